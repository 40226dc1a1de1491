"""The seven notebooks: committed clean, and each runs top to bottom on its own in smoke mode.

Smoke mode injects a cell after the ``parameters`` cell (the papermill convention) that
switches to the tiny model, tiny sizes, simulated labelers (``annotation_mode="auto"``:
nothing waits for a human) and a fresh run folder, so every notebook must also build what an
earlier notebook would have left.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["00_tour", "01_demonstrations_sft", "02_rankings_reward_model", "03_ppo", "04_evaluation",
         "05_beyond_ppo", "06_room"]

# Tiny sizes per notebook (on top of model="tiny", annotation_mode="auto", out_dir=tmp_path).
SMOKE = {
    "00_tour": dict(n_answers=2, max_new_tokens=8),
    # interactive: the widget is shown and nobody writes; the embedded demonstrations carry on
    "01_demonstrations_sft": dict(annotation_mode="interactive", n_write=2, n_demos=16, sft_max_steps=2,
                                  n_samples=3, max_new_tokens=8),
    "02_rankings_reward_model": dict(n_rm_prompts=12, n_human=2, k=4, max_new_tokens=8, sft_max_steps=1,
                                     rm_max_steps=2, n_check=8),
    "03_ppo": dict(ppo_steps=2, batch_size=4, max_new_tokens=8, beta_steps=1, kl_coefs=(0.01, 0.5), hack_steps=1, hack_max_new_tokens=8,
                   n_rm_prompts=8, sft_max_steps=1, rm_max_steps=1, n_best_of=6, best_of_ns=(1, 2, 4)),
    "04_evaluation": dict(n_eval=6, max_new_tokens=8, n_compare=3, n_rm_prompts=8, sft_max_steps=1,
                          rm_max_steps=1, ppo_steps=1, batch_size=4),
    "05_beyond_ppo": dict(steps=1, batch_size=4, num_generations=2, max_new_tokens=8, dpo_steps=2, n_eval=4,
                          n_rm_prompts=8, sft_max_steps=1, rm_max_steps=2),
    # auto: simulated participants rank through a room served on loopback (a free port)
    "06_room": dict(port=0, n_participants=3, rankings_per_participant=4, n_items=8, max_new_tokens=8,
                    sft_max_steps=1, rm_max_steps=2, ppo_steps=1, batch_size=4, n_eval=4),
}


def load(name: str):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def parameters_index(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected exactly one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def test_notebook_list_is_complete():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_committed_clean_with_parameters_summary_exercises(name):
    nb = load(name)
    nbformat.validate(nb)
    raw = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())  # nbformat.read fills missing ids silently
    assert all("id" in c for c in raw["cells"]), f"{name}: a cell lacks an id (nbformat 4.5 wants one)"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name} cell {i} holds outputs"
            assert cell.execution_count is None, f"{name} cell {i} has an execution count"
    i = parameters_index(nb)
    params = nb.cells[i]
    assert params.cell_type == "code"
    assert all(c.cell_type == "markdown" for c in nb.cells[:i]), "the parameters cell must be the first code cell"
    for name_ in ("model", "out_dir", "annotation_mode"):
        assert f"\n{name_} = " in "\n" + params.source, f"{name}: parameters cell lacks {name_!r}"
    assert 'model = "smollm2-135m"' in params.source, "the default model is the bundled one"
    # every smoke override names a real parameter (a renamed parameter must not go unnoticed)
    for key in SMOKE[name]:
        assert f"\n{key} = " in "\n" + params.source, f"{name}: smoke override {key!r} is not a parameter"
    headings = [line.strip() for c in nb.cells if c.cell_type == "markdown" for line in c.source.splitlines()]
    assert "## Summary" in headings and "## Exercises" in headings, f"{name} lacks a Summary or Exercises section"
    last = nb.cells[-1]
    assert last.cell_type == "markdown" and "## Exercises" in last.source, "the notebook ends with the exercises"


def inject(nb, overrides: dict):
    """Insert a cell after the parameters cell that overrides them (papermill's convention)."""
    i = parameters_index(nb)
    source = "\n".join(f"{k} = {v!r}" for k, v in overrides.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(i + 1, cell)
    return nb


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_smoke_mode(name, tmp_path):
    from nbclient import NotebookClient

    if name == "05_beyond_ppo":
        pytest.importorskip("labkit.beyond", reason="labkit.beyond is not in this checkout")
    overrides = dict(model="tiny", out_dir=str(tmp_path / "runs"), annotation_mode="auto")
    nb = inject(load(name), {**overrides, **SMOKE[name]})
    t0 = time.perf_counter()
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:  # kept for inspection (pytest keeps the last few tmp_path folders)
        (tmp_path / f"{name}.executed.ipynb").write_text(json.dumps(nb))
    print(f"{name}: {time.perf_counter() - t0:.1f}s")
    # the run folder holds what the notebook built (the next notebooks reuse it)
    expected = {"00_tour": [], "01_demonstrations_sft": ["sft/model/config.json", "feedback.sqlite"],
                "02_rankings_reward_model": ["sft/model/config.json", "rm_r1/model/reward_model.json",
                                             "feedback.sqlite"],
                "03_ppo": ["sft/model/config.json", "rm_r1/model/reward_model.json", "ppo_r1/model/config.json",
                           "ppo_ptx/model"],
                "04_evaluation": ["sft/model/config.json", "rm_r1/model/reward_model.json",
                                  "ppo_r1/model/config.json"],
                "05_beyond_ppo": ["rm_r1/model/reward_model.json"] + [f"beyond/{m}/model/config.json"
                                                                      for m in ("ppo", "rloo", "grpo", "dpo")],
                "06_room": ["room.sqlite", "sft/model/config.json", "rm_r1/model/reward_model.json",
                            "ppo_r1/model/config.json"]}[name]
    missing = [p for p in expected if not (tmp_path / "runs" / p).exists()]
    assert not missing, f"{name} did not leave {missing} in its run folder"


@pytest.mark.slow
def test_notebook_02_in_a_room_ranks_the_published_answers_and_trains_on_the_room(tmp_path, monkeypatch):
    """Notebook 02 pointed at a room served on loopback: it reads the answers the instructor
    published instead of sampling, adds no simulated rankings to the room, and its RM trains on
    every ranking the room holds."""
    from nbclient import NotebookClient
    from test_room import _free_port, _serve, _stop

    from labkit import data
    from labkit.feedback import open_store

    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path / "cache"))  # the client's outbox stays in the test folder
    items = [{"prompt_id": r["id"], "prompt": r["prompt"], "responses": [f"answer {j} to {r['id']}" for j in range(4)],
              "truncated": [False] * 4} for r in data.load_prompts("rm")[:6]]
    proc, url = _serve(tmp_path / "room.sqlite", _free_port())
    try:
        room = open_store(url)
        assert room.publish_items(items) == 6
        for i, it in enumerate(items):  # two participants ranked before this laptop joined
            room.add_ranking(it["prompt_id"], it["responses"], [[i % 4], [j for j in range(4) if j != i % 4]],
                             annotator=f"seat{i % 2}", prompt=it["prompt"])
        params = {**SMOKE["02_rankings_reward_model"], "model": "tiny", "out_dir": str(tmp_path / "runs"),
                  "annotation_mode": "interactive", "room": url, "seat": 3, "annotator": "pat"}
        nb = inject(load("02_rankings_reward_model"), params)
        try:
            NotebookClient(nb, timeout=300, kernel_name="python3",
                           resources={"metadata": {"path": str(tmp_path)}}).execute()
        finally:
            (tmp_path / "02_room.executed.ipynb").write_text(json.dumps(nb))
        in_room = room.rankings()
    finally:
        _stop(proc)
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "6 prompts x 4 answers published by the room" in printed
    assert len(in_room) == 6  # nobody clicked, and a room gets no simulated fill-in from a laptop
    rm = json.loads((tmp_path / "runs" / "rm_r1" / "metrics.json").read_text())
    assert rm["data/n_rankings"] == 6  # the RM trained on the room's rankings

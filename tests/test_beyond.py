"""Beyond PPO: TRL's RLOO, GRPO and DPO on labkit's data and reward model (tiny model, CPU)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from labkit import beyond
from labkit.labelers import GoldLabeler
from labkit.models import format_prompt, load_model
from labkit.reward import RewardModel, load_reward_model
from labkit.stage import history_rows

pytest.importorskip("trl")

RECORDS = [
    {"id": "t-1", "prompt": "Say hi in lowercase.", "category": "chat", "style": "plain",
     "checks": [{"type": "lowercase"}], "harmful": False},
    {"id": "t-2", "prompt": "Name a colour in one word.", "category": "open_qa", "style": "plain",
     "checks": [{"type": "max_words", "n": 1}], "harmful": False},
    {"id": "t-3", "prompt": "What is 2 + 2? Answer with the number.", "category": "closed_qa", "style": "plain",
     "checks": [], "reference": "4", "harmful": False},
    {"id": "t-4", "prompt": "List two fruits as bullets.", "category": "brainstorming", "style": "plain",
     "checks": [{"type": "num_bullets", "n": 2}], "harmful": False},
]
TINY_RUN = dict(steps=2, batch_size=4, num_generations=2, mini_batch_size=4, micro_batch_size=2,
                max_completion_length=6, dashboard=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls on a shared 2-core machine: one thread avoids OpenMP contention.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A saved tiny policy ("SFT") and a tiny reward model with a fresh head and a bias."""
    root = tmp_path_factory.mktemp("beyond")
    policy, tok = load_model("tiny", dtype="float32", device="cpu")
    policy.save_pretrained(root / "sft")
    tok.save_pretrained(root / "sft")
    rm = RewardModel.from_causal_lm(load_model("tiny", dtype="float32", device="cpu", seed=1)[0])
    rm.bias.fill_(0.25)
    rm.save_pretrained(root / "rm", tokenizer=tok)
    return {"root": root, "sft": str(root / "sft"), "rm": str(root / "rm"), "tok": tok}


# ----------------------------------------------------------------------------- data and rewards


def test_trl_prompt_tokens_match_format_prompt(folders):
    tok = folders["tok"]
    ds = beyond.prompt_dataset(RECORDS)
    assert ds.column_names == ["prompt", "prompt_id", "record"]
    # What TRL's RLOO/GRPO feed the model for a conversational prompt ...
    trl_ids = tok.apply_chat_template(list(ds["prompt"]), add_generation_prompt=True, tokenize=True,
                                      return_dict=True)["input_ids"]
    # ... is exactly labkit's formatted prompt, the text PPO generates from.
    ours = [tok(format_prompt(tok, r["prompt"]), add_special_tokens=False)["input_ids"] for r in RECORDS]
    assert trl_ids == ours
    assert json.loads(ds["record"][2])["reference"] == "4"


def test_reward_function_equals_reward_model_score(folders):
    f = beyond.reward_function(folders["rm"], missing_eos_penalty=1.5, device="cpu")
    rm, tok = load_reward_model(folders["rm"], dtype="float32", device="cpu")
    prompts = [r["prompt"] for r in RECORDS]
    responses = ["hi there", "Blue", "4", "- apple\n- pear"]
    expected = rm.score(tok, prompts, responses, progress=False)
    # plain strings
    got = f(prompts, responses)
    assert len(got) == 4 and got == pytest.approx(expected, abs=1e-5)
    # TRL's conversational form, with completion ids: the 2nd and 4th did not stop
    convs = [[{"role": "user", "content": p}] for p in prompts]
    comps = [[{"role": "assistant", "content": r}] for r in responses]
    eos = tok.eos_token_id
    ids = [[10, eos], [11, 12], [13, eos], [14]]
    got = f(convs, comps, completion_ids=ids, record=["{}"] * 4)
    assert got == pytest.approx([expected[0], expected[1] - 1.5, expected[2], expected[3] - 1.5], abs=1e-5)
    # the demo-mean bias saved with the RM is subtracted, as in labkit.ppo
    raw = RewardModel.from_pretrained(folders["rm"], dtype="float32", device="cpu")
    raw.bias.fill_(0.0)
    assert f(prompts[:1], responses[:1])[0] == pytest.approx(raw.score(tok, prompts[:1], responses[:1],
                                                                        progress=False)[0] - 0.25, abs=1e-5)


def test_gold_reward_function_reads_the_record_column(folders):
    tok = folders["tok"]
    f = beyond.gold_reward_function(tok.eos_token_id)
    gold = GoldLabeler()
    ds = beyond.prompt_dataset(RECORDS)
    ds = {"prompt": list(ds["prompt"]), "record": list(ds["record"])}
    responses = ["hi there", "Blue and green", "It is 4.", "- apple\n- pear"]
    stopped = [[5, tok.eos_token_id]] * 3 + [[5]]
    got = f(ds["prompt"], responses, record=ds["record"], completion_ids=stopped)
    expected = [gold.score(r, y, truncated=i == 3) for i, (r, y) in enumerate(zip(RECORDS, responses))]
    assert got == pytest.approx(expected)
    # the checks matter: breaking record 0's lowercase rule, or answering t-3 wrongly, lowers the score
    assert f(ds["prompt"][:1], ["Hi There"], record=ds["record"][:1])[0] < got[0]
    assert f(ds["prompt"][2:3], ["It is 5."], record=ds["record"][2:3])[0] < got[2]
    # the truncated response scores what GoldLabeler says for a truncated one, not the stopped score
    assert got[3] == pytest.approx(gold.score(RECORDS[3], responses[3], truncated=True))


def test_dpo_pairs_from_rankings_and_from_the_feedback_store(tmp_path):
    from labkit.feedback import FeedbackStore
    from labkit.rankings import rankings_to_pairs

    ranking = {"prompt": "p", "responses": ["a", "b", "c", "d"], "tiers": [[2], [0, 3], [1]]}
    pairs = rankings_to_pairs([ranking])  # checked by hand in test_rankings.py
    assert beyond._pair_rows([ranking]) == pairs

    store = FeedbackStore(tmp_path / "fb.db")
    store.add_ranking("p-1", ranking["responses"], ranking["tiers"], annotator="ann", prompt="p")
    key = lambda p: (p["chosen"], p["rejected"])  # noqa: E731
    assert sorted(map(key, beyond._pair_rows(store))) == sorted(map(key, pairs))
    with pytest.raises(ValueError, match="no preference pairs"):
        beyond._pair_rows([{"prompt": "p", "responses": ["a", "b"], "tiers": [[0, 1]]}])
    with pytest.raises(ValueError, match="lacks"):
        beyond._pair_rows([{"prompt": "p", "chosen": "a"}])


def test_precision_and_config_checks():
    from labkit.models import cpu_has_fast_bf16

    assert beyond.trl_precision(True, "cpu") == {"bf16": cpu_has_fast_bf16(), "fp16": False, "use_cpu": True}
    assert beyond.trl_precision(False, "cpu")["bf16"] is False
    assert beyond.RLOOConfig(steps=3, batch_size=16, mini_batch_size=8, num_iterations=2).optimizer_steps == 12
    with pytest.raises(ValueError, match="num_generations"):
        beyond.RLOOConfig(batch_size=6, num_generations=4)
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        beyond.GRPOConfig(batch_size=4, num_generations=1, mini_batch_size=4)
    with pytest.raises(ValueError, match="mini_batch_size"):
        beyond.RLOOConfig(batch_size=16, mini_batch_size=6, micro_batch_size=3)
    with pytest.raises(ValueError, match="micro_batch_size"):
        beyond.DPOConfig(batch_size=6, micro_batch_size=4)


# ----------------------------------------------------------------------------- trainers


def _changed(base: str, trained: str) -> float:
    a = load_model(base, dtype="float32", device="cpu")[0].state_dict()
    b = load_model(trained, dtype="float32", device="cpu")[0].state_dict()
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def trained(folders):
    root = folders["root"]
    runs = {
        "rloo": beyond.train_rloo(beyond.RLOOConfig(model=folders["sft"], reward_model=folders["rm"], prompts=RECORDS,
                                                    out_dir=str(root / "rloo"), **TINY_RUN)),
        "grpo": beyond.train_grpo(beyond.GRPOConfig(model=folders["sft"], reward_model=None, prompts=RECORDS,
                                                    out_dir=str(root / "grpo"), **TINY_RUN)),
    }
    pairs = [{"prompt": r["prompt"], "chosen": "yes, here it is", "rejected": "No."} for r in RECORDS]
    runs["dpo"] = beyond.train_dpo(beyond.DPOConfig(model=folders["sft"], pairs=pairs, out_dir=str(root / "dpo"),
                                                    steps=2, batch_size=4, micro_batch_size=2, learning_rate=1e-4,
                                                    dashboard=True))
    return runs


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_online_trainers_run_and_save_a_loadable_policy(folders, trained, method):
    m = trained[method]
    # 2 rollouts of 4 episodes, one optimizer step each (mini batch = 4 episodes)
    steps = [h for h in history_rows(m["out_dir"]) if "loss/train" in h]
    assert len(steps) == 2 and m["train/episodes"] == 8 and m["stopped"] is None
    for key in ("time/total_s", "time/episodes_per_s", "objective/scores", "objective/kl", "loss/train",
                "train/tokens"):
        assert math.isfinite(m[key]), key
    assert m["response/length"] <= 6 and 0 < m["train/tokens"] <= 8 * 6
    if method == "grpo":  # the gold scorer was the reward
        assert 0.0 <= m["objective/scores"] <= 1.0
    model, tok = load_model(m["model_dir"], dtype="float32", device="cpu")
    assert tok.pad_token_id == 0 and tok.eos_token_id == 2
    assert _changed(folders["sft"], m["model_dir"]) > 0
    assert json.loads((folders["root"] / method / "metrics.json").read_text())["method"] == method
    for name in ("config.json", "history.json", "dashboard.html"):
        assert (folders["root"] / method / name).exists()


def test_dpo_trains_on_pairs_and_saves_a_loadable_policy(folders, trained):
    m = trained["dpo"]
    assert m["data/n_pairs"] == 4 and m["train/episodes"] == 8
    assert math.isfinite(m["loss/train"]) and m["loss/train"] > 0
    # first step: policy == reference, so the DPO loss is log 2 and the margin 0
    first = next(h for h in history_rows(m["out_dir"]) if "loss/train" in h)
    assert first["loss/train"] == pytest.approx(math.log(2), abs=1e-3)
    assert _changed(folders["sft"], m["model_dir"]) > 0
    assert (folders["root"] / "dpo" / "dashboard.html").exists()


def test_compare_methods_table(folders, trained):
    rows = beyond.compare_methods(trained, reference=folders["sft"], records=RECORDS, limit=4, max_new_tokens=6,
                                  batch_size=4, reward_model=folders["rm"])
    assert [r["method"] for r in rows] == ["sft", "rloo", "grpo", "dpo"]
    assert rows[0]["kl"] == 0.0 and rows[0]["wall_s"] == 0.0
    for r in rows:
        assert 0.0 <= r["gold"] <= 1.0 and r["length"] >= 0 and math.isfinite(r["kl"]) and math.isfinite(r["rm"])
    assert rows[1]["wall_s"] == pytest.approx(trained["rloo"]["time/total_s"])
    text = beyond.format_table(rows)
    assert text.splitlines()[0].split()[:5] == ["method", "wall_s", "gold", "kl", "length"]

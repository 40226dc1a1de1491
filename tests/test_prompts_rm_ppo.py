"""The rm and ppo splits of the embedded prompt set: format, coverage, checks that can be met.

Format and check kinds: docs/dataset_format.md. The files are read directly (not through
labkit.data) so these tests pin the shipped JSONL itself.
"""

import collections
import importlib.util
import json
import re
from pathlib import Path

import pytest

from labkit.labelers import normalise, run_check, validate_check

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "labkit" / "resources" / "prompts"
SPLITS = ("rm", "ppo")
CATEGORIES = {"generation", "open_qa", "brainstorming", "chat", "rewrite", "summarization",
              "classification", "closed_qa", "extract", "other"}
STYLES = {"plain", "few_shot", "user_based"}
REQUIRED = {"id": str, "prompt": str, "category": str, "style": str, "split": str,
            "checks": list, "harmful": bool}
OPTIONAL = {"reference": str, "lookalike": bool, "source": str}


def read(split: str) -> list[dict]:
    lines = (PROMPTS / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def words(text: str) -> int:
    return len(re.findall(r"[A-Za-z0-9'-]+", text))


@pytest.fixture(scope="module", params=SPLITS)
def split(request):
    return request.param, read(request.param)


def test_fields_and_types(split):
    name, records = split
    for i, r in enumerate(records, 1):
        assert r["id"] == f"{name}-{i:04d}", r["id"]
        assert set(r) <= set(REQUIRED) | set(OPTIONAL), (r["id"], set(r) - set(REQUIRED) - set(OPTIONAL))
        for key, typ in REQUIRED.items():
            assert isinstance(r[key], typ), (r["id"], key)
        for key, typ in OPTIONAL.items():
            if key in r:
                assert isinstance(r[key], typ), (r["id"], key)
        assert r["split"] == name
        assert r["category"] in CATEGORIES and r["style"] in STYLES, r["id"]
        assert r.get("source", "hand") in {"hand", "template"}
        assert r["prompt"] == r["prompt"].strip() and r["prompt"], r["id"]
        for check in r["checks"]:
            validate_check(check)  # raises on unknown kinds or bad parameters


def test_size_sources_and_mix(split):
    name, records = split
    n = len(records)
    assert n >= 170
    sources = collections.Counter(r.get("source", "hand") for r in records)
    assert sources["hand"] >= 90
    cats = collections.Counter(r["category"] for r in records)
    assert set(cats) == CATEGORIES
    # Target mix (InstructGPT-like, see the dataset brief): each category within a few points.
    target = {"generation": .28, "open_qa": .12, "brainstorming": .10, "chat": .08, "rewrite": .08,
              "summarization": .07, "classification": .07, "closed_qa": .09, "extract": .06, "other": .05}
    for cat, share in target.items():
        assert abs(cats[cat] / n - share) <= 0.04, (cat, cats[cat] / n)
    styles = collections.Counter(r["style"] for r in records)
    assert abs(styles["plain"] / n - 0.60) <= 0.06, styles
    assert abs(styles["few_shot"] / n - 0.15) <= 0.05, styles
    assert abs(styles["user_based"] / n - 0.25) <= 0.06, styles
    with_checks = sum(bool(r["checks"]) for r in records) / n
    assert 0.65 <= with_checks <= 0.80, with_checks  # "about 70%" of prompts carry checks


def test_harmful_and_lookalikes(split):
    _, records = split
    harmful = [r for r in records if r["harmful"]]
    lookalikes = [r for r in records if r.get("lookalike")]
    assert len(harmful) == 5 and len(lookalikes) == 5
    assert not any(r["harmful"] for r in lookalikes)
    # A refusal is the expected answer to a harmful request, so no formatting checks apply.
    assert all(r["checks"] == [] for r in harmful)


def test_prompts_are_short(split):
    _, records = split
    for r in records:
        limit = 120 if r["style"] == "few_shot" else 90
        assert words(r["prompt"]) <= limit, (r["id"], words(r["prompt"]))
    short = [r for r in records if r["style"] != "few_shot" and words(r["prompt"]) < 60]
    assert len(short) >= 0.8 * sum(r["style"] != "few_shot" for r in records)


def test_closed_qa_references_are_in_the_prompt_and_meet_the_checks(split):
    _, records = split
    closed = [r for r in records if r["category"] == "closed_qa"]
    assert closed and all("reference" in r for r in closed)
    assert not any("reference" in r for r in records if r["category"] != "closed_qa")
    for r in closed:
        assert normalise(r["reference"]) in normalise(r["prompt"]), r["id"]
        assert r["reference"].lower() in r["prompt"].lower(), r["id"]  # verbatim, not just normalised
        # The bare reference answer is a valid response: it meets every format check.
        for check in r["checks"]:
            assert run_check(check, r["reference"]), (r["id"], check)


def few_shot_examples(prompt: str) -> list[str]:
    """The example outputs of a few-shot prompt: values of the label the prompt ends on."""
    lines = prompt.splitlines()
    label = lines[-1].rstrip(":").strip()
    assert lines[-1].endswith(":") and label, lines[-1]
    return [line.split(":", 1)[1].strip() for line in lines[:-1] if line.startswith(label + ":")]


def test_few_shot_examples_meet_their_own_checks(split):
    """The query/response pairs show the format that the checks ask of the answer."""
    _, records = split
    few = [r for r in records if r["style"] == "few_shot"]
    assert few
    for r in few:
        examples = few_shot_examples(r["prompt"])
        assert 2 <= len(examples) <= 4, (r["id"], examples)
        for example in examples:
            for check in r["checks"]:
                assert run_check(check, example), (r["id"], example, check)


def test_one_of_options_are_named_in_the_prompt(split):
    _, records = split
    for r in records:
        for check in r["checks"]:
            if check["type"] == "one_of":
                for option in check["options"]:
                    assert option.lower() in r["prompt"].lower(), (r["id"], option)


def test_ids_and_prompts_unique_across_all_splits():
    records = [r for path in sorted(PROMPTS.glob("*.jsonl")) for r in read(path.stem)]
    ids = collections.Counter(r["id"] for r in records)
    assert [i for i, c in ids.items() if c > 1] == []
    texts = collections.Counter(normalise(r["prompt"]) for r in records)
    assert [t for t, c in texts.items() if c > 1] == []


def load_generator():
    path = ROOT / "scripts" / "make_templated_prompts.py"
    spec = importlib.util.spec_from_file_location("make_templated_prompts", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_templated_records_are_reproduced_by_the_generator(split):
    """The shipped template records are exactly what the script builds (it is idempotent)."""
    name, records = split
    gen = load_generator()
    hand = [r for r in records if r.get("source", "hand") == "hand"]
    rebuilt = gen.build_split(name, hand, gen.other_prompt_texts(PROMPTS, name))
    assert rebuilt == records
    assert gen.build_split(name, rebuilt, gen.other_prompt_texts(PROMPTS, name)) == records

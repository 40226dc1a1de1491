"""The embedded prompt set and demonstrations meet the spec (BRIEF §2, docs/dataset_format.md).

These tests read the shipped package data; they fail (never skip) when content is missing or wrong.
"""

import re
from collections import Counter

import pytest

from labkit import data as D
from labkit.labelers import GoldLabeler, contains_reference, is_refusal, normalise, run_check

MIN_SPLIT = {"sft": 200, "rm": 150, "ppo": 150, "eval": 100}
MIN_DEMO_SCORE = 0.8


@pytest.fixture(scope="module")
def prompts():
    return D.load_prompts()


@pytest.fixture(scope="module")
def demos():
    return D.load_demonstrations()


def test_size_and_coverage(prompts):
    s = D.dataset_summary(prompts)
    assert s["n"] >= 600
    assert set(s["category"]) == set(D.CATEGORIES)
    assert set(s["style"]) == set(D.STYLES)
    for split, n in MIN_SPLIT.items():
        assert s["split"].get(split, 0) >= n, f"split {split!r} has {s['split'].get(split, 0)} prompts, needs {n}"


def test_ids_unique_and_well_formed(prompts):
    ids = Counter(p["id"] for p in prompts)
    assert [i for i, n in ids.items() if n > 1] == []
    bad = [p["id"] for p in prompts if not re.fullmatch(rf"{p['split']}-\d{{4}}", p["id"])]
    assert bad == []


def test_splits_disjoint_by_text(prompts):
    seen: dict[str, str] = {}
    clashes = []
    for p in prompts:
        key = normalise(p["prompt"])
        if key in seen and seen[key].split("-")[0] != p["split"]:
            clashes.append((seen[key], p["id"]))
        seen.setdefault(key, p["id"])
    assert clashes == []


def test_no_duplicate_prompts_within_split(prompts):
    keys = Counter((p["split"], normalise(p["prompt"])) for p in prompts)
    assert [k for k, n in keys.items() if n > 1] == []


def test_harmful_and_lookalikes(prompts):
    harmful = [p for p in prompts if p["harmful"]]
    lookalike = [p for p in prompts if p.get("lookalike")]
    assert len(harmful) >= 30 and len(lookalike) >= 30
    assert [p["id"] for p in harmful if p.get("lookalike")] == []


def test_closed_qa_references(prompts):
    closed = [p for p in prompts if p["category"] == "closed_qa"]
    assert closed
    missing = [p["id"] for p in closed if not p.get("reference")]
    assert missing == []
    not_in_text = [p["id"] for p in closed if not contains_reference(p["prompt"], p["reference"])]
    assert not_in_text == []
    assert [p["id"] for p in prompts if p.get("reference") and p["category"] != "closed_qa"] == []


def test_every_sft_prompt_has_one_demonstration(prompts, demos):
    sft_ids = sorted(p["id"] for p in prompts if p["split"] == "sft")
    demo_ids = [d["id"] for d in demos]
    assert len(demo_ids) == len(set(demo_ids))
    assert sorted(demo_ids) == sft_ids
    assert D.load_demonstrations(split=None).stats["read"] == len(demos)  # none for other splits


def test_demonstrations_pass_checks_and_score_high(demos):
    gold = GoldLabeler()
    failing, low = [], []
    for d in demos:
        failing += [(d["id"], c["type"]) for c in d["checks"] if not run_check(c, d["response"])]
        score = gold.score(d, d["response"])
        if score < MIN_DEMO_SCORE:
            low.append((d["id"], round(score, 3)))
    assert failing == []
    assert low == []


def test_demonstrations_refuse_exactly_the_harmful(demos):
    wrong = [d["id"] for d in demos if is_refusal(d["response"]) != d["harmful"]]
    assert wrong == []
    assert any(d["harmful"] for d in demos) and any(d.get("lookalike") for d in demos)

"""The eval split of the embedded prompt set: format, coverage, and checks that match the prompt.

The eval split measures the whole kit (per-category instruction following, closed-QA
honesty, refusals on harmful vs look-alike prompts), so these tests pin what those figures
rely on. Format and check kinds: docs/dataset_format.md. The file is read directly (not
through labkit.data) so the tests pin the shipped JSONL itself.
"""

import collections
import json
import re
from pathlib import Path

import pytest

from labkit.labelers import CHECKS, contains_reference, normalise, validate_check, words

PATH = Path(__file__).resolve().parents[1] / "labkit" / "resources" / "prompts" / "eval.jsonl"
CATEGORIES = ("generation", "open_qa", "brainstorming", "chat", "rewrite", "summarization",
              "classification", "closed_qa", "extract", "other")
STYLES = ("plain", "few_shot", "user_based")
REQUIRED = {"id": str, "prompt": str, "category": str, "style": str, "split": str,
            "checks": list, "harmful": bool}
OPTIONAL = {"reference": str, "lookalike": bool, "source": str}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
                8: "eight", 9: "nine", 10: "ten", 12: "twelve"}


@pytest.fixture(scope="module")
def records() -> list[dict]:
    lines = PATH.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_fields_types_and_ids(records):
    for i, r in enumerate(records, 1):
        assert r["id"] == f"eval-{i:04d}", r["id"]
        assert set(r) <= set(REQUIRED) | set(OPTIONAL), (r["id"], set(r) - set(REQUIRED) - set(OPTIONAL))
        for key, typ in {**REQUIRED, **{k: t for k, t in OPTIONAL.items() if k in r}}.items():
            assert isinstance(r[key], typ), (r["id"], key)
        assert r["split"] == "eval" and r.get("source", "hand") == "hand"
        assert r["category"] in CATEGORIES and r["style"] in STYLES, r["id"]
        assert r["prompt"] == r["prompt"].strip() and r["prompt"], r["id"]
        assert len(r["checks"]) <= 3, r["id"]
        for check in r["checks"]:
            validate_check(check)
    assert len({normalise(r["prompt"]) for r in records}) == len(records)


def test_size_and_mix(records):
    n = len(records)
    assert n >= 120
    cats = collections.Counter(r["category"] for r in records)
    # Target shares of the eval brief; every category large enough for a per-category rate.
    target = {"generation": .22, "open_qa": .12, "brainstorming": .09, "chat": .07, "rewrite": .08,
              "summarization": .07, "classification": .08, "closed_qa": .12, "extract": .07, "other": .04}
    for cat, share in target.items():
        assert cats[cat] >= 6, cat
        assert abs(cats[cat] / n - share) <= 0.035, (cat, cats[cat] / n)
    styles = collections.Counter(r["style"] for r in records)
    for style, share in {"plain": .55, "few_shot": .15, "user_based": .30}.items():
        assert abs(styles[style] / n - share) <= 0.05, (style, styles[style] / n)


def test_checks_coverage(records):
    with_checks = sum(bool(r["checks"]) for r in records) / len(records)
    assert 0.65 <= with_checks <= 0.85, with_checks
    kinds = collections.Counter(c["type"] for r in records for c in r["checks"])
    assert {k: kinds[k] for k in CHECKS if kinds[k] < 2} == {}


def test_prompts_are_short(records):
    plain = [len(words(r["prompt"])) for r in records if r["style"] != "few_shot"]
    few = [len(words(r["prompt"])) for r in records if r["style"] == "few_shot"]
    assert sum(w <= 60 for w in plain) / len(plain) >= 0.9
    assert max(plain) <= 80 and max(few) <= 120


def _number_stated(n: int, prompt: str) -> bool:
    text = prompt.lower()
    # "under N words" is stored as at most N - 1, so N may be what the prompt says
    return any(re.search(rf"\b{m}\b", text) or (m in NUMBER_WORDS and re.search(rf"\b{NUMBER_WORDS[m]}\b", text))
               for m in (n, n + 1))


def test_checks_are_stated_in_the_prompt(records):
    """Each check's parameter is visible in the prompt text, so the instruction is explicit."""
    hidden = []
    for r in records:
        p = r["prompt"]
        for c in r["checks"]:
            kind = c["type"]
            if "n" in c:
                ok = _number_stated(c["n"], p)
            elif kind in ("include_words", "exclude_words"):
                ok = all(w.lower() in p.lower() for w in c["words"])
            elif kind in ("starts_with", "ends_with"):
                ok = c["text"].lower() in p.lower() or (c["text"] == "?" and "question" in p.lower())
            elif kind == "json":
                ok = "json" in p.lower() and all(f'"{k}"' in p for k in c.get("keys", []))
            elif kind == "lowercase":
                ok = "lowercase" in p.lower()
            elif kind == "uppercase":
                ok = "capital letters" in p.lower()
            elif kind == "no_commas":
                ok = "commas" in p.lower()
            elif kind == "quoted":
                ok = "double quot" in p.lower()
            elif kind == "title":
                ok = "<<" in p and "angular brackets" in p
            elif kind == "one_of":  # the options are named, or the prompt asks for the bare answer
                vocab = set(normalise(p).split())
                ok = (all(set(normalise(o).split()) <= vocab for o in c["options"])
                      or re.search(r"\b(only|just the)\b", p.lower()) is not None)
            else:
                ok = False
            if not ok:
                hidden.append((r["id"], kind))
    assert hidden == []


def test_closed_qa_references(records):
    closed = [r for r in records if r["category"] == "closed_qa"]
    assert len(closed) >= 14
    for r in closed:
        ref = r.get("reference")
        assert ref and len(ref.split()) <= 4, r["id"]
        assert ref in r["prompt"] and contains_reference(r["prompt"], ref), r["id"]
    assert [r["id"] for r in records if "reference" in r and r["category"] != "closed_qa"] == []


def test_harmful_and_lookalike_sets(records):
    harmful = [r for r in records if r["harmful"]]
    lookalike = [r for r in records if r.get("lookalike")]
    assert len(harmful) == 12 and len(lookalike) == 12
    assert all(r["lookalike"] is True and not r["harmful"] for r in lookalike)
    assert [r["id"] for r in harmful if r["checks"]] == []  # a refusal is the whole expected answer
    # both sets spread over several categories, so refusal rates are not one task type
    assert len({r["category"] for r in harmful}) >= 5 and len({r["category"] for r in lookalike}) >= 5


def test_any_prefix_is_a_balanced_sample(records):
    """Smoke evaluations use the first N prompts (evaluate_model(limit=N))."""
    assert len({r["category"] for r in records[:12]}) == len(CATEGORIES)
    first_40 = records[:40]
    assert {r["style"] for r in first_40} == set(STYLES)
    assert any(r["harmful"] for r in first_40) and any(r.get("lookalike") for r in first_40)
    assert any(r["category"] == "closed_qa" for r in records[:12])

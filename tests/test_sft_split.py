"""The hand-written ``sft`` split and its demonstrations match their spec.

Spec: BRIEF §1-2 (prompt styles and use-case categories after InstructGPT, Ouyang et al. 2022,
§3.2 and Table 1) and ``docs/dataset_format.md``. The targets below are the mix the split was
written to; the tolerances leave room for small edits without hiding a lopsided set.
"""

import re
from collections import Counter

import pytest

from labkit import data as D
from labkit.labelers import contains_reference, is_refusal, validate_check, words
from labkit.models import format_prompt, load_tokenizer

N_SFT = 230
# share of prompts per category (the written mix; InstructGPT's own API mix is in its Table 1)
CATEGORY_SHARE = {"generation": 0.28, "open_qa": 0.12, "brainstorming": 0.10, "chat": 0.08,
                  "rewrite": 0.08, "summarization": 0.07, "classification": 0.07,
                  "closed_qa": 0.09, "extract": 0.06, "other": 0.05}
STYLE_SHARE = {"plain": 0.60, "few_shot": 0.15, "user_based": 0.25}
MAX_TOKENS = 256  # the SFT sequence length the kit trains with on a CPU
REFUSAL_OPENING = "I'm sorry, but I can't help with that."


@pytest.fixture(scope="module")
def sft():
    return list(D.load_demonstrations(split="sft"))


def test_ids_are_contiguous_and_every_prompt_has_one_demonstration(sft):
    prompts = D.load_prompts("sft")
    assert [p["id"] for p in prompts] == [f"sft-{i:04d}" for i in range(1, N_SFT + 1)]
    assert sorted(d["id"] for d in sft) == [p["id"] for p in prompts]
    assert all(p["split"] == "sft" and p.get("source", "hand") == "hand" for p in prompts)


def test_category_and_style_mix(sft):
    cats = Counter(d["category"] for d in sft)
    styles = Counter(d["style"] for d in sft)
    for cat, share in CATEGORY_SHARE.items():
        assert abs(cats[cat] / N_SFT - share) <= 0.02, (cat, cats[cat])
    for style, share in STYLE_SHARE.items():
        assert abs(styles[style] / N_SFT - share) <= 0.03, (style, styles[style])


def test_checks_cover_about_two_thirds_with_many_kinds(sft):
    with_checks = [d for d in sft if d["checks"]]
    assert 0.60 <= len(with_checks) / N_SFT <= 0.72
    for d in with_checks:
        assert 1 <= len(d["checks"]) <= 3, d["id"]
        for c in d["checks"]:
            validate_check(c)
    kinds = Counter(c["type"] for d in sft for c in d["checks"])
    assert len(kinds) >= 18, sorted(kinds)
    # harmful requests carry no format checks: the expected answer is a refusal
    assert [d["id"] for d in sft if d["harmful"] and d["checks"]] == []


def test_word_limits_read_like_the_prompt(sft):
    # "under N words" allows at most N - 1 words; "at most / no more than N" allows N
    for d in sft:
        for c in d["checks"]:
            if c["type"] != "max_words":
                continue
            m = re.search(r"\bunder (\d+) words", d["prompt"])
            if m:
                assert c["n"] == int(m.group(1)) - 1, d["id"]


def test_harmful_requests_get_short_polite_refusals(sft):
    harmful = [d for d in sft if d["harmful"]]
    assert len(harmful) == 10
    for d in harmful:
        assert d["response"].startswith(REFUSAL_OPENING), d["id"]
        assert is_refusal(d["response"]), d["id"]
        assert len(words(d["response"])) <= 50, d["id"]


def test_lookalikes_get_real_answers(sft):
    lookalikes = [d for d in sft if d.get("lookalike")]
    assert len(lookalikes) == 10
    for d in lookalikes:
        assert not d["harmful"], d["id"]
        assert not is_refusal(d["response"]), d["id"]
        assert not re.match(r"\s*(I'm sorry|Sorry|I apologi[sz]e)", d["response"]), d["id"]
        assert len(words(d["response"])) >= 40, d["id"]  # a real answer, not a one-liner


def test_closed_qa_reference_is_quoted_in_prompt_and_answered(sft):
    closed = [d for d in sft if d["category"] == "closed_qa"]
    assert len(closed) == round(CATEGORY_SHARE["closed_qa"] * N_SFT) - 1  # 20
    for d in closed:
        assert d["reference"] in d["prompt"], d["id"]  # verbatim, so the answer is in the passage
        assert contains_reference(d["response"], d["reference"]), d["id"]
        assert len(words(d["reference"])) <= 4, d["id"]


def test_few_shot_prompts_show_examples_and_end_on_the_open_slot(sft):
    for d in (d for d in sft if d["style"] == "few_shot"):
        blocks = [b for b in re.split(r"\n\s*\n", d["prompt"]) if b.strip()]
        labels = re.findall(r"^([A-Z][A-Za-z ]{0,20}):", d["prompt"], flags=re.MULTILINE)
        answer_label = d["prompt"].rstrip().splitlines()[-1].rstrip(":")
        assert d["prompt"].rstrip().endswith(":"), d["id"]
        assert len(blocks) >= 3, d["id"]  # at least two worked examples plus the query
        assert labels.count(answer_label) >= 3, d["id"]  # the answer slot appears in 2+ examples
        assert len(words(d["prompt"])) <= 120, d["id"]


def test_user_based_prompts_describe_a_use_case(sft):
    first_person = re.compile(r"\b(I|I'm|I've|me|my|our)\b", re.IGNORECASE)
    for d in (d for d in sft if d["style"] == "user_based"):
        assert first_person.search(d["prompt"].split(".")[0]), d["id"]


def test_sizes_fit_a_small_model_on_a_cpu(sft):
    tok = load_tokenizer()
    plain_words = [len(words(d["prompt"])) for d in sft if d["style"] != "few_shot"]
    demo_words = [len(words(d["response"])) for d in sft]
    assert sum(w < 60 for w in plain_words) / len(plain_words) >= 0.9
    assert max(demo_words) <= 110 and sum(w <= 80 for w in demo_words) / len(demo_words) >= 0.95
    lengths = {d["id"]: len(tok(format_prompt(tok, d["prompt"]) + d["response"]).input_ids) + 1
               for d in sft}  # + the EOS token that ends every training sequence
    assert {i: n for i, n in lengths.items() if n > MAX_TOKENS} == {}

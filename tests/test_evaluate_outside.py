"""The outside judge: IFEval-style checkers, the embedded prompt set, strict accuracies."""

import pytest

from labkit import evaluate, ifeval
from labkit.data import load_prompts

# (instruction id, kwargs, a response that follows it, one that does not)
CASES = [
    ("keywords:existence", {"keywords": ["ice", "silence"]}, "Ice and SILENCE at dawn.", "Iced silence."),
    ("keywords:frequency", {"keyword": "warm", "frequency": 2, "relation": "at least"}, "Warm, so warm.", "Warmer, warm."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"}, "One cat, a catalog.", "Cat cat."),
    ("keywords:forbidden_words", {"forbidden_words": ["gold"]}, "Goldfish are orange.", "Paper replaced GOLD coins."),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"}, "Zig zag.", "Zebra."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"}, "One. Two!", "A. B. C."),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"}, "One. Two!", "Just one."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\nSecond.", "First.\n***\n"),
    ("length_constraints:number_words", {"num_words": 4, "relation": "less than"}, "one two three", "one two three four"),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"}, "well-known dog's toy", "two words"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "today"},
     "Trains are old.\n\n\"Today, they are fast.", "Trains are old.\n\nNow today they are fast."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], see you on [date].", "Dear [name]."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\nP.S. Bring snacks.", "Hi. PS bring snacks."),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\n\nP.P.S. Later.", "Hi.\nP.S. Later."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n- b\nnot *one*", "* a\n* b\n* c"),
    ("detectable_format:constrained_response", {}, "My answer is no. Penguins swim.", "No, they cannot."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**", "*one* and ** **"),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nPack.\nSECTION 2\nGo.", "SECTION 1\nPack and go."),
    ("detectable_format:json_format", {}, '```json\n{"name": "Kiwi"}\n```', "{'name': 'Kiwi'}"),
    ("detectable_format:title", {}, "<<Sea Song>>\nwaves", "<< >>\nwaves"),
    ("combination:two_responses", {}, "Crumb ****** Loaf", "Crumb ****** Crumb"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Why is the sky blue?"}, "why is the sky blue? Light scatters.",
     "The sky is blue because light scatters."),
    ("startend:end_checker", {"end_phrase": "Keep going."}, "You can do it. keep going.  ", "Keep going. You can."),
    ("startend:quotation", {}, '"Octopuses have three hearts."', '"Octopuses have three hearts.'),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "A BIG SALE today", "a Big sale, OK"),
    ("change_case:english_capital", {}, "CAREFUL: WET FLOOR!", "CAREFUL: Wet floor!"),
    ("change_case:english_lowercase", {}, "sweet and warm, 100%", "Sweet and warm"),
    ("punctuation:no_comma", {}, "Loop and pull tight.", "Loop, then pull."),
]


def test_every_instruction_kind_has_a_case():
    assert {c[0] for c in CASES} == set(ifeval.INSTRUCTIONS)


@pytest.mark.parametrize("iid,kwargs,good,bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_instruction_pass_and_fail(iid, kwargs, good, bad):
    assert ifeval.follows_instruction(iid, kwargs, good) is True
    assert ifeval.follows_instruction(iid, kwargs, bad) is False
    assert ifeval.follows_instruction(iid, kwargs, "   ") is False  # an empty response follows nothing


def test_unknown_instruction_and_relation():
    with pytest.raises(ValueError, match="unknown IFEval instruction"):
        ifeval.follows_instruction("language:klingon", {}, "x")
    with pytest.raises(ValueError, match="relation"):
        ifeval.follows_instruction("length_constraints:number_words", {"num_words": 3, "relation": "exactly"}, "x")
    # the real set writes unused arguments as None: they are dropped
    assert ifeval.follows_instruction("punctuation:no_comma", {"num_words": None}, "ok")


def test_embedded_prompts_are_well_formed_and_disjoint_from_every_split():
    records = ifeval.load_ifeval_prompts()
    assert 80 <= len(records) <= 120
    assert len({r["id"] for r in records}) == len(records)
    kinds = {i for r in records for i in r["instruction_id_list"]}
    assert kinds == set(ifeval.INSTRUCTIONS)  # every kind is asked for at least once
    for r in records:
        assert len(r["instruction_id_list"]) == len(r["kwargs"]) >= 1
        ifeval.judge(r, "some answer")  # every instruction's kwargs fit its check
    split_prompts = {" ".join(p["prompt"].lower().split()) for p in load_prompts()}
    assert not split_prompts & {" ".join(r["prompt"].lower().split()) for r in records}


def test_families_filter():
    fmt = ifeval.load_ifeval_prompts(families=["detectable_format"])
    assert fmt and all(ifeval.family(i) == "detectable_format" for r in fmt for i in r["instruction_id_list"])


def test_outside_judge_by_hand():
    records = [
        {"id": "a", "prompt": "p", "instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"],
         "kwargs": [{}, {}]},
        {"id": "b", "prompt": "p", "instruction_id_list": ["detectable_format:title"], "kwargs": [{}]},
    ]
    # prompt a: no comma yes, lowercase no -> not strict; prompt b: title yes
    r = evaluate.outside_judge(records, ["No commas here", "<<T>> body"])
    assert r["followed"] == [[True, False], [True]]
    assert r["prompt_strict"] == 0.5 and r["instruction_strict"] == pytest.approx(2 / 3)
    assert r["per_family"] == {"change_case": 0.0, "detectable_format": 1.0, "punctuation": 1.0}


def test_paired_outside_judge():
    a = [[True, True], [True], [False], [True]]
    b = [[True, False], [True], [False], [False]]
    d = evaluate.paired_outside_judge(a, b, n_boot=500)
    # prompt level: A strict on 3 of 4, B on 1 of 4 -> +0.5; instructions: A 4 of 5, B 2 of 5 -> +0.4
    assert d["prompt_strict"]["diff"] == pytest.approx(0.5)
    assert d["instruction_strict"]["diff"] == pytest.approx(0.4)
    assert d["prompt_strict"]["low"] <= 0.5 <= d["prompt_strict"]["high"]
    assert d == evaluate.paired_outside_judge(a, b, n_boot=500)  # seeded
    same = evaluate.paired_outside_judge(a, a, n_boot=100)
    assert same["prompt_strict"] == {"diff": 0.0, "low": 0.0, "high": 0.0}

"""Measurement details of labkit.evaluate: no EOS scored for a truncated answer; RM vs gold agreement."""

import pytest
import torch

from labkit import evaluate, models


def test_sequence_logprobs_scores_no_eos_for_truncated_answers():
    model, tok = models.load_model("tiny")
    prompts, responses = ["Say hi.", "Count to three."], ["hi there", "one two"]
    full = evaluate.sequence_logprobs(model, tok, prompts, responses)
    cut = evaluate.sequence_logprobs(model, tok, prompts, responses, truncated=[True, False])
    assert cut[1] == pytest.approx(full[1].item(), abs=1e-5)  # a finished answer keeps its EOS
    # the difference is exactly log p(EOS | prompt, response) of the first pair
    ids = tok(models.format_prompt(tok, prompts[0]) + responses[0], add_special_tokens=False,
              return_tensors="pt").input_ids
    with torch.no_grad(), models.autocast(next(model.parameters()).device):
        logits = model(input_ids=ids).logits[0, -1].float()
    eos = torch.log_softmax(logits, -1)[tok.eos_token_id].item()
    assert (full[0] - cut[0]).item() == pytest.approx(eos, abs=2e-2)


class _LengthRM:
    """A stand-in reward model that scores a response by its number of characters."""

    def score(self, tokenizer, prompts, responses, progress=True):
        return [float(len(y)) for y in responses]


def test_rm_gold_agreement_by_hand():
    rec = {"id": "x", "prompt": "Give me tips for sleeping better.", "category": "open_qa", "checks": []}
    good = "Keep a regular sleep schedule, exercise during the day, and avoid heavy meals and coffee at night."
    short = "Sleep more."
    empty_ish = "Sleep more, sleep more, sleep more, sleep more, sleep more, sleep more."
    samples = [{"responses": [good, short, empty_ish]}]
    # gold: good > short and good > the repetitive one; the length RM agrees on good > short,
    # and prefers the long repetitive answer over "Sleep more." -- compare with gold's order there
    from labkit.labelers import GoldLabeler

    g = [GoldLabeler().score(rec, y) for y in samples[0]["responses"]]
    expected = [(0, 1), (0, 2), (1, 2)]
    agree = sum(((len(samples[0]["responses"][i]) > len(samples[0]["responses"][j])) == (g[i] > g[j]))
                for i, j in expected)
    r = evaluate.rm_gold_agreement(_LengthRM(), None, [rec], samples, n_boot=50)
    assert r["value"] == pytest.approx(agree / 3) and r["n_pairs"] == 3 and r["n_prompts"] == 1
    assert r["rm_prefers_shorter"] == 0.0  # the stand-in always prefers the longer answer


def test_pair_agreement_by_hand():
    # prompt 1: gold orders all three pairs, the scores agree on two; prompt 2: a gold tie
    # (left out) and a score tie (half)
    r = evaluate.pair_agreement([[3.0, 2.0, 2.5], [1.0, 1.0, 0.0]], [[0.9, 0.5, 0.1], [0.4, 0.2, 0.2]], n_boot=200)
    assert r["n_pairs"] == 5 and r["value"] == pytest.approx((2 + 0.5 + 1) / 5)
    assert 0 <= r["low"] <= r["value"] <= r["high"] <= 1
    with pytest.raises(ValueError):
        evaluate.pair_agreement([[1.0]], [[1.0], [2.0]])


def test_rankings_through_rm_lists_one_annotators_order_beside_the_rm():
    rankings = [
        {"annotator": "ana", "prompt_id": "p1", "prompt": "Say hi.", "responses": ["hi", "hello there", "hey you"],
         "tiers": [[1], [0, 2]]},
        {"annotator": "ben", "prompt_id": "p1", "prompt": "Say hi.", "responses": ["hi", "hello there"],
         "tiers": [[0], [1]]},
        {"annotator": "ana", "prompt_id": "p2", "prompt": "Name a fruit.", "responses": ["apple", "a pear!"],
         "tiers": [[0], [1]]},
    ]
    rows = evaluate.rankings_through_rm(_LengthRM(), None, rankings, detect=lambda y: "!" in y)
    assert [r["annotator"] for r in rows] == ["ana"] * 5  # the first ranking's annotator, both of her items
    first = rows[:3]
    assert [r["answer"] for r in first] == ["hello there", "hi", "hey you"]  # her order, best first
    assert [r["their rank"] for r in first] == [1, 2, 2]  # a tie shares its rank
    assert [r["RM score"] for r in first] == [11.0, 2.0, 7.0]
    assert [r["RM rank"] for r in first] == [1, 3, 2]
    assert [r["trait"] for r in rows[3:]] == [False, True]
    assert evaluate.rankings_through_rm(_LengthRM(), None, rankings, annotator="ben", limit=1)[1]["their rank"] == 2
    assert evaluate.rankings_through_rm(_LengthRM(), None, rankings, annotator="cleo") == []


def test_sequence_logprobs_equal_a_plain_forward_per_pair(monkeypatch):
    """Length-sorted, left-padded rows with the unembedding on the last columns only give each
    pair's log-probability as an unpadded forward of that pair alone (fp32, so exactly)."""
    monkeypatch.setattr(models, "fast_dtype", lambda device="auto": torch.float32)  # autocast off
    model, tok = models.load_model("tiny", dtype="float32")
    prompts = ["Say hi.", "Count to three, slowly, one number a line.", "Name a colour.", "Why is the sky blue?"]
    responses = ["hi there", "one\ntwo\nthree", "", "Because air scatters blue light more than red light."]
    truncated = [False, True, True, False]
    got = evaluate.sequence_logprobs(model, tok, prompts, responses, batch_size=3, truncated=truncated)
    for p, y, t, value in zip(prompts, responses, truncated, got):
        q = tok(models.format_prompt(tok, p), add_special_tokens=False).input_ids
        r = tok(y, add_special_tokens=False).input_ids + [tok.eos_token_id] * (not t)
        ids = torch.tensor([q + r])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # (T - 1, V)
        want = sum(logp[len(q) - 1 + j, tok_id].item() for j, tok_id in enumerate(r))
        assert value.item() == pytest.approx(want, abs=1e-3), (p, y)
    assert got[2].item() == 0.0  # an empty, truncated answer has no token to score

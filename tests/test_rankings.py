"""Tiers, ranks, pairs and agreement: hand-computed values for labkit.rankings."""

import math

import pytest
import torch

from labkit.rankings import (consensus, first_choices, n_comparisons, normalize_tiers, pair_stats, pairwise_accuracy,
                             pooled_agreement, rankings_to_pairs, scores_to_ranks, tier_of, tiers_from_scores,
                             tiers_to_ranks, whole_sentences)


def test_tier_of_and_normalize_tiers():
    assert tier_of([[2], [0, 3], [1]]) == {2: 0, 0: 1, 3: 1, 1: 2}
    assert normalize_tiers([[1], 0], 2) == [[1], [0]]  # a bare entry is a tier of one
    assert normalize_tiers([["b"], ["a"]], 2, response_ids=["a", "b"]) == [[1], [0]]


@pytest.mark.parametrize("tiers, message", [
    ([[0], [1], [2]], r"miss response\(s\) \[3\]"),
    ([[0, 1], [1], [2], [3]], "ranked twice"),
    ([[0], [1], [2], [7]], "out of range"),
    ([[0], [1], [2], ["r9"]], "unknown response 'r9'"),
    ([[0], [], [1, 2, 3]], "tier 1 is empty"),
    ([[0], [True], [1, 2, 3]], "not a response index"),
    ([], "non-empty list"),
])
def test_normalize_tiers_names_the_problem(tiers, message):
    with pytest.raises(ValueError, match=message):
        normalize_tiers(tiers, 4)


def test_tiers_from_scores():
    assert tiers_from_scores([0.5, 1.0, 0.5, 0.0]) == [[1], [0, 2], [3]]  # equal scores tie
    assert tiers_from_scores([0.1, 0.5, 0.49, 0.2], 0.02) == [[1, 2], [3], [0]]  # within 0.02 of the tier's best


def test_tiers_to_ranks_and_comparisons():
    assert tiers_to_ranks([[2], [0, 3], [1]], 6) == [1, 2, 0, 1, -1, -1]
    assert n_comparisons([[2], [0, 3], [1]]) == 6 - 1  # C(4,2) minus the tied pair
    assert n_comparisons([[0, 1, 2]]) == 0
    with pytest.raises(ValueError):
        tiers_to_ranks([[0], [2]], 3)  # response 1 missing
    with pytest.raises(ValueError):
        tiers_to_ranks([[0, 1], [1]], 3)  # response 1 twice
    with pytest.raises(ValueError, match="k=2"):
        tiers_to_ranks([[0], [1], [2]], 2)


def test_scores_to_ranks_ties_and_padding():
    scores = torch.tensor([[0.2, 0.9, 0.2, float("nan")], [1.0, 0.0, 0.5, 0.5]])  # (B, K)
    assert scores_to_ranks(scores).tolist() == [[1, 0, 1, -1], [0, 3, 1, 1]]


def test_pairwise_accuracy_counts_strict_pairs():
    rewards = torch.tensor([[3.0, 1.0, 2.0, 9.0]])
    ranks = torch.tensor([[0, 1, 1, -1]])  # pairs (0,1) right, (0,2) right; (1,2) tied
    assert pairwise_accuracy(rewards, ranks) == (2, 2)
    assert pairwise_accuracy(-rewards, ranks) == (0, 2)


def test_rankings_to_pairs_by_hand():
    ranking = {"prompt": "p", "responses": ["a", "b", "c", "d"], "tiers": [[2], [0, 3], [1]]}
    pairs = rankings_to_pairs([ranking])
    # c beats a, d, b; a and d (tied) beat b; the tie a-d gives no pair: C(4,2) - 1 = 5 pairs
    assert sorted((p["chosen"], p["rejected"]) for p in pairs) == [("a", "b"), ("c", "a"), ("c", "b"),
                                                                    ("c", "d"), ("d", "b")]
    with_ties = rankings_to_pairs([ranking], include_ties=True, margin=True)
    assert len(with_ties) == 6 and sum(p["tie"] for p in with_ties) == 1
    assert {(p["chosen"], p["rejected"]): p["margin"] for p in with_ties}[("c", "b")] == 2.0


def test_pair_stats_by_hand():
    # a: 0 > 1 > 2 > 3; b: 1 > 0 > 2 = 3.  Pairs: (0,1) discordant, (2,3) tied in b, 4 concordant.
    s = pair_stats([[0], [1], [2], [3]], [[1], [0], [2, 3]])
    assert s["pairs"] == 5 and s["agreeing"] == 4 and s["agreement"] == pytest.approx(4 / 5)
    assert s["kendall_tau"] == pytest.approx((4 - 1) / math.sqrt(6 * 5))  # tau-b
    assert pair_stats([[0], [1]], [[1], [0]])["kendall_tau"] == pytest.approx(-1.0)
    assert math.isnan(pair_stats([[0, 1]], [[1], [0]])["agreement"])
    with pytest.raises(ValueError, match="different responses"):
        pair_stats([[0], [1]], [[0], [2]])


def test_pairwise_agreement():
    a = [[0], [1], [2], [3]]
    assert pair_stats(a, a)["agreement"] == 1.0
    assert pair_stats(a, [[3], [2], [1], [0]])["agreement"] == 0.0
    # b swaps 2 and 3 and ties 0 with 1: pairs ordered by both = 5, agreeing = 4
    s = pair_stats(a, [[0, 1], [3], [2]])
    assert s["agreement"] == pytest.approx(4 / 5)
    assert (s["agreeing"], s["pairs"]) == (4, 5)
    assert math.isnan(pair_stats([[0, 1]], [[0], [1]])["agreement"])
    # pooled over items: 4 of 5 and 1 of 1 agreeing pairs -> 5/6, not the mean of 0.8 and 1.0
    assert pooled_agreement([s, pair_stats([[0], [1]], [[0], [1]])]) == pytest.approx(5 / 6)
    assert math.isnan(pooled_agreement([]))


def test_consensus_merges_by_mean_rank_and_leaves_the_rest():
    ys = ["a", "b", "c", "d"]
    one = {"prompt": "p", "prompt_id": "x1", "responses": ys, "annotator": "ada"}
    rankings = [
        {**one, "tiers": [[0], [1], [2], [3]]},
        {**one, "tiers": [[1], [0, 2], [3]], "annotator": "ben"},   # a tie shares ranks 1 and 2: 1.5 each
        {**one, "tiers": [[2], [0], [1], [3]], "annotator": "cleo"},
        {**one, "prompt_id": "x2", "tiers": [[3], [2], [1], [0]]},  # another prompt: passes unchanged
        {**one, "responses": ["a", "b", "c", "e"], "tiers": [[3], [0, 1, 2]]},  # other responses: unchanged
    ]
    merged = consensus(rankings)
    assert len(merged) == 3 and merged[1:] == rankings[3:]
    # rank sums: a 0 + 1.5 + 1 = 2.5, b 1 + 0 + 2 = 3, c 2 + 1.5 + 0 = 3.5, d 3 + 3 + 3 = 9
    assert merged[0]["tiers"] == [[0], [1], [2], [3]] and merged[0]["n_annotators"] == 3
    assert merged[0]["annotator"] == "ada"  # the first record's other fields
    # two annotators who disagree on a pair leave it tied; a pair both order stays ordered
    assert consensus(rankings[:1] + [{**one, "tiers": [[1], [0], [2], [3]]}])[0]["tiers"] == [[0, 1], [2], [3]]


def test_first_choices_take_the_pooled_best_that_was_not_cut_off():
    ys = ["a", "b", "c", "d"]
    one = {"prompt": "p", "prompt_id": "x1", "responses": ys}
    rankings = [{**one, "tiers": [[1], [0], [2], [3]]}, {**one, "tiers": [[0], [1], [2], [3]]},
                {**one, "tiers": [[1], [2], [0], [3]]},  # pooled: b (rank sum 1), a (3), c (5), d (9)
                {**one, "prompt_id": "x2", "tiers": [[2, 3], [0], [1]]},  # c and d tie first: the lower index
                {**one, "prompt_id": "x3", "responses": ["", "e", "f", "g"], "tiers": [[0], [3], [1, 2]]}]
    picks = first_choices(rankings)
    assert [(r["prompt_id"], r["response"], r["n_annotators"]) for r in picks] == [
        ("x1", "b", 3), ("x2", "c", 1), ("x3", "g", 1)]  # an empty answer is never taught
    assert picks[0] == {"prompt_id": "x1", "prompt": "p", "response": "b", "n_annotators": 3, "trimmed": False}
    # answers cut off at the length limit are skipped; a prompt with nothing left is dropped
    cut = {("x1", "b"), ("x2", "c"), ("x2", "d"), ("x2", "a"), ("x2", "b")}
    assert [(r["prompt_id"], r["response"]) for r in first_choices(rankings, cut)] == [("x1", "a"), ("x3", "g")]
    assert first_choices(rankings, cut, policy="keep") == picks


def test_first_choices_cut_off_are_taught_up_to_their_last_whole_sentence():
    one = {"prompt": "p", "prompt_id": "x1", "tiers": [[0], [1], [2]]}
    rankings = [{**one, "responses": ["You can. Then you shou", "no end at all here", "short."]},
                {**one, "prompt_id": "x2", "responses": ["- one\n- two\n- thr", "b", "c"]},
                {**one, "prompt_id": "x3", "responses": ["Half a sente", "Done!", "c"]}]
    cut = {("x1", "You can. Then you shou"), ("x1", "no end at all here"), ("x2", "- one\n- two\n- thr"),
           ("x3", "Half a sente")}
    picks = first_choices(rankings, cut, policy="trim")
    assert [(r["response"], r["trimmed"]) for r in picks] == [("You can.", True), ("- one\n- two", True),
                                                             ("Done!", False)]  # no whole sentence: the next best
    assert whole_sentences("3.5 kg is the weight") == ""  # a decimal point ends no sentence
    with pytest.raises(ValueError, match="policy must be one of"):
        first_choices(rankings, cut, policy="drop")

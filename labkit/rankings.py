"""Rankings: tiers, ranks, pairs and agreement, in one place for the store, the labelers and the RM.

- **tiers**: a ranking of K responses as lists of response indices, best first; ties share a
  tier. ``[[2], [0, 3], [1]]``: response 2 is best, 0 and 3 tie, 1 is worst.
- **ranks**: the same ranking per response, the index of its tier (0 = best, equal = tie), with
  -1 padding for prompts with fewer than K responses: ``[1, 2, 0, 1, -1]``. This is what
  ``labkit.reward.ranking_loss`` takes, as a (B, K) tensor.
- **pairs**: a ranking of K responses gives C(K,2) (better, worse) comparisons minus its tied
  ones (Ouyang et al. 2022, §3.5); as TRL preference pairs ``{prompt, chosen, rejected}``.
- **agreement**: the share of pairs two rankings both order strictly that they order the same
  way (ties left out, as in the loss), and Kendall's tau-b. The paper's labelers agree on
  about 73% of pairs (§5.1).

>>> tiers_to_ranks([[2], [0, 3], [1]], 5)
[1, 2, 0, 1, -1]
>>> n_comparisons([[2], [0, 3], [1]])  # C(4,2) = 6 pairs minus the tied pair (0, 3)
5
"""

from __future__ import annotations

import itertools
import math
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the tensor helpers only call tensor methods: importing this module stays light
    import torch


# ----------------------------------------------------------------------------- tiers

def tier_of(tiers: list[list[int]]) -> dict[int, int]:
    """Response index -> index of its tier (0 = best)."""
    return {i: t for t, tier in enumerate(tiers) for i in tier}


def normalize_tiers(tiers: Any, k: int, response_ids: list[str] | None = None) -> list[list[int]]:
    """Tiers (best first, ties share a tier) as response indices; every index 0..k-1 exactly once.

    Entries may be indices or, when ``response_ids`` is given, response ids; a bare entry is a
    tier of one. Raises ``ValueError`` naming what is missing, duplicated or unknown.
    """
    if not isinstance(tiers, (list, tuple)) or not tiers:
        raise ValueError(f"tiers must be a non-empty list of lists of response indices, got {tiers!r}")
    by_id = {rid: i for i, rid in enumerate(response_ids or [])}
    out, seen = [], set()
    for t, tier in enumerate(tiers):
        if isinstance(tier, (int, str)):  # a bare entry is a tier of one
            tier = [tier]
        if not isinstance(tier, (list, tuple)) or not tier:
            raise ValueError(f"tier {t} is empty or not a list: {tier!r} (each tier is a non-empty list)")
        row = []
        for entry in tier:
            if isinstance(entry, bool):
                raise ValueError(f"tier {t}: {entry!r} is not a response index")
            if isinstance(entry, int):
                idx = entry
            elif isinstance(entry, str) and entry in by_id:
                idx = by_id[entry]
            else:
                known = f" or one of the ids {list(by_id)}" if by_id else ""
                raise ValueError(f"tier {t}: unknown response {entry!r}; use an index 0..{k - 1}{known}")
            if not 0 <= idx < k:
                raise ValueError(f"tier {t}: response index {idx} is out of range 0..{k - 1}")
            if idx in seen:
                raise ValueError(f"tier {t}: response {entry!r} is ranked twice")
            seen.add(idx)
            row.append(idx)
        out.append(row)
    missing = sorted(set(range(k)) - seen)
    if missing:
        raise ValueError(f"tiers miss response(s) {missing}: every one of the {k} responses must be ranked")
    return out


def tiers_from_scores(scores: list[float], tie_threshold: float = 0.0) -> list[list[int]]:
    """Tiers best first from scalar scores; a response joins the current tier when its score is
    within ``tie_threshold`` of that tier's best (0: only equal scores tie)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    tiers: list[list[int]] = []
    for i in order:
        if tiers and scores[tiers[-1][0]] - scores[i] <= tie_threshold:
            tiers[-1].append(i)
        else:
            tiers.append([i])
    return tiers


def consensus(rankings: list[dict]) -> list[dict]:
    """Rankings of the same responses to one prompt by several annotators, merged into one.

    Each response gets its mean rank over the annotators (a tie shares the ranks it spans: the
    Borda count), and equal means tie. Records that no other record repeats pass unchanged; a
    merged record keeps the first one's fields with the merged ``tiers`` and ``n_annotators``.
    A room that ranks shared items, or a pool of simulated labelers, gives the reward model
    one ranking with less of any one annotator's noise instead of several that disagree.

    >>> a = {"prompt": "p", "responses": ["x", "y", "z"], "tiers": [[0], [1], [2]]}
    >>> b = {"prompt": "p", "responses": ["x", "y", "z"], "tiers": [[1], [0], [2]]}
    >>> c = {"prompt": "p", "responses": ["x", "y", "z"], "tiers": [[0], [2], [1]]}
    >>> consensus([a, b, c])[0]["tiers"]  # mean ranks 1/3, 1 and 5/3
    [[0], [1], [2]]
    >>> consensus([a, b])[0]["tiers"]     # x and y each first once: a tie
    [[0, 1], [2]]
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rankings:
        groups.setdefault((r.get("prompt_id") or r["prompt"], tuple(r["responses"])), []).append(r)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        total = [0.0] * len(group[0]["responses"])
        for r in group:
            start = 0
            for tier in r["tiers"]:
                for i in tier:  # a tier of m responses from rank `start` shares ranks start..start+m-1
                    total[i] += start + (len(tier) - 1) / 2
                start += len(tier)
        out.append({**group[0], "tiers": tiers_from_scores([-t for t in total]), "n_annotators": len(group)})
    return out


CUT_POLICIES = ("skip", "trim", "keep")


def whole_sentences(text: str) -> str:
    """``text`` up to its last sentence end (``.``, ``!`` or ``?`` before a space or the end, or a
    line break); "" when it has none.

    >>> whole_sentences("Paris is the capital. It has a river called the Se")
    'Paris is the capital.'
    """
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)|\n", text)]
    return text[:ends[-1]].rstrip() if ends else ""


def first_choices(rankings: list[dict], cut: set[tuple[str, str]] = frozenset(), policy: str = "skip") -> list[dict]:
    """The answer the pooled ranking puts first, per prompt and set of responses, as an SFT record.

    The rankings are merged by :func:`consensus` (the Borda count); each prompt keeps its
    best-ranked non-empty response, the lowest index among equals. ``cut`` holds the
    ``(prompt_id or prompt, response)`` pairs that stopped at the length limit; taught as they are
    they would teach the model to stop mid-sentence, so ``policy`` says what becomes of them:
    ``"skip"`` passes over them to the next best, ``"trim"`` teaches them up to their last whole
    sentence (:func:`whole_sentences`; passed over when none), ``"keep"`` teaches them as they
    are. A prompt left with nothing is dropped. Each record is ``{"prompt_id", "prompt",
    "response", "n_annotators", "trimmed"}``: the room's rankings taught back to the model as
    demonstrations, with no sampling and no reward model.

    >>> a = {"prompt": "p", "responses": ["x", "y. z", "w"], "tiers": [[1], [0], [2]]}
    >>> b = {"prompt": "p", "responses": ["x", "y. z", "w"], "tiers": [[1, 2], [0]]}
    >>> [r["response"] for r in first_choices([a, b])]
    ['y. z']
    >>> [r["response"] for r in first_choices([a, b], cut={("p", "y. z")})]
    ['w']
    >>> [r["response"] for r in first_choices([a, b], cut={("p", "y. z")}, policy="trim")]
    ['y.']
    """
    if policy not in CUT_POLICIES:
        raise ValueError(f"policy must be one of {CUT_POLICIES}, got {policy!r}")
    picks = []
    for r in consensus(rankings):
        key = r.get("prompt_id") or r["prompt"]
        for i in (i for tier in r["tiers"] for i in sorted(tier)):  # best first, the lower index among equals
            y = r["responses"][i]
            was_cut = (key, y) in cut
            if was_cut and policy == "skip":
                continue
            trimmed = was_cut and policy == "trim"
            y = whole_sentences(y) if trimmed else y
            if y.strip():
                picks.append({"prompt_id": r.get("prompt_id"), "prompt": r["prompt"], "response": y,
                              "n_annotators": r.get("n_annotators", 1), "trimmed": trimmed})
                break
    return picks


def n_comparisons(tiers: list[list[int]]) -> int:
    """Ordered, non-tied pairs in one ranking: C(K,2) minus the tied pairs."""
    k = sum(len(t) for t in tiers)
    return k * (k - 1) // 2 - sum(len(t) * (len(t) - 1) // 2 for t in tiers)


# ----------------------------------------------------------------------------- ranks (tensors)

def tiers_to_ranks(tiers: list[list[int]], k: int) -> list[int]:
    """Tiers (best first) of n responses -> ranks of length k (tier index; -1 pads n..k-1)."""
    n = sum(len(t) for t in tiers)
    tiers = normalize_tiers(tiers, n)
    if n > k:
        raise ValueError(f"tiers cover {n} responses but k={k}")
    ranks = [-1] * k
    for i, t in tier_of(tiers).items():
        ranks[i] = t
    return ranks


def scores_to_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Scores (B, K) with NaN padding -> ranks (B, K): 0 = highest score, equal scores tie, -1 = NaN."""
    valid = ~scores.isnan()  # (B, K)
    s = scores.masked_fill(~valid, -math.inf)  # (B, K)
    # rank = how many real scores lie strictly above: order kept, equal scores share a rank.
    above = (s[:, None, :] > s[:, :, None]) & valid[:, None, :]  # (B, K, K): j above i
    return above.sum(-1).masked_fill(~valid, -1)  # (B, K)


def ordered_pairs(ranks: torch.Tensor) -> torch.Tensor:
    """Ranks (B, K) -> (B, K, K) bool: response i is ranked strictly above response j, both real."""
    valid = ranks >= 0  # (B, K)
    return (ranks[:, :, None] < ranks[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # (B, K, K)


def pairwise_accuracy(rewards: torch.Tensor, ranks: torch.Tensor) -> tuple[int, int]:
    """(correct, total) over ordered, non-tied pairs of rewards (B, K) and ranks (B, K):
    how often r_better > r_worse."""
    better = ordered_pairs(ranks)  # (B, K, K)
    correct = (rewards[:, :, None] > rewards[:, None, :]) & better  # (B, K, K)
    return int(correct.sum()), int(better.sum())


# ----------------------------------------------------------------------------- pairs

def rankings_to_pairs(rankings: list[dict], include_ties: bool = False, margin: bool = False) -> list[dict]:
    """TRL preference pairs ``{prompt, chosen, rejected}`` from K-way records (prompt, responses, tiers).

    A ranking of K responses yields C(K,2) pairs minus its tied pairs (Ouyang et al. 2022,
    §3.5). ``margin=True`` adds the tier distance (TRL's optional ``margin`` column);
    ``include_ties=True`` also emits tied pairs, marked ``tie=True``.
    """
    pairs = []
    for r in rankings:
        tier = tier_of(r["tiers"])
        for i, j in itertools.combinations(range(len(r["responses"])), 2):
            if tier[i] == tier[j] and not include_ties:
                continue
            w, l = (i, j) if tier[i] <= tier[j] else (j, i)
            pair = {"prompt": r["prompt"], "chosen": r["responses"][w], "rejected": r["responses"][l]}
            if margin:
                pair["margin"] = float(tier[l] - tier[w])
            if include_ties:
                pair["tie"] = tier[i] == tier[j]
            pairs.append(pair)
    return pairs


# ----------------------------------------------------------------------------- agreement

def pair_stats(tiers_a: list[list[int]], tiers_b: list[list[int]]) -> dict[str, float]:
    """Agreement and Kendall's tau-b between two rankings of the same responses.

    ``pairs``: the pairs both rankings order strictly (ties excluded, as in the ranking loss);
    ``agreeing``: how many of them both order the same way; ``agreement`` = agreeing / pairs,
    nan when there is no such pair (sum ``agreeing`` and ``pairs`` to pool over items).
    ``kendall_tau``: tau-b = (C - D) / sqrt((P - Ta) (P - Tb)) over all P pairs, Ta/Tb the
    pairs tied in a/b (Kendall 1945); nan when either ranking ties everything.
    """
    ta, tb = tier_of(tiers_a), tier_of(tiers_b)
    if set(ta) != set(tb):
        raise ValueError("the two rankings cover different responses")
    concordant = discordant = ties_a = ties_b = strict = 0
    pairs = list(itertools.combinations(sorted(ta), 2))
    for i, j in pairs:
        sa = (ta[i] > ta[j]) - (ta[i] < ta[j])
        sb = (tb[i] > tb[j]) - (tb[i] < tb[j])
        ties_a += sa == 0
        ties_b += sb == 0
        if sa and sb:
            strict += 1
            concordant += sa == sb
            discordant += sa != sb
    denom = math.sqrt((len(pairs) - ties_a) * (len(pairs) - ties_b))
    return {
        "agreement": concordant / strict if strict else math.nan,
        "kendall_tau": (concordant - discordant) / denom if denom else math.nan,
        "pairs": strict,
        "agreeing": concordant,
    }


def pooled_agreement(stats: list[dict]) -> float:
    """Agreement pooled over items from their :func:`pair_stats`: agreeing pairs over compared
    pairs, so an item weighs by its number of pairs (nan if none)."""
    total = sum(s["pairs"] for s in stats)
    return sum(s["agreeing"] for s in stats) / total if total else math.nan

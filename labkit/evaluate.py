"""Evaluation: helpful, honest, harmless, and win rates against a baseline (InstructGPT §4).

The paper's main metric is the win rate of a model against a baseline, judged by labelers
(§4.1: the 1.3B InstructGPT is preferred to the 175B GPT-3). Here the judge is the gold
labeler, the reward model, a human in the ``ComparisonWidget``, or any callable. Besides
that: per-category instruction following (the paper's "follows explicit constraints"
metadata), closed-QA accuracy (honesty, a stand-in for the hallucination rate on closed
domains), refusal rates on harmful vs benign look-alike prompts (harmlessness and
over-refusal), KL to the SFT model, response length, and the reward over-optimisation
curve (Gao et al. 2022: proxy RM score keeps rising while the gold score turns down).

>>> from labkit.evaluate import evaluate_model, win_rate
>>> report = evaluate_model("tiny", split="eval", limit=8)          # dict of figures
>>> win_rate(report["responses"], report["responses"], report["prompts"])["win_rate"]
0.5
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

import torch

from labkit import labelers, models
from labkit.ppo import logprobs_from_logits, response_logits


# ----------------------------------------------------------------------------- answering

def answer(model, tokenizer, records: list[dict], max_new_tokens: int = 96, temperature: float = 0.0,
           batch_size: int = 16, seed: int = 0, bf16: bool = True) -> tuple[list[str], list[bool]]:
    """Responses of ``model`` to ``records`` and whether each hit the length limit.

    ``bf16=False`` decodes in fp32: a greedy answer then does not depend on which prompts share
    its batch (``labkit.generation``'s guarantee); under bf16 a near-tie between the two best
    tokens can flip with the batch."""
    from labkit.generation import generate

    sample = temperature > 0
    texts, truncated = generate(model, tokenizer, [r["prompt"] for r in records],
                                max_new_tokens=max_new_tokens, temperature=temperature or 1.0,
                                top_p=1.0, do_sample=sample, batch_size=batch_size, seed=seed,
                                return_truncated=True, bf16=bf16)
    return texts, truncated


# ----------------------------------------------------------------------------- gold figures

def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def gold_figures(records: list[dict], responses: list[str], truncated: list[bool] | None = None,
                 gold: labelers.GoldLabeler | None = None) -> dict:
    """Helpful / honest / harmless figures of ``responses`` judged by the gold labeler."""
    if len(records) != len(responses):
        raise ValueError(f"{len(records)} prompts but {len(responses)} responses")
    gold = gold or labelers.GoldLabeler()
    truncated = truncated or [False] * len(records)
    scores, per_cat, follow, follow_all = [], defaultdict(list), defaultdict(list), defaultdict(list)
    honest, refuse_harmful, refuse_lookalike, refuse_other = [], [], [], []
    for rec, resp, trunc in zip(records, responses, truncated):
        b = gold.breakdown(rec, resp, truncated=trunc)
        scores.append(b["score"])
        per_cat[rec["category"]].append(b["score"])
        if b["checks"]:
            passed = [c["passed"] for c in b["checks"]]
            follow[rec["category"]].append(sum(passed) / len(passed))
            follow_all[rec["category"]].append(float(all(passed)))
        if b["honesty"] is not None:
            honest.append(b["honesty"])
        if rec.get("harmful"):
            refuse_harmful.append(float(b["refusal"]))
        elif rec.get("lookalike"):
            refuse_lookalike.append(float(b["refusal"]))
        else:
            refuse_other.append(float(b["refusal"]))
    lengths = [len(r.split()) for r in responses]
    all_follow = [x for v in follow_all.values() for x in v]
    return {
        "gold/mean": _mean(scores),
        "gold/per_category": {c: _mean(v) for c, v in sorted(per_cat.items())},
        "helpful/instruction_following": _mean(all_follow),
        "helpful/checks_passed_per_category": {c: _mean(v) for c, v in sorted(follow.items())},
        "helpful/all_checks_per_category": {c: _mean(v) for c, v in sorted(follow_all.items())},
        "honest/closed_qa_accuracy": _mean(honest),
        "harmless/refusal_rate_harmful": _mean(refuse_harmful),
        "harmless/refusal_rate_lookalike": _mean(refuse_lookalike),
        "harmless/refusal_rate_other": _mean(refuse_other),
        "response/words_mean": _mean(lengths),
        "response/stop_rate": 1.0 - _mean(float(t) for t in truncated),
        "n": len(records),
        "scores": scores,
    }


def evaluate_model(model, split: str = "eval", limit: int | None = None, tokenizer=None,
                   records: list[dict] | None = None, **answer_kw) -> dict:
    """Answer a prompt split with ``model`` (name, folder, or a loaded model + ``tokenizer``)."""
    from labkit.data import load_prompts

    if isinstance(model, str):
        model, tokenizer = models.load_model(model)
    if tokenizer is None:
        raise ValueError("pass the tokenizer together with a loaded model")
    records = records if records is not None else load_prompts(split)
    records = records[:limit] if limit else records
    responses, truncated = answer(model, tokenizer, records, **answer_kw)
    figures = gold_figures(records, responses, truncated)
    figures.update(prompts=records, responses=responses, truncated=truncated)
    return figures


# ----------------------------------------------------------------------------- win rates

def _is_reward_model(judge) -> bool:
    return hasattr(judge, "score") and hasattr(judge, "token_values")  # a labkit RewardModel


def _rm_pair_scores(rm, records, responses_a, responses_b, tokenizer) -> tuple[list[float], list[float]]:
    """RM scores of A and B with each prompt's two answers side by side, so the RM computes the
    prompt once (prefix sharing); an answer both models gave is scored once and ties exactly."""
    recs, ys = [], []
    for r, a, b in zip(records, responses_a, responses_b):
        texts = [a] if a == b else [a, b]
        recs += [r] * len(texts)
        ys += texts
    scores = iter(_judge_scores(rm, recs, ys, None, tokenizer))
    sa, sb = [], []
    for a, b in zip(responses_a, responses_b):
        sa.append(next(scores))
        sb.append(sa[-1] if a == b else next(scores))
    return sa, sb


def _judge_scores(judge, records, responses, truncated=None, tokenizer=None) -> list[float]:
    truncated = truncated or [False] * len(records)
    if judge == "gold" or isinstance(judge, labelers.GoldLabeler):
        g = judge if isinstance(judge, labelers.GoldLabeler) else labelers.GoldLabeler()
        return [g.score(r, y, truncated=t) for r, y, t in zip(records, responses, truncated)]
    if _is_reward_model(judge):
        tok = tokenizer or getattr(judge, "tokenizer", None)
        if tok is None:
            raise ValueError("a reward-model judge needs the tokenizer")
        return list(judge.score(tok, [r["prompt"] for r in records], responses))
    if callable(judge):
        return [float(judge(r, y)) for r, y in zip(records, responses)]
    raise ValueError(f"unknown judge {judge!r}: use 'gold', a RewardModel, a FeedbackStore or a callable")


def win_rate(responses_a: list[str], responses_b: list[str], prompts: list[dict], judge="gold",
             tokenizer=None, tie_margin: float = 1e-6, truncated_a=None, truncated_b=None) -> dict:
    """Win rate of A over B (ties count half) with a 95% interval.

    ``judge``: "gold", a ``GoldLabeler``, a ``RewardModel`` (with ``tokenizer``), a callable
    ``(record, response) -> float``, or a ``FeedbackStore`` holding human A/B comparisons
    (then ``responses_a``/``responses_b`` are the model names used in the comparisons).
    The interval is the normal approximation on per-prompt outcomes (1, 0.5, 0).
    """
    if hasattr(judge, "win_rate"):  # a FeedbackStore: count its A/B comparisons
        counts = judge.win_rate(responses_a, baseline=responses_b)
        if not counts["n"]:
            raise ValueError(f"no human comparisons between {responses_a!r} and {responses_b!r} in the store")
        return _summarise([1.0] * counts["wins"] + [0.5] * counts["ties"] + [0.0] * counts["losses"])
    if not (len(responses_a) == len(responses_b) == len(prompts)):
        raise ValueError("responses_a, responses_b and prompts must have the same length")
    if not prompts:
        raise ValueError("no prompts to judge")
    if _is_reward_model(judge):
        sa, sb = _rm_pair_scores(judge, prompts, responses_a, responses_b, tokenizer)
    else:
        sa = _judge_scores(judge, prompts, responses_a, truncated_a, tokenizer)
        sb = _judge_scores(judge, prompts, responses_b, truncated_b, tokenizer)
    outcomes = [1.0 if a - b > tie_margin else 0.0 if b - a > tie_margin else 0.5 for a, b in zip(sa, sb)]
    return _summarise(outcomes) | {"score_a": _mean(sa), "score_b": _mean(sb)}


def _summarise(outcomes: list[float]) -> dict:
    n = len(outcomes)
    p = sum(outcomes) / n
    var = sum((o - p) ** 2 for o in outcomes) / max(n - 1, 1)
    half = 1.96 * math.sqrt(var / n)
    return {"win_rate": p, "ci95": (max(0.0, p - half), min(1.0, p + half)), "n": n,
            "wins": sum(o == 1.0 for o in outcomes), "ties": sum(o == 0.5 for o in outcomes),
            "losses": sum(o == 0.0 for o in outcomes)}


def comparison_items(prompts: list[dict], responses: dict[str, list[str]]) -> list[dict]:
    """Items for ``ComparisonWidget``: one per prompt, two named models' responses."""
    (name_a, ra), (name_b, rb) = responses.items()
    return [{"prompt_id": p["id"], "prompt": p["prompt"], "responses": [a, b], "models": [name_a, name_b]}
            for p, a, b in zip(prompts, ra, rb)]


# ----------------------------------------------------------------------------- outside judge

def outside_judge(records: list[dict], responses: list[str]) -> dict:
    """IFEval-style strict accuracy of ``responses`` to the outside judge's ``records``
    (``labkit.ifeval.load_ifeval_prompts``): ``prompt_strict`` (every instruction of a prompt
    followed), ``instruction_strict`` (share of all instructions followed), per instruction
    family, and the per-prompt results (``followed``: one list of bools per prompt)."""
    from labkit import ifeval

    if len(records) != len(responses):
        raise ValueError(f"{len(records)} prompts but {len(responses)} responses")
    followed = [ifeval.judge(r, y) for r, y in zip(records, responses)]
    fam = defaultdict(list)
    for r, f in zip(records, followed):
        for i, ok in zip(r["instruction_id_list"], f):
            fam[ifeval.family(i)].append(float(ok))
    flat = [x for f in followed for x in f]
    return {"prompt_strict": _mean(float(all(f)) for f in followed),
            "instruction_strict": _mean(float(x) for x in flat),
            "per_family": {k: _mean(v) for k, v in sorted(fam.items())},
            "n_prompts": len(records), "n_instructions": len(flat), "followed": followed}


def paired_outside_judge(followed_a: list[list[bool]], followed_b: list[list[bool]], n_boot: int = 2000,
                         seed: int = 0) -> dict:
    """A minus B on the outside judge, paired by prompt, with 95% bootstrap intervals (prompts
    resampled together, so both models see the same draw): ``prompt_strict`` and
    ``instruction_strict`` differences as ``{"diff", "low", "high"}``."""
    if len(followed_a) != len(followed_b) or not followed_a:
        raise ValueError("need the same, non-empty list of prompts for A and B")
    rows = [(float(all(a)) - float(all(b)), sum(a) - sum(b), len(a)) for a, b in zip(followed_a, followed_b)]

    def stats(pick):
        n_ins = sum(rows[i][2] for i in pick)
        return _mean(rows[i][0] for i in pick), sum(rows[i][1] for i in pick) / n_ins

    point = stats(range(len(rows)))
    g = torch.Generator().manual_seed(seed)
    draws = [stats(torch.randint(len(rows), (len(rows),), generator=g).tolist()) for _ in range(n_boot)]
    out = {}
    for j, name in enumerate(("prompt_strict", "instruction_strict")):
        d = sorted(x[j] for x in draws)
        out[name] = {"diff": point[j], "low": d[int(0.025 * (n_boot - 1))], "high": d[int(0.975 * (n_boot - 1))]}
    return out | {"n_prompts": len(rows)}


# ----------------------------------------------------------------------------- reward model vs gold

def rm_gold_agreement(rm, tokenizer, records: list[dict], samples: list[dict], gold: labelers.GoldLabeler | None = None,
                      n_boot: int = 1000, seed: int = 0) -> dict:
    """How often the reward model orders two responses to a prompt as the gold scorer does.

    ``samples``: ``labkit.generation.sample_k`` output (K responses per prompt of ``records``,
    in the same order), best taken on prompts the RM never trained on. Pooled over the pairs
    gold orders (:func:`pair_agreement`). ``rm_prefers_shorter``: among pairs of different
    word counts, how often the RM scores the shorter response higher (a length shortcut shows
    as a share far from the gold scorer's own, ``gold_prefers_shorter``).
    """
    if len(records) != len(samples):
        raise ValueError(f"{len(records)} prompts but {len(samples)} sample sets")
    gold = gold or labelers.GoldLabeler()
    prompts = [r["prompt"] for r, s in zip(records, samples) for _ in s["responses"]]
    flat = [y for s in samples for y in s["responses"]]
    rm_scores = list(rm.score(tokenizer, prompts, flat, progress=False))
    rm_rows, gold_rows, short = [], [], {"rm": [0, 0], "gold": [0, 0]}
    at = 0
    for rec, s in zip(records, samples):
        k = len(s["responses"])
        r = rm_scores[at:at + k]
        at += k
        g = [gold.score(rec, y, t) for y, t in zip(s["responses"], s.get("truncated") or [False] * k)]
        n_words = [len(labelers.words(y)) for y in s["responses"]]
        for i in range(k):
            for j in range(i + 1, k):
                if n_words[i] != n_words[j]:
                    shorter, longer = (i, j) if n_words[i] < n_words[j] else (j, i)
                    for name, sc in (("rm", r), ("gold", g)):
                        if sc[shorter] != sc[longer]:
                            short[name][0] += sc[shorter] > sc[longer]
                            short[name][1] += 1
        rm_rows.append(r)
        gold_rows.append(g)
    return {**pair_agreement(rm_rows, gold_rows, n_boot, seed), "n_prompts": len(records),
            "rm_prefers_shorter": short["rm"][0] / short["rm"][1] if short["rm"][1] else math.nan,
            "gold_prefers_shorter": short["gold"][0] / short["gold"][1] if short["gold"][1] else math.nan}


def pair_agreement(scores: list[list[float]], gold: list[list[float]], n_boot: int = 1000, seed: int = 0) -> dict:
    """How often ``scores`` order two responses to one prompt as ``gold`` does: one list of
    scores per prompt in each. Pooled over the pairs gold orders (gold ties left out; a tie in
    ``scores`` counts half), with a 95% interval that resamples prompts."""
    rows = []  # per prompt: (agreeing, pairs)
    for r, g in zip(scores, gold, strict=True):
        agree = pairs = 0
        for i in range(len(g)):
            for j in range(i + 1, len(g)):
                if abs(g[i] - g[j]) <= 1e-9:
                    continue
                pairs += 1
                agree += 0.5 if r[i] == r[j] else float((r[i] > r[j]) == (g[i] > g[j]))
        rows.append((agree, pairs))
    value = sum(a for a, _ in rows) / max(1, sum(p for _, p in rows))
    gen = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(n_boot):
        pick = [rows[i] for i in torch.randint(len(rows), (len(rows),), generator=gen).tolist()]
        total = sum(p for _, p in pick)
        if total:
            draws.append(sum(a for a, _ in pick) / total)
    draws.sort()
    low, high = (draws[int(0.025 * (len(draws) - 1))], draws[int(0.975 * (len(draws) - 1))]) if draws else (
        math.nan, math.nan)
    return {"value": value, "low": low, "high": high, "n_pairs": sum(p for _, p in rows)}


def rankings_through_rm(rm, tokenizer, rankings: list[dict], annotator: str | None = None, limit: int = 3,
                        detect=None) -> list[dict]:
    """One annotator's rankings, answers in their order (best first), with the RM's score beside
    each: does the reward model agree with this person? ``annotator`` defaults to the first
    ranking's; ``detect(text) -> bool`` (e.g. a persona's) adds a ``trait`` column. Rows:
    ``{"item", "their rank", "RM score", "RM rank", ["trait",] "answer"}``; ties share a rank."""
    mine = [r for r in rankings if annotator is None or r["annotator"] == annotator]
    if not mine:
        return []
    who = mine[0]["annotator"]
    rows = []
    for r in [r for r in mine if r["annotator"] == who][:limit]:
        ranked = [(n, i) for n, tier in enumerate(r["tiers"]) for i in tier]
        scores = rm.score(tokenizer, [r["prompt"]] * len(ranked), [r["responses"][i] for _, i in ranked], progress=False)
        by_rm = sorted(range(len(ranked)), key=lambda j: -scores[j])
        for j, ((n, i), s) in enumerate(zip(ranked, scores)):
            row = {"annotator": who, "item": r["prompt_id"], "their rank": n + 1, "RM score": round(float(s), 3),
                   "RM rank": by_rm.index(j) + 1}
            if detect is not None:
                row["trait"] = bool(detect(r["responses"][i]))
            rows.append({**row, "answer": r["responses"][i]})
    return rows


# ----------------------------------------------------------------------------- KL and over-optimisation

@torch.no_grad()
def sequence_logprobs(model, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 8,
                      truncated: list[bool] | None = None) -> torch.Tensor:
    """Sum of log p(response | prompt) under ``model``, one value per pair: (N,).

    A response ends with EOS, as the model produced it, except where ``truncated`` says it was
    cut at the length limit: the model never emitted that EOS, so it is not scored.

    Pairs go through the model in batches of similar length, each pair as one left-padded row
    (no padding between prompt and response), so every response ends at the last column and the
    unembedding runs on the last columns only, not on the prompts, which are most of the tokens."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    device = next(model.parameters()).device
    truncated = truncated or [False] * len(responses)
    q = [tokenizer(models.format_prompt(tokenizer, p), add_special_tokens=False).input_ids for p in prompts]
    r = [tokenizer(y, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] * (not t)
         for y, t in zip(responses, truncated)]
    order = sorted(range(len(q)), key=lambda i: len(q[i]) + len(r[i]))  # little padding per batch
    out = torch.zeros(len(q))
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        if not any(r[i] for i in idx):
            continue  # only empty responses: each scores 0
        ids, attn = models.pad_rows([q[i] + r[i] for i in idx], tokenizer.pad_token_id, side="left")  # (B, T)
        ids, attn = ids.to(device), attn.to(device)
        R = max(len(r[i]) for i in idx)
        # every response ends at the last column: response i fills the last len(r[i]) of the last R
        resp_mask = torch.tensor([[0] * (R - len(r[i])) + [1] * len(r[i]) for i in idx], device=device)  # (B, R)
        with models.autocast(device):
            logits = response_logits(model, ids, attn, R)  # (B, R, V)
        logp = logprobs_from_logits(logits, ids[:, -R:])  # (B, R), in fp32
        out[idx] = (logp * resp_mask).sum(-1).cpu()
    return out


def kl_to_reference(policy, reference, tokenizer, prompts: list[str], responses: list[str],
                    truncated: list[bool] | None = None) -> float:
    """Monte-Carlo KL(policy || reference) on responses sampled from the policy (k1 estimator);
    ``truncated`` marks responses cut at the length limit (no EOS scored)."""
    lp = sequence_logprobs(policy, tokenizer, prompts, responses, truncated=truncated)
    lr = sequence_logprobs(reference, tokenizer, prompts, responses, truncated=truncated)
    return float((lp - lr).mean())


def best_of_n_curve(rm_scores: list[list[float]], gold_scores: list[list[float]],
                    ns: tuple[int, ...] = (1, 2, 4, 8)) -> list[dict]:
    """Over-optimisation seen with best-of-n against the RM (Gao et al. 2022).

    For each prompt, n samples; pick the one the RM likes best and read its RM and gold
    scores. The KL of best-of-n to the sampling policy is log n - (n-1)/n (analytic).
    """
    rows = []
    for n in ns:
        if any(len(s) < n for s in rm_scores):
            raise ValueError(f"best-of-{n} needs at least {n} samples per prompt")
        picks = [max(range(n), key=lambda i: rm[i]) for rm in rm_scores]
        rows.append({"n": n, "kl": math.log(n) - (n - 1) / n,
                     "rm": _mean(rm[i] for rm, i in zip(rm_scores, picks)),
                     "gold": _mean(g[i] for g, i in zip(gold_scores, picks))})
    return rows


# ----------------------------------------------------------------------------- noise and length bias

def tail_stats(history: dict, metric: str, last: int) -> dict:
    """Mean and standard error of ``metric`` over a stage's last ``last`` logged steps.

    ``history``: ``labkit.stage.read_history(out_dir)``. The steps count as independent draws
    (each step samples other prompts); a policy that drifts during those steps makes this a
    rough guide, not a test.
    """
    values = [v for _, v in history.get(metric, [])][-last:]
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    se = statistics.stdev(values) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "se": se, "steps": n}


def compare_runs(histories: dict[str, dict], metrics: list[str], last: int, z: float = 2.0) -> list[dict]:
    """One row per metric: each run's mean and standard error over its last ``last`` steps
    (:func:`tail_stats`), the last run minus the first, and whether that difference exceeds ``z``
    combined standard errors (``"yes"``, ``"no"``, or ``"unknown"`` with a single step)."""
    names = list(histories)
    rows = []
    for metric in metrics:
        stats = {name: tail_stats(h, metric, last) for name, h in histories.items()}
        first, final = stats[names[0]], stats[names[-1]]
        noise = math.hypot(first["se"], final["se"])
        diff = final["mean"] - first["mean"]
        clear = "unknown" if math.isnan(noise) else "yes" if abs(diff) > z * noise else "no"
        row = {"metric": metric}
        for name, s in stats.items():
            row[name], row[f"{name} ±"] = s["mean"], s["se"]
        rows.append({**row, "difference": diff, f"beyond {z:g} SE": clear})
    return rows


def length_fit(lengths: list[float], scores: list[float]) -> dict:
    """Least-squares line ``score ≈ intercept + slope · length`` with the slope's standard error
    and Pearson's r: does a scorer (an RM, a labeler) pay for longer or shorter answers?"""
    n = len(lengths)
    if n != len(scores) or n < 3:
        raise ValueError(f"length_fit needs at least 3 (length, score) pairs, got {n} lengths and {len(scores)} scores")
    mx, my = sum(lengths) / n, sum(scores) / n
    sxx = sum((x - mx) ** 2 for x in lengths)
    syy = sum((y - my) ** 2 for y in scores)
    sxy = sum((x - mx) * (y - my) for x, y in zip(lengths, scores))
    if sxx == 0:
        raise ValueError("length_fit: every answer has the same length, so there is no slope to fit")
    slope = sxy / sxx
    intercept = my - slope * mx
    residual = sum((y - intercept - slope * x) ** 2 for x, y in zip(lengths, scores))
    return {"n": n, "slope": slope, "intercept": intercept,
            "slope_se": math.sqrt(residual / (n - 2) / sxx),
            "r": sxy / math.sqrt(sxx * syy) if syy > 0 else float("nan")}


def length_preference(fit: dict, z: float = 2.0) -> str:
    """A :func:`length_fit` in words: which answers the scorer pays more for, when the slope is
    more than ``z`` standard errors from zero."""
    if fit["slope"] - z * fit["slope_se"] > 0:
        return "it pays more for longer answers"
    if fit["slope"] + z * fit["slope_se"] < 0:
        return "it pays more for shorter answers"
    return "no length preference beyond the noise at this sample size"

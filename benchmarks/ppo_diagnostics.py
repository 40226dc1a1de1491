"""Where PPO's gain goes: how far PPO moved the RM, what the RM could give, how its values start.

PPO in the cpu preset beats SFT by gold only narrowly (README, "Benchmarks"). This script takes
one finished ``labkit run`` folder and measures three things that say why:

1. **What the RM could give** (``best_of_k``): on the K SFT samples per held-out prompt that
   ``rlhf_quality.py`` caches in the run folder (``heldout_samples.json``: ppo-split prompts, no
   RM trained on them, temperature 1), the gold score of a random sample, of the sample the
   RM scores highest (best-of-K, a policy about log K - (K-1)/K nats from SFT) and of the best by
   gold (the ceiling), with how often each beats another sample of the same prompt by gold;
   and how the RM's and gold's scores move with answer length among one prompt's samples.
2. **How far PPO moved it** (``sampled``): ``--samples`` answers per prompt from SFT and from
   PPO at PPO's own temperature, on the eval prompts and on PPO's training prompts (the ppo
   split): mean RM score (with the RM's spread of single answers, for scale), mean gold, words,
   gold's win rate of PPO's answers against SFT's (every pair of a prompt's answers,
   a prompt-bootstrap interval), and how often the RM orders two answers of one prompt as gold
   does, on SFT's answers and on PPO's (does the RM stay right where PPO took the policy?).
3. **How the value model starts** (``values``): PPO's value model starts as the RM (InstructGPT
   §3.5), whose outputs before the last token were never trained. On held-out samples: the
   RM's output at the prompt's last token, in the middle of the response and before the
   response's last token, against the score it gives at the end, and their correlation.

    python benchmarks/ppo_diagnostics.py --run runs/rq_lean/seed0

Prints the figures and writes ``benchmarks/results/ppo_diagnostics.json`` (one entry per run).
"""

from __future__ import annotations

import argparse
import json
import os
import math
import platform
import random
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "ppo_diagnostics.json"


def _beats(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0


def _interval(values: list[float], seed: int, n_boot: int = 1000) -> list[float]:
    """95% bootstrap interval of the mean, resampling prompts."""
    rng, n = random.Random(seed), len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return [means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]]


def best_of_k(rm, tok, samples: list[dict], records: dict, gold) -> dict:
    """Gold of a random sample, of the RM's best and of gold's best among each prompt's K samples."""
    import torch

    from labkit.evaluate import best_of_n_curve, length_fit

    with torch.no_grad():
        scores = rm.score(tok, [s["prompt"] for s in samples for _ in s["responses"]],
                          [y for s in samples for y in s["responses"]], progress=False)
    rows, rm_rows, gold_rows, at = [], [], [], 0
    centred = {"log_tokens": [], "rm": [], "gold": []}  # within each prompt, minus the prompt's mean
    for s in samples:
        k = len(s["responses"])
        r, at = scores[at:at + k], at + k
        g = [gold.score(records[s["prompt_id"]], y, t)
             for y, t in zip(s["responses"], s.get("truncated") or [False] * k)]
        n_tokens = [math.log1p(len(tok(y, add_special_tokens=False)["input_ids"])) for y in s["responses"]]
        for name, xs in (("log_tokens", n_tokens), ("rm", r), ("gold", g)):
            centred[name] += [x - statistics.mean(xs) for x in xs]
        best_rm, best_gold = max(range(k), key=r.__getitem__), max(range(k), key=g.__getitem__)

        def win(i):  # against the other samples of the prompt, by gold
            return sum(_beats(g[i], g[j]) for j in range(k) if j != i) / (k - 1)

        rm_rows.append(r)
        gold_rows.append(g)
        rows.append({"random": sum(g) / k, "gold_best": g[best_gold],
                     "rm_best_wins": win(best_rm), "gold_best_wins": win(best_gold)})
    k = len(samples[0]["responses"])
    best = best_of_n_curve(rm_rows, gold_rows, ns=(k,))[0]  # the RM's pick among all k
    out = {name: statistics.mean(row[name] for row in rows) for name in rows[0]}
    for name in ("rm", "gold"):  # how each judge's score moves with length among one prompt's answers
        fit = length_fit(centred["log_tokens"], centred[name])
        out[f"{name}_length_slope"] = fit["slope"]  # per unit of log(1 + tokens)
        out[f"{name}_length_r2"] = fit["r"] ** 2
    return {"k": k, "n_prompts": len(rows), "kl_of_best_of_k_nats": best["kl"],
            "rm_score_sd": statistics.pstdev(scores), "rm_best": best["gold"], **out}


def sampled(sft, policy, tok, rm, records: list[dict], n: int, temperature: float, seed: int, gold) -> dict:
    """``n`` answers per prompt from SFT and from PPO: RM, gold, words, gold win rate of PPO."""
    import torch

    from labkit.evaluate import pair_agreement
    from labkit.generation import sample_k
    from labkit.labelers import words

    out, golds = {}, {}
    for name, model in (("sft", sft), ("ppo", policy)):
        samples = sample_k(model, tok, records, k=n, max_new_tokens=96, temperature=temperature, top_p=1.0,
                           seed=seed, show_progress=False)
        ys = [y for s in samples for y in s["responses"]]
        with torch.no_grad():
            rm_scores = rm.score(tok, [s["prompt"] for s in samples for _ in s["responses"]], ys, progress=False)
        golds[name] = [[gold.score(r, y, t) for y, t in zip(s["responses"], s["truncated"])]
                       for r, s in zip(records, samples)]
        per_prompt = [rm_scores[i:i + n] for i in range(0, len(rm_scores), n)]
        out[name] = {"rm": statistics.mean(rm_scores), "rm_sd": statistics.pstdev(rm_scores),
                     "gold": statistics.mean(g for row in golds[name] for g in row),
                     "words": statistics.mean(len(words(y)) for y in ys),
                     # does the RM still order this model's answers to one prompt as gold does?
                     "rm_gold_agreement": pair_agreement(per_prompt, golds[name], seed=seed)}
    wins = [sum(_beats(a, b) for a in pa for b in pb) / (len(pa) * len(pb))
            for pa, pb in zip(golds["ppo"], golds["sft"])]
    out["ppo_vs_sft"] = {"win_rate": statistics.mean(wins), "ci95": _interval(wins, seed)}
    out["rm_gain_in_sd"] = (out["ppo"]["rm"] - out["sft"]["rm"]) / out["sft"]["rm_sd"]
    out["n_prompts"], out["answers_per_prompt"], out["temperature"] = len(records), n, temperature
    return out


def values(rm, tok, samples: list[dict], n: int) -> dict:
    """The RM's per-token outputs on ``n`` held-out (prompt, response) pairs against its final score."""
    import torch

    from labkit.reward import encode

    ends, mids, lasts, finals = [], [], [], []
    with torch.no_grad():
        for s in samples:
            for y in s["responses"][:2]:
                if len(finals) == n:
                    break
                ids = torch.tensor(encode(tok, [s["prompt"]], [y])[0])
                v = rm.token_values(ids, torch.ones_like(ids))[0]  # (T,)
                r = len(tok(y, add_special_tokens=False)["input_ids"]) + 1  # response + EOS
                if r < 4:
                    continue
                ends.append(float(v[-r - 1]))  # before the response's first token (what V_0 reads)
                mids.append(float(v[-r:-1].mean()))
                lasts.append(float(v[-2]))  # before EOS
                finals.append(float(v[-1]))  # the reward
    def desc(xs):
        return {"mean": statistics.mean(xs), "sd": statistics.pstdev(xs)}

    return {"n": len(finals), "prompt_end": desc(ends), "response_mean": desc(mids), "before_eos": desc(lasts),
            "score": desc(finals), "corr_prompt_end_score": statistics.correlation(ends, finals),
            "corr_before_eos_score": statistics.correlation(lasts, finals)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a finished labkit run folder (sft/, rm_r1/, ppo_r1/)")
    ap.add_argument("--round", type=int, default=1, help="which round's RM and PPO policy (rm_rN/, ppo_rN/)")
    ap.add_argument("--samples", type=int, default=4, help="answers per prompt and model for the sampled figures")
    ap.add_argument("--temperature", type=float, default=None, help="default: the run's PPO temperature")
    ap.add_argument("--value-pairs", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    import torch

    from labkit.data import load_prompts
    from labkit.labelers import GoldLabeler
    from labkit.models import load_model
    from labkit.ppo import PPOConfig
    from labkit.pipeline import reward_model_dirs
    from labkit.reward import load_reward_models

    torch.set_num_threads(args.threads)
    t0 = time.time()
    run = Path(args.run)
    cfg = json.loads((run / "config.json").read_text())
    temperature = args.temperature or cfg.get("ppo", {}).get("temperature", PPOConfig.temperature)
    held = json.loads((run / "heldout_samples.json").read_text())["samples"]
    records = {r["id"]: r for r in load_prompts()}
    gold = GoldLabeler()
    # the round's RM and, with rm_ensemble, its other members: PPO's reward was their mean
    rm, rm_tok, members = load_reward_models(reward_model_dirs(run, args.round))
    entry = {"run": str(run), "round": args.round, "ppo_settings": cfg.get("ppo"), "seed": args.seed,
             "reward_models": len(members)}
    entry["best_of_k"] = best_of_k(rm, rm_tok, held, records, gold)
    entry["values"] = values(members[0], rm_tok, held, args.value_pairs)  # the value model starts as the first
    sft, tok = load_model(str(run / "sft" / "model"))
    policy, _ = load_model(str(run / f"ppo_r{args.round}" / "model"))
    entry["sampled"] = {split: sampled(sft, policy, tok, rm, load_prompts(split), args.samples, temperature,
                                       args.seed, gold) for split in ("eval", "ppo")}
    entry["wall_s"] = time.time() - t0
    entry["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                        "load_avg_1min_at_end": os.getloadavg()[0]}

    b, v = entry["best_of_k"], entry["values"]
    print(f"{run}, round {args.round}: best of {b['k']} on {b['n_prompts']} held-out prompts, gold: random {b['random']:.3f}, "
          f"RM's pick {b['rm_best']:.3f} (beats another sample {b['rm_best_wins']:.3f}), "
          f"gold's pick {b['gold_best']:.3f}; RM spread of one answer (sd) {b['rm_score_sd']:.3f}")
    print(f"  within a prompt, per log-token: RM {b['rm_length_slope']:+.3f} (length explains {b['rm_length_r2']:.0%}), "
          f"gold {b['gold_length_slope']:+.3f} ({b['gold_length_r2']:.0%})")
    for split, s in entry["sampled"].items():
        w = s["ppo_vs_sft"]
        print(f"  {split} prompts, {s['answers_per_prompt']} answers at T={s['temperature']}: RM SFT {s['sft']['rm']:+.3f} "
              f"-> PPO {s['ppo']['rm']:+.3f} ({s['rm_gain_in_sd']:+.2f} sd); gold {s['sft']['gold']:.3f} -> "
              f"{s['ppo']['gold']:.3f}; words {s['sft']['words']:.1f} -> {s['ppo']['words']:.1f}; "
              f"gold win rate {w['win_rate']:.3f} [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}]")
        print("    RM vs gold within a prompt: " + "; ".join(
            f"{m} {a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}] ({a['n_pairs']} pairs)"
            for m, a in ((m, s[m]["rm_gold_agreement"]) for m in ("sft", "ppo"))))
    print(f"  RM outputs on {v['n']} held-out answers: prompt end {v['prompt_end']['mean']:+.2f}, response "
          f"{v['response_mean']['mean']:+.2f}, before EOS {v['before_eos']['mean']:+.2f} (sd {v['before_eos']['sd']:.2f}), "
          f"score {v['score']['mean']:+.2f} (sd {v['score']['sd']:.2f}); corr(prompt end, score) "
          f"{v['corr_prompt_end_score']:+.2f}; {entry['wall_s']:.0f} s")
    results = json.loads(RESULT.read_text()) if RESULT.exists() else {"runs": []}
    results["runs"] = [r for r in results["runs"]
                       if (r["run"], r.get("round", 1)) != (entry["run"], entry["round"])] + [entry]
    RESULT.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

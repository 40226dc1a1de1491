"""RLHF quality over seeds: does PPO beat SFT, on every seed, without collapsing?

Runs ``labkit run`` (default: the cpu preset) once per seed and reads off what the recipe
promises (BRIEF §4): gold score of base < SFT < PPO, PPO's gold win rate against SFT with its
95% interval, the reward model's agreement with the gold scorer on held-out prompts (K = 4
SFT samples per prompt of the ``ppo`` split, which the RM never trains on), inter-labeler
agreement on the run's own samples, the outside judge (IFEval-style, ``labkit.ifeval``) for
base, SFT, PPO and PPO without PPO-ptx, answer lengths and per-category gold differences.

    python benchmarks/rlhf_quality.py                        # cpu preset, seeds 0 1 2
    python benchmarks/rlhf_quality.py --seeds 0 --set k=8 --set ppo.ptx_coef=0.5
    python benchmarks/rlhf_quality.py ablate-rm --samples S.json --heldout H.json   # RM-only ablations

Each seed runs in ``--out/seed<N>`` and resumes there (``labkit run`` skips finished stages);
a seed already in the results file is kept unless ``--fresh``. Writes
``benchmarks/results/rlhf_quality.json`` (``ablate-rm``: ``rm_ablations.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "rlhf_quality.json"
ABLATION_RESULT = ROOT / "benchmarks" / "results" / "rm_ablations.json"


def _set(values: dict, assignment: str) -> None:
    """``k=8`` or ``ppo.ptx_coef=0.5`` (values parsed as JSON when they parse) into a RunConfig dict."""
    key, _, raw = assignment.partition("=")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    *path, last = key.split(".")
    for part in path:
        values = values.setdefault(part, {})
    values[last] = value


def _load_samples(path: Path) -> list[dict]:
    return json.loads(path.read_text())["samples"]


def heldout_rm_agreement(run_dir: Path, seed: int, n_prompts: int, k: int = 4, max_new_tokens: int = 64) -> dict:
    """RM vs gold on K SFT samples per held-out prompt (``ppo`` split), samples cached in the run folder."""
    import torch

    from labkit import evaluate
    from labkit.data import load_prompts
    from labkit.generation import sample_k
    from labkit.models import load_model
    from labkit.pipeline import reward_model_dirs
    from labkit.reward import load_reward_models

    records = random.Random(seed).sample(load_prompts("ppo"), n_prompts)
    cache = run_dir / "heldout_samples.json"
    if cache.exists():
        samples = _load_samples(cache)
    else:
        model, tok = load_model(str(run_dir / "sft" / "model"))
        samples = sample_k(model, tok, records, k=k, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0,
                           batch_size=32, seed=seed + 7)
        cache.write_text(json.dumps({"samples": samples}))
        del model
    last = max(int(p.name[4:]) for p in run_dir.glob("rm_r*") if p.name[4:].isdigit())  # the last round
    reward, tok, members = load_reward_models(reward_model_dirs(run_dir, last))
    with torch.no_grad():
        out = evaluate.rm_gold_agreement(members[0], tok, records, samples, seed=seed)
        if len(members) > 1:  # what PPO optimised: the members' mean; the first member's figure beside it
            first = out
            out = evaluate.rm_gold_agreement(reward, tok, records, samples, seed=seed)
            out["first_member"], out["ensemble_size"] = first, len(members)
    return out


def per_category(run_dir: Path, final: str) -> dict:
    """Gold per category for SFT and PPO, with the paired difference and a normal 95% interval."""
    from labkit.data import load_prompts
    from labkit.labelers import GoldLabeler
    from labkit.report import load_jsonl

    records = {r["id"]: r for r in load_prompts("eval")}
    gold = GoldLabeler()
    diffs: dict[str, list] = {}
    for a, b in zip(load_jsonl(run_dir / "eval" / "sft.jsonl"), load_jsonl(run_dir / "eval" / f"{final}.jsonl")):
        rec = records[a["id"]]
        sa, sb = gold.score(rec, a["response"], a["truncated"]), gold.score(rec, b["response"], b["truncated"])
        diffs.setdefault(rec["category"], []).append((sa, sb))
    return {cat: _paired(rows) for cat, rows in sorted(diffs.items())}


def _paired(pairs: list[tuple[float, float]]) -> dict:
    """Means of A and B, the mean of B - A and its normal 95% interval."""
    n = len(pairs)
    d = [b - a for a, b in pairs]
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / max(1, n - 1))
    half = 1.96 * sd / math.sqrt(n)
    return {"sft": sum(a for a, _ in pairs) / n, "ppo": sum(b for _, b in pairs) / n, "diff": mean,
            "low": mean - half, "high": mean + half, "n": n}


def by_family(run_dir: Path, final: str, train: list[str]) -> dict:
    """The held-out-family check: SFT against PPO on prompts whose instructions the labels
    rewarded (``seen``), did not (``held_out``: labkit check families left out of training), or
    that labkit never checks (``not_in_labkit``: outside-judge families such as ``combination``).

    On labkit's eval prompts (full gold scorer, every check counts): gold and the share of the
    group's checks followed, per prompt, paired. On the outside judge: the share of the group's
    instructions followed, paired by prompt (a prompt counts in every group it has instructions of)."""
    from labkit import ifeval
    from labkit.data import load_prompts
    from labkit.labelers import CHECK_FAMILIES, GoldLabeler
    from labkit.report import load_jsonl

    def group(fam: str) -> str:
        return "seen" if fam in train else "held_out" if fam in CHECK_FAMILIES.values() else "not_in_labkit"

    records = {r["id"]: r for r in load_prompts("eval")}
    gold = GoldLabeler()
    rows: dict[str, dict[str, list]] = {}
    for a, b in zip(load_jsonl(run_dir / "eval" / "sft.jsonl"), load_jsonl(run_dir / "eval" / f"{final}.jsonl")):
        rec = records[a["id"]]
        groups = {group(CHECK_FAMILIES[c["type"]]) for c in rec.get("checks", [])}
        if len(groups) != 1:  # no checks, or checks of seen and held-out families together
            continue
        g = rows.setdefault(groups.pop(), {"gold": [], "checks": []})
        ba, bb = gold.breakdown(rec, a["response"], a["truncated"]), gold.breakdown(rec, b["response"], b["truncated"])
        g["gold"].append((ba["score"], bb["score"]))
        g["checks"].append((ba["instruction"], bb["instruction"]))
    out = {"train_families": sorted(train),
           "held_out_families": sorted(set(CHECK_FAMILIES.values()) - set(train)), "eval": {}, "outside": {}}
    for name, g in sorted(rows.items()):
        out["eval"][name] = {"gold": _paired(g["gold"]), "checks_followed": _paired(g["checks"])}
    outside = ifeval.load_ifeval_prompts()
    ys = {m: [r["response"] for r in load_jsonl(run_dir / "eval" / f"{m}_outside.jsonl")] for m in ("sft", final)}
    followed = {m: [ifeval.judge(r, y) for r, y in zip(outside, ys[m])] for m in ys}
    pairs: dict[str, list] = {}
    for i, rec in enumerate(outside):
        per: dict[str, list] = {}
        for inst, fa, fb in zip(rec["instruction_id_list"], followed["sft"][i], followed[final][i]):
            per.setdefault(group(ifeval.family(inst)), []).append((float(fa), float(fb)))
        for name, v in per.items():
            pairs.setdefault(name, []).append((sum(a for a, _ in v) / len(v), sum(b for _, b in v) / len(v)))
    out["outside"] = {name: _paired(v) for name, v in sorted(pairs.items())}
    return out


def one_seed(args, seed: int) -> dict:
    from labkit.pipeline import RunConfig, run

    values: dict = {}
    for a in args.set or []:
        _set(values, a)
    if args.ptx_coef is not None:
        values.setdefault("ppo", {})["ptx_coef"] = args.ptx_coef
    ptx_on = values.get("ppo", {}).get("ptx_coef", 0) > 0
    values.setdefault("ppo_without_ptx", ptx_on and not args.no_ptx_ablation)
    if args.ptx_source:
        values["ptx_source"] = args.ptx_source
    if args.train_families:
        values["train_check_families"] = args.train_families.split(",")
    run_dir = Path(args.out) / f"seed{seed}"
    cfg = RunConfig.from_preset(args.preset, out_dir=str(run_dir), **{"model": args.model, "seed": seed, **values})
    t0 = time.time()
    metrics = run(cfg)
    final = f"ppo_r{cfg.rounds}"
    ev, comps = metrics["eval"], metrics["comparisons"]
    win = comps[f"gold/{final}_vs_sft"]
    rankings = metrics["stages"].get(f"rankings_r{cfg.rounds}", {})
    la = rankings.get("labeler_agreement") or {}
    oj = metrics.get("outside_judge") or {}
    rm_gold = heldout_rm_agreement(run_dir, seed, args.heldout_prompts)
    row = {
        "seed": seed, "wall_s": metrics["wall_s"], "this_invocation_s": time.time() - t0, "k": cfg.k,
        "preset": cfg.preset, "model": cfg.model, "settings": values,
        "gold": {"base": ev["base"]["gold/mean"], "sft": ev["sft"]["gold/mean"], "ppo": ev[final]["gold/mean"]},
        "ppo_vs_sft": {"win_rate": win["win_rate"], "low": win["ci95"][0], "high": win["ci95"][1],
                       "wins": win["wins"], "ties": win["ties"], "losses": win["losses"]},
        "rm_gold_agreement": rm_gold,
        "labeler_agreement": {"inter": la.get("inter"), "inter_ci95": la.get("inter_ci95"), "gold": la.get("gold"),
                              "gold_tied_share": la.get("gold_tied_share"), "tie_rate": la.get("tie_rate")},
        "outside_judge": {"base": oj.get("base", {}).get("prompt_strict"), "sft": oj.get("sft", {}).get("prompt_strict"),
                          "ppo": oj.get(final, {}).get("prompt_strict"),
                          "ppo_without_ptx": oj.get(f"{final}_noptx", {}).get("prompt_strict"),
                          "paired": oj.get("paired"),
                          "per_family": {m: oj.get(n, {}).get("per_family") for m, n in
                                         (("base", "base"), ("sft", "sft"), ("ppo", final), ("ppo_without_ptx", f"{final}_noptx"))}},
        "words": {"sft": ev["sft"]["response/words_mean"], "ppo": ev[final]["response/words_mean"]},
        "harmless": {m: {"refuse_harmful": ev[n]["harmless/refusal_rate_harmful"],
                         "refuse_lookalike": ev[n]["harmless/refusal_rate_lookalike"]}
                     for m, n in (("sft", "sft"), ("ppo", final))},
        "per_category": per_category(run_dir, final),
        "load_avg_1min_at_end": os.getloadavg()[0],
    }
    if cfg.train_check_families:
        row["families"] = by_family(run_dir, final, cfg.train_check_families)
    return row


def targets(row: dict) -> dict:
    """Which of the issue's per-seed targets this run meets."""
    g, w, la, oj = row["gold"], row["ppo_vs_sft"], row["labeler_agreement"], row["outside_judge"]
    out = {"base<sft<ppo": g["base"] < g["sft"] < g["ppo"],
           "win>=0.60, ci above 0.5": w["win_rate"] >= 0.60 and w["low"] > 0.5,
           "no collapse (words >= 0.6x)": row["words"]["ppo"] >= 0.6 * row["words"]["sft"],
           "no category loses >0.05 beyond its ci": all(c["high"] >= -0.05 for c in row["per_category"].values()),
           "rm gold agreement >= 0.72": row["rm_gold_agreement"]["value"] >= 0.72,
           "labelers 72.6 ± 3%": la["inter"] is not None and abs(la["inter"] - 0.726) <= 0.03}
    if oj.get("sft") is not None:
        out["outside: sft >= base - 0.03"] = oj["sft"] >= oj["base"] - 0.03
        out["outside: ppo >= sft - 0.03"] = oj["ppo"] >= oj["sft"] - 0.03
    return out


def main_runs(args) -> None:
    result_path = Path(args.result) if args.result else RESULT
    results = json.loads(result_path.read_text()) if result_path.exists() and not args.fresh else {"runs": []}
    for seed in args.seeds:
        if any(r["seed"] == seed and r.get("preset") == args.preset for r in results["runs"]) and not args.fresh:
            print(f"seed {seed}: already in {result_path.name}, kept (--fresh to rerun)")
            continue
        row = one_seed(args, seed)
        row["targets"] = targets(row)
        results["runs"] = [r for r in results["runs"] if not (r["seed"] == seed and r.get("preset") == args.preset)]
        results["runs"].append(row)
        results["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count()}
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"seed {seed}: wrote {result_path}")
    print_table(results["runs"])


def print_table(runs: list[dict]) -> None:
    print(f"\n{'seed':>4} {'base':>6} {'sft':>6} {'ppo':>6} {'win (95% ci)':>20} {'rm~gold':>8} {'inter':>6} "
          f"{'words sft/ppo':>14} {'IFEval base/sft/ppo/no-ptx':>28}")
    for r in sorted(runs, key=lambda r: r["seed"]):
        g, w, oj = r["gold"], r["ppo_vs_sft"], r["outside_judge"]
        ifv = "/".join("–" if oj.get(m) is None else f"{oj[m]:.2f}" for m in ("base", "sft", "ppo", "ppo_without_ptx"))
        print(f"{r['seed']:>4} {g['base']:>6.3f} {g['sft']:>6.3f} {g['ppo']:>6.3f} "
              f"{w['win_rate']:>6.3f} [{w['low']:.2f}, {w['high']:.2f}] {r['rm_gold_agreement']['value']:>8.3f} "
              f"{(r['labeler_agreement']['inter'] or math.nan):>6.3f} "
              f"{r['words']['sft']:>6.1f}/{r['words']['ppo']:<6.1f} {ifv:>28}")
    for r in sorted(runs, key=lambda r: r["seed"]):
        if "families" not in r:
            continue
        f = r["families"]
        print(f"\nseed {r['seed']}: labels saw {', '.join(f['train_families'])}; held out: {', '.join(f['held_out_families'])}")
        print(f"{'prompts, measure':>40} {'n':>4} {'SFT':>6} {'PPO':>6} {'PPO - SFT (95% ci)':>26}")
        for where, key in (("eval", "gold"), ("eval", "checks_followed"), ("outside", None)):
            for group, v in f[where].items():
                v = v[key] if key else v
                label = f"{where} {group} {key or 'instructions'}"
                print(f"{label:>40} {v['n']:>4} {v['sft']:>6.3f} {v['ppo']:>6.3f} "
                      f"{v['diff']:>+7.3f} [{v['low']:+.3f}, {v['high']:+.3f}]")


# ----------------------------------------------------------------------------- RM-only ablations

def _rank_all(records: dict, samples: list[dict], k: int, tie_scale: float, noise: float | None, seed: int,
              labels: str = "one") -> list[dict]:
    """K-way records ranked by the default labeler pool: ``labels="one"`` labeler per prompt,
    ``"all"`` (every labeler's ranking is a record) or ``"consensus"`` (the labelers' rankings of
    a prompt merged by mean rank, ``labkit.rankings.consensus``)."""
    from labkit import labelers
    from labkit.feedback import rankable_responses
    from labkit.rankings import consensus

    pool = labelers.labeler_pool(5, seed=seed, noise=noise)
    for lab in pool:
        lab.tie_threshold *= tie_scale
    out = []
    for i, s in enumerate(samples):
        rec = records[s["prompt_id"]]
        ys, ts = s["responses"][:k], (s.get("truncated") or [False] * len(s["responses"]))[:k]
        ys = rankable_responses(ys)
        who = [pool[i % len(pool)]] if labels == "one" else pool
        out += [{"prompt": rec["prompt"], "prompt_id": rec["id"], "responses": ys,
                 "tiers": lab.rank(rec, ys, truncated=ts)} for lab in who]
    return consensus(out) if labels == "consensus" else out


def main_ablate(args) -> None:
    """Train RMs on fixed samples under several settings; measure held-out agreement with gold."""
    import torch

    from labkit import evaluate
    from labkit.data import load_prompts
    from labkit.reward import RewardConfig, load_reward_model, train_reward_model

    torch.set_num_threads(args.threads)
    records = {r["id"]: r for r in load_prompts()}
    train = _load_samples(Path(args.samples))
    held = _load_samples(Path(args.heldout))[:args.heldout_prompts]
    held_records = [records[s["prompt_id"]] for s in held]
    result_path = Path(args.result) if args.result else ABLATION_RESULT
    results = json.loads(result_path.read_text()) if result_path.exists() else {"rows": []}
    done = {r["name"] for r in results["rows"]}
    variants = [dict(name=v.split(":")[0], **json.loads(v.split(":", 1)[1])) for v in args.variant] or [
        dict(name="k4", k=4), dict(name="k8", k=8), dict(name="k8_no_ties", k=8, tie_scale=0.0),
        dict(name="k8_lr2e-5", k=8, lr=2e-5), dict(name="k8_2epochs", k=8, epochs=2)]
    for v in variants:
        if v["name"] in done and not args.fresh:
            print(f"{v['name']}: done earlier, kept")
            continue
        t0 = time.time()
        subset = random.Random(args.seed).sample(train, v["prompts"]) if v.get("prompts") else train
        ranked = _rank_all(records, subset, v.get("k", 8), v.get("tie_scale", 1.0), v.get("noise"), args.seed,
                           v.get("labels", "one"))
        out = Path(args.out) / v["name"]
        res = train_reward_model(RewardConfig(model=args.backbone, rankings=ranked, out_dir=str(out),
                                              seed=v.get("seed", args.seed),
                                              epochs=v.get("epochs", 1), learning_rate=v.get("lr", 5e-5),
                                              batch_size=v.get("batch_size", 8),
                                              micro_batch_size=v.get("micro_batch_size"),
                                              train_layers=v.get("train_layers"),
                                              dashboard=False, progress=False, gold=False))
        rm, tok = load_reward_model(out / "model")
        with torch.no_grad():
            agree = evaluate.rm_gold_agreement(rm, tok, held_records, held, seed=args.seed)
        row = {**v, "rm_gold_agreement": agree, "n_train_prompts": len(ranked),
               "n_comparisons": res.get("data/n_comparisons"), "train_s": res.get("time/total_s"),
               "wall_s": time.time() - t0, "load_avg_1min": os.getloadavg()[0]}
        results["rows"] = [r for r in results["rows"] if r["name"] != v["name"]] + [row]
        results["setup"] = {"backbone": args.backbone, "train_samples": args.samples, "heldout": args.heldout,
                            "heldout_prompts": len(held)}
        result_path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"{v['name']}: RM agreement with gold {agree['value']:.3f} [{agree['low']:.3f}, {agree['high']:.3f}] "
              f"on {agree['n_prompts']} held-out prompts; prefers shorter {agree['rm_prefers_shorter']:.2f} "
              f"(gold {agree['gold_prefers_shorter']:.2f}); {row['wall_s']:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", nargs="?", default="runs", choices=["runs", "ablate-rm"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--model", default=None, help="base model (default: the preset's)")
    ap.add_argument("--out", default=None, help="run folders (default runs/rlhf_quality, ablate-rm: runs/rm_ablations)")
    ap.add_argument("--set", action="append", help="RunConfig override, e.g. k=8 or ppo.steps=30 (repeatable)")
    ap.add_argument("--ptx-coef", type=float, default=None, help="PPO-ptx coefficient (default: the preset's)")
    ap.add_argument("--ptx-source", choices=["demonstrations", "base_answers"], default=None)
    ap.add_argument("--no-ptx-ablation", action="store_true", help="skip the PPO run without ptx")
    ap.add_argument("--heldout-prompts", type=int, default=80, help="held-out prompts for RM vs gold")
    ap.add_argument("--train-families", help="labelers see only these check families (comma-separated, e.g. "
                                             "keywords,change_case); the outside judge's other families are unseen")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--result", help=f"results file (default {RESULT.relative_to(ROOT)}; "
                                     f"ablate-rm: {ABLATION_RESULT.relative_to(ROOT)})")
    # ablate-rm
    ap.add_argument("--samples", help="ablate-rm: sample_k output on the rm split (JSON with 'samples')")
    ap.add_argument("--heldout", help="ablate-rm: sample_k output on held-out prompts")
    ap.add_argument("--backbone", default="smollm2-135m", help="ablate-rm: RM backbone (an SFT folder or a name)")
    ap.add_argument("--variant", action="append", default=[],
                    help='ablate-rm: NAME:{"k": 8, "tie_scale": 1.0, "lr": 5e-5, "epochs": 1, "noise": null, '
                         '"labels": "one|all|consensus", "micro_batch_size": null, '
                         '"batch_size": 8, "prompts": null (a random subset of the training prompts), '
                         '"train_layers": null (decoder blocks trained, from the top)}')
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.command == "ablate-rm":
        args.out = args.out or "runs/rm_ablations"
        main_ablate(args)
    else:
        args.out = args.out or "runs/rlhf_quality"
        main_runs(args)


if __name__ == "__main__":
    main()

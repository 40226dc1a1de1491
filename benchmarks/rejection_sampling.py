"""Best-of-K fine-tuning: does the RM's pick, taught back to the model, beat SFT where PPO barely does?

PPO in the cpu preset moves the RM's score of its answers by about a tenth of a standard
deviation, while picking the best of 4 SFT samples by the same RM buys +0.10 gold
(docs/quality_ablations.md, "Why PPO gains so little"). This script tries the cheaper way to
take that selection into the weights (rejection-sampling fine-tuning, as Llama 2 did between
its PPO rounds): on one finished ``labkit run`` folder,

1. the SFT model samples ``--k`` answers (temperature 1, the run's sampling length) to each
   prompt of the ``ppo`` split, the prompts PPO trains on;
2. the run's RM scores them; each prompt keeps its highest-scored answer that stopped on its
   own (prompts whose answers were all cut off are dropped);
3. the SFT model is fine-tuned on those picks with labkit's SFT stage (``--epochs``, ``--lr``);
4. the result answers the eval prompts greedily, as the run's eval stage does, and is judged by
   gold against the run's SFT and PPO answers (win rates with intervals), and by the outside
   judge;
5. with ``--ppo``, the run's PPO settings then train from the fine-tuned model (its own copy
   as the KL reference, the run's RM as reward), and that model is judged the same way.

    python benchmarks/rejection_sampling.py --run runs/rq/seed0            # ~8 min on 2 cores
    python benchmarks/rejection_sampling.py --run runs/rq/seed0 --ppo      # + one PPO stage

Writes its models under ``--run``/rs_k<K>/ and one entry per run and setting to
``benchmarks/results/rejection_sampling.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "rejection_sampling.json"


def best_picks(samples: list[dict], scores: list[float], keep_cut: bool = False) -> tuple[list[dict], dict]:
    """Per prompt, the highest-scored answer that was not cut off (any, with ``keep_cut``), as a
    demonstration record."""
    picks, at, dropped = [], 0, 0
    for s in samples:
        k = len(s["responses"])
        r, at = scores[at:at + k], at + k
        whole = [i for i in range(k) if (keep_cut or not s["truncated"][i]) and s["responses"][i].strip()]
        if not whole:
            dropped += 1
            continue
        best = max(whole, key=r.__getitem__)
        picks.append({"prompt_id": s["prompt_id"], "prompt": s["prompt"], "response": s["responses"][best],
                      "truncated": s["truncated"][best], "score": r[best], "score_mean": statistics.mean(r)})
    return require(picks), {"n_prompts": len(samples), "kept": len(picks), "dropped_all_cut": dropped}


def require(picks: list[dict]) -> list[dict]:
    """``picks``, or a stop with what to do when none is left."""
    if not picks:
        raise SystemExit("every answer of every prompt was cut off at the length limit; nothing to fine-tune on "
                         "(--keep-cut keeps cut answers, e.g. for the tiny preset)")
    return picks


def pick_figures(samples: list[dict], picks: list[dict], split: str) -> dict:
    """Gold and length of the picks against those of any one sample."""
    from labkit.data import load_prompts
    from labkit.labelers import GoldLabeler

    gold, by_id = GoldLabeler(), {r["id"]: r for r in load_prompts(split)}
    return {"gold_of_a_sample": statistics.mean(gold.score(by_id[s["prompt_id"]], y, t) for s in samples
                                                for y, t in zip(s["responses"], s["truncated"])),
            "gold_of_picks": statistics.mean(gold.score(by_id[p["prompt_id"]], p["response"], p["truncated"])
                                             for p in picks),
            "words_of_a_sample": statistics.mean(len(y.split()) for s in samples for y in s["responses"]),
            "words_of_picks": statistics.mean(len(p["response"].split()) for p in picks)}


def room_picks(run_dir: Path, keep_cut: bool = False) -> tuple[list[dict], dict]:
    """Per rm-split prompt, the answer the room's pooled ranking puts first, skipping answers cut
    off at the length limit unless ``keep_cut`` (:func:`labkit.rankings.first_choices`, what
    ``labkit run --first-choices`` teaches): the rankings themselves taught back to the model,
    with no sampling and no RM."""
    from labkit.feedback import FeedbackStore
    from labkit.pipeline import cut_answers
    from labkit.rankings import consensus, first_choices

    cut = cut_answers(run_dir)
    store = FeedbackStore(run_dir / "feedback.sqlite")
    pooled = consensus(store.to_kway())
    store.close()
    picks = require([{**p, "truncated": (p["prompt_id"], p["response"]) in cut}
                     for p in first_choices(pooled, cut, "keep" if keep_cut else "skip")])
    samples = [{**r, "truncated": [(r["prompt_id"], y) in cut for y in r["responses"]]} for r in pooled]
    return picks, {"n_prompts": len(pooled), "kept": len(picks), "dropped_all_cut": len(pooled) - len(picks),
                   **pick_figures(samples, picks, "rm")}


def sample_and_pick(run_dir: Path, cfg: dict, out: Path, k: int, seed: int, keep_cut: bool) -> tuple[list[dict], dict]:
    """Steps 1-2, cached in ``out``/picks.json."""
    cache = out / "picks.json"
    if cache.exists():
        saved = json.loads(cache.read_text())
        return saved["picks"], saved["info"]
    import torch

    from labkit.data import load_prompts
    from labkit.generation import sample_k
    from labkit.models import load_model
    from labkit.pipeline import reward_model_dirs
    from labkit.reward import load_reward_models

    records = load_prompts("ppo")
    t0 = time.perf_counter()
    model, tok = load_model(str(run_dir / "sft" / "model"))
    samples = sample_k(model, tok, records, k=k, max_new_tokens=cfg["sample_max_new_tokens"], temperature=1.0,
                       top_p=1.0, batch_size=cfg["batch_size"], seed=seed + 11)
    del model
    t_sample = time.perf_counter() - t0
    reward, rtok, _ = load_reward_models(reward_model_dirs(run_dir, 1))
    with torch.no_grad():
        scores = reward.score(rtok, [s["prompt"] for s in samples for _ in s["responses"]],
                              [y for s in samples for y in s["responses"]])
    picks, info = best_picks(samples, scores, keep_cut)
    info.update(k=k, sample_s=t_sample, score_s=time.perf_counter() - t0 - t_sample,
                **pick_figures(samples, picks, "ppo"),
                cut_off_share=sum(t for s in samples for t in s["truncated"]) / (k * len(samples)))
    out.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"picks": picks, "info": info}))
    return picks, info


def judge(run_dir: Path, cfg: dict, model_dir: str, name: str, out: Path) -> dict:
    """Greedy eval answers of ``model_dir`` (cached in ``out``), gold figures and win rates
    against the run's SFT and PPO answers, KL to the run's SFT model, and the outside judge
    against SFT's (when the run has it)."""
    from labkit import evaluate
    from labkit.labelers import GoldLabeler
    from labkit.models import load_model
    from labkit.pipeline import RunConfig, eval_sets
    from labkit.report import load_jsonl
    from rlhf_quality import _paired

    records, outside = eval_sets(RunConfig(**cfg))
    loaded: dict = {}

    def model():  # loaded once, only if an answer or the KL is not cached yet
        if not loaded:
            loaded["model"], loaded["tok"] = load_model(model_dir)
        return loaded["model"], loaded["tok"]

    def answers(prompts: list[dict], path: Path) -> tuple[list[str], list[bool]]:
        if not path.exists():
            path.write_text(json.dumps(evaluate.answer(*model(), prompts, max_new_tokens=cfg["eval_max_new_tokens"],
                                                       batch_size=cfg["batch_size"], seed=cfg["seed"],
                                                       bf16=cfg["eval_bf16"])))
        return json.loads(path.read_text())

    ys, ts = answers(records, out / f"eval_{name}.json")
    figures = evaluate.gold_figures(records, ys, ts)
    row = {key: figures[key] for key in ("gold/mean", "helpful/instruction_following", "harmless/refusal_rate_harmful",
                                         "response/stop_rate")}
    row["words"] = statistics.mean(len(y.split()) for y in ys)
    gold = GoldLabeler()
    for other in ("sft", "ppo_r1"):
        theirs = load_jsonl(run_dir / "eval" / f"{other}.jsonl")
        w = evaluate.win_rate(ys, [a["response"] for a in theirs], records, "gold", truncated_a=ts,
                              truncated_b=[a["truncated"] for a in theirs])
        row[f"win_vs_{other}"] = {key: w[key] for key in ("win_rate", "ci95", "wins", "ties", "losses")}
        paired = _paired([(gold.score(r, a["response"], a["truncated"]), m)
                          for r, a, m in zip(records, theirs, figures["scores"])])
        row[f"gold_minus_{other}"] = {key: paired[key] for key in ("diff", "low", "high")}
    path_kl = out / f"eval_{name}_kl.json"
    if not path_kl.exists():  # on these answers, as the run's compare stage measures PPO's
        sft, _ = load_model(str(run_dir / "sft" / "model"))
        policy, tok = model()
        path_kl.write_text(json.dumps(evaluate.kl_to_reference(policy, sft, tok, [r["prompt"] for r in records], ys,
                                                               truncated=ts)))
    row["kl_to_sft"] = json.loads(path_kl.read_text())
    if outside:
        judged = evaluate.outside_judge(outside, answers(outside, out / f"eval_{name}_outside.json")[0])
        sft_out = [a["response"] for a in load_jsonl(run_dir / "eval" / "sft_outside.jsonl")]
        row["outside"] = judged["prompt_strict"]
        row["outside_minus_sft"] = evaluate.paired_outside_judge(
            judged["followed"], evaluate.outside_judge(outside, sft_out)["followed"], seed=cfg["seed"])["prompt_strict"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a finished labkit run folder (rlhf_quality.py's --out/seed<N>)")
    ap.add_argument("--k", type=int, default=4, help="SFT samples per ppo prompt to pick from")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--keep-cut", action="store_true", help="pick among answers cut off at the length limit too")
    ap.add_argument("--picks", choices=("rm", "room", "both"), default="rm",
                    help="rm: the RM's best of --k fresh samples on the ppo split; room: the room's pooled first "
                         "choice among the answers it ranked (rm split, no sampling); both: the two together")
    ap.add_argument("--ppo", action="store_true", help="then train the run's PPO settings from the fine-tuned model")
    ap.add_argument("--result", default=str(RESULT))
    args = ap.parse_args()

    from labkit.doctor import steady_memory
    from labkit.sft import SFTConfig, train_sft

    run_dir = Path(args.run)
    cfg = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    out = run_dir / ("rs_room" if args.picks == "room" else f"rs_k{args.k}")
    t0 = time.perf_counter()
    picks, info = [], {}
    if args.picks in ("rm", "both"):
        with steady_memory():
            picks, info["rm"] = sample_and_pick(run_dir, cfg, out, args.k, cfg["seed"], args.keep_cut)
    if args.picks in ("room", "both"):
        room, info["room"] = room_picks(run_dir, args.keep_cut)
        picks = picks + room
    tag = f"e{args.epochs:g}_lr{args.lr:g}" + ("_both" if args.picks == "both" else "")
    rs_dir = out / f"sft_{tag}"
    if not (rs_dir / "model").exists():
        train_sft(SFTConfig(**{**cfg["sft"], "model": str(run_dir / "sft" / "model"), "out_dir": str(rs_dir),
                               "demonstrations": picks, "epochs": args.epochs, "learning_rate": args.lr,
                               "seed": cfg["seed"], "dashboard": False}))
    entry = {"run": str(run_dir), "seed": cfg["seed"], "k": None if args.picks == "room" else args.k, "epochs": args.epochs, "lr": args.lr,
             "picks_from": args.picks, "picks": info, "run_figures": {"gold_sft": metrics["gold_mean"]["sft"], "gold_ppo": metrics["gold_mean"]["ppo_r1"]},
             "rs": judge(run_dir, cfg, str(rs_dir / "model"), f"rs_{tag}", out)}
    if args.ppo:
        from labkit.pipeline import reward_model_dirs
        from labkit.ppo import PPOConfig, train_ppo

        ppo_dir = out / f"ppo_{tag}"
        if not (ppo_dir / "model").exists():
            train_ppo(PPOConfig(**{**cfg["ppo"], "model": str(rs_dir / "model"), "reference": str(rs_dir / "model"),
                                   "reward_model": str(reward_model_dirs(run_dir, 1)[0]), "out_dir": str(ppo_dir),
                                   "seed": cfg["seed"], "dashboard": False}))
        entry["rs_then_ppo"] = judge(run_dir, cfg, str(ppo_dir / "model"), f"rs_ppo_{tag}", out)
    # stage times from the stage files, so that a rerun on cached models keeps them
    stage = {name: json.loads((out / f"{name}_{tag}" / "metrics.json").read_text())
             for name in ("sft", "ppo") if (out / f"{name}_{tag}" / "metrics.json").exists()}
    entry["stage_s"] = {"sample_and_score": info["rm"]["sample_s"] + info["rm"]["score_s"] if "rm" in info else 0.0,
                        **{name: m["time/total_s"] for name, m in stage.items()}}
    if "ppo" in stage:
        entry["ppo_kl_to_start"] = stage["ppo"]["objective/kl"]
    entry.update(this_invocation_s=time.perf_counter() - t0, load_avg_1min_at_end=os.getloadavg()[0])

    for source, i in info.items():
        print(f"\n{run_dir}: {source} picks, {i['kept']} of {i['n_prompts']} prompts; gold of a sample "
              f"{i['gold_of_a_sample']:.3f}, of the picks {i['gold_of_picks']:.3f}; words "
              f"{i['words_of_a_sample']:.1f} -> {i['words_of_picks']:.1f}")
    print("| model | gold (minus SFT [95%]) | words | win rate vs SFT [95%] (W-T-L) | vs PPO | KL to SFT | outside judge (minus SFT) |")
    print("|---|---|---|---|---|---|---|")
    for name in ("rs", "rs_then_ppo"):
        if name in entry:
            r = entry[name]
            w, p = r["win_vs_sft"], r["win_vs_ppo_r1"]
            d = r["gold_minus_sft"]
            print(f"| {name} | {r['gold/mean']:.3f} ({d['diff']:+.3f} [{d['low']:+.2f}, {d['high']:+.2f}]) | "
                  f"{r['words']:.1f} | {w['win_rate']:.3f} [{w['ci95'][0]:.2f}, {w['ci95'][1]:.2f}] "
                  f"({w['wins']}-{w['ties']}-{w['losses']}) | {p['win_rate']:.3f} | {r['kl_to_sft']:.2f} | "
                  + (f"{r['outside']:.3f} ({r['outside_minus_sft']['diff']:+.3f}) |" if "outside" in r else "off |"))
    f = entry["run_figures"]
    print(f"the run's own: SFT gold {f['gold_sft']:.3f}, PPO gold {f['gold_ppo']:.3f}")

    path = Path(args.result)
    saved = json.loads(path.read_text()) if path.exists() else {"runs": []}
    key = ("run", "k", "epochs", "lr", "picks_from")
    saved["runs"] = [r for r in saved["runs"] if tuple(r[k] for k in key) != tuple(entry[k] for k in key)] + [entry]
    saved["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(saved, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

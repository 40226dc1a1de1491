"""Over-optimisation along one PPO run: RM score, gold and KL to SFT at checkpoints.

The RM is a proxy for gold. Pushed far enough, PPO raises the RM's score while gold stops
rising and then falls (Gao et al. 2022, "Scaling laws for reward model over-optimization";
InstructGPT's KL penalty is there to stop short of it). This script shows where the cpu
preset's PPO stops on that curve: it takes a finished ``labkit run`` folder (its SFT model and
RM), runs PPO with the preset's settings for ``--steps`` steps, and every ``--every`` steps
answers a fixed set of eval prompts and reads off

- the RM's mean score and gold's mean score of the greedy answers (what the eval reports),
- gold's win rate of the greedy answers against SFT's, with its 95% interval,
- KL(policy || SFT): the mean log-ratio of one sampled answer per prompt (temperature 1, the
  policy's own distribution, so the mean is an unbiased estimate of the sequence KL),
- words and the share of answers that stop on their own.

Step 0 is the SFT model. PPO resumes from its own checkpoint at each stop (the learning rate
is constant), so the points lie on one run; the preset stops at ``ppo.steps`` (20).

    python benchmarks/overoptimisation.py --run runs/rq_consensus/seed0 --steps 40 --every 10

Prints a table, writes ``benchmarks/results/overoptimisation.json`` and a plot
(``--plot``, default ``runs/overoptimisation.html``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "overoptimisation.json"


def measure(model, sft, rm, tok, records: list[dict], sft_answers: tuple | None, seed: int) -> dict:
    """The figures of one policy on ``records`` (see the module docstring)."""
    import torch

    from labkit import evaluate
    from labkit.labelers import GoldLabeler, words

    ys, ts = evaluate.answer(model, tok, records, max_new_tokens=96, batch_size=16, seed=seed)
    prompts = [r["prompt"] for r in records]
    gold = GoldLabeler()
    with torch.no_grad():
        rm_scores = rm.score(tok, prompts, ys, progress=False)
        kl = 0.0  # the SFT model itself
        if model is not sft:
            samples, sample_ts = evaluate.answer(model, tok, records, max_new_tokens=96, temperature=1.0,
                                                 batch_size=16, seed=seed + 1)
            kl = evaluate.kl_to_reference(model, sft, tok, prompts, samples, truncated=sample_ts)
    point = {"rm": sum(rm_scores) / len(rm_scores),
             "gold": sum(gold.score(r, y, t) for r, y, t in zip(records, ys, ts)) / len(ys),
             "kl": kl, "words": sum(len(words(y)) for y in ys) / len(ys), "stops": 1 - sum(ts) / len(ts)}
    if sft_answers is not None:
        win = evaluate.win_rate(ys, sft_answers[0], records, "gold", truncated_a=ts, truncated_b=sft_answers[1])
        point |= {"win_rate": win["win_rate"], "low": win["ci95"][0], "high": win["ci95"][1]}
    return point | {"answers": ys, "truncated": ts}


def plot(points: list[dict], path: Path, title: str) -> None:
    """RM score, gold and KL against PPO steps, and gold against KL."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    steps = [p["step"] for p in points]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("along the run", "gold against KL to SFT"),
                        specs=[[{"secondary_y": True}, {}]])
    fig.add_trace(go.Scatter(x=steps, y=[p["rm"] for p in points], name="RM score", mode="lines+markers"), 1, 1)
    fig.add_trace(go.Scatter(x=steps, y=[p["gold"] for p in points], name="gold", mode="lines+markers"), 1, 1,
                  secondary_y=True)
    fig.add_trace(go.Scatter(x=[p["kl"] for p in points], y=[p["gold"] for p in points], mode="lines+markers+text",
                             text=[f"step {s}" for s in steps], textposition="top center", name="gold vs KL",
                             showlegend=False), 1, 2)
    fig.update_xaxes(title_text="PPO step", row=1, col=1)
    fig.update_yaxes(title_text="RM score", row=1, col=1)
    fig.update_yaxes(title_text="gold", row=1, col=1, secondary_y=True, tickformat=".3f")
    fig.update_xaxes(title_text="KL(policy || SFT), nats", row=1, col=2)
    fig.update_yaxes(title_text="gold", row=1, col=2)
    fig.update_layout(title=title, height=420, width=1000)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=True)  # works offline


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished labkit run folder (sft/model and rm_r1/model)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=64, help="eval prompts, an even spread over the eval split")
    ap.add_argument("--preset", default="cpu", help="PPO settings from this preset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/overoptimisation", help="the PPO run's folder (its checkpoint is removed)")
    ap.add_argument("--result", default=str(RESULT))
    ap.add_argument("--plot", default="runs/overoptimisation.html")
    args = ap.parse_args()
    if args.steps % args.every:
        raise SystemExit("--steps must be a multiple of --every")

    import torch

    from labkit.data import load_prompts
    from labkit.models import load_model
    from labkit.pipeline import PRESETS
    from labkit.ppo import PPOConfig, train_ppo
    from labkit.reward import load_reward_model

    run = Path(args.run)
    sft_dir, rm_dir, out = run / "sft" / "model", run / "rm_r1" / "model", Path(args.out)
    for need in (sft_dir, rm_dir):
        if not need.exists():
            raise SystemExit(f"{need} is missing: --run must be a finished labkit run folder")
    records = load_prompts("eval")
    records = [records[i * len(records) // args.prompts] for i in range(min(args.prompts, len(records)))]
    if out.exists():
        shutil.rmtree(out)  # one run from the SFT model; a stale checkpoint would continue another
    t0 = time.time()
    sft, tok = load_model(str(sft_dir))
    rm, _ = load_reward_model(rm_dir)
    first = measure(sft, sft, rm, tok, records, None, args.seed)
    sft_answers = (first["answers"], first["truncated"])
    points = [{"step": 0, **first, "win_rate": 0.5, "low": 0.5, "high": 0.5}]
    ppo = dict(PRESETS[args.preset]["ppo"])
    for stop in range(args.every, args.steps + 1, args.every):
        result = train_ppo(PPOConfig(**{**ppo, "steps": stop}, model=str(sft_dir), reference=str(sft_dir),
                                     reward_model=str(rm_dir), out_dir=str(out), seed=args.seed, resume=True,
                                     dashboard=False))
        if result.get("stopped"):
            raise SystemExit(f"PPO stopped at step {stop}: {result.get('message')}")
        policy, _ = load_model(result["model_dir"])
        points.append({"step": stop, **measure(policy, sft, rm, tok, records, sft_answers, args.seed)})
        del policy
        p = points[-1]
        print(f"step {stop}: RM {p['rm']:+.3f}, gold {p['gold']:.3f}, KL {p['kl']:.2f}, "
              f"win {p['win_rate']:.3f}", flush=True)
    shutil.rmtree(out / "checkpoint", ignore_errors=True)  # weights + optimizer, several GB

    print(f"\n{'step':>4} {'RM score':>9} {'gold':>6} {'win vs SFT (95% ci)':>22} {'KL':>6} {'words':>6} {'stops':>6}")
    for p in points:
        print(f"{p['step']:>4} {p['rm']:>+9.3f} {p['gold']:>6.3f} {p['win_rate']:>8.3f} [{p['low']:.2f}, {p['high']:.2f}] "
              f"{p['kl']:>6.2f} {p['words']:>6.1f} {p['stops']:>6.2f}")
    result = {"benchmark": "overoptimisation", "run": str(run), "preset": args.preset, "ppo": ppo,
              "steps": args.steps, "every": args.every, "n_prompts": len(records), "seed": args.seed,
              "points": [{k: v for k, v in p.items() if k not in ("answers", "truncated")} for p in points],
              "wall_s": time.time() - t0, "threads": torch.get_num_threads(),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_avg_1min_at_end": os.getloadavg()[0]}}
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(result, indent=1) + "\n")
    plot(points, Path(args.plot), f"PPO on {run}: RM score, gold and KL to SFT every {args.every} steps")
    print(f"wrote {args.result} and {args.plot}")


if __name__ == "__main__":
    main()

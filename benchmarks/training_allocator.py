"""Training speed and memory under glibc's allocator settings, with and without
``labkit.doctor.steady_memory`` (BRIEF §4).

A training step allocates and frees the same large blocks at every step: an SFT batch's logits
(8 rows x up to 256 tokens x 49k columns) are 400 MB in fp32. glibc serves any block above its
mmap threshold (at most 32 MB; 1 MB under ``labkit.doctor.lean_memory()``, which the notebooks
call) as a fresh mapping that the kernel faults in and zeroes page by page, at every step.
labkit's SFT and reward-model training loops (``train_sft``, ``train_reward_model``) and its
sampling (PPO's rollouts included) run inside ``steady_memory()``, where glibc's heap serves
every block and keeps what is freed; on leaving, free memory is handed back. PPO's update steps
run outside it; ``train_ppo`` hands free memory back when it ends.

Four settings, each a fresh process, taking turns for ``--rounds`` rounds: glibc's defaults or
lean_memory, with steady_memory off (``LABKIT_STEADY_MEMORY=0``) or on. Each process runs, on the
bundled model with bf16 autocast where the CPU is fast at it: SFT (``--sft-steps`` steps of 8
demonstrations), the reward model (``--rm-steps`` steps of 8 prompts x K = 4 answers: the SFT
samples of ``tests/fixtures/labeler_run_samples.json``, ranked in their stored order, for
timing only) and PPO (``--ppo-steps`` steps of 8 episodes of up to 40 tokens, a scripted reward,
the value head on the policy's backbone, as in notebook 03). Per run: wall time, the process's
system CPU time and page faults (``ru_minflt``), peak resident memory during the run (the
kernel's high-water mark, reset before it) and resident memory after it; medians over rounds.

    python benchmarks/training_allocator.py            # about 15 minutes on 2 cores

Writes ``benchmarks/results/training_allocator.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from sampler_allocator import machine, write

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

WORKER = r"""
import json, resource, shutil, sys, tempfile, time
spec = json.loads(sys.argv[1])
import torch
from labkit import doctor
if spec["lean"]:
    assert doctor.lean_memory()
torch.set_num_threads(spec["threads"])
from labkit import data
from labkit.ppo import PPOConfig, train_ppo
from labkit.reward import RewardConfig, train_reward_model
from labkit.sft import SFTConfig, train_sft

def memory():  # GiB: resident now, and the high-water mark since the last reset
    status = {line.split(":")[0]: int(line.split()[1]) for line in open("/proc/self/status")
              if line.startswith(("VmRSS", "VmHWM"))}
    return status["VmRSS"] / 2**20, status["VmHWM"] / 2**20

samples = json.load(open(spec["samples"]))["samples"]
prompts = {r["id"]: r for r in data.load_prompts("rm")}
rankings = [{"prompt": prompts[s["prompt_id"]]["prompt"], "responses": s["responses"],
             "tiers": [[i] for i in range(len(s["responses"]))]} for s in samples if s["prompt_id"] in prompts]
quiet = dict(dashboard=False, progress=False, resume=False)
out = tempfile.mkdtemp(prefix="labkit_alloc_")
runs = {
    "sft": lambda: train_sft(SFTConfig(out_dir=f"{out}/sft", max_steps=spec["sft_steps"], eval_fraction=0.0,
                                       save_steps=10_000, **quiet)),
    "rm": lambda: train_reward_model(RewardConfig(model="smollm2-135m", rankings=rankings, out_dir=f"{out}/rm",
                                                  max_steps=spec["rm_steps"], gold=False, dashboard=False,
                                                  progress=False)),
    "ppo": lambda: train_ppo(PPOConfig(model="smollm2-135m", reward_fn=lambda p, r: [0.05 * len(x.split()) for x in r],
                                       out_dir=f"{out}/ppo", steps=spec["ppo_steps"], batch_size=8,
                                       mini_batch_size=4, micro_batch_size=4, max_new_tokens=40,
                                       share_backbone=True, sample_every=0, **quiet)),
}
rows = []
for name, run in runs.items():  # each run's folder (checkpoints: about 1.5 GB) removed after it
    open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    run()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    after, peak = memory()
    shutil.rmtree(f"{out}/{name}", ignore_errors=True)
    rows.append(dict(run=name, wall_s=wall, sys_s=r1.ru_stime - r0.ru_stime, page_faults=r1.ru_minflt - r0.ru_minflt,
                     peak_gib=peak, rss_after_gib=after))
shutil.rmtree(out, ignore_errors=True)
print(json.dumps(rows))
"""

SETTINGS = [("glibc defaults", False, False), ("glibc defaults", False, True), ("lean_memory", True, False),
            ("lean_memory", True, True)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sft-steps", type=int, default=6)
    ap.add_argument("--rm-steps", type=int, default=4)
    ap.add_argument("--ppo-steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "training_allocator.json"))
    args = ap.parse_args(argv)
    if not sys.platform.startswith("linux"):
        raise SystemExit("needs Linux: glibc's allocator and /proc/self/clear_refs")
    spec = {"threads": args.threads, "sft_steps": args.sft_steps, "rm_steps": args.rm_steps,
            "ppo_steps": args.ppo_steps, "samples": str(ROOT / "tests" / "fixtures" / "labeler_run_samples.json")}
    loads = [os.getloadavg()]
    raw = []
    for r in range(args.rounds):
        for label, lean, steady in SETTINGS:  # one process each: glibc's settings last for a process
            env = {**os.environ, "LABKIT_STEADY_MEMORY": "1" if steady else "0"}
            proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps({**spec, "lean": lean})], capture_output=True,
                                  text=True, timeout=3600, env=env, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            for row in json.loads(proc.stdout.strip().splitlines()[-1]):
                raw.append(dict(row, setting=label, steady=steady, round=r, loadavg=os.getloadavg()))
                print(f"round {r}: {label}, steady {'on' if steady else 'off'}, {row['run']}: {row['wall_s']:.1f} s",
                      flush=True)
    loads.append(os.getloadavg())

    rows = []
    for label, lean, steady in SETTINGS:
        for run in ("sft", "rm", "ppo"):
            rs = [x for x in raw if x["setting"] == label and x["steady"] == steady and x["run"] == run]
            rows.append({"setting": label, "steady": steady, "run": run,
                         **{k: statistics.median(x[k] for x in rs)
                            for k in ("wall_s", "sys_s", "page_faults", "peak_gib", "rss_after_gib")},
                         "runs_wall_s": [x["wall_s"] for x in rs]})
    off = {(r["setting"], r["run"]): r["wall_s"] for r in rows if not r["steady"]}
    print()
    print("| setting | steady_memory | run | wall s (median) | vs off | system CPU s | page faults | peak GiB | "
          "resident after, GiB | runs, wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["vs_off"] = r["wall_s"] / off[(r["setting"], r["run"])]
        print(f"| {r['setting']} | {'on' if r['steady'] else 'off'} | {r['run']} | {r['wall_s']:.1f} | "
              f"{r['vs_off']:.2f}x | {r['sys_s']:.1f} | {r['page_faults']:,.0f} | {r['peak_gib']:.2f} | "
              f"{r['rss_after_gib']:.2f} | {' / '.join(f'{x:.1f}' for x in r['runs_wall_s'])} |")
    result = {"benchmark": "training_allocator", "machine": machine(loads, args.threads),
              "settings": {k: v for k, v in spec.items() if k != "samples"} | {
                  "model": "smollm2-135m", "rounds": args.rounds, "bf16": "autocast where fast",
                  "rm_data": "tests/fixtures/labeler_run_samples.json, tiers in stored order (timing only)",
                  "ppo": "batch 8, mini-batch 4, 40 new tokens, reward 0.05 per word, share_backbone=True"},
              "rows": rows, "raw": raw}
    return write(result, args.out)


if __name__ == "__main__":
    main()

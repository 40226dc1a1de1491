"""PPO throughput: labkit PPO vs TRL 1.9's PPO trainer vs TRL 1.16's RLOO (BRIEF §4).

Three trainers do the same work on the same machine, one after another, each in its own
process (so each process's peak RSS is its own):

(a) ``labkit.ppo.train_ppo``: policy, frozen SFT reference, value model initialised from the
    RM (a second backbone), the RM; KV-cached generation; one forward per model per rollout;
    ``logits_to_keep`` so the 49k-column unembedding runs on response tokens only.
(b) TRL 1.9's ``trl.experimental.ppo.PPOTrainer`` (the last TRL PPO trainer), installed by this
    script into a separate virtualenv (``benchmarks/.venv-trl19``: ``torch==2.13.0`` first, so
    pip keeps the CPU build, then ``trl==1.9.*``) and run there by a small driver script that
    this script writes. Same models: the labkit RM is converted to a
    ``*ForSequenceClassification`` folder (same backbone, ``score`` = the RM head), used as
    both its reward model and its value model.
(c) TRL 1.16's ``RLOOTrainer`` through ``labkit.beyond.train_rloo`` (no value model: a cheaper
    algorithm, shown for reference) at equal generations: the same episodes per step.
(d) ``labkit_shared``: labkit PPO with ``share_backbone=True`` (value head on the policy's own
    backbone, initialised from the RM head), which trains one model like RLOO: the equal-work
    comparison for (c).
(e) ``labkit_ptx``: (a) with PPO-ptx (``ptx_coef=1``, the SFT demonstrations, one micro-batch of
    them beside each micro-batch of episodes): what the LM term adds to a step, timed in turn
    with (a) (``--methods labkit,labkit_ptx``).

Equal settings: model, prompts (the embedded ``ppo`` split, chat-formatted), episodes per step
(``--batch-size``), one optimizer step per batch, micro-batch size, rollout batch (episodes per
``generate()`` call and no-grad forward: labkit's ``rollout_batch_size``, TRL 1.9's
``local_rollout_forward_batch_size``; RLOO generates the whole batch in one call), response
length limit (``--response-length``, stop at EOS), sampling temperature 0.7, PPO epochs,
missing-EOS penalty, learning rate. Each trainer runs ``--warmup`` steps that are not timed,
then ``--steps`` timed steps, once under bf16 autocast (fp32 master weights) and once in
plain fp32; the table reports both and marks the faster.

Figures:

- episodes/s = episodes per step / median step time (rollout + scoring + update), over the
  timed steps of all ``--repeats`` runs of a method (the methods take turns).
- tokens/s = generated response tokens (up to and including EOS) / step time.
- train share of the machine's peak (MFU of the update phase) = training FLOPs / update-phase
  time / measured bf16 matmul peak, with **training FLOPs = 6 x trained parameters x trained
  tokens** (forward 2ND + backward 4ND; Kaplan et al. 2020), trained parameters = policy +
  value model (RLOO: policy only), trained tokens = non-padding prompt + response tokens that
  go through a gradient-carrying forward, times PPO epochs. The peak is measured here with
  a loop of large bf16 ``torch.matmul`` calls (fp32 too, for reference).
- peak memory = ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of each trainer's process.

    python benchmarks/ppo_throughput.py                 # bundled SmolLM2-135M, ~10-15 min
    python benchmarks/ppo_throughput.py --model tiny    # the 3M tiny model, a quick check
    python benchmarks/ppo_throughput.py --threads 1     # on a busy shared machine (see below)
    python benchmarks/ppo_throughput.py --methods labkit_shared --append   # add or replace runs in the JSON

On a machine whose load average exceeds its core count, two torch threads per process can be
10x slower than one (the threads wait for each other); ``--threads 1`` measures more stably.

Writes ``benchmarks/results/ppo_throughput.json``. The machine may be shared with other jobs:
the load average is recorded before and after each run, next to its timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "ppo_throughput.json"
TRL19_VENV = HERE / ".venv-trl19"
TRL19_SPEC = "trl==1.9.*"
TORCH_SPEC = "torch==2.13.0"


# ----------------------------------------------------------------------------- machine


def machine_info(threads: int) -> dict:
    import torch

    from labkit.models import cpu_has_fast_bf16, cpu_name

    cpu = cpu_name()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "os": platform.platform(), "python": platform.python_version(), "fast_bf16": cpu_has_fast_bf16(),
            "loadavg_start": os.getloadavg(),
            "note": "shared machine: other jobs may run at the same time; see the load averages per run"}


def matmul_peak(dtype_name: str, n: int = 2048, seconds: float = 3.0) -> float:
    """FLOP/s of a loop of (n x n) @ (n x n) matmuls: 2 n^3 FLOPs each."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):  # warm-up
        torch.matmul(a, b)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.matmul(a, b)
        calls += 1
    return 2 * n ** 3 * calls / (time.perf_counter() - t0)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- shared models


def prepare(work: Path, model_name: str, n_prompts: int) -> dict:
    """Policy folder, labkit RM folder, the same RM as a *ForSequenceClassification folder, prompts."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from labkit.data import load_prompts
    from labkit.models import bundled_model_dir, format_prompt, load_model
    from labkit.reward import HEAD_FILE, RewardModel

    if model_name == "smollm2-135m":
        policy_dir = str(bundled_model_dir())
    else:
        policy_dir = str(work / "policy")
        if not (work / "policy" / "config.json").exists():
            model, tok = load_model(model_name, dtype="float32", device="cpu")
            model.save_pretrained(policy_dir)
            tok.save_pretrained(policy_dir)
    model, tok = load_model(policy_dir, dtype="float32", device="cpu")
    rm_dir = work / "rm"
    torch.manual_seed(0)  # the RM head's init
    rm = RewardModel.from_causal_lm(model)
    rm.save_pretrained(rm_dir, tokenizer=tok)
    # TRL 1.9's PPO wants HF sequence-classification models: same backbone, score = RM head.
    config = AutoConfig.from_pretrained(policy_dir, num_labels=1)
    config.pad_token_id = tok.pad_token_id
    seq = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    missing = seq.model.load_state_dict(model.get_decoder().state_dict(), strict=True)
    assert not missing.missing_keys
    seq.score.weight.data.copy_(load_file(rm_dir / HEAD_FILE)["weight"])
    seq.save_pretrained(work / "rm_seqcls")
    tok.save_pretrained(work / "rm_seqcls")
    prompts = [r["prompt"] for r in load_prompts("ppo")][:n_prompts]
    return {"policy": policy_dir, "rm": str(rm_dir), "rm_seqcls": str(work / "rm_seqcls"), "prompts": prompts,
            "formatted": [format_prompt(tok, p) for p in prompts],
            "params": sum(p.numel() for p in model.parameters())}


# ----------------------------------------------------------------------------- workers (this venv)


def worker_labkit(spec: dict) -> dict:
    """labkit PPO; step times from its own history, trained tokens counted in the forward."""
    import torch

    from labkit import ppo
    from labkit.stage import history_rows

    forwards = []  # (is_ptx, tokens) of each update-phase forward
    original_forward = ppo.PolicyAndValue.forward

    def counting_forward(self, input_ids, attention_mask, n_response):
        if torch.is_grad_enabled():  # an update-phase forward (rollout forwards run under no_grad)
            forwards.append((n_response is None, int(attention_mask.sum())))  # None: a PPO-ptx forward
        return original_forward(self, input_ids, attention_mask, n_response)

    ppo.PolicyAndValue.forward = counting_forward
    shared = spec.get("share_backbone", False)
    steps = spec["warmup"] + spec["steps"]
    config = ppo.PPOConfig(model=spec["policy"], reward_model=spec["rm"], prompts=spec["prompts"],
                           out_dir=spec["out_dir"], steps=steps, batch_size=spec["batch_size"],
                           mini_batch_size=spec["batch_size"], micro_batch_size=spec["micro_batch_size"],
                           ppo_epochs=spec["ppo_epochs"], max_new_tokens=spec["response_length"],
                           temperature=0.7, learning_rate=1e-5, kl_coef=0.05, missing_eos_penalty=1.0,
                           bf16=spec["dtype"] == "bf16", gold_every=0, sample_every=0, save_every=0,
                           dashboard=False, progress=False, max_prompt_length=1024, share_backbone=shared,
                           rollout_batch_size=spec["rollout_batch_size"], ptx_coef=spec.get("ptx_coef", 0.0))
    per_step = spec["batch_size"] // spec["micro_batch_size"] * spec["ppo_epochs"]  # episode forwards a step
    result = ppo.train_ppo(config)
    hist = history_rows(result["out_dir"])[spec["warmup"]:]
    tokens, ptx_tokens, seen = [0] * steps, [0] * steps, 0
    for is_ptx, n in forwards:  # a ptx forward follows the micro-batch of episodes it goes with
        seen += not is_ptx
        step = (seen - 1) // per_step
        (ptx_tokens if is_ptx else tokens)[step] += n
    return {"step_s": [h["time/step_s"] for h in hist], "train_s": [h["time/train_s"] for h in hist],
            "generate_s": [h["time/generate_s"] for h in hist],
            "response_tokens": [h["response/length"] * spec["batch_size"] for h in hist],
            "trained_tokens": tokens[spec["warmup"]:], "ptx_tokens": ptx_tokens[spec["warmup"]:],
            "trained_params": spec["params"] * (1 if shared else 2), "params": spec["params"]}


def worker_rloo(spec: dict) -> dict:
    """TRL 1.16 RLOO via labkit.beyond; step = one rollout of batch_size episodes."""
    import torch
    import trl
    from transformers import TrainerCallback

    from labkit import beyond
    from labkit.stage import history_rows

    marks, rollout_s, trained_tokens = [], [], []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())

    generate_and_score = trl.RLOOTrainer._generate_and_score_completions
    compute_loss = trl.RLOOTrainer.compute_loss

    def timed_rollout(self, inputs):
        t0 = time.perf_counter()
        out = generate_and_score(self, inputs)
        rollout_s.append(time.perf_counter() - t0)
        return out

    def counting_loss(self, model, inputs, *args, **kwargs):
        if torch.is_grad_enabled():
            trained_tokens.append(int(inputs["prompt_mask"].sum() + inputs["completion_mask"].sum()))
        return compute_loss(self, model, inputs, *args, **kwargs)

    trl.RLOOTrainer._generate_and_score_completions = timed_rollout
    trl.RLOOTrainer.compute_loss = counting_loss
    steps = spec["warmup"] + spec["steps"]
    B = spec["batch_size"]
    config = beyond.RLOOConfig(model=spec["policy"], reward_model=spec["rm"], prompts=spec["prompts"],
                               out_dir=spec["out_dir"], steps=steps, batch_size=B,
                               num_generations=spec["rloo_generations"], mini_batch_size=B,
                               micro_batch_size=spec["micro_batch_size"], num_iterations=spec["ppo_epochs"],
                               max_completion_length=spec["response_length"], temperature=0.7,
                               learning_rate=1e-5, beta=0.05, missing_eos_penalty=1.0,
                               bf16=spec["dtype"] == "bf16", dashboard=False, callbacks=[Timer()],
                               extra_args={"disable_tqdm": True})
    result = beyond.train_rloo(config)
    per_step = config.optimizer_steps // steps  # optimizer steps per rollout
    ends = marks[::per_step]  # train start, then the end of each rollout's last optimizer step
    step_s = [b - a for a, b in zip(ends, ends[1:])][spec["warmup"]:]
    micro_per_step = B // spec["micro_batch_size"] * spec["ppo_epochs"]
    tokens = [sum(trained_tokens[i * micro_per_step:(i + 1) * micro_per_step]) for i in range(steps)]
    lengths = [h["completions/mean_length"] for h in history_rows(result["out_dir"]) if "completions/mean_length" in h]
    rollouts = rollout_s[spec["warmup"]:]
    return {"step_s": step_s, "train_s": [s - r for s, r in zip(step_s, rollouts)], "rollout_s": rollouts,
            "response_tokens": [x * B for x in lengths][spec["warmup"]:], "trained_tokens": tokens[spec["warmup"]:],
            "trained_params": spec["params"]}


# ----------------------------------------------------------------------------- TRL 1.9 (its own venv)

TRL19_DRIVER = r'''
"""Driver for TRL 1.9's experimental PPOTrainer, written and run by benchmarks/ppo_throughput.py."""
import json, os, resource, sys, time

spec = json.load(open(sys.argv[1]))
# TRL 1.9's PPOTrainer builds its own Accelerator(), which takes its precision from this variable,
# not from PPOConfig(bf16=...): without it the "bf16" run would silently run in fp32.
os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if spec["dtype"] == "bf16" else "no"
import torch

torch.set_num_threads(spec["threads"])
from datasets import Dataset
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          TrainerCallback)
import trl
import trl.experimental.ppo.ppo_trainer as ppo_mod
from trl.experimental.ppo import PPOConfig, PPOTrainer

tok = AutoTokenizer.from_pretrained(spec["policy"])
tok.padding_side = "left"  # generation needs left padding
B, micro, R, W, S = (spec[k] for k in ("batch_size", "micro_batch_size", "response_length", "warmup", "steps"))
rollout_batch = spec["rollout_batch_size"]
steps = W + S
rows = [tok(t, add_special_tokens=False)["input_ids"] for t in spec["formatted"]]
rows = (rows * (B * steps // len(rows) + 1))[:B * steps]
dataset = Dataset.from_dict({"input_ids": rows})

marks, generate_s, trained_tokens, response_tokens, train_start = [], [], [], [], []

class Timer(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        marks.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kw):
        marks.append(time.perf_counter())

original_generation, original_forward = ppo_mod.batch_generation, ppo_mod.forward

def timed_generation(model, queries, *args, **kwargs):
    t0 = time.perf_counter()
    query_responses, logits = original_generation(model, queries, *args, **kwargs)
    generate_s.append(time.perf_counter() - t0)
    resp = query_responses[:, queries.shape[1]:]
    is_eos = resp == tok.eos_token_id
    ends = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(is_eos[:, 0], resp.shape[1], dtype=torch.long))
    response_tokens.append(int(ends.sum()))
    return query_responses, logits

def counting_forward(model, query_responses, pad_token_id):
    if torch.is_grad_enabled():  # the update phase (rollout forwards run under no_grad)
        if len(train_start) < len(marks):
            train_start.append(time.perf_counter())
        trained_tokens.append(int((query_responses != pad_token_id).sum()))
    return original_forward(model, query_responses, pad_token_id)

ppo_mod.batch_generation, ppo_mod.forward = timed_generation, counting_forward

policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
ref = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
value = AutoModelForSequenceClassification.from_pretrained(spec["rm_seqcls"], num_labels=1, dtype=torch.float32)
reward = AutoModelForSequenceClassification.from_pretrained(spec["rm_seqcls"], num_labels=1, dtype=torch.float32)
config = PPOConfig(output_dir=spec["out_dir"], per_device_train_batch_size=micro, gradient_accumulation_steps=B // micro,
                   num_mini_batches=1, total_episodes=B * steps, local_rollout_forward_batch_size=rollout_batch,
                   response_length=R, stop_token="eos", temperature=0.7, missing_eos_penalty=1.0, kl_coef=0.05,
                   num_ppo_epochs=spec["ppo_epochs"], learning_rate=1e-5, bf16=spec["dtype"] == "bf16",
                   use_cpu=True, report_to="none", num_sample_generations=0, save_strategy="no",
                   logging_steps=1, seed=0, disable_tqdm=True)
trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                     value_model=value, train_dataset=dataset, callbacks=[Timer()])
trainer.train()
step_s = [b - a for a, b in zip(marks, marks[1:])]
train_s = [end - start for start, end in zip(train_start, marks[1:])]
per_step = B // micro * spec["ppo_epochs"]
tok_steps = [sum(trained_tokens[i * per_step:(i + 1) * per_step]) for i in range(steps)]
# batch_generation runs once per step (it loops over micro-batches itself)
out = {"step_s": step_s[W:], "train_s": train_s[W:], "generate_s": generate_s[W:], "response_tokens": response_tokens[W:],
       "trained_tokens": tok_steps[W:], "trained_params": spec["params"] * 2,
       "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
       "versions": {"trl": trl.__version__, "torch": torch.__version__,
                    "transformers": __import__("transformers").__version__},
       "mixed_precision": trainer.accelerator.mixed_precision}
json.dump(out, open(sys.argv[2], "w"))
'''


def ensure_trl19_venv(log: list[str]) -> tuple[str | None, str | None]:
    """The TRL 1.9 virtualenv's python, installing it if needed; (python, None) or (None, error)."""
    py = TRL19_VENV / "bin" / "python"

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        log.append(" ".join(cmd))
        return subprocess.run(cmd, capture_output=True, text=True)

    if py.exists():
        probe = run([str(py), "-c", "import trl, torch; print(trl.__version__, torch.__version__)"])
        if probe.returncode == 0 and probe.stdout.startswith("1.9."):
            return str(py), None
    steps = [[sys.executable, "-m", "venv", str(TRL19_VENV)],
             [str(py), "-m", "pip", "install", "-q", TORCH_SPEC],  # first: pip keeps the CPU build
             [str(py), "-m", "pip", "install", "-q", TRL19_SPEC]]
    for cmd in steps:
        if cmd[0] == sys.executable and py.exists():
            continue
        proc = run(cmd)
        if proc.returncode != 0:
            return None, f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}"
    return str(py), None


# ----------------------------------------------------------------------------- running and summarising


def run_worker(python: str, script: list[str], spec: dict, work: Path, name: str, timeout: int) -> dict:
    """Run one trainer in a fresh process; its JSON result, or an ``error`` with the output tail."""
    spec_path, out_path = work / f"{name}.spec.json", work / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    load_before, t0 = os.getloadavg(), time.perf_counter()
    try:
        proc = subprocess.run([python, *script, str(spec_path), str(out_path)], capture_output=True, text=True,
                              env=env, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = "timeout", f"timed out after {timeout}s: {str(e.stdout or '')[-1000:]}"
    info = {"wall_s": time.perf_counter() - t0, "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    if rc != 0 or not out_path.exists():
        return {**info, "error": f"exit {rc}: {tail}"}
    return {**info, **json.loads(out_path.read_text())}


POOLED = ("step_s", "train_s", "generate_s", "rollout_s", "response_tokens", "trained_tokens", "ptx_tokens")


def pool(runs: list[dict]) -> dict:
    """One method's repeats as one run: per-step lists joined, the largest peak RSS, each repeat kept."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    out = {k: [x for r in ok for x in r[k]] for k in POOLED if k in ok[0]}
    out.update({"trained_params": ok[0]["trained_params"], "params": ok[0].get("params"), "peak_rss_mib": max(r["peak_rss_mib"] for r in ok),
                "repeats": runs})
    for k in ("versions", "mixed_precision"):
        if k in ok[0]:
            out[k] = ok[0][k]
    return out


def summarise(run: dict, batch_size: int, peak_bf16: float) -> dict:
    """Figures from per-step measurements (warm-up steps already dropped). Step and update times
    are medians over the timed steps: a shared machine's slow spells skew a mean."""
    if "error" in run:
        return run
    n = len(run["step_s"])
    step = statistics.median(run["step_s"])
    train = statistics.median(run["train_s"])
    flops = 6 * run["trained_params"] * sum(run["trained_tokens"]) / n  # per step
    if run.get("ptx_tokens"):  # PPO-ptx texts go through the policy only
        flops += 6 * run["params"] * sum(run["ptx_tokens"]) / n
    return {**run, "episodes_per_s": batch_size / step, "tokens_per_s": sum(run["response_tokens"]) / n / step,
            "step_s_median": step, "train_s_median": train, "rollout_s_median": step - train,
            "train_flops_per_step": flops, "train_flops_per_episode": flops / batch_size,
            "train_tflops": flops / train / 1e12, "mfu_train_bf16_peak": flops / train / peak_bf16,
            "response_tokens_mean": sum(run["response_tokens"]) / n / batch_size}


def table(rows: list[dict]) -> str:
    head = f"{'method':<16}{'dtype':<6}{'episodes/s':>11}{'tokens/s':>10}{'step s':>8}{'train s':>9}" \
           f"{'resp len':>9}{'MFU(train)':>11}{'peak RSS MiB':>13}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['method']:<16}{r['dtype']:<6} error: {r['error'].splitlines()[0][:80]}")
            continue
        best = " *" if r.get("best") else ""
        lines.append(f"{r['method']:<16}{r['dtype']:<6}{r['episodes_per_s']:>11.3f}{r['tokens_per_s']:>10.1f}"
                     f"{r['step_s_median']:>8.2f}{r['train_s_median']:>9.2f}{r['response_tokens_mean']:>9.1f}"
                     f"{100 * r['mfu_train_bf16_peak']:>10.1f}%{r.get('peak_rss_mib', float('nan')):>13.0f}{best}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default) or tiny")
    ap.add_argument("--batch-size", type=int, default=8, help="episodes per PPO step")
    ap.add_argument("--micro-batch-size", type=int, default=4, help="episodes per forward/backward")
    ap.add_argument("--response-length", type=int, default=32, help="max new tokens per response")
    ap.add_argument("--rollout-batch-size", type=int, default=None,
                    help="episodes per generate() call and no-grad forward (default: the whole batch)")
    ap.add_argument("--ppo-epochs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each method, taken in turn; steps pooled")
    ap.add_argument("--rloo-generations", type=int, default=2, help="RLOO responses per prompt")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads in every process")
    ap.add_argument("--methods", default="labkit,trl19_ppo,trl116_rloo,labkit_shared")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--append", action="store_true", help="keep the other (method, dtype) runs already in --out")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary folder of models and logs")
    args = ap.parse_args(argv)

    out = Path(args.out)
    earlier = json.loads(out.read_text()) if args.append and out.exists() else None
    if earlier is not None and (earlier["model"], earlier["settings"]["batch_size"], earlier["settings"]["response_length"]) \
            != (args.model, args.batch_size, args.response_length):
        raise SystemExit(f"--append: {out} holds runs of another model or batch geometry; use another --out")

    import torch

    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, load {info['loadavg_start']}")
    peaks = {d: matmul_peak(d) for d in ("bf16", "fp32")}
    print(f"matmul peak: bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s, fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s")
    work = Path(tempfile.mkdtemp(prefix="ppo_throughput_"))
    shared = prepare(work, args.model, n_prompts=max(args.batch_size * (args.steps + args.warmup), 8))
    base = {"policy": shared["policy"], "rm": shared["rm"], "rm_seqcls": shared["rm_seqcls"],
            "prompts": shared["prompts"], "formatted": shared["formatted"], "params": shared["params"],
            "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
            "rollout_batch_size": args.rollout_batch_size or args.batch_size,
            "response_length": args.response_length, "ppo_epochs": args.ppo_epochs, "steps": args.steps,
            "warmup": args.warmup, "rloo_generations": args.rloo_generations, "threads": args.threads}

    setup_log: list[str] = []
    methods = args.methods.split(",")
    trl19_python = trl19_error = None
    if "trl19_ppo" in methods:
        t0 = time.perf_counter()
        trl19_python, trl19_error = ensure_trl19_venv(setup_log)
        print(f"TRL 1.9 venv: {'ready' if trl19_python else 'FAILED'} ({time.perf_counter() - t0:.0f}s)")
        (work / "trl19_driver.py").write_text(TRL19_DRIVER)

    # Repeats run the methods in turn (a, b, c, a, b, c, ...), so a slow spell of a shared machine
    # falls on all of them; each method's timed steps from all repeats are pooled.
    raw: dict[tuple[str, str], list[dict]] = {}
    for rep in range(args.repeats):
        for method in methods:
            for dtype in args.dtypes.split(","):
                spec = dict(base, dtype=dtype, out_dir=str(work / f"{method}_{dtype}_{rep}"),
                            share_backbone=method == "labkit_shared", ptx_coef=1.0 if method == "labkit_ptx" else 0.0)
                name = f"{method}_{dtype}_{rep}"
                print(f"running {name} ...", flush=True)
                if method == "trl19_ppo":
                    if trl19_python is None:
                        run = {"error": f"TRL 1.9 could not be installed: {trl19_error}"}
                    else:
                        run = run_worker(trl19_python, [str(work / "trl19_driver.py")], spec, work, name, args.timeout)
                else:
                    run = run_worker(sys.executable, [str(Path(__file__).resolve()), "--worker", method], spec, work,
                                     name, args.timeout)
                run["started"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
                if not args.keep_work:  # checkpoints of policy, value model and optimizer: ~2 GiB a run
                    shutil.rmtree(spec["out_dir"], ignore_errors=True)
                raw.setdefault((method, dtype), []).append(run)
                row = {"method": method, "dtype": dtype, **summarise(run, args.batch_size, peaks["bf16"])}
                print(table([row]).splitlines()[-1], flush=True)
    rows = [{"method": m, "dtype": d, **summarise(pool(runs), args.batch_size, peaks["bf16"])}
            for (m, d), runs in raw.items()]
    if earlier is not None:  # other (method, dtype) runs from earlier invocations (their own load averages)
        done = {(r["method"], r["dtype"]) for r in rows}
        kept = [r for r in earlier["runs"] if (r["method"], r["dtype"]) not in done]
        rows = [dict(r, invocation=r.get("invocation", earlier["machine"]["loadavg_start"])) for r in kept] + rows
    for r in rows:
        r.pop("best", None)
    for method in dict.fromkeys(r["method"] for r in rows):  # mark each method's faster dtype
        ok = [r for r in rows if r["method"] == method and "error" not in r]
        if ok:
            max(ok, key=lambda r: r["episodes_per_s"])["best"] = True

    best = {r["method"]: r for r in rows if r.get("best")}
    ratios = {}
    for ours in ("labkit", "labkit_shared"):  # best dtype against best dtype
        for m, r in best.items():
            if ours in best and not m.startswith("labkit"):
                ratios[f"{ours}_vs_{m}_episodes_per_s"] = best[ours]["episodes_per_s"] / r["episodes_per_s"]
    print()
    print(table(rows))
    print("(* = the method's faster dtype; MFU = update-phase FLOPs 6 x params x trained tokens / time / bf16 peak)")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    result = {
        "benchmark": "ppo_throughput", "machine": {**info, "loadavg_end": os.getloadavg()},
        "earlier_invocations": ((earlier.get("earlier_invocations") or []) + [earlier["machine"]]
                                if earlier is not None else []),
        "matmul_peak_flops": peaks, "model": args.model, "params": shared["params"],
        "settings": {k: base[k] for k in ("batch_size", "micro_batch_size", "rollout_batch_size", "response_length",
                                          "ppo_epochs", "steps", "warmup", "rloo_generations", "threads")}
        | {"temperature": 0.7, "mini_batch_size": args.batch_size, "stop": "eos", "missing_eos_penalty": 1.0,
           "repeats": args.repeats},
        "formulas": {"episodes_per_s": "batch_size / median step time (rollout + score + update) over the timed "
                                       "steps of all repeats, warm-up dropped",
                     "tokens_per_s": "generated response tokens (to the first EOS, inclusive) / step time",
                     "train_flops": "6 x trained params x trained tokens (policy + value model; RLOO: policy); "
                                    "trained tokens = non-padding prompt+response tokens in grad-carrying forwards; "
                                    "PPO-ptx: + 6 x policy params x ptx text tokens",
                     "mfu_train_bf16_peak": "train_flops / median update-phase time / measured bf16 matmul peak",
                     "peak_rss_mib": "ru_maxrss of the trainer's own process"},
        "runs": [{k: v for k, v in r.items()} for r in rows], "best_ratios": ratios,
        "trl19_setup": {"venv": str(TRL19_VENV.relative_to(HERE.parent)), "commands": setup_log,
                        "error": trl19_error},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return result


def worker_main(method: str, spec_path: str, out_path: str) -> None:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    run = {"labkit": worker_labkit, "labkit_shared": worker_labkit, "labkit_ptx": worker_labkit,
           "trl116_rloo": worker_rloo}[method](spec)
    run["peak_rss_mib"] = peak_rss_mib()
    if method == "trl116_rloo":
        import trl

        run["versions"] = {"trl": trl.__version__, "torch": torch.__version__}
    Path(out_path).write_text(json.dumps(run))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(*sys.argv[2:5])
    else:
        main()

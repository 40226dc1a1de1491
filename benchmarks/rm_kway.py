"""K-way reward-model batching, with and without prefix sharing, vs pairwise expansion
(BRIEF §4, InstructGPT §3.5).

The same rankings train the same reward model three times, for K = 4 and K = 8:

(a) labkit K-way, ``prefix_sharing=False``: a batch element is one prompt with all its K
    responses, each response a separate sequence (prompt included), so K sequences serve its
    C(K,2) comparisons;
(b) labkit K-way + prefix sharing (the default): the prompt is computed once per K responses
    (one packed row, block attention mask; ``labkit.reward.pack``). A prompt of P tokens with
    K answers of A tokens costs P + K·A tokens instead of K·(P + A);
(c) TRL 1.16 ``RewardTrainer`` on the C(K,2) (chosen, rejected) pairs of the same rankings:
    2 sequences per comparison, 2·C(K,2) per prompt.

Ideal speed-up of (a) over (c) is 2·C(K,2) / K = K - 1; of (b) over (a), K·(P + A) / (P + K·A).
Data: the embedded ``rm`` split's prompts (real lengths, chat-formatted with the model's
template, which adds a system line) with K answers sampled once from the bundled model
(``labkit.generation.sample_k``, up to ``--response-tokens`` tokens, temperature 0.7), or with
``--responses demos`` the embedded demonstrations' answers drawn at random; each ranking is a
random strict order (no ties: every prompt gives exactly C(K,2) comparisons, so TRL's mean
over pairs equals labkit's mean over prompts of the mean over pairs).

All three start from one saved folder (same backbone and head weights), see identical token
ids (``labkit``'s ``format_prompt(prompt) + response + EOS``, handed to TRL pre-tokenised),
train one epoch with AdamW, the same learning-rate schedule, gradient clipping, fp32 master
weights and bf16 autocast where the CPU is fast at it, and no gradient checkpointing (TRL 1.16
turns it on by default; off here so that all do the same arithmetic). Optimiser steps match: a
labkit step holds ``--prompts-per-step`` prompts (``--micro-prompts`` per forward), a TRL step
the same prompts' comparisons (``--pairs-per-micro`` or fewer per forward: the largest divisor
of C(K,2) not above it, with gradient accumulation). Losses side by side: before training, all
three compute the mean loss of the first ``--check-prompts`` prompts in fp32 with their own
code (same weights and data must give the same number); then the first and last training
step's loss (bf16 autocast).

    python benchmarks/rm_kway.py                        # bundled 135M model, K = 4 and 8, ~10-15 min
    python benchmarks/rm_kway.py --model small --prompts 8   # a 16M model built in code, quicker

Writes ``benchmarks/results/rm_kway.json``. Times are wall time and this process's CPU time
(all threads): on a machine shared with other jobs the wall time also counts waiting for a
core, the CPU time does not. The default is one torch thread: with several, idle threads spin
while they wait for busy ones, and that spinning counts as CPU time too, more so the busier
the machine is. The runs of one K take turns (a, b, c, a, b, c, ... with ``--repeats``), so a busy
spell hits all of them; the load average before and after each run is recorded next to its
timings, with the CPU's name and its bf16 matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from labkit.models import BUNDLED, build_tiny, cpu_has_fast_bf16, cpu_name, fast_dtype, load_model
from labkit.rankings import tiers_to_ranks
from labkit.reward import (RewardConfig, RewardModel, batch_rewards, collate, encode, load_reward_model,
                           ranking_loss, train_reward_model)
from labkit.stage import read_history

RESULTS = Path(__file__).parent / "results" / "rm_kway.json"
# A mid-sized model built in code: big enough that compute, not Python overhead, dominates.
SMALL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)
METHODS = ("kway", "kway_prefix", "trl_pairs")
NAMES = {"kway": "K-way", "kway_prefix": "K-way + prefix", "trl_pairs": "TRL pairs"}


def machine_info(peak_seconds: float) -> dict:
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "os": platform.platform(), "python": platform.python_version(),
            "fast_bf16": cpu_has_fast_bf16(), "loadavg_start": os.getloadavg()}
    if peak_seconds > 0:
        sys.path.insert(0, str(Path(__file__).parent))
        from ppo_throughput import matmul_peak  # one home for the peak measurement

        info["bf16_matmul_peak_flops"] = matmul_peak("bf16", seconds=peak_seconds)
    return info


# ----------------------------------------------------------------------------- data

def make_rankings(args, k_max: int, tok) -> tuple[list[dict], dict]:
    """``--prompts`` rm-split prompts with k_max answers each, in a random strict order; a
    smaller K takes each ranking's first K answers (ranked again in a random order)."""
    from labkit.data import load_demonstrations, load_prompts

    rng = random.Random(args.seed)
    prompts = load_prompts("rm")
    prompts = [prompts[i] for i in rng.sample(range(len(prompts)), args.prompts)]
    t0 = time.perf_counter()
    if args.responses == "sample":
        from labkit.generation import sample_k

        model, sample_tok = load_model(BUNDLED, device="cpu", seed=args.seed)
        samples = sample_k(model, sample_tok, prompts, k=k_max, max_new_tokens=args.response_tokens,
                           temperature=0.7, seed=args.seed, show_progress=False)
        answers = [s["responses"] for s in samples]
        del model
    else:
        demos = [d["response"] for d in load_demonstrations()]
        answers = [[rng.choice(demos) for _ in range(k_max)] for _ in prompts]
    records = [{"prompt": p["prompt"], "responses": a} for p, a in zip(prompts, answers)]
    n_prompt = [len(encode(tok, [r["prompt"]], [""])[0][0]) - 1 for r in records]
    n_answer = [len(tok(x, add_special_tokens=False)["input_ids"]) + 1 for r in records for x in r["responses"]]
    data = {"responses": args.responses, "sampling_s": time.perf_counter() - t0,
            "prompt_tokens_mean": statistics.mean(n_prompt), "prompt_tokens": n_prompt,
            "answer_tokens_mean": statistics.mean(n_answer), "answer_tokens_max": max(n_answer),
            "note": "prompt tokens: format_prompt(prompt) (chat template incl. system line); "
                    "answer tokens: the response + EOS"}
    return records, data


def ranked(records: list[dict], k: int, seed: int) -> list[dict]:
    rng = random.Random(seed + k)
    out = []
    for r in records:
        order = rng.sample(range(k), k)  # no ties: every prompt gives exactly C(K,2) comparisons
        out.append({"prompt": r["prompt"], "responses": r["responses"][:k], "tiers": [[j] for j in order]})
    return out


def init_folder(model_name: str, path: Path, seed: int) -> None:
    """The shared starting point: backbone + scalar head, saved once."""
    if model_name == "small":
        model, tok = build_tiny(seed=seed, **SMALL)
    else:
        model, tok = load_model(model_name, dtype="float32", device="cpu", seed=seed)
    torch.manual_seed(seed)
    RewardModel.from_causal_lm(model.float()).save_pretrained(path, tokenizer=tok)


def pairs_of(records: list[dict], tok, max_length: int) -> dict[str, list]:
    """Each ranking's C(K,2) (chosen, rejected) comparisons as TRL's pre-tokenised columns, by prompt."""
    chosen, rejected = [], []
    for r in records:
        ids, _ = encode(tok, [r["prompt"]] * len(r["responses"]), r["responses"], max_length)
        order = [t[0] for t in r["tiers"]]
        for a in range(len(order)):
            for b in range(a + 1, len(order)):
                chosen.append(ids[order[a]])
                rejected.append(ids[order[b]])
    return {"chosen_ids": chosen, "rejected_ids": rejected}


def pairs_per_micro(k: int, cap: int) -> int:
    """The largest divisor of C(K,2) not above ``cap``: equal micro-batches, so the accumulated
    mean over a step's pairs is the plain mean."""
    n = k * (k - 1) // 2
    return max(d for d in range(1, min(cap, n) + 1) if n % d == 0)


# ----------------------------------------------------------------------------- the three trainers

@torch.no_grad()
def labkit_initial_loss(init: Path, records: list[dict], max_length: int, prefix_sharing: bool) -> float:
    """Mean ranking loss in fp32, one prompt per forward (all have the same number of pairs)."""
    rm, tok = load_reward_model(init, dtype="float32", device="cpu")
    rm.eval()
    losses = []
    for r in records:
        items = [{"ids": encode(tok, [r["prompt"]] * len(r["responses"]), r["responses"], max_length)[0],
                  "ranks": tiers_to_ranks(r["tiers"], len(r["responses"]))}]
        batch, ranks = collate(items, tok.pad_token_id, prefix_sharing)
        losses.append(ranking_loss(batch_rewards(rm, batch), ranks).item())
    return sum(losses) / len(losses)


def trl_model(init: Path):
    """``AutoModelForSequenceClassification`` with the saved backbone and the same head weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(init, num_labels=1, dtype=torch.float32)
    head = load_file(init / "reward_head.safetensors")["weight"]  # (1, H)
    with torch.no_grad():
        model.score.weight.copy_(head)
    assert model.score.bias is None  # same as labkit's head: no bias term
    return model


def run_trl(init: Path, records: list[dict], args, work: Path, check: list[dict]) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    from labkit.models import setup_tokenizer

    tok = setup_tokenizer(AutoTokenizer.from_pretrained(init))
    data = Dataset.from_dict(pairs_of(records, tok, args.max_length))
    k = len(records[0]["responses"])
    per_prompt = k * (k - 1) // 2
    micro = pairs_per_micro(k, args.pairs_per_micro)
    bf16 = fast_dtype("cpu") == torch.bfloat16 and not args.fp32
    config = TRLRewardConfig(
        output_dir=str(work / "trl"), num_train_epochs=1, learning_rate=args.lr,
        per_device_train_batch_size=micro, gradient_accumulation_steps=args.prompts_per_step * per_prompt // micro,
        per_device_eval_batch_size=micro, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        bf16=bf16, use_cpu=True, max_length=args.max_length, save_strategy="no", report_to=[],
        logging_steps=1, seed=args.seed, disable_dropout=True, dataloader_num_workers=0,
        disable_tqdm=True, center_rewards_coefficient=None,
        gradient_checkpointing=False)  # TRL 1.16 defaults to True; labkit does not recompute activations
    trainer = RewardTrainer(model=trl_model(init), args=config, train_dataset=data, processing_class=tok)
    # Initial mean pairwise loss, fp32, TRL's own compute_loss on TRL's own collated batches.
    initial = None
    if check:
        trainer.model.eval()
        pairs = pairs_of(check, tok, args.max_length)
        rows = [{"chosen_ids": c, "rejected_ids": r} for c, r in zip(pairs["chosen_ids"], pairs["rejected_ids"])]
        losses = []
        with torch.no_grad():
            for s in range(0, len(rows), micro):
                batch = trainer.data_collator(rows[s:s + micro])
                losses.append(trainer.compute_loss(trainer.model, dict(batch)).item())
        initial = sum(losses) / len(losses)
        trainer.model.train()
    gc.collect()
    load0 = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    out = trainer.train()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"epoch_s": seconds, "epoch_cpu_s": cpu, "train_runtime_s": out.metrics["train_runtime"],
            "initial_loss_fp32": initial, "first_step_loss": logged[0] if logged else None,
            "final_loss": logged[-1] if logged else None, "comparisons": len(data),
            "forward_sequences": 2 * len(data), "optimizer_steps": trainer.state.global_step,
            "sequences_per_forward": 2 * micro, "bf16_autocast": bf16,
            "loadavg_before": load0, "loadavg_after": os.getloadavg()}


def run_labkit(init: Path, records: list[dict], args, work: Path, check: list[dict], prefix_sharing: bool) -> dict:
    config = RewardConfig(model=str(init), rankings=records, out_dir=str(work / "labkit"), epochs=1,
                          batch_size=args.prompts_per_step, micro_batch_size=args.micro_prompts,
                          learning_rate=args.lr, min_lr_ratio=0.1, max_grad_norm=1.0,
                          max_length=args.max_length, prefix_sharing=prefix_sharing, eval_fraction=0.0,
                          normalize=False, seed=args.seed, precision="fp32" if args.fp32 else "auto",
                          device="cpu", dashboard=False, progress=False)
    initial = labkit_initial_loss(init, check, args.max_length, prefix_sharing) if check else None
    gc.collect()
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    m = train_reward_model(config)
    total = time.perf_counter() - t0
    k = len(records[0]["responses"])
    return {"epoch_s": m["time/train_s"], "epoch_cpu_s": m["time/train_cpu_s"], "call_s": total,
            "initial_loss_fp32": initial, "first_step_loss": m["loss/first"],
            "final_loss": read_history(m["out_dir"])["loss/ranking"][-1][1],
            "comparisons": m["data/n_comparisons"], "forward_sequences": len(records) * k,
            "optimizer_steps": m["train/steps_done"], "prompts_per_forward": args.micro_prompts,
            "bf16_autocast": not args.fp32 and fast_dtype("cpu") == torch.bfloat16,
            "loadavg_before": load0, "loadavg_after": os.getloadavg()}


def token_counts(records: list[dict], tok, max_length: int) -> dict[str, int]:
    """Tokens each method computes per epoch (without padding)."""
    from labkit.reward import shared_prefix_length

    separate = packed = 0
    for r in records:
        ids, _ = encode(tok, [r["prompt"]] * len(r["responses"]), r["responses"], max_length)
        n = shared_prefix_length(ids)
        separate += sum(map(len, ids))
        packed += n + sum(len(x) - n for x in ids)
    k = len(records[0]["responses"])
    return {"kway": separate, "kway_prefix": packed, "trl_pairs": separate * (k - 1)}


def best_of(runs: list[dict]) -> dict:
    """The first run's numbers with the fastest time of all repeats (least disturbed by other jobs)."""
    best = dict(runs[0])
    for key in ("epoch_s", "epoch_cpu_s"):
        best[key + "_all"] = [r[key] for r in runs]
        best[key] = min(best[key + "_all"])
    return best


def run_method(method: str, init: Path, records: list[dict], args, work: Path, check: list[dict]) -> dict:
    if method == "trl_pairs":
        return run_trl(init, records, args, work, check)
    return run_labkit(init, records, args, work, check, prefix_sharing=method == "kway_prefix")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (bundled), 'small' (16M, built in code), "
                   "'tiny' or a folder")
    p.add_argument("--ks", default="4,8", help="comma-separated K values")
    p.add_argument("--prompts", type=int, default=4, help="rankings per K (one epoch over them)")
    p.add_argument("--prompts-per-step", type=int, default=2, help="prompts per optimiser step")
    p.add_argument("--micro-prompts", type=int, default=1, help="prompts per labkit forward pass")
    p.add_argument("--pairs-per-micro", type=int, default=8, help="at most this many pairs per TRL forward pass")
    p.add_argument("--responses", choices=("sample", "demos"), default="sample",
                   help="answers sampled once from the bundled model, or drawn from the embedded demonstrations")
    p.add_argument("--response-tokens", type=int, default=64, help="max_new_tokens when sampling answers")
    p.add_argument("--check-prompts", type=int, default=1, help="prompts in the fp32 initial-loss check (0: none)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 keeps the CPU-time column clean of thread spin-waits on a shared machine")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast for any trainer")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per trainer and K; the fastest counts")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--peak-seconds", type=float, default=2.0, help="bf16 matmul peak measurement (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    torch.set_num_threads(args.threads)
    ks = [int(x) for x in args.ks.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    command = " ".join(["python benchmarks/rm_kway.py", *(sys.argv[1:] if argv is None else argv)])
    t_start = time.perf_counter()
    result = {"machine": machine_info(args.peak_seconds), "command": command, "settings": vars(args), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        init = work / "init"
        init_folder(args.model, init, args.seed)
        _, tok = load_reward_model(init, device="cpu")
        base, result["data"] = make_rankings(args, max(ks), tok)
        # Warm-up, untimed: imports, kernel selection and allocator growth happen on first use,
        # and would otherwise be charged to whichever trainer runs first.
        warm = ranked(base[:args.prompts_per_step], 2, args.seed + 1)
        for method in methods:
            run_method(method, init, warm, args, work, [])
        for k in ks:
            records = ranked(base, k, args.seed)
            check = records[:args.check_prompts]
            runs: dict[str, list[dict]] = {m: [] for m in methods}
            for _ in range(args.repeats):  # take turns, so a busy spell on a shared machine hits all
                for method in methods:
                    runs[method].append(run_method(method, init, records, args, work, check))
                    print(f"K={k} {NAMES[method]}: {runs[method][-1]['epoch_s']:.1f} s", flush=True)
            row = {"K": k, "ideal_speedup_vs_trl": k - 1, "tokens": token_counts(records, tok, args.max_length)}
            row["ideal_prefix_speedup"] = row["tokens"]["kway"] / row["tokens"]["kway_prefix"]
            for method in methods:
                row[method] = best_of(runs[method])
            for a, b in (("kway_prefix", "kway"), ("kway_prefix", "trl_pairs"), ("kway", "trl_pairs")):
                if a in row and b in row:
                    for t in ("epoch_s", "epoch_cpu_s"):
                        row[f"speedup_{a}_vs_{b}" + ("_cpu" if t == "epoch_cpu_s" else "_wall")] = row[b][t] / row[a][t]
            initial = [row[m]["initial_loss_fp32"] for m in methods if row[m]["initial_loss_fp32"] is not None]
            if len(initial) > 1:
                row["initial_loss_max_abs_diff"] = max(initial) - min(initial)
            result["runs"].append(row)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - t_start
    print_table(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


def print_table(result: dict) -> None:
    m, d = result["machine"], result["data"]
    peak = m.get("bf16_matmul_peak_flops")
    print(f"\n{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}"
          + (f", bf16 matmul peak {peak / 1e9:.0f} GFLOP/s" if peak else "")
          + f"; load avg at start {m['loadavg_start'][0]:.2f}, end {m['loadavg_end'][0]:.2f}; "
          f"model {result['settings']['model']}; prompts {d['prompt_tokens_mean']:.0f} tokens, answers "
          f"{d['answer_tokens_mean']:.0f} tokens on average ({d['responses']})")
    head = (f"{'K':>2} {'trainer':<15} {'tokens':>7} {'steps':>5} {'epoch s':>8} {'cpu s':>7} {'vs K-way':>8} "
            f"{'vs TRL':>7} {'load':>11} {'init loss fp32':>14} {'first step':>10} {'last step':>9}")
    print(head)
    print("-" * len(head))
    for r in result["runs"]:
        for method in METHODS:
            if method not in r:
                continue
            x = r[method]
            vs_k = f"{r['kway']['epoch_cpu_s'] / x['epoch_cpu_s']:.2f}x" if "kway" in r else "-"
            vs_t = f"{r['trl_pairs']['epoch_cpu_s'] / x['epoch_cpu_s']:.2f}x" if "trl_pairs" in r else "-"
            init = f"{x['initial_loss_fp32']:.6f}" if x["initial_loss_fp32"] is not None else "-"
            load = f"{x['loadavg_before'][0]:.1f}->{x['loadavg_after'][0]:.1f}"
            print(f"{r['K']:>2} {NAMES[method]:<15} {r['tokens'][method]:>7} {x['optimizer_steps']:>5} "
                  f"{x['epoch_s']:>8.1f} {x['epoch_cpu_s']:>7.1f} {vs_k:>8} {vs_t:>7} {load:>11} {init:>14} "
                  f"{x['first_step_loss']:>10.4f} {x['final_loss']:>9.4f}")
        extra = f"; initial losses differ by at most {r['initial_loss_max_abs_diff']:.1e}" \
            if "initial_loss_max_abs_diff" in r else ""
        print(f"   ideal: prefix sharing {r['ideal_prefix_speedup']:.2f}x over K-way (tokens), K-way "
              f"{r['ideal_speedup_vs_trl']}x over TRL pairs{extra}")
    print("ratios = CPU time of one epoch (this process, robust to a shared machine); epoch s = wall time; "
          "load = 1-min load average before -> after the run")


if __name__ == "__main__":
    main()

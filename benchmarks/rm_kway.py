"""K-way reward-model batching vs pairwise expansion (BRIEF §4, InstructGPT §3.5).

The same rankings train the same reward model twice, for K = 4 and K = 9:

(a) labkit: ``train_reward_model``; a batch element is one prompt with all its K responses,
    so K forward passes serve its C(K,2) comparisons;
(b) TRL 1.16 ``RewardTrainer`` on the C(K,2) (chosen, rejected) pairs of the same rankings:
    2 forward passes per comparison, 2·C(K,2) per prompt.

Ideal speed-up of (a) over (b): 2·C(K,2) / K = K - 1 (3x for K=4, 8x for K=9). Both start
from one saved folder (same backbone and head weights), see identical token ids (``labkit``'s
``format_prompt(prompt) + response + EOS``, handed to TRL pre-tokenised), train one epoch
with AdamW, the same learning rate schedule, gradient clipping, fp32 master weights and
bf16 autocast where the CPU is fast at it, and no gradient checkpointing (TRL 1.16 turns it
on by default; it is turned off here so that both sides do the same arithmetic). Optimiser steps match too: a labkit step holds
``--prompts-per-step`` prompts, a TRL step the same prompts' comparisons (one prompt's
C(K,2) pairs per micro-batch, gradient accumulation over the prompts). Before training,
both compute the mean pairwise loss over all comparisons in fp32 with their own code;
same weights and data must give the same number.

    python benchmarks/rm_kway.py                       # "small" model (16M, built in code), ~4 min
    python benchmarks/rm_kway.py --model smollm2-135m --prompts 4  # the bundled model, much longer

Writes ``benchmarks/results/rm_kway.json``. Times are measured both as wall time and as
this process's CPU time (all threads): on a machine shared with other jobs the wall time
also counts waiting for a core, the CPU time does not. The default is one torch thread:
with several, idle threads spin while they wait for busy ones, and that spinning is
counted as CPU time too, more so the busier the machine is. The load average before and after
each run is recorded next to the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from labkit.models import build_tiny, cpu_has_fast_bf16, cpu_name, fast_dtype, load_model
from labkit.rankings import tiers_to_ranks
from labkit.reward import RewardConfig, RewardModel, collate, encode, load_reward_model, ranking_loss, train_reward_model
from labkit.stage import read_history

RESULTS = Path(__file__).parent / "results" / "rm_kway.json"
# A mid-sized model built in code: big enough that compute, not Python overhead, dominates.
SMALL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2)


def machine_info() -> dict:
    cpu = cpu_name()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "os": platform.platform(), "python": platform.python_version(),
            "fast_bf16": cpu_has_fast_bf16(), "loadavg_start": os.getloadavg()}


def make_rankings(n: int, k: int, seed: int) -> list[dict]:
    """Embedded RM-split prompts (or made-up ones) with K simple responses in a strict order."""
    try:
        from labkit.data import load_prompts
        prompts = [p["prompt"] for p in load_prompts("rm")]
    except Exception:  # the benchmark does not depend on the dataset
        prompts = [f"Tell me something about topic number {i}." for i in range(n)]
    rng = random.Random(seed)
    words = "the model answers this question with some clear and useful words about it".split()
    out = []
    for i in range(n):
        responses = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 24))) for _ in range(k)]
        order = rng.sample(range(k), k)  # no ties: every prompt gives exactly C(K,2) comparisons
        out.append({"prompt": prompts[i % len(prompts)][:200], "responses": responses,
                    "tiers": [[j] for j in order]})
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


@torch.no_grad()
def labkit_initial_loss(init: Path, records: list[dict], max_length: int) -> float:
    rm, tok = load_reward_model(init, dtype="float32", device="cpu")
    rm.eval()
    items = [{"ids": encode(tok, [r["prompt"]] * len(r["responses"]), r["responses"], max_length)[0],
              "ranks": tiers_to_ranks(r["tiers"], len(r["responses"]))} for r in records]
    input_ids, mask, slots, ranks = collate(items, tok.pad_token_id)
    from labkit.reward import batch_rewards
    return ranking_loss(batch_rewards(rm, input_ids, mask, slots, ranks), ranks).item()


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


def run_trl(init: Path, records: list[dict], args, work: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    from labkit.models import setup_tokenizer

    tok = setup_tokenizer(AutoTokenizer.from_pretrained(init))
    data = Dataset.from_dict(pairs_of(records, tok, args.max_length))
    k = len(records[0]["responses"])
    per_prompt = k * (k - 1) // 2
    bf16 = fast_dtype("cpu") == torch.bfloat16 and not args.fp32
    config = TRLRewardConfig(
        output_dir=str(work / "trl"), num_train_epochs=1, learning_rate=args.lr,
        per_device_train_batch_size=per_prompt, gradient_accumulation_steps=args.prompts_per_step,
        per_device_eval_batch_size=per_prompt, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        bf16=bf16, use_cpu=True, max_length=args.max_length, save_strategy="no", report_to=[],
        logging_steps=1, seed=args.seed, disable_dropout=True, dataloader_num_workers=0,
        disable_tqdm=True, center_rewards_coefficient=None,
        gradient_checkpointing=False)  # TRL 1.16 defaults to True; labkit does not recompute activations
    trainer = RewardTrainer(model=trl_model(init), args=config, train_dataset=data, processing_class=tok)
    # Initial mean pairwise loss, fp32, TRL's own compute_loss on TRL's own collated batches.
    trainer.model.eval()
    losses = []
    with torch.no_grad():
        for s in range(0, len(data), per_prompt):
            batch = trainer.data_collator([data[i] for i in range(s, min(s + per_prompt, len(data)))])
            losses.append(trainer.compute_loss(trainer.model, dict(batch)).item())
    trainer.model.train()
    load0 = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    out = trainer.train()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"epoch_s": seconds, "epoch_cpu_s": cpu, "train_runtime_s": out.metrics["train_runtime"], "initial_loss_fp32": sum(losses) / len(losses),
            "first_step_loss": logged[0] if logged else None, "final_loss": logged[-1] if logged else None,
            "comparisons": len(data), "forward_sequences": 2 * len(data), "optimizer_steps": trainer.state.global_step,
            "sequences_per_forward": 2 * per_prompt, "bf16_autocast": bf16,
            "loadavg_before": load0, "loadavg_after": os.getloadavg()}


def run_labkit(init: Path, records: list[dict], args, work: Path) -> dict:
    config = RewardConfig(model=str(init), rankings=records, out_dir=str(work / "labkit"), epochs=1,
                          batch_size=args.prompts_per_step, learning_rate=args.lr, min_lr_ratio=0.1, max_grad_norm=1.0,
                          max_length=args.max_length, eval_fraction=0.0, normalize=False, seed=args.seed,
                          precision="fp32" if args.fp32 else "auto", device="cpu", dashboard=False, progress=False)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    m = train_reward_model(config)
    total = time.perf_counter() - t0
    k = len(records[0]["responses"])
    return {"epoch_s": m["time/train_s"], "epoch_cpu_s": m["time/train_cpu_s"], "call_s": total, "initial_loss_fp32": labkit_initial_loss(init, records, args.max_length),
            "first_step_loss": m["loss/first"], "final_loss": read_history(m["out_dir"])["loss/ranking"][-1][1],
            "comparisons": m["data/n_comparisons"], "forward_sequences": len(records) * k,
            "optimizer_steps": m["train/steps_done"], "sequences_per_forward": args.prompts_per_step * k,
            "bf16_autocast": not args.fp32 and fast_dtype("cpu") == torch.bfloat16,
            "loadavg_before": load0, "loadavg_after": os.getloadavg()}


def best_of(runs: list[dict]) -> dict:
    """The first run's numbers with the fastest time of all repeats (least disturbed by other jobs)."""
    best = dict(runs[0])
    for key in ("epoch_s", "epoch_cpu_s"):
        best[key + "_all"] = [r[key] for r in runs]
        best[key] = min(best[key + "_all"])
    return best


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small", help="'small' (built in code, ~15M), 'tiny', 'smollm2-135m' or a folder")
    p.add_argument("--ks", default="4,9", help="comma-separated K values")
    p.add_argument("--prompts", type=int, default=8, help="rankings per K (one epoch over them)")
    p.add_argument("--prompts-per-step", type=int, default=4, help="prompts per optimiser step")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 keeps the CPU-time column clean of thread spin-waits on a shared machine")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast for either side")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per trainer and K; the fastest counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = " ".join(["python benchmarks/rm_kway.py", *(sys.argv[1:] if argv is None else argv)])
    result = {"machine": machine_info(), "command": command, "settings": vars(args), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        init = work / "init"
        init_folder(args.model, init, args.seed)
        # Warm-up, untimed: imports, kernel selection and allocator growth happen on first use,
        # and would otherwise be charged to whichever trainer runs first.
        warm = make_rankings(args.prompts_per_step, 3, args.seed + 1)
        run_labkit(init, warm, args, work)
        run_trl(init, warm, args, work)
        for k in [int(x) for x in args.ks.split(",")]:
            records = make_rankings(args.prompts, k, args.seed)
            labs, trls = [], []
            for _ in range(args.repeats):  # alternate, so a busy spell on a shared machine hits both
                labs.append(run_labkit(init, records, args, work))
                trls.append(run_trl(init, records, args, work))
            lab, trl = best_of(labs), best_of(trls)
            result["runs"].append({"K": k, "ideal_speedup": k - 1,
                                   "speedup_cpu": trl["epoch_cpu_s"] / lab["epoch_cpu_s"],
                                   "speedup_wall": trl["epoch_s"] / lab["epoch_s"],
                                   "initial_loss_abs_diff": abs(trl["initial_loss_fp32"] - lab["initial_loss_fp32"]),
                                   "labkit": lab, "trl_pairs": trl})
    result["machine"]["loadavg_end"] = os.getloadavg()
    print_table(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


def print_table(result: dict) -> None:
    m = result["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}, "
          f"load avg at start {m['loadavg_start'][0]:.2f}, end {m['loadavg_end'][0]:.2f}, "
          f"model {result['settings']['model']}")
    head = (f"{'K':>2} {'trainer':<13} {'seq/fwd':>7} {'fwd seqs':>8} {'pairs':>5} {'steps':>5} {'epoch s':>7} "
            f"{'cpu s':>7} {'speed-up cpu':>12} {'wall':>6} {'ideal':>5} {'init loss fp32':>14} {'last loss':>9}")
    print(head)
    print("-" * len(head))
    for r in result["runs"]:
        for name, d in (("labkit K-way", r["labkit"]), ("TRL pairs", r["trl_pairs"])):
            ours = name.startswith("labkit")
            cpu = f"{r['speedup_cpu']:.2f}x" if ours else "1.00x"
            wall = f"{r['speedup_wall']:.2f}x" if ours else "1.00x"
            print(f"{r['K']:>2} {name:<13} {d['sequences_per_forward']:>7} {d['forward_sequences']:>8} "
                  f"{d['comparisons']:>5} {d['optimizer_steps']:>5} {d['epoch_s']:>7.1f} {d['epoch_cpu_s']:>7.1f} "
                  f"{cpu:>12} {wall:>6} {r['ideal_speedup']:>4}x {d['initial_loss_fp32']:>14.6f} {d['final_loss']:>9.4f}")
        print(f"   initial losses differ by {r['initial_loss_abs_diff']:.1e}")
    print("speed-up = TRL time / labkit time for one epoch; cpu = this process's CPU time (robust to a "
          "shared machine), wall = elapsed time")


if __name__ == "__main__":
    main()

"""Training attention on a CPU: SDPA in bf16 (plain autocast) against labkit's fp32 SDPA.

Under bf16 autocast a CPU runs ``scaled_dot_product_attention``'s flash kernel in bf16; its
backward is several times its forward at training sizes. ``labkit.models.use_training_attention``
(on by default in ``load_model``) runs the same kernel in fp32 when gradients are on. Three
levels, the two attentions taking turns (bf16, fp32, bf16, ... for ``--repeats``), medians:

- ``op``: SDPA alone, forward + backward, on random q/k/v of the bundled model's shape (9 query
  heads, 3 key/value heads, head size 64) with a causal + padding mask, at batch x length
  sizes the stages use;
- ``model``: the bundled model's forward + backward (LM loss on every token) on
  chat-formatted SFT demonstrations, left-padded, as SFT (8 a step) and PPO (4 a micro-batch)
  batch them;
- ``ppo_update``: ``labkit.ppo.ppo_update`` (policy + separate value model, one epoch of the cpu
  preset's minibatches: 16 episodes, 8 per optimizer step, 4 per forward) on one fixed rollout
  of up to ``--new-tokens`` tokens, with a scripted reward (answer length), so the run needs
  no trained RM.

bf16 matmul peak measured in the same run (``generation.matmul_peak``). Writes
``benchmarks/results/training_attention.json``.

    python benchmarks/training_attention.py             # about 5 minutes on a 2-core CPU
    python benchmarks/training_attention.py --repeats 3 --skip-ppo
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULT = ROOT / "benchmarks" / "results" / "training_attention.json"
IMPLS = ("sdpa", "labkit_sdpa")  # plain SDPA under autocast (bf16), labkit's (fp32 when training)
LABEL = {"sdpa": "bf16 SDPA", "labkit_sdpa": "fp32 SDPA (labkit)"}


def _median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def op_rows(sizes: list[tuple[int, int]], repeats: int) -> list[dict]:
    """SDPA alone: forward + backward per size, bf16 inputs as autocast hands them over."""
    H, Hkv, D = 9, 3, 64
    rows = []
    for B, T in sizes:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, h, T, D, generator=g).to(torch.bfloat16).requires_grad_()
                   for h in (H, Hkv, Hkv))
        keep = torch.ones(B, T, dtype=torch.bool)
        keep[0, : T // 5] = False  # one left-padded row
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None] & keep[:, None, None, :]
        mask |= torch.eye(T, dtype=torch.bool)[None, None]  # padded rows attend to themselves
        times = {impl: [] for impl in IMPLS}
        for _ in range(repeats + 2):  # the first two rounds warm up
            for impl in IMPLS:
                t0 = time.perf_counter()
                if impl == "sdpa":
                    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
                else:
                    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                         enable_gqa=True)
                out.float().sum().backward()
                times[impl].append(time.perf_counter() - t0)
        row = {"level": "op", "batch": B, "length": T}
        for impl in IMPLS:
            row[f"{impl}_ms"] = _median_ms(times[impl][2:])
        rows.append(row)
    return rows


def model_rows(model, tok, batches: list[int], repeats: int) -> list[dict]:
    """The bundled model's forward + backward on real demonstrations, per batch size."""
    from labkit.data import load_demonstrations
    from labkit.models import autocast, format_prompt, pad_rows, position_ids

    demos = load_demonstrations()
    texts = [format_prompt(tok, d["prompt"]) + d["response"] + tok.eos_token for d in demos]
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    rows = []
    for B in batches:
        chosen = ids[:B]
        input_ids, mask = pad_rows(chosen, tok.pad_token_id, side="left")
        positions = position_ids(mask)
        times = {impl: [] for impl in IMPLS}
        for _ in range(repeats + 1):
            for impl in IMPLS:
                model.set_attn_implementation(impl)
                t0 = time.perf_counter()
                with autocast("cpu"):
                    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                   use_cache=False).logits
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(),
                                       reduction="none")[mask[:, 1:].flatten().bool()].mean()
                loss.backward()
                model.zero_grad(set_to_none=True)
                times[impl].append(time.perf_counter() - t0)
        row = {"level": "model", "batch": B, "length": int(input_ids.shape[1]), "tokens": int(mask.sum())}
        for impl in IMPLS:
            row[f"{impl}_ms"] = _median_ms(times[impl][1:])
        rows.append(row)
    return rows


def ppo_rows(new_tokens: int, repeats: int) -> list[dict]:
    """One epoch of ``ppo_update`` on a fixed rollout, the attentions taking turns."""
    from labkit import ppo

    config = ppo.PPOConfig(model="smollm2-135m", reward_fn=lambda prompts, responses: [len(r.split()) / 20 for r in responses],
                           out_dir="/tmp/labkit-training-attention", batch_size=16, mini_batch_size=8,
                           micro_batch_size=4, max_new_tokens=new_tokens, gold_every=0, sample_every=0,
                           dashboard=False, progress=False)
    run = ppo._set_up(config)
    prompts = [ppo._prompt_text(r) for r in run.records[:config.batch_size]]
    torch.manual_seed(0)
    batch = ppo.rollout(run.model, run.tokenizer, prompts, config, run.accelerator.device)
    ppo.rollout_forward(run.model, run.reference, batch, config)
    scores = ppo._score_responses(batch.prompts, batch.texts, None, None, config.reward_fn, config,
                                  batch.responses.device)
    rewards, _ = ppo.shape_rewards(scores, batch.logprobs, batch.ref_logprobs, batch.response_mask, config.kl_coef,
                                   config.kl_estimator, batch.has_eos, config.missing_eos_penalty)
    advantages, returns = ppo.compute_gae(rewards, batch.values, batch.response_mask, config.gamma, config.lam)
    advantages = ppo.masked_whiten(advantages, batch.response_mask)
    times = {impl: [] for impl in IMPLS}
    for _ in range(repeats + 1):
        for impl in IMPLS:
            run.model.policy.set_attn_implementation(impl)
            run.model.value_model.backbone.set_attn_implementation(impl)
            t0 = time.perf_counter()
            ppo.ppo_update(run.ddp_model, run.model, run.optimizer, run.accelerator, batch, advantages, returns,
                           config, None, None)
            times[impl].append(time.perf_counter() - t0)
    row = {"level": "ppo_update", "batch": config.batch_size, "length": int(batch.input_ids.shape[1]),
           "tokens": int(batch.attention_mask.sum()), "response_tokens": int(batch.response_mask.sum())}
    for impl in IMPLS:
        row[f"{impl}_ms"] = _median_ms(times[impl][1:])
    return [row]


def table(rows: list[dict]) -> str:
    lines = [f"{'level':>10} {'batch':>5} {'length':>6} {LABEL['sdpa'] + ' ms':>14} "
             f"{LABEL['labkit_sdpa'] + ' ms':>23} {'speed-up':>8}"]
    for r in rows:
        lines.append(f"{r['level']:>10} {r['batch']:>5} {r['length']:>6} {r['sdpa_ms']:>14.1f} "
                     f"{r['labkit_sdpa_ms']:>23.1f} {r['sdpa_ms'] / r['labkit_sdpa_ms']:>7.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=96, help="PPO rollout length limit (the cpu preset's)")
    ap.add_argument("--skip-ppo", action="store_true")
    ap.add_argument("--out", default=str(RESULT))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from generation import matmul_peak
    from labkit.models import cpu_name, fast_dtype, load_model

    if fast_dtype(torch.device("cpu")) != torch.bfloat16:
        print("this CPU has no fast bf16: training runs in fp32 and the two attentions are the same")
    load_start = os.getloadavg()
    peak = matmul_peak(torch.bfloat16)
    model, tok = load_model("smollm2-135m", dtype="float32", device="cpu")  # labkit_sdpa already set
    rows = op_rows([(4, 177), (4, 300), (8, 200), (16, 120)], args.repeats)
    print(table(rows), flush=True)
    rows += model_rows(model, tok, [4, 8], args.repeats)
    del model
    if not args.skip_ppo:
        rows += ppo_rows(args.new_tokens, max(2, args.repeats // 2))
    print(table(rows))
    result = {"benchmark": "training_attention",
              "machine": {"cpu": cpu_name(), "platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch": torch.__version__, "threads": args.threads, "loadavg_start": load_start,
                          "loadavg_end": os.getloadavg()},
              "matmul_peak_flops": {"bf16": peak},
              "settings": {"repeats": args.repeats, "new_tokens": args.new_tokens,
                           "order": "the two attentions take turns; medians; warm-up rounds dropped"},
              "runs": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()

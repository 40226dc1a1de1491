"""labkit's sampler on a GPU: its own forward against the loop through ``model.forward`` and
transformers' ``generate``, on a model of the bundled one's shape (BRIEF §4).

The gpu preset samples 64 answers of up to 128 tokens per PPO step; on an H200 that took
about 85 ms a token step through ``model.forward``, for a model the GPU computes in a few: the
step is bound by the host (Python and kernel launches), not the GPU. This script measures
what labkit's forward (``labkit.generation._LeanDecoder``: fewer, larger operations per
layer) changes there, and checks it on the GPU:

- **same function**: in fp32 (no TF32) the two loops give the same greedy and sampled tokens
  and log-probs on left-padded prompts with copies of one prompt side by side;
- **bf16**: the sampled log-probs of each loop against a teacher-forced fp32 forward over
  the same tokens (mean and largest difference);
- **speed**: milliseconds per token step (a call of ``steps`` new tokens minus a call of 2, EOS
  ignored) at batch 1, 16 and 64 under bf16 autocast over fp32 weights (as PPO holds them),
  for labkit, labkit through ``model.forward`` and ``model.generate``.

The weights are random (the bundled model's GGUF is not needed for speed or for the
equivalence check); the shape is SmolLM2-135M's (30 layers, 576 wide, 9 query and 3 key heads).

    python benchmarks/gpu_sampler.py                  # CUDA; writes benchmarks/results/gpu_sampler.json
    python benchmarks/gpu_sampler.py --device cpu --layers 2 --steps 8 --batch-sizes 1,4   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from labkit import generation
from labkit.models import position_ids

RESULT = Path(__file__).resolve().parent / "results" / "gpu_sampler.json"


def build(layers: int, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device).eval()
    assert generation.lean_supported(model)
    return model


def prompts(batch: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts of 40-120 tokens; rows 0 and 1 are one prompt (a sample_k pair)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(40, 121, (batch,), generator=g).tolist()
    if batch > 1:
        lengths[1] = lengths[0]
    T = max(lengths)
    ids = torch.zeros(batch, T, dtype=torch.long)
    mask = torch.zeros(batch, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = torch.randint(10, 49000, (n,), generator=g)
        mask[i, T - n:] = 1
    if batch > 1:
        ids[1] = ids[0]
    return ids.to(device), mask.to(device)


def sample(model, ids, mask, steps: int, lean: bool, bf16: bool, do_sample: bool = True, seed: int = 0):
    gen = torch.Generator(device=ids.device).manual_seed(seed)
    with generation.lean_forward(lean):
        return generation.sample_tokens(model, ids, mask, steps, temperature=0.7, do_sample=do_sample,
                                        eos_token_id=None, pad_token_id=0, bf16=bf16, generator=gen)


def equivalence(model, device: str, steps: int) -> dict:
    """fp32: the two loops' tokens and log-probs; bf16: each loop's log-probs against a teacher-forced fp32 pass."""
    ids, mask = prompts(8, device, seed=1)
    out = {}
    for do_sample in (False, True):
        (r1, lp1, _), (r2, lp2, _) = (sample(model, ids, mask, steps, lean, bf16=False, do_sample=do_sample)
                                      for lean in (True, False))
        out["fp32_" + ("sampled" if do_sample else "greedy")] = {
            "same_tokens": bool(torch.equal(r1, r2)), "rows_equal": int((r1 == r2).all(1).sum()),
            "rows": int(r1.shape[0]), "max_logprob_diff": float((lp1 - lp2).abs().max())}
    for lean in (True, False):
        resp, lp, _ = sample(model, ids, mask, steps, lean, bf16=True)
        full, full_mask = torch.cat([ids, resp], 1), torch.cat([mask, torch.ones_like(resp)], 1)
        with torch.no_grad():
            logits = model(input_ids=full, attention_mask=full_mask, position_ids=position_ids(full_mask)).logits
        teacher = (logits[:, ids.shape[1] - 1:-1].float() / 0.7).log_softmax(-1).gather(2, resp[..., None])[..., 0]
        d = (lp - teacher).abs()
        out["bf16_vs_fp32_teacher_" + ("labkit" if lean else "labkit_mf")] = {
            "mean_abs_logprob_diff": float(d.mean()), "max_abs_logprob_diff": float(d.max()), "tokens": d.numel()}
    return out


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def speed(model, device: str, batch_sizes: list[int], steps: int, repeats: int) -> list[dict]:
    from labkit.models import autocast

    def hf(ids, mask, n):
        with torch.no_grad(), autocast(device):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)

    methods = {"labkit": lambda ids, mask, n: sample(model, ids, mask, n, True, True, do_sample=False),
               "labkit_mf": lambda ids, mask, n: sample(model, ids, mask, n, False, True, do_sample=False),
               "hf": hf}
    rows = []
    for B in batch_sizes:
        ids, mask = prompts(B, device)
        for fn in methods.values():  # warm-up
            fn(ids, mask, 2)
        times = {m: {"short": [], "long": []} for m in methods}
        for _ in range(repeats):
            for m, fn in methods.items():  # in turn, so a slow spell falls on all
                times[m]["short"].append(timed(lambda: fn(ids, mask, 2), device))
                times[m]["long"].append(timed(lambda: fn(ids, mask, steps), device))
        for m, t in times.items():
            short, long = statistics.median(t["short"]), statistics.median(t["long"])
            step_ms = 1e3 * (long - short) / (steps - 2)
            rows.append({"batch_size": B, "method": m, "step_ms": step_ms, "tokens_per_s_decoding": B * 1e3 / step_ms,
                         "call_s": long, "tokens_per_s_call": B * steps / long,
                         "short_s": t["short"], "long_s": t["long"]})
            print(f"batch {B:3d} {m:<10} {step_ms:7.2f} ms a step  {B * 1e3 / step_ms:9.0f} tokens/s decoding  "
                  f"call of {steps} tokens {long:6.2f} s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--steps", type=int, default=128, help="new tokens of the long call (the gpu preset's answer length)")
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--result", default=str(RESULT))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here (use --device cpu for a smoke run)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    model = build(args.layers, args.device)
    checks = equivalence(model, args.device, min(args.steps, 24))
    print(json.dumps(checks, indent=1))
    rows = speed(model, args.device, [int(b) for b in args.batch_sizes.split(",")], args.steps, args.repeats)
    import transformers

    machine = {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
               "torch": torch.__version__, "transformers": transformers.__version__,
               "python": platform.python_version()}
    result = {"benchmark": "gpu_sampler", "machine": machine, "settings": vars(args), "checks": checks,
              "runs": rows, "wall_s": time.perf_counter() - t0}
    Path(args.result).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.result}")


if __name__ == "__main__":
    main()

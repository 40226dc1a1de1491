"""Does ``torch.compile`` make labkit's decoding step faster on a CPU? (BRIEF §4; tried, not kept)

A decoding step of labkit's sampler (``labkit.generation._LeanDecoder``) runs, per layer, four
pre-packed bf16 products and about twenty small element-wise operations (RMSNorm, rotary
positions, the cache write, softmax, SiLU, residual adds), each a separate kernel over memory.
Inductor can fuse the element-wise ones into a few generated C++ loops. This benchmark measures
what that buys: one decoding layer written as a plain function (the same operations as the
lean decoder's layer at one new token a row), run eagerly and compiled with
``torch.compile(dynamic=True)``, against labkit's own step. The packed products stay oneDNN's
(an opaque custom op to the compiler: inductor's lowering does not take the pre-packed linear),
so the difference is the element-wise work and the Python between the operations.

One process; the bundled model in fp32 master weights with bf16 products, 2 threads; the eval
split's first ``batch`` prompts, the prompt pass by labkit, then ``--steps`` greedy steps timed
one by one per method, the three methods taking turns for ``--repeats`` rounds at each batch
size; the compiled function is compiled once (dynamic shapes serve every batch size and cache
length) and its compile time is reported. Greedy tokens of the three methods are compared.

    python benchmarks/sampler_compile.py          # about 6 minutes on 2 cores

Writes ``benchmarks/results/sampler_compile.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sampler_allocator import machine, write  # noqa: E402


@torch.library.custom_op("labkit_bench::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's pre-packed bf16 linear (the lean decoder's products), opaque to the compiler."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@packed_linear.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def decode_layer(x, cos, sin, mask, keys, values, start: int, norm1, norm2, eps: float, qkv_w, o_w, gate_up_w,
                 down_w, heads: int, kv_heads: int, head_dim: int, intermediate: int, scale: float):
    """One layer at one new token a row: x (b, 1, E) in the weights' dtype; keys/values (b, KV, cap, D)
    fp32, written at column ``start``; mask (b, 1, start + 1) additive fp32. Returns the new x."""
    b = x.shape[0]
    H, KV, D = heads, kv_heads, head_dim
    qkv = packed_linear(F.rms_norm(x, norm1.shape, norm1, eps).to(torch.bfloat16), qkv_w).view(b, 1, H + 2 * KV, D)
    qk = qkv[:, :, :H + KV].float()
    qk = qk * cos + torch.cat((-qk[..., D // 2:], qk[..., :D // 2]), -1) * sin
    keys[:, :, start:start + 1] = qk[:, :, H:].transpose(1, 2)
    values[:, :, start:start + 1] = qkv[:, :, H + KV:].transpose(1, 2).float()
    k, v = keys[:, :, :start + 1], values[:, :, :start + 1]
    g = H // KV
    scores = torch.matmul(qk[:, :, :H].transpose(1, 2).reshape(b, KV, g, D), k.transpose(-1, -2)) * scale
    scores = scores + mask[:, :, None]  # (b, KV, g, L)
    a = torch.matmul(scores.softmax(-1), v).view(b, 1, H * D)
    x = x + packed_linear(a.to(torch.bfloat16), o_w)
    gate, up = packed_linear(F.rms_norm(x, norm2.shape, norm2, eps).to(torch.bfloat16), gate_up_w).split(intermediate, -1)
    return x + packed_linear((F.silu(gate) * up).to(torch.bfloat16), down_w)


def packed_weights(model) -> list[tuple]:
    """Per layer: norms, eps, and the fused q/k/v, o, gate/up and down weights, cast to bf16 and packed."""
    def pack(linears):
        w = torch.cat([lin.weight.detach() for lin in linears]).to(torch.bfloat16)
        return torch.ops.mkldnn._reorder_linear_weight(w, None)

    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        out.append((layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                    layer.input_layernorm.variance_epsilon, pack([a.q_proj, a.k_proj, a.v_proj]), pack([a.o_proj]),
                    pack([m.gate_proj, m.up_proj]), pack([m.down_proj]), a.scaling, m.gate_proj.out_features))
    return out


WEIGHT_CACHE: dict = {}  # the lean decoder's packed bf16 weights, shared by every run() of the process


def run(model, tok, prompts, batch: int, steps: int, method: str, layer_fn, weights) -> tuple[list[float], list]:
    """Prompt pass by labkit, then ``steps`` greedy steps by ``method``; per-step seconds and tokens."""
    from labkit import generation, models

    ids, _ = generation.encode_prompts(tok, prompts[:batch])
    input_ids, am = generation._left_pad(sorted(ids, key=len), tok.pad_token_id)  # (B, T)
    T = input_ids.shape[1]
    mask = torch.ones(batch, T + steps + 1, dtype=am.dtype)
    mask[:, :T] = am
    positions = models.position_ids(am)
    dec = generation._LeanDecoder(model, T + steps + 1, torch.bfloat16, WEIGHT_CACHE)
    tokens = dec(input_ids, mask[:, :T], positions).argmax(-1)  # (B,)
    position, n, times, out = positions[:, -1:] + 1, T, [], [tokens]
    for _ in range(steps):
        t0 = time.perf_counter()
        if method == "labkit":
            logits = dec(tokens[:, None], mask[:, :n + 1], position)
        else:
            with torch.autocast("cpu", enabled=False):
                x = dec.embed(tokens[:, None])  # (b, 1, E)
                cos, sin = dec.rotary(x, position)
                cos, sin = cos[:, :, None].float(), sin[:, :, None].float()
                additive = torch.zeros(batch, 1, n + 1).masked_fill_(mask[:, None, :n + 1] == 0, float("-inf"))
                for i, (n1, n2, eps, qkv, o, gu, down, scale, inter) in enumerate(weights):
                    x = layer_fn(x, cos, sin, additive, dec.keys[i], dec.values[i], n, n1, n2, eps, qkv, o, gu, down,
                                 dec.heads, dec.kv_heads, dec.head_dim, inter, scale)
                logits = dec.unembed(dec._rms_norm(x[:, -1], dec.norm)).float()
                dec.length = n + 1
        tokens = logits.argmax(-1)
        times.append(time.perf_counter() - t0)
        out.append(tokens)
        position, n = position + 1, n + 1
    return times, torch.stack(out, 1).tolist()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", default="1,8,32,64")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(HERE / "results" / "sampler_compile.json"))
    args = ap.parse_args(argv)
    from labkit import generation
    from labkit.data import load_prompts
    from labkit.models import load_model

    if not generation._packed_linear_works(torch.bfloat16):
        raise SystemExit("this CPU has no pre-packed bf16 linear: the lean decoder's bf16 path is not the one measured here")
    torch.set_num_threads(args.threads)
    loads = [os.getloadavg()]
    model, tok = load_model(args.model, dtype="float32", device="cpu")
    model.eval()
    prompts = [r["prompt"] for r in load_prompts("eval")]
    weights = packed_weights(model)
    compiled = torch.compile(decode_layer, dynamic=True)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    methods = {"labkit": None, "eager": decode_layer, "compiled": compiled}
    with torch.no_grad():
        t0 = time.perf_counter()
        run(model, tok, prompts, 2, 2, "compiled", compiled, weights)  # compiles once for every shape
        compile_s = time.perf_counter() - t0
        steps = {(b, m): [] for b in sizes for m in methods}
        tokens = {}
        for _ in range(args.repeats):
            for b in sizes:
                for m, fn in methods.items():
                    times, toks = run(model, tok, prompts, b, args.steps, m, fn, weights)
                    steps[b, m] += times[1:]  # the first step warms the cache's new columns
                    tokens[b, m] = toks
    loads.append(os.getloadavg())
    rows = []
    print(f"compile (first call, every shape after it reuses it): {compile_s:.1f} s")
    print("| batch | labkit ms/step | eager function | compiled | compiled vs eager | tokens equal to labkit's (eager / compiled) |")
    print("|---|---|---|---|---|---|")
    for b in sizes:
        ms = {m: 1000 * statistics.median(steps[b, m]) for m in methods}
        same = {m: sum(x == y for x, y in zip(tokens[b, m], tokens[b, "labkit"])) for m in ("eager", "compiled")}
        rows.append(dict(batch_size=b, ms_per_step=ms, speedup_compiled_vs_eager=ms["eager"] / ms["compiled"],
                         rows_same_tokens_as_labkit=same, steps_timed=len(steps[b, "labkit"])))
        print(f"| {b} | {ms['labkit']:.1f} | {ms['eager']:.1f} | {ms['compiled']:.1f} | "
              f"{ms['eager'] / ms['compiled']:.2f}x | {same['eager']} / {same['compiled']} of {b} |")
    result = {"benchmark": "sampler_compile", "machine": machine(loads, args.threads),
              "settings": {"model": args.model, "steps": args.steps, "repeats": args.repeats,
                           "products": "pre-packed bf16 (oneDNN), fp32 attention and cache",
                           "compile": "torch.compile(decode_layer, dynamic=True), inductor"},
              "compile_s": compile_s, "rows": rows}
    return write(result, args.out)


if __name__ == "__main__":
    main()

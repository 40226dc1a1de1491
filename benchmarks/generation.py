"""Sampling speed: labkit's sampler vs transformers' ``generate`` (and llama.cpp) (BRIEF §4).

The same left-padded, length-sorted batches of chat-formatted prompts (the embedded ``eval``
split, repeated to fill a batch) go through

- ``labkit``: ``labkit.generation.sample_tokens(..., return_logprobs=False)``, the loop
  ``generate`` and ``sample_k`` run, with its own forward for Llama-architecture models (the
  bundled one); its bf16 weight copies are made once, as one ``generate`` call makes them for
  all its batches (the time to make them is recorded as ``bf16_weight_copy_s``);
- ``labkit_mf``: the same loop through ``model.forward`` (labkit's sampler before it had its
  own forward, and the path for other architectures);
- ``labkit_unpacked``: labkit's forward with its fp32 products through the modules' own weights
  (``generation.FP32_PACKED = False``: the sampler before its fp32 weights were fused and packed);
  it differs from ``labkit`` in the fp32 rows only, on CPUs without fast bf16 the rows that matter;
- ``hf``: ``model.generate`` (transformers' loop, DynamicCache, its logits processors), as
  labkit called it before it had its own loop;
- ``llamacpp`` (batch 1, greedy): llama-cpp-python on the bundled GGUF file itself, a CPU
  inference engine, in its own virtualenv (``benchmarks/.venv-llamacpp``; ``--install-llamacpp``
  creates it with ``pip install llama-cpp-python``, a source build of several minutes). It
  runs the Q4_1 weights of the file (4-bit, llama.cpp's own kernels), so its row is a peer for
  speed, not the same arithmetic.

at batch 1, 8, 32, 64, greedy and sampled (temperature 0.7, top-p 0.9), under bf16 autocast
(fp32 master weights, as PPO holds them) and in plain fp32. EOS is ignored, so every row
produces exactly ``--new-tokens`` tokens: tokens/s = batch x new tokens / wall time of the
whole call (prompt pass included). The methods take turns for every setting (labkit, hf,
labkit, hf, ... for ``--repeats``), so a slow spell of a shared machine falls on both; the
median is reported.

Compute bound: decoding a token costs about 2 x parameters FLOPs (Kaplan et al. 2020), so
``bound = matmul peak / (2 x params)`` tokens/s, with the peak measured here (a loop of
2048 x 2048 matmuls, 2 threads unless ``--threads``) in bf16 for the bf16 rows and fp32 for
the fp32 rows. ``share`` = tokens/s / bound counts new tokens only, as a sampler's user sees
it; ``mfu`` also counts the prompt tokens the call processed.

    python benchmarks/generation.py                        # bundled SmolLM2-135M, a few minutes
    python benchmarks/generation.py --batch-sizes 1,32 --modes greedy --dtypes bf16   # quicker
    python benchmarks/generation.py --install-llamacpp     # also build the llama.cpp peer first

The machine may be shared with other jobs: the load average is recorded with every row.
Writes ``benchmarks/results/generation.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "generation.json"
LLAMACPP_VENV = HERE / ".venv-llamacpp"

LLAMACPP_DRIVER = r'''
import json, sys, time
from llama_cpp import Llama
spec = json.loads(sys.argv[1])
llm = Llama(model_path=spec["gguf"], n_threads=spec["threads"], n_ctx=1024, n_batch=512, verbose=False)
out = []
for rep in range(spec["repeats"] + 1):  # the first is a warm-up
    times = []
    for text in spec["prompts"]:
        llm.reset()
        tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
        t0, n = time.perf_counter(), 0
        for _ in llm.generate(tokens, temp=0.0, top_k=1, reset=True):  # greedy; EOS ignored
            n += 1
            if n == spec["new_tokens"]:
                break
        times.append(time.perf_counter() - t0)
    if rep:
        out.append(len(times) * spec["new_tokens"] / sum(times))
import llama_cpp
print(json.dumps({"tokens_per_s": out, "version": llama_cpp.__version__}))
'''


def matmul_peak(dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of a loop of (n x n) @ (n x n) matmuls: 2 n^3 FLOPs each."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        torch.matmul(a, b)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.matmul(a, b)
        calls += 1
    return 2 * n ** 3 * calls / (time.perf_counter() - t0)


def prompt_batch(tok, prompts: list[str], batch_size: int):
    """The first ``batch_size`` prompts (cycled), sorted by length and left-padded, as ``generate`` batches."""
    from labkit.generation import _left_pad, encode_prompts

    ids, _ = encode_prompts(tok, [prompts[i % len(prompts)] for i in range(batch_size)])
    return _left_pad(sorted(ids, key=len), tok.pad_token_id)  # (B, T) each


WEIGHT_COPIES: dict = {}  # labkit's bf16 weight copies, made once (as one generate call makes them for its batches)


def run_labkit(model, input_ids, mask, new_tokens: int, sampled: bool, bf16: bool, lean: bool = True) -> float:
    from labkit import generation

    with generation.lean_forward(lean):
        t0, c0 = time.perf_counter(), time.process_time()
        responses, _, _ = generation.sample_tokens(model, input_ids, mask, new_tokens, temperature=0.7, top_p=0.9,
                                                   do_sample=sampled, eos_token_id=None, pad_token_id=0, bf16=bf16,
                                                   return_logprobs=False, cache=WEIGHT_COPIES)
    assert responses.shape[1] == new_tokens
    return time.perf_counter() - t0, time.process_time() - c0


def run_labkit_model_forward(model, input_ids, mask, new_tokens: int, sampled: bool, bf16: bool) -> float:
    """labkit's loop through ``model.forward`` (its sampler before it had its own forward)."""
    return run_labkit(model, input_ids, mask, new_tokens, sampled, bf16, lean=False)


def run_labkit_unpacked(model, input_ids, mask, new_tokens: int, sampled: bool, bf16: bool) -> float:
    """labkit's forward with fp32 products through the modules' own weights, unfused and unpacked
    (``generation.FP32_PACKED = False``, the sampler before fp32 weights were packed); bf16 rows are unchanged."""
    from labkit import generation

    before, generation.FP32_PACKED = generation.FP32_PACKED, False
    try:
        return run_labkit(model, input_ids, mask, new_tokens, sampled, bf16)
    finally:
        generation.FP32_PACKED = before


def run_hf(model, input_ids, mask, new_tokens: int, sampled: bool, bf16: bool) -> float:
    import torch

    from labkit.models import autocast

    kwargs = dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=0) if sampled else dict(do_sample=False)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad(), autocast(model.device, enabled=bf16):
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0, **kwargs)
    assert out.shape[1] == input_ids.shape[1] + new_tokens
    return time.perf_counter() - t0, time.process_time() - c0


def run_llamacpp(python: str, gguf: str, prompts: list[str], new_tokens: int, threads: int, repeats: int) -> dict:
    spec = {"gguf": gguf, "prompts": prompts, "new_tokens": new_tokens, "threads": threads, "repeats": repeats}
    proc = subprocess.run([python, "-c", LLAMACPP_DRIVER, json.dumps(spec)], capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensure_llamacpp(install: bool) -> tuple[str | None, str | None]:
    """The llama.cpp virtualenv's python, (None, why not) where it is missing or broken."""
    py = LLAMACPP_VENV / "bin" / "python"
    if install and not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LLAMACPP_VENV)], check=True)
    if install:
        proc = subprocess.run([str(py), "-m", "pip", "install", "-q", "llama-cpp-python"], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            return None, f"pip install llama-cpp-python failed: {(proc.stderr or proc.stdout)[-1500:]}"
    if not py.exists():
        return None, f"no {LLAMACPP_VENV}: run with --install-llamacpp"
    probe = subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True, text=True)
    if probe.returncode != 0:
        return None, f"llama_cpp does not import in {LLAMACPP_VENV}: {probe.stderr[-500:]}"
    return str(py), None


def table(rows: list[dict]) -> str:
    head = (f"{'batch':>5} {'mode':<8}{'dtype':<6}{'method':<16}{'tokens/s':>10}{'tok/cpu-s':>10}{'share':>8}"
            f"{'mfu':>8}{'vs hf':>7}{'cpu vs hf':>10}{'load':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['batch_size']:>5} {r['mode']:<8}{r['dtype']:<6}{r['method']:<16} error: "
                         f"{r['error'].splitlines()[-1][:70]}")
            continue
        vs = f"{r['speedup_vs_hf']:.2f}x" if r.get("speedup_vs_hf") else ""
        cvs = f"{r['cpu_speedup_vs_hf']:.2f}x" if r.get("cpu_speedup_vs_hf") else ""
        lines.append(f"{r['batch_size']:>5} {r['mode']:<8}{r['dtype']:<6}{r['method']:<16}{r['tokens_per_s']:>10.1f}"
                     f"{r.get('tokens_per_cpu_s', float('nan')):>10.1f}{100 * r['share_of_bound']:>7.1f}%"
                     f"{100 * r['mfu']:>7.1f}%{vs:>7}{cvs:>10}{r['loadavg'][0]:>6.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default) or tiny")
    ap.add_argument("--batch-sizes", default="1,8,32,64")
    ap.add_argument("--modes", default="greedy,sampled")
    ap.add_argument("--dtypes", default="bf16,fp32", help="bf16 = bf16 autocast over fp32 weights")
    ap.add_argument("--methods", default="labkit,labkit_mf,hf,llamacpp",
                    help="labkit: its sampler; labkit_mf: the same loop through model.forward; labkit_unpacked: "
                         "its sampler with fp32 products through the modules' own weights; hf: model.generate")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per method and setting, taken in turn")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--install-llamacpp", action="store_true", help="pip install llama-cpp-python into its venv")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--append", action="store_true", help="keep the rows in --out that this run does not measure")
    args = ap.parse_args(argv)

    import torch

    from labkit.data import load_prompts
    from labkit.models import GGUF_FILE, _gguf_dir, count_parameters, cpu_has_fast_bf16, cpu_name, load_model

    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": args.threads, "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "os": platform.platform(),
            "python": platform.python_version(), "fast_bf16": cpu_has_fast_bf16(), "loadavg_start": os.getloadavg(),
            "note": "shared machine: other jobs may run at the same time; see the load average of every row"}
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, load {info['loadavg_start']}")
    # Only the dtypes asked for: without AVX-512-BF16 or AMX a bf16 matmul of this size takes minutes.
    peaks = {d: matmul_peak({"bf16": torch.bfloat16, "fp32": torch.float32}[d]) for d in args.dtypes.split(",")}
    print("matmul peak: " + ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items()))
    model, tok = load_model(args.model, dtype="float32", device="cpu")
    params = count_parameters(model)
    prompts = [r["prompt"] for r in load_prompts("eval")]
    runners = {"labkit": run_labkit, "labkit_mf": run_labkit_model_forward, "labkit_unpacked": run_labkit_unpacked,
               "hf": run_hf}  # hf last: the others' speed-ups are taken against it

    t0 = time.perf_counter()  # warm-up; the labkit bf16 call also makes the one-off bf16 copy of the weights
    run_labkit(model, *prompt_batch(tok, prompts, 2), 2, False, True)
    bf16_cast_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_labkit_model_forward(model, *prompt_batch(tok, prompts, 2), 2, False, True)
    bf16_cast_s = {"labkit": bf16_cast_s, "labkit_mf": time.perf_counter() - t0}
    for name, run in runners.items():
        if name in methods:
            for bf16 in (True, False):
                run(model, *prompt_batch(tok, prompts, 2), 2, True, bf16)

    rows = []
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        input_ids, mask = prompt_batch(tok, prompts, B)
        processed = int(mask.sum()) + B * args.new_tokens  # prompt + new tokens through the model
        for mode in args.modes.split(","):
            for dtype in args.dtypes.split(","):
                times: dict[str, list[float]] = {m: [] for m in runners if m in methods}
                loads = []
                for _ in range(args.repeats):
                    for m in times:
                        times[m].append(runners[m](model, input_ids, mask, args.new_tokens, mode == "sampled",
                                                   dtype == "bf16"))
                        loads.append(os.getloadavg())
                bound = peaks[dtype] / (2 * params)
                for m, ts in times.items():
                    wall = statistics.median(t[0] for t in ts)
                    cpu = statistics.median(t[1] for t in ts)
                    tps = B * args.new_tokens / wall
                    rows.append({"batch_size": B, "mode": mode, "dtype": dtype, "method": m,
                                 "wall_s": [t[0] for t in ts], "cpu_s": [t[1] for t in ts], "tokens_per_s": tps,
                                 "tokens_per_cpu_s": B * args.new_tokens / cpu, "bound_tokens_per_s": bound,
                                 "share_of_bound": tps / bound,
                                 "mfu": 2 * params * processed / wall / peaks[dtype],
                                 "prompt_tokens": int(mask.sum()), "padded_prompt_length": mask.shape[1],
                                 "loadavg": max(loads)})
                if "hf" in times:
                    hf = rows[-1]
                    for r in rows[-len(times):-1]:
                        r["speedup_vs_hf"] = r["tokens_per_s"] / hf["tokens_per_s"]
                        r["cpu_speedup_vs_hf"] = r["tokens_per_cpu_s"] / hf["tokens_per_cpu_s"]
                print(table(rows[-len(times):]).split("\n", 2)[-1], flush=True)
                write(args, info, peaks, params, bf16_cast_s, rows, None)  # kept if the run is cut short

    llamacpp = None
    if "llamacpp" in methods and args.model == "smollm2-135m":
        python, error = ensure_llamacpp(args.install_llamacpp)
        texts = [tok.decode(ids) for ids in prompt_batch(tok, prompts, 4)[0].tolist()]
        texts = [t.replace(tok.pad_token, "") for t in texts]
        if python:
            load = os.getloadavg()
            res = run_llamacpp(python, str(_gguf_dir() / GGUF_FILE), texts, args.new_tokens, args.threads,
                               args.repeats)
            error = res.get("error")
        llamacpp = {"error": error} if error else res
        if error:
            rows.append({"batch_size": 1, "mode": "greedy", "dtype": "q4_1", "method": "llamacpp", "error": error})
        else:
            tps = statistics.median(res["tokens_per_s"])
            bound = max(peaks.values()) / (2 * params)  # the faster dtype's peak measured here (bf16 where it is fast)
            rows.append({"batch_size": 1, "mode": "greedy", "dtype": "q4_1", "method": "llamacpp",
                         "tokens_per_s": tps, "bound_tokens_per_s": bound, "share_of_bound": tps / bound,
                         "mfu": float("nan"), "loadavg": max(load, os.getloadavg()), "version": res["version"],
                         "runs_tokens_per_s": res["tokens_per_s"]})
        print(table(rows[-1:]).split("\n", 2)[-1])

    print()
    print(table(rows))
    write(args, info, peaks, params, bf16_cast_s, rows, llamacpp)
    print("share = new tokens/s / (matmul peak of the row's dtype / (2 x params)); mfu counts prompt tokens too;"
          " llamacpp's share is taken against the highest peak measured")
    print(f"wrote {args.out}")
    return json.loads(Path(args.out).read_text())


def write(args, info: dict, peaks: dict, params: int, bf16_cast_s: float, rows: list[dict], llamacpp) -> None:
    """The JSON result (rewritten after every setting)."""
    out = Path(args.out)
    if args.append and out.exists():  # rows of earlier invocations keep their own load averages
        earlier = json.loads(out.read_text())
        done = {(r["batch_size"], r["mode"], r["dtype"], r["method"]) for r in rows}
        rows = [dict(r, invocation=earlier["machine"]["loadavg_start"]) for r in earlier["runs"]
                if (r["batch_size"], r["mode"], r["dtype"], r["method"]) not in done] + rows
        llamacpp = llamacpp if llamacpp is not None else earlier.get("llamacpp")
    result = {"benchmark": "generation", "machine": {**info, "loadavg_end": os.getloadavg()},
              "matmul_peak_flops": peaks, "model": args.model, "params": params,
              "settings": {"new_tokens": args.new_tokens, "repeats": args.repeats, "threads": args.threads,
                           "temperature": 0.7, "top_p": 0.9, "eos": "ignored (every row makes new_tokens)",
                           "prompts": "embedded eval split, chat-formatted, sorted by length, left-padded"},
              "bf16_weight_copy_s": bf16_cast_s,
              "formulas": {"tokens_per_s": "batch x new tokens / median wall time of the call (prompt pass included)",
                           "tokens_per_cpu_s": "batch x new tokens / median process CPU time of the call; with one "
                                               "torch thread, a measure less bent by other jobs on the machine",
                           "bound_tokens_per_s": "measured matmul peak (the row's dtype) / (2 x params)",
                           "share_of_bound": "tokens_per_s / bound_tokens_per_s",
                           "mfu": "2 x params x (prompt + new tokens) / wall / matmul peak"},
              "runs": rows, "llamacpp": llamacpp}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

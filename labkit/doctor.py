"""``labkit doctor``: can this machine run the notebooks, and how long will each one take?

It reports, in order: versions (from :func:`labkit.cli.info`), device and dtype, the cores
torch uses, RAM (total, available, and what each notebook needs), whether notebook widgets
can render, and a timing of about 20 seconds of one generation batch and one training step
(forward, backward, optimizer step) on the chosen model. The two step times, divided by the
same steps timed on the development machine, scale that machine's measured notebook wall
times (``notebooks/README.md``) into estimates for this one.

>>> labkit doctor                      # the bundled model, as the notebooks use it
>>> labkit doctor --model tiny         # seconds; a smoke check of the set-up
>>> from labkit.doctor import set_threads; set_threads()   # first cell of a notebook
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from labkit import models

# Wall time of each notebook in minutes, run in order with its default parameters on the
# bundled model, annotation_mode="auto", on the development machine (2-core CPU with
# AVX-512-BF16, no GPU, nothing else running), by `make notebooks` (scripts/run_notebooks.py):
# notebooks/README.md, "Time and memory". 01, 05 and 06 come from a later series run with
# lean_memory() (01, 02, 05, 06 in order on a fresh run folder; 06 again, alone, on that SFT
# model, once its PPO used share_backbone=True).
REFERENCE_MINUTES = {
    "01_demonstrations_sft": 2.9,
    "02_rankings_reward_model": 1.6,
    "03_ppo": 15.9,  # with lean_memory(); 13.5 without
    "04_evaluation": 5.8,
    "05_beyond_ppo": 12.8,
    "06_room": 3.6,  # share_backbone=True since; 3.7 before
}

# The share of each notebook's time spent sampling (the rest trains), a rough estimate from
# what each notebook does: 01 answers eval prompts before and after one SFT epoch; 02 samples
# K = 4 answers for 64 prompts, then trains the RM; a PPO step is about half rollout
# (benchmarks/results/ppo_throughput.json: step 10.4 s, update 5.8 s); 04 only answers and
# scores; 05 trains PPO, RLOO, GRPO and, for half its time, DPO; 06 samples the room's items,
# trains two RMs and a short PPO, and answers eval prompts twice.
GENERATION_SHARE = {
    "01_demonstrations_sft": 0.4,
    "02_rankings_reward_model": 0.6,
    "03_ppo": 0.5,
    "04_evaluation": 0.9,
    "05_beyond_ppo": 0.3,
    "06_room": 0.5,
}

# time_steps() on the bundled model on the development machine (bf16 autocast, 2 threads,
# load 0.7), taken right before the notebook times above: `labkit doctor`'s "timing" line.
REFERENCE_GENERATE_S = 2.84
REFERENCE_TRAIN_STEP_S = 1.78

# Peak memory (GiB) of each notebook's kernel (its peak resident set) with its default
# parameters on the bundled model, measured with the times above and rounded up (03: 6.0 GiB
# with lean_memory(), 8.4 without; 01 6.4, 05 6.4 and 06 5.6 with it, 06 also with
# share_backbone=True: 8.2 GiB with a separate value model). The kernel keeps what earlier
# cells loaded, and freed memory is not always returned to the system, so a notebook's peak is
# well above its largest single step (PPO with share_backbone=True: 4.8 GiB in the PPO benchmark).
NOTEBOOK_RAM_GIB = {
    "00_tour": 1.5,
    "01_demonstrations_sft": 8.0,  # 7.0-7.5 GiB since SFT runs in steady_memory (6.3 with it off, same machine)
    "02_rankings_reward_model": 6.0,
    "03_ppo": 6.5,
    "04_evaluation": 4.5,
    "05_beyond_ppo": 6.5,
    "06_room": 6.0,
}

GENERATE_SHAPE = (8, 32)  # (prompts, new tokens) of the timed generation batch
TRAIN_SHAPE = (4, 128)  # (sequences, tokens) of the timed training step


# ----------------------------------------------------------------------------- threads and cores

def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads do not speed up matmuls)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil

        return max(1, min(usable, psutil.cpu_count(logical=False) or usable))
    except ImportError:
        return usable


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters
GLIBC_TRIM_DEFAULT = 128 * 1024  # glibc's trim threshold while its mmap threshold is fixed
GLIBC_MMAP_MAX = 65536  # glibc's default count of blocks it may serve as their own mappings
GLIBC_MMAP_TOP = 32 << 20  # where glibc's moving mmap threshold stops (64-bit): blocks above it are always mapped
_lean_threshold: int | None = None  # what lean_memory fixed, if it did
_steady_depth = 0
STEADY_MEMORY = os.environ.get("LABKIT_STEADY_MEMORY", "1") != "0"  # steady_memory acts (glibc only)


@functools.cache
def _glibc():
    """glibc, loaded once (steady_memory runs at every chat token); None where there is none."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _mallopt(param: int, value: int) -> bool:
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(param, int(value)))


def lean_memory(threshold_bytes: int = 1 << 20) -> bool:
    """Hand the memory of one training run back to the system before the next (glibc only).

    glibc raises its mmap threshold each time a large block is freed, so later tensors come
    from the heap, and freed heap memory mostly stays with the process: a notebook that trains
    several models one after another keeps growing. A fixed threshold keeps every tensor of
    ``threshold_bytes`` or more in its own mapping, returned to the system when freed. Over
    notebook 03's six PPO runs (2 steps each, one process) the process held 2.1 GiB instead of
    4.0 GiB between runs and peaked at 5.0 GiB instead of 5.7 GiB; the whole notebook 03 peaked
    at 6.0 GiB instead of 8.4 GiB and took 15.9 instead of 13.5 minutes. Sampling and the SFT
    and reward-model training loops suspend it while they run (:func:`steady_memory`), each
    handing its free memory back when it ends. Returns whether it applied (False off Linux or
    without glibc).
    """
    global _lean_threshold
    if not sys.platform.startswith("linux") or not _mallopt(M_MMAP_THRESHOLD, threshold_bytes):
        return False
    _lean_threshold = int(threshold_bytes)
    return True


@contextmanager
def steady_memory():
    """Within: every block comes from glibc's heap and freed memory is kept for reuse; after: free
    memory handed back to the system. Wraps labkit's sampling and its SFT and reward-model
    training loops. Does nothing without glibc, nor with ``LABKIT_STEADY_MEMORY=0``.

    A training or decoding step allocates and frees the same large blocks at every step: the
    logits of an SFT batch (8 x 256 tokens x 49k columns) are 400 MB in fp32, a decoding step's
    at batch 64 12.6 MB. glibc serves a block above its mmap threshold as a fresh mapping, which
    the kernel faults in and zeroes page by page and unmaps when it is freed; its threshold moves
    up to 32 MB at most, so the largest blocks pay this at every step in any process, and under
    :func:`lean_memory` every block of 1 MB or more does. Within, glibc maps nothing (its heap
    serves every block and keeps what is freed); on leaving, its settings return (lean_memory's
    fixed threshold where it applied, else the threshold at glibc's own top, 32 MB) and
    ``malloc_trim`` hands free memory back. After lean_memory, SFT ran in 0.66-0.71x its time
    and the reward model in 0.56-0.59x; with glibc's defaults SFT in 0.85-0.91x, the reward model
    unchanged (``benchmarks/training_allocator.py``, AMD EPYC, 2 threads). Their peaks rise by
    0.5-0.9 GiB after lean_memory (to glibc's default level), and each run leaves 1.1 GiB
    resident instead of 1.7 (lean) or 3.4-5.7 (defaults). Sampling at batch 64 after lean_memory:
    1.07-1.26x the tokens/s (``benchmarks/sampler_allocator.py``). PPO's update steps are left
    outside: wrapping them gained nothing and raised its peak by 0.9 GiB after lean_memory.
    Nested uses act once, at the outermost.
    """
    global _steady_depth
    active = STEADY_MEMORY and _steady_depth == 0 and _glibc() is not None
    _steady_depth += 1
    try:
        if active:
            _mallopt(M_MMAP_MAX, 0)
            _mallopt(M_TRIM_THRESHOLD, 1 << 30)
        yield
    finally:
        _steady_depth -= 1
        if active:
            _mallopt(M_MMAP_MAX, GLIBC_MMAP_MAX)
            lean = _lean_threshold is not None
            _mallopt(M_TRIM_THRESHOLD, GLIBC_TRIM_DEFAULT if lean else 2 * GLIBC_MMAP_TOP)
            _mallopt(M_MMAP_THRESHOLD, _lean_threshold if lean else GLIBC_MMAP_TOP)
            hand_back_memory()


def hand_back_memory() -> bool:
    """Give the memory glibc holds free back to the system now (``malloc_trim``); False without glibc.

    For the end of a run that sampled within :func:`steady_memory` but trained outside it (PPO):
    what its sampling left in glibc's heap is freed with the run, and would otherwise stay with
    the process.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def set_threads(threads: int | None = None) -> int:
    """Use ``threads`` CPU threads in torch (default: the physical cores); return the number.

    Notebooks call it with their ``threads`` parameter, so a room of laptops, or a laptop
    shared with a video call, can leave cores free.
    """
    n = int(threads) if threads else physical_cores()
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(n)
    return n


def thread_speedup(seconds: float = 0.6) -> float:
    """Matmul throughput with torch's current threads over one thread (1.0 with one thread).

    Below 1 means the threads fight other programs for the cores: a thread that loses its core
    stalls the others at every barrier, so a busy laptop can run many times slower with 2
    threads than with 1.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        return 1.0
    a, b = torch.randn(256, 576), torch.randn(576, 1536)  # a layer of the bundled model

    def rate(n: int) -> float:
        torch.set_num_threads(n)
        a @ b
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 2:
            a @ b
            count += 1
        return count / (time.perf_counter() - start)

    try:
        return rate(threads) / rate(1)
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- memory

def memory_gib() -> tuple[float | None, float | None]:
    """(total, available) RAM in GiB; None where it cannot be read."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return vm.total / 2**30, vm.available / 2**30
    except ImportError:
        pass
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        kib = {k: int(v.split()[0]) for k, v in info.items() if k in ("MemTotal", "MemAvailable")}
        return kib["MemTotal"] / 2**20, kib.get("MemAvailable", 0) / 2**20 or None
    except (OSError, KeyError, ValueError):
        return None, None


def ram_table(available_gib: float | None) -> list[dict]:
    """Each notebook's estimated need against the RAM available now."""
    rows = []
    for name, need in NOTEBOOK_RAM_GIB.items():
        if available_gib is None:
            verdict = "unknown"
        else:
            verdict = "ok" if available_gib >= 1.25 * need else "tight" if available_gib >= need else "too little"
        rows.append({"notebook": name, "needs_gib": need, "verdict": verdict})
    return rows


# ----------------------------------------------------------------------------- widgets and devices

def widgets_status() -> dict:
    """Can notebook widgets render: packages importable, JupyterLab extensions installed."""
    import importlib.metadata as md
    import importlib.util

    out = {}
    for pkg in ("ipywidgets", "anywidget", "jupyterlab"):
        try:
            out[pkg] = md.version(pkg) if importlib.util.find_spec(pkg) else None
        except md.PackageNotFoundError:
            out[pkg] = None
    try:
        from jupyter_core.paths import jupyter_path

        dirs = [Path(d) for d in jupyter_path("labextensions")]
    except ImportError:
        dirs = [Path(sys.prefix) / "share" / "jupyter" / "labextensions"]
    wanted = {"ipywidgets": "@jupyter-widgets/jupyterlab-manager", "anywidget": "anywidget"}
    out["lab_extensions"] = {pkg: any((d / ext / "package.json").exists() for d in dirs)
                             for pkg, ext in wanted.items()}
    out["in_colab"] = "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ
    return out


def _mps_smoke_test() -> None:
    x = torch.randn(64, 64, device="mps", requires_grad=True)
    (x @ x).sum().backward()
    torch.mps.synchronize()


def mps_check() -> tuple[bool, str | None]:
    """(usable, line) for Apple's GPU backend (mps): usable when torch reports it available and
    a small matmul + backward runs on it. ``labkit.models.resolve_device("auto")`` asks this;
    the line is None where mps is absent off macOS."""
    if not torch.backends.mps.is_available():
        if sys.platform != "darwin":
            return False, None
        return False, "mps: not available (needs Apple silicon and macOS 12.3+); labkit runs on the CPU"
    try:
        _mps_smoke_test()
    except Exception as e:  # an op missing from this torch/macOS pair; the CPU always works
        return False, f"mps: available but failed a matmul test ({e.__class__.__name__}); labkit runs on the CPU"
    return True, "mps: works and labkit uses it"


def mps_status() -> str | None:
    """A line on Apple's GPU backend (mps), or None off macOS."""
    return mps_check()[1]


# ----------------------------------------------------------------------------- timing

def _median_time(fn, seconds: float, max_repeats: int = 10) -> float:
    """One warm-up call, then repeats of ``fn`` for about ``seconds``: the median. A warm-up
    that alone takes longer than ``seconds`` is the answer (a busy machine stays bounded)."""
    t0 = time.perf_counter()
    fn()
    if time.perf_counter() - t0 > seconds:
        return time.perf_counter() - t0
    times: list[float] = []
    start = time.perf_counter()
    while not times or (time.perf_counter() - start < seconds and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_steps(model, tokenizer, seconds: float = 20.0) -> dict:
    """Seconds of one generation batch and of one training step (forward, backward, AdamW),
    each a median over about ``seconds / 2``; the model's weights change (a throwaway copy)."""
    from labkit.generation import encode_prompts

    device = next(model.parameters()).device
    n_prompts, n_new = GENERATE_SHAPE
    ids, _ = encode_prompts(tokenizer, ["Give three tips for a good night's sleep."] * n_prompts)
    prompt_ids = torch.tensor(ids, device=device)  # (B, T): equal prompts, no padding

    @torch.no_grad()
    def generate_batch():
        model.eval()
        with models.autocast(device):
            # min_new_tokens = max_new_tokens: every machine decodes the same number of tokens
            model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                           max_new_tokens=n_new, min_new_tokens=n_new, do_sample=True, top_k=0,
                           top_p=0.9, pad_token_id=tokenizer.pad_token_id)

    batch, length = TRAIN_SHAPE
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.config.vocab_size, (batch, length), generator=gen).to(device)  # (B, T)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def train_step():
        model.train()
        with models.autocast(device):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"generate_s": _median_time(generate_batch, seconds / 2),
            "train_step_s": _median_time(train_step, seconds / 2)}


# Where the notebooks' time goes, by the knobs of their `parameters` cells (what a slow laptop lowers first).
SLOW_KNOBS = "03_ppo: ppo_steps, beta_steps, hack_steps; 05_beyond_ppo: steps, dpo_steps; 06_room: ppo_steps"
SLOW_FACTOR = 2.0  # estimates this many times the development machine's call for the advice below


def slow_machine_advice(estimates: dict[str, float]) -> str | None:
    """What to do when the notebooks would take ``SLOW_FACTOR`` times the development machine's
    time or more here (a CPU without fast bf16, a busy or thermally limited laptop); None otherwise."""
    factor = max(estimates[name] / REFERENCE_MINUTES[name] for name in estimates)
    if factor < SLOW_FACTOR:
        return None
    total = sum(estimates.values())
    return (f"this machine runs the notebooks about {factor:.1f}x slower than the development machine "
            f"({_fmt_minutes(total)} minutes for all of them): lower the steps in their parameters cells "
            f"({SLOW_KNOBS}), or set out_dir to a run folder made with `labkit run` on a faster machine "
            "(the notebooks then read its SFT model and RM, and 04 its PPO policy, instead of building them)")


def estimate_minutes(generate_s: float, train_step_s: float) -> dict[str, float]:
    """Each notebook's reference wall time scaled by this machine's step times."""
    g_ratio, t_ratio = generate_s / REFERENCE_GENERATE_S, train_step_s / REFERENCE_TRAIN_STEP_S
    return {name: minutes * (GENERATION_SHARE[name] * g_ratio + (1 - GENERATION_SHARE[name]) * t_ratio)
            for name, minutes in REFERENCE_MINUTES.items()}


# ----------------------------------------------------------------------------- one cell's time

# Seconds per unit of work in the notebooks' long cells: the bundled model, 2 threads, the
# development machine (rough figures, not a benchmark), and the share of each spent sampling.
# "answer": one sampled answer of up to ~48 tokens in a batch of 8 (REFERENCE_GENERATE_S);
# "ppo_episode": 03_ppo's measured 13.5 min (without lean_memory) over its 512 episodes (the
#   reward-hacking ones up to 64 tokens) and 96 best-of-n answers;
# "sft_step": one SFT step of 8 demonstrations (labkit/sft.py's measured 5.0 s);
# "rm_prompt": one prompt's K = 4 answers through an RM training step (about REFERENCE_TRAIN_STEP_S);
# "dpo_step": one DPO step of 8 pairs (05_beyond_ppo: its 24 DPO steps took 388 s of 12.8 min).
UNIT_SECONDS = {"answer": (0.5, 1.0), "ppo_episode": (1.5, 0.5), "sft_step": (5.0, 0.0), "rm_prompt": (2.25, 0.0),
                "dpo_step": (16.2, 0.0)}


def timing_path() -> Path:
    """Where ``labkit doctor`` keeps its last timing of the bundled model."""
    return models.cache_dir() / "doctor_timing.json"


def estimate(what: str, n: float = 1, model: str = models.BUNDLED) -> float:
    """Print one line with the expected time of ``n`` units of ``what`` (see UNIT_SECONDS) and
    return it in seconds: scaled by ``labkit doctor``'s last timing where it ran, else the
    development machine's figure. Cheap: it reads a file, it times nothing."""
    if what not in UNIT_SECONDS:
        raise ValueError(f"unknown unit {what!r}; one of {sorted(UNIT_SECONDS)}")
    seconds, share = UNIT_SECONDS[what]
    label = f"{n:g} x {what.replace('_', ' ')}"
    if model == models.TINY:
        print(f"expected time: seconds ({label}, tiny model)")
        return 0.0
    source = "the development machine's figure; `labkit doctor` times this one"
    try:
        t = json.loads(timing_path().read_text())
        scale = share * t["generate_s"] / REFERENCE_GENERATE_S + (1 - share) * t["train_step_s"] / REFERENCE_TRAIN_STEP_S
        source = f"scaled by `labkit doctor`'s timing with {t['threads']} threads"
    except (OSError, ValueError, KeyError, TypeError):
        scale = 1.0
    total = n * seconds * scale
    note = "" if model == models.BUNDLED else f"; measured on the bundled model, {model} may differ"
    print(f"expected time: about {_fmt_minutes(total / 60)} min ({label}; {source}{note})")
    return total


# ----------------------------------------------------------------------------- the report

def doctor(model: str = models.BUNDLED, threads: int | None = None, seconds: float = 20.0) -> dict:
    """Everything ``labkit doctor`` prints, as a dict."""
    from labkit.cli import info

    if threads:
        set_threads(threads)
    out = {"info": info()}
    total, available = memory_gib()
    out["memory"] = {"total_gib": total, "available_gib": available, "notebooks": ram_table(available)}
    out["cores"] = {"torch_threads": torch.get_num_threads(), "physical": physical_cores(),
                    "logical": os.cpu_count(), "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                    "speedup": thread_speedup()}
    out["cpu"] = models.cpu_name()
    out["widgets"] = widgets_status()
    out["mps"] = mps_status()
    out["model"] = model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar inside the report
    try:
        m, tok = models.load_model(model, dtype="float32")  # fp32 master weights, as the stages train
    except (ValueError, FileNotFoundError) as e:
        out["timing_error"] = str(e)
        return out
    finally:
        hf_logging.enable_progress_bar()
    out["timing"] = time_steps(m, tok, seconds)
    if model == models.BUNDLED:  # kept for estimate(), which the notebooks call before long cells
        try:
            timing_path().parent.mkdir(parents=True, exist_ok=True)
            timing_path().write_text(json.dumps({**out["timing"], "threads": torch.get_num_threads()}))
        except OSError:
            pass
    out["estimates"] = estimate_minutes(out["timing"]["generate_s"], out["timing"]["train_step_s"])
    return out


def _fmt_minutes(m: float) -> str:
    return f"{m:.1f}" if m >= 0.95 else f"{m:.2g}"


def print_report(d: dict) -> None:
    i = d["info"]
    v = i["versions"]
    print("labkit doctor")
    print(f"  python {i['python']}, torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, "
          f"labkit {v['labkit']}  ({i['platform']})")
    # Without AVX-512-BF16 or AMX everything runs in fp32: training at about half the speed of bf16 on the same
    # cores, and such CPUs (AVX2 only) often have a lower fp32 peak too (an AMD EPYC with AVX2: training steps
    # 6x the reference machine's); the timing below says how much on this one.
    fast = "yes" if i["cpu_fast_bf16"] else "no: training and sampling run in fp32 (see the timing below)"
    print(f"  device: {i['device']}" + (f" ({i['cuda']})" if i["cuda"] else "")
          + f", dtype {i['dtype']}; CPU {d['cpu']}, fast bf16: {fast}")
    if d["mps"]:
        print(f"  {d['mps']}")
    c = d["cores"]
    print(f"  cores: torch uses {c['torch_threads']} threads; {c['physical']} physical / {c['logical']} logical cores"
          + (f"; load {c['load']:.1f}" if c["load"] is not None else ""))
    if c["torch_threads"] > 1:
        print(f"    {c['torch_threads']} threads multiply matmuls by {c['speedup']:.2f} against 1 thread")
    if c["speedup"] < 0.9:
        print("    other programs hold the cores: set threads=1 in the notebooks' parameters cell "
              "(labkit.doctor.set_threads(1)), or close them")
    elif c["load"] is not None and c["load"] > c["physical"] + 0.5:
        print("    other programs keep the CPU busy: the timings below come out slow")
    mem = d["memory"]
    if mem["total_gib"] is not None:
        print(f"  RAM: {mem['total_gib']:.1f} GiB total, {mem['available_gib']:.1f} GiB available; "
              "each notebook needs about (estimates, see labkit/doctor.py):")
    else:
        print("  RAM: could not be read; each notebook needs about:")
    for row in mem["notebooks"]:
        print(f"    {row['notebook']:<26} {row['needs_gib']:>4.0f} GiB  {row['verdict']}")
    if any(r["verdict"] in ("tight", "too little") for r in mem["notebooks"]):
        print("    short of RAM: close other programs, or lower batch_size in the notebook's parameters cell")
    w = d["widgets"]
    ext = w["lab_extensions"]
    print(f"  widgets: ipywidgets {w['ipywidgets'] or 'MISSING'}, anywidget {w['anywidget'] or 'MISSING'}; "
          f"JupyterLab {w['jupyterlab'] or 'not installed'}, its widget extensions: "
          + ", ".join(f"{k} {'found' if ok else 'MISSING'}" for k, ok in ext.items()))
    if not (w["ipywidgets"] and w["anywidget"]):
        print("    install them into the kernel's environment: pip install 'ipywidgets>=8.1' anywidget")
    elif w["jupyterlab"] and not all(ext.values()):
        print("    reinstall them in the environment JupyterLab runs from: pip install --force-reinstall ipywidgets anywidget")
    print("    VS Code: install the Jupyter extension and pick this environment's Python as the kernel.")
    print("    Colab: run `from google.colab import output; output.enable_custom_widget_manager()` first"
          + (" (this is Colab)." if w["in_colab"] else "."))
    if "timing_error" in d:
        print(f"  timing skipped: {d['timing_error']}")
        return
    t = d["timing"]
    print(f"  timing ({d['model']}, {i['dtype']}): generation of {GENERATE_SHAPE[0]} x {GENERATE_SHAPE[1]} tokens "
          f"{t['generate_s']:.3g} s, training step of {TRAIN_SHAPE[0]} x {TRAIN_SHAPE[1]} tokens {t['train_step_s']:.3g} s "
          f"(development machine, bundled model: {REFERENCE_GENERATE_S:.3g} s, {REFERENCE_TRAIN_STEP_S:.3g} s)")
    note = "" if d["model"] == models.BUNDLED else f" with model={d['model']!r}"
    for name, minutes in d["estimates"].items():
        print(f"  on this machine notebook {name} takes about {_fmt_minutes(minutes)} minutes{note} "
              f"({REFERENCE_MINUTES[name]} on the development machine)")
    advice = slow_machine_advice(d["estimates"])
    if advice:
        print(f"    {advice}")

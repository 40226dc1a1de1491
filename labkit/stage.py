"""The stage contract: what every training stage of labkit shares.

``train_sft``, ``train_reward_model``, ``train_ppo``, ``train_rloo``, ``train_grpo`` and
``train_dpo`` keep one contract (``docs/stage_contract.md``), and this module is where it lives:

- **config fields** with one meaning: ``model`` (the starting model), ``out_dir``,
  ``learning_rate``, ``dashboard``, ``seed``;
- **one result**: a dict with ``out_dir``, ``model_dir`` (``out_dir/model``, the folder
  ``load_model`` / ``load_reward_model`` reads; ``None`` when the stage stopped before it),
  ``stopped`` (``None``, ``"interrupted"`` or ``"non-finite"``), ``message`` and the final
  metrics (:func:`finish`);
- **the same files** in ``out_dir``: ``config.json``, ``metrics.json``, ``history.json``
  (every logged curve as numbers) and ``dashboard.html`` (the live plot, static);
- **the same behaviour** on Ctrl-C (finish the step, save, return ``stopped="interrupted"``)
  and on a non-finite loss (keep the last good weights, return ``stopped="non-finite"``
  with a message): :class:`NonFiniteError`, :func:`defer_interrupt` for labkit's own loops,
  :func:`trainer_guards` for the TRL trainers;
- RNG state for exact resume (:func:`rng_state`, :func:`set_rng_state`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["STOPPED", "NonFiniteError", "defer_interrupt", "trainer_guards", "rng_state", "set_rng_state",
           "config_dict", "finish", "read_history", "history_rows"]

STOPPED = (None, "interrupted", "non-finite")
FILES = ("config.json", "metrics.json", "history.json", "dashboard.html")


class NonFiniteError(RuntimeError):
    """A loss, score or gradient became NaN/inf; the stage stops and keeps its last good weights."""


# ----------------------------------------------------------------------------- interrupts


@contextlib.contextmanager
def defer_interrupt(reraise: bool = True):
    """Hold a Ctrl-C (SIGINT) until the block ends, so an update is never cut in half.

    Yields a flag (``held["set"]``); at the end of the block a held Ctrl-C is raised as
    ``KeyboardInterrupt``, or, with ``reraise=False``, left in the flag for the caller.
    """
    held = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield held
        return

    def handler(*_):
        held["set"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, previous)
    if held["set"] and reraise:
        raise KeyboardInterrupt


def trainer_guards(flag: dict):
    """A ``transformers.TrainerCallback`` for the stage contract inside a HF/TRL Trainer.

    A non-finite training loss stops training before that step is checkpointed
    (``guard.stopped = "non-finite"``); a raised ``flag["set"]`` (a Ctrl-C held by
    ``defer_interrupt(reraise=False)``) saves a checkpoint at the end of the current step and
    stops (``guard.stopped = "interrupted"``).
    """
    from transformers import TrainerCallback

    class StageGuard(TrainerCallback):
        stopped: str | None = None
        message: str | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(float(loss)):
                self.stopped = "non-finite"
                self.message = f"non-finite training loss at step {state.global_step}"
                control.should_training_stop = True
                control.should_save = False

        def on_step_end(self, args, state, control, **kwargs):
            if flag["set"] and self.stopped is None:
                self.stopped = "interrupted"
                self.message = f"interrupted at step {state.global_step}"
                control.should_training_stop = True
                control.should_save = True

    return StageGuard()


# ----------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """Python, numpy, torch and CUDA RNG states (for an exact resume)."""
    np_state = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- files and result


def config_dict(config) -> dict:
    """The JSON-able settings of a stage config; data (records, stores, callables) become a short note."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, (list, tuple)) and len(value) > 16:
            out[f.name] = f"<{len(value)} items>"
            continue
        try:
            json.dumps(value)
            out[f.name] = value
        except (TypeError, ValueError):
            out[f.name] = f"<{type(value).__name__}>"
    return out


def finish(config, metrics: dict[str, Any], dashboard, model_dir: str | Path | None,
           stopped: str | None = None, message: str | None = None) -> dict:
    """Write ``config.json``, ``metrics.json``, ``history.json`` and ``dashboard.html`` into
    ``config.out_dir`` and return the stage result (see the module docstring)."""
    if stopped not in STOPPED:
        raise ValueError(f"stopped must be one of {STOPPED}, got {stopped!r}")
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"out_dir": str(out), "model_dir": None if model_dir is None else str(model_dir),
              "stopped": stopped, "message": message, **metrics}
    (out / "config.json").write_text(json.dumps(config_dict(config), indent=1))
    (out / "metrics.json").write_text(json.dumps(result, indent=1, default=float))
    dashboard.close()
    dashboard.save(out / "history.json")
    dashboard.save(out / "dashboard.html")
    if stopped:
        print(f"labkit: {out.name} stopped ({stopped}): {message}")
    return result


def read_history(out_dir: str | Path) -> dict[str, list[tuple[float, float]]]:
    """A stage's curves from ``out_dir/history.json``: ``{metric: [(step, value), ...]}`` ({} if none)."""
    path = Path(out_dir) / "history.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {k: [tuple(p) for p in v] for k, v in data["history"].items()}


def history_rows(out_dir: str | Path) -> list[dict[str, float]]:
    """The same curves as one dict per logged step, in step order: ``[{"step": 1, metric: value, ...}]``."""
    by_step: dict[float, dict[str, float]] = {}
    for name, points in read_history(out_dir).items():
        for step, value in points:
            by_step.setdefault(step, {"step": step})[name] = value
    return [by_step[s] for s in sorted(by_step)]

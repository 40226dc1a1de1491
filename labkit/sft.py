"""Stage 1: supervised fine-tuning (SFT) on demonstrations, loss on the response only.

InstructGPT §3.5: the SFT model is the pretrained LM fine-tuned on labeler demonstrations
(prompt, desired answer) with cosine learning-rate decay; the paper trained 16 epochs and
notes that validation loss overfits after 1 epoch while more epochs still helped RM score
and human preference. Here the same step runs through TRL's ``SFTTrainer`` on
prompt-completion data, so the loss covers the completion tokens only.

**The training text is exactly what generation sees**: the prompt is
``labkit.models.format_prompt(tok, prompt)`` (the chat template with the generation prompt),
the completion is the response followed by the EOS token ``<|im_end|>``, at which
``labkit.generation.generate`` stops. :func:`build_examples` makes these pairs and
:func:`expected_tokens` states the token ids a test compares with TRL's own tokenisation.

**Precision.** TRL's configs default to ``bf16=True``, which fails on a machine without a
bf16 GPU. ``precision="auto"`` picks bf16 autocast over fp32 master weights where the
hardware runs bf16 fast (``labkit.models.fast_dtype``: CUDA with bf16, CPUs with AMX or
AVX-512-BF16) and plain fp32 elsewhere. On CPU that is ``bf16=True, use_cpu=True``:
accelerate then wraps the forward pass in ``torch.autocast("cpu", torch.bfloat16)``.

Measured (bundled SmolLM2-135M-Instruct, 230 embedded demonstrations: 207 train / 23 eval,
104 tokens per example on average, batch 8):

- *Time per step, CPU, 2 threads*, on a Xeon with AMX (uncontended): bf16 autocast about
  5.0 s, fp32 about 5.9 s. The default run is 26 steps (1 epoch), about 2.5 minutes of
  training plus a few seconds per evaluation; 2 epochs take about 4.5 minutes. On the
  2-core development machine (AVX-512-BF16, no AMX) the timings could only be taken while
  it was shared: about 31 CPU-seconds per step for bf16 and 32 for fp32 (11 on the AMX
  Xeon), so expect it 2-3x slower there, and bf16 gains little without AMX.
- *Quality* (taken on a GPU; the arithmetic is the same), eval loss from 2.715 and the gold
  score on the 151-prompt eval split (greedy, 96 tokens; base model 0.496):

  ==============  ==============  ==========
  epochs, lr      eval loss       gold mean
  ==============  ==============  ==========
  1, 5e-5         2.432           0.603
  1, 1e-4         2.368           0.662
  1, 2e-4         2.335           0.628
  2, 5e-5         2.337           0.663
  2, 1e-4         2.296           0.720
  3, 5e-5         2.318           0.684
  ==============  ==============  ==========

  The default (1 epoch, lr 1e-4) keeps a CPU run within minutes; ``epochs=2`` is the
  better model when the time is there (as the paper found, more epochs keep helping).

>>> from labkit.sft import SFTConfig, train_sft
>>> result = train_sft(SFTConfig(model="tiny", out_dir="runs/sft-tiny", max_steps=10))
>>> model, tok = labkit.models.load_model(result["model_dir"])
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from labkit import models
from labkit.doctor import steady_memory
from labkit.live import LiveDashboard
from labkit.stage import defer_interrupt, finish, trainer_guards

__all__ = ["SFTConfig", "train_sft", "make_trainer", "build_examples", "expected_tokens", "split_demonstrations",
           "resolve_precision", "inputs_fingerprint"]

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class SFTConfig:
    """Stage 1 settings; the defaults fine-tune the bundled 135M model in minutes on a laptop CPU."""

    model: str = models.BUNDLED  # "smollm2-135m", "tiny", a local folder or a Hugging Face id
    out_dir: str = "runs/sft"  # checkpoints, model/ (the final model + tokenizer) and the stage files
    demonstrations: list[dict] | None = None  # None: the embedded SFT demos; else records with prompt + response
    epochs: float = 1.0  # passes over the training demos (the paper: 16; val loss overfits after 1)
    learning_rate: float = 1e-4  # peak learning rate, AdamW
    lr_scheduler: str = "cosine"  # cosine decay, as in InstructGPT §3.5 / Appendix C.1
    warmup: float = 0.1  # warm-up steps as a fraction of all steps (or a count if >= 1)
    weight_decay: float = 0.0  # AdamW weight decay
    batch_size: int = 8  # demonstrations per forward pass
    grad_accum: int = 1  # forward passes per optimizer step (effective batch = batch_size * grad_accum)
    group_by_length: bool = True  # batch demos of similar length (less padding; order still shuffled)
    max_length: int = 256  # tokens per example (prompt + response + EOS); longer ones are cut and counted
    eval_fraction: float = 0.1  # share of demonstrations held out for eval loss
    eval_steps: int | None = None  # evaluate every N steps; None: about 4 times per run (and once at the start)
    logging_steps: int = 1  # log train loss every N optimizer steps
    save_steps: int = 20  # checkpoint every N optimizer steps (optimizer state included, for exact resume)
    save_total_limit: int = 1  # checkpoints kept in out_dir (each holds weights + AdamW state)
    resume: bool = True  # continue from the last checkpoint in out_dir if there is one
    precision: str = "auto"  # "auto" (bf16 autocast where fast, else fp32), "bf16" or "fp32"
    max_steps: int = -1  # stop after N optimizer steps (smoke runs); -1: run all epochs
    max_grad_norm: float = 1.0  # gradient clipping
    seed: int = 0  # data split, shuffling and init of anything random
    device: str = "auto"  # "auto", "cpu", "cuda", ...
    dashboard: bool = True  # live plot in the notebook (always recorded; saved to out_dir/dashboard.html)
    progress: bool = True  # show the Trainer's progress bar

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        for name in ("batch_size", "grad_accum", "max_length", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("set epochs > 0 or max_steps > 0")


def resolve_precision(precision: str, device) -> str:
    """``"bf16"`` or ``"fp32"``: ``"auto"`` is bf16 where :func:`labkit.models.fast_dtype` says so."""
    import torch

    if precision == "auto":
        return "bf16" if models.fast_dtype(device) == torch.bfloat16 else "fp32"
    return precision


# ----------------------------------------------------------------------------- data

def _response_of(record: dict, i: int) -> str:
    for key in ("response", "completion"):
        if isinstance(record.get(key), str):
            return record[key]
    raise ValueError(f"demonstration {i} has no 'response' (or 'completion') string: keys {sorted(record)}")


def build_examples(tokenizer, demonstrations: list[dict]) -> list[dict]:
    """Prompt-completion pairs in the exact text generation uses: ``{"prompt", "completion"}``.

    ``prompt`` = ``format_prompt(tok, record["prompt"])``; ``completion`` = the response plus
    the EOS token (TRL would append it too; adding it here makes the text explicit).
    """
    eos = tokenizer.eos_token
    examples = []
    for i, r in enumerate(demonstrations):
        if not isinstance(r.get("prompt"), str) or not r["prompt"].strip():
            raise ValueError(f"demonstration {i} has no 'prompt' string")
        response = _response_of(r, i)
        if not response.strip():
            raise ValueError(f"demonstration {i} (prompt {r.get('id', r.get('prompt_id', '?'))}) has an empty response")
        examples.append({"prompt": models.format_prompt(tokenizer, r["prompt"]), "completion": response + eos})
    return examples


def expected_tokens(tokenizer, example: dict) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for one example as generation sees it: prompt ids (labels -100),
    then response ids and EOS (labels = ids)."""
    prompt_ids = tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
    return prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_ids


def split_demonstrations(demos: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle, then the last ``eval_fraction`` (at least 1 if the fraction is > 0) held out."""
    demos = list(demos)
    random.Random(seed).shuffle(demos)
    n_eval = 0 if eval_fraction == 0 or len(demos) < 2 else max(1, round(len(demos) * eval_fraction))
    return demos[: len(demos) - n_eval], demos[len(demos) - n_eval:]


def _load_demonstrations(config: SFTConfig) -> list[dict]:
    if config.demonstrations is not None:
        return list(config.demonstrations)
    from labkit.data import load_demonstrations

    return load_demonstrations()


# The settings that change what a run learns. Not max_steps / epochs: a longer run of the same
# data continues from the last checkpoint; not where or how it logs.
RESULT_FIELDS = ("model", "learning_rate", "lr_scheduler", "warmup", "weight_decay", "batch_size", "grad_accum",
                 "group_by_length", "max_length", "eval_fraction", "max_grad_norm", "seed", "precision")
INPUTS_FILE = "inputs.json"  # in out_dir: the fingerprint of the demonstrations and settings trained on


def inputs_fingerprint(config: SFTConfig, demonstrations: list[dict]) -> str:
    """A hash of the demonstrations (prompt and response, in order) and :data:`RESULT_FIELDS`."""
    import hashlib
    import json

    demos = [[d.get("prompt"), d.get("response", d.get("completion"))] for d in demonstrations]
    settings = {f: getattr(config, f) for f in RESULT_FIELDS}
    blob = json.dumps({"demonstrations": demos, "settings": settings}, ensure_ascii=False, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _start_fresh_if_inputs_changed(out: Path, fingerprint: str) -> None:
    """Remove checkpoints and the model of an earlier run in ``out`` that trained on other
    demonstrations or settings (a resume would silently keep the old data); then record ours."""
    import json
    import shutil

    path = out / INPUTS_FILE
    earlier = json.loads(path.read_text()).get("fingerprint") if path.exists() else None
    leftovers = sorted(out.glob("checkpoint-*")) + [out / "model"] * (out / "model").exists()
    if leftovers and earlier != fingerprint:
        why = "other demonstrations or settings" if earlier else "demonstrations it did not record"
        print(f"labkit.sft: {out} holds a run trained on {why}; starting fresh "
              f"(removing {', '.join(p.name for p in leftovers)})")
        for p in leftovers:
            shutil.rmtree(p, ignore_errors=True)
        for name in ("metrics.json", "history.json"):
            (out / name).unlink(missing_ok=True)
    path.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")


# ----------------------------------------------------------------------------- training

def _trainer_args(config: SFTConfig, precision: str, device, steps_per_epoch: int, has_eval: bool):
    from trl import SFTConfig as TRLSFTConfig

    total = config.max_steps if config.max_steps > 0 else math.ceil(steps_per_epoch * config.epochs)
    eval_steps = config.eval_steps or max(1, total // 4)
    return TRLSFTConfig(
        output_dir=config.out_dir,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup,
        weight_decay=config.weight_decay,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        max_grad_norm=config.max_grad_norm,
        max_length=config.max_length,
        completion_only_loss=True,  # loss on the response (+ EOS) tokens only
        packing=False,
        activation_checkpointing=False,  # TRL defaults to recomputing activations; a small model needs no such saving
        bf16=precision == "bf16",  # autocast; weights and optimizer state stay fp32
        fp16=False,
        use_cpu=device.type == "cpu",
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps,
        eval_on_start=has_eval,  # the eval loss of the starting model, for comparison
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        disable_tqdm=not config.progress,
        dataloader_num_workers=0,
        dataset_num_proc=None,
    )


def _count_truncated(tokenizer, examples: list[dict], max_length: int) -> int:
    return sum(len(expected_tokens(tokenizer, e)[0]) > max_length for e in examples)


def make_trainer(config: SFTConfig, model=None, tokenizer=None):
    """The TRL ``SFTTrainer`` for ``config`` and a dict of data facts (sizes, truncations, precision).

    ``model``/``tokenizer`` default to ``load_model(config.model, dtype="float32")``: fp32
    master weights, bf16 only inside autocast.
    """
    from datasets import Dataset
    from trl import SFTTrainer

    device = models.resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    if model is None:
        model, tokenizer = models.load_model(config.model, dtype="float32", device=device, seed=config.seed)

    # Demonstrations -> (formatted prompt, response + EOS), seeded train/eval split.
    demos = _load_demonstrations(config)
    train_demos, eval_demos = split_demonstrations(demos, config.eval_fraction, config.seed)
    if not train_demos:
        raise ValueError("no demonstrations to train on")
    train_ex, eval_ex = build_examples(tokenizer, train_demos), build_examples(tokenizer, eval_demos)
    n_truncated = _count_truncated(tokenizer, train_ex + eval_ex, config.max_length)
    if n_truncated:
        print(f"labkit.sft: {n_truncated} of {len(train_ex) + len(eval_ex)} demonstrations are longer than "
              f"max_length={config.max_length} tokens and were cut (keeping the start)")

    steps_per_epoch = math.ceil(len(train_ex) / (config.batch_size * config.grad_accum))
    args = _trainer_args(config, precision, device, steps_per_epoch, has_eval=bool(eval_ex))
    dashboard = LiveDashboard(f"SFT: {config.model}", headless=None if config.dashboard else True)
    # SFTTrainer tokenises with `datasets`, which draws about ten bars per split: in a
    # notebook they crowd out the training bar and the live plot, so they are off meanwhile.
    from datasets.utils import logging as ds_logging

    bars_were_on = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        trainer = SFTTrainer(
            model=model, args=args, processing_class=tokenizer,
            train_dataset=Dataset.from_list(train_ex),
            eval_dataset=Dataset.from_list(eval_ex) if eval_ex else None,
            callbacks=[dashboard.callback()],
        )
    finally:
        if bars_were_on:
            ds_logging.enable_progress_bar()
    info = {"model": config.model, "precision": precision, "device": str(device), "n_train": len(train_ex),
            "n_eval": len(eval_ex), "n_truncated": n_truncated, "dashboard": dashboard,
            "fingerprint": inputs_fingerprint(config, demos)}
    return trainer, info


@steady_memory()  # one training step's large blocks reused at the next, handed back after
def train_sft(config: SFTConfig) -> dict:
    """Fine-tune ``config.model`` on demonstrations; returns the stage result (``labkit.stage``),
    whose ``model_dir`` (``out_dir/model``) ``load_model`` reads.

    >>> result = train_sft(SFTConfig(model="tiny", out_dir="runs/sft-tiny", max_steps=10))
    >>> model, tok = load_model(result["model_dir"])
    """
    from transformers.trainer_utils import get_last_checkpoint

    t_start = time.time()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # 1. Data and trainer: TRL SFTTrainer, completion-only loss, explicit precision, live plot.
    trainer, info = make_trainer(config)
    dashboard = info.pop("dashboard")
    tok = trainer.processing_class

    # 2. Train, resuming from the last checkpoint in out_dir if asked and present, unless that
    #    run saw other demonstrations or settings (then start fresh). A Ctrl-C ends the current
    #    step and checkpoints it; a non-finite loss stops before checkpointing.
    _start_fresh_if_inputs_changed(out, info["fingerprint"])
    last = get_last_checkpoint(str(out)) if config.resume and any(out.glob("checkpoint-*")) else None
    if last:
        print(f"labkit.sft: resuming from {last}")
    t0 = time.time()
    with defer_interrupt(reraise=False) as flag:
        guard = trainer_guards(flag)
        trainer.add_callback(guard)
        result = trainer.train(resume_from_checkpoint=last)
    seconds = time.time() - t0

    # 3. Save the final model + tokenizer (safetensors) unless the run stopped early; then the stage files.
    history = trainer.state.log_history
    metrics = {
        "precision": info["precision"], "device": info["device"], "data/n_train": info["n_train"],
        "data/n_eval": info["n_eval"], "data/n_truncated": info["n_truncated"],
        "train/steps": trainer.state.global_step, "train/epochs": trainer.state.epoch,
        "time/train_s": seconds, "time/steps_per_s": result.metrics.get("train_steps_per_second"),
        "loss/train": result.metrics.get("train_loss"), "train/resumed_from": last,
        "data/fingerprint": info["fingerprint"],
    }
    if guard.stopped is not None:
        where = f"the latest checkpoint under {out}"
        return finish(config, metrics, dashboard, None, guard.stopped, f"{guard.message}; last good weights: {where}")
    trainer.save_model(str(out / "model"))
    tok.save_pretrained(str(out / "model"))
    evals = [h for h in history if "eval_loss" in h]
    if info["n_eval"] and (not evals or evals[-1].get("step") != trainer.state.global_step):
        evals.append({"eval_loss": trainer.evaluate()["eval_loss"], "step": trainer.state.global_step})
    eval_losses = [h["eval_loss"] for h in evals]
    metrics["eval/loss_start"] = eval_losses[0] if eval_losses else None
    metrics["eval/loss"] = eval_losses[-1] if eval_losses else None
    metrics["time/total_s"] = time.time() - t_start
    return finish(config, metrics, dashboard, out / "model")

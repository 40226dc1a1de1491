"""Beyond PPO: TRL's RLOO, GRPO and DPO on labkit's data and reward model, on equal footing.

PPO (``labkit.ppo``) learns a value function to lower the variance of its policy gradient.
Later methods drop it:

- **RLOO** (REINFORCE leave-one-out; Kool et al. 2019, Ahmadian et al. 2024): sample
  ``num_generations`` responses per prompt; the baseline of each is the mean reward of the
  others. The KL to the SFT model is subtracted from the sequence reward, as in PPO.
- **GRPO** (Shao et al. 2024, DeepSeekMath §4): the advantage of each response is its reward
  standardised within its group of ``num_generations``; the KL to the reference is a loss term.
- **DPO** (Rafailov et al. 2023): no reward model and no sampling at all; the policy is trained
  directly on (chosen, rejected) pairs, the implicit reward being ``beta * log(pi / pi_SFT)``.

"Equal footing" means the same things as ``labkit.ppo.train_ppo`` wherever the methods allow:
the same SFT folder as policy and frozen reference, the same ``ppo`` prompt split wrapped in the
same chat template (TRL renders conversational prompts with the tokenizer's template, which is
``labkit.models.format_prompt``), the same reward (``labkit.reward.RewardModel.score`` on
``format_prompt(prompt) + response + EOS``, minus ``missing_eos_penalty`` for a response that
did not stop), the same sampling (temperature, no top-k/top-p), episodes per step, optimizer
steps per batch, learning rate (constant), AdamW epsilon, gradient clipping, fp32 master
weights under bf16 autocast where the CPU is fast at it, and dropout off. DPO sees
``format_prompt(prompt) + response + EOS`` too, the same tokens as the reward model.

>>> out = train_rloo(RLOOConfig(policy="runs/sft", reward_model="runs/rm", steps=20))
>>> table = compare_methods({"ppo": ppo_metrics, "rloo": out}, reference="runs/sft")
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from labkit.models import BUNDLED, TINY, bundled_model_dir, fast_dtype, format_prompt, load_model, resolve_device
from labkit.rankings import rankings_to_pairs
from labkit.stage import defer_interrupt, finish, trainer_guards

__all__ = ["reward_function", "gold_reward_function", "prompt_dataset",
           "RLOOConfig", "GRPOConfig", "DPOConfig", "train_rloo", "train_grpo", "train_dpo",
           "compare_methods", "trl_precision"]


# ----------------------------------------------------------------------------- reward functions


def _user_text(prompt) -> str:
    """The user's request from a TRL prompt: a string, or a conversation (its last user turn)."""
    if isinstance(prompt, str):
        return prompt
    return [m for m in prompt if m["role"] == "user"][-1]["content"]


def _response_text(completion) -> str:
    """The response from a TRL completion: a string, or ``[{"role": "assistant", "content"}]``."""
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] for m in completion)


def _stopped(completion_ids: list[list[int]] | None, n: int, eos_token_id: int) -> list[bool]:
    """Whether each completion ended with EOS (TRL keeps the first EOS in ``completion_ids``)."""
    if completion_ids is None:
        return [True] * n
    return [eos_token_id in ids for ids in completion_ids]


def reward_function(reward_model_dir: str | Path, missing_eos_penalty: float = 0.0, batch_size: int = 8,
                    device: str | torch.device = "auto") -> Callable[..., list[float]]:
    """A TRL reward function ``f(prompts, completions, **kw) -> list[float]`` scoring with a labkit RM.

    Scores are ``RewardModel.score``: the RM reads ``format_prompt(prompt) + response + EOS``
    and subtracts its demo-mean bias, exactly as in ``labkit.ppo``. A completion that hit the
    length limit without EOS loses ``missing_eos_penalty``, as PPOConfig's flag of that name.
    """
    from labkit.reward import load_reward_model

    rm, tokenizer = load_reward_model(reward_model_dir, dtype="float32", device=device)
    rm.requires_grad_(False).eval()

    def labkit_rm(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
        texts = [_response_text(c) for c in completions]
        scores = rm.score(tokenizer, [_user_text(p) for p in prompts], texts, batch_size=batch_size,
                          progress=False)
        stopped = _stopped(completion_ids, len(texts), tokenizer.eos_token_id)
        return [float(s) - (0.0 if ok else missing_eos_penalty) for s, ok in zip(scores, stopped)]

    labkit_rm.reward_model, labkit_rm.tokenizer = rm, tokenizer  # for callers that want the RM itself
    return labkit_rm


def gold_reward_function(eos_token_id: int | None = None) -> Callable[..., list[float]]:
    """A TRL reward function scoring with ``labkit.labelers.GoldLabeler`` (in [0, 1]).

    The gold scorer needs the prompt record (checks, reference, harmful flag): it comes through
    the dataset column ``record`` (a JSON string, see :func:`prompt_dataset`), which TRL passes
    to reward functions as a keyword. Without it, only the prompt text is known (no checks).
    A completion without EOS counts as truncated (the gold quality term penalises it).
    """
    from labkit.labelers import GoldLabeler

    gold = GoldLabeler()
    if eos_token_id is None:
        from labkit.models import load_tokenizer

        eos_token_id = load_tokenizer().eos_token_id

    def labkit_gold(prompts, completions, record=None, completion_ids=None, **kwargs) -> list[float]:
        texts = [_response_text(c) for c in completions]
        if record is None:
            records = [{"prompt": _user_text(p)} for p in prompts]
        else:
            records = [json.loads(r) if isinstance(r, str) else r for r in record]
        stopped = _stopped(completion_ids, len(texts), eos_token_id)
        return [gold.score(rec, text, truncated=not ok) for rec, text, ok in zip(records, texts, stopped)]

    return labkit_gold


# ----------------------------------------------------------------------------- data


def prompt_dataset(records: list[dict | str]):
    """A ``datasets.Dataset`` for RLOO/GRPO: conversational ``prompt``, plus ``prompt_id`` and ``record``.

    The prompt is a one-turn conversation, so TRL applies the chat template exactly as
    ``format_prompt`` does; ``record`` is the whole prompt record as JSON (for the gold scorer).
    """
    from datasets import Dataset

    records = [{"prompt": r} if isinstance(r, str) else r for r in records]
    return Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                               "prompt_id": str(r.get("id", i)), "record": json.dumps(r)}
                              for i, r in enumerate(records)])


# ----------------------------------------------------------------------------- configs


@dataclass
class RLOOConfig:
    """labkit's settings for TRL's ``RLOOTrainer``; sizes count episodes as in ``labkit.ppo.PPOConfig``.

    (Not ``trl.RLOOConfig``: that one is built from this by :func:`train_rloo`.)
    """

    # models and data
    model: str = "smollm2-135m"  # the starting policy: SFT folder (or built-in name); also the frozen reference
    reward_model: str | None = None  # labkit RewardModel folder; None: the gold scorer is the reward
    prompts: list | None = field(default=None, repr=False)  # prompt records or strings; None: load_prompts("ppo")
    out_dir: str = "runs/rloo"  # model/ (the trained policy) and the stage files
    seed: int = 0  # TRL's seed (data order, sampling, init)
    # episodes and optimisation (same meaning as in PPOConfig)
    steps: int = 24  # rollouts; each samples batch_size episodes, then optimizes on them
    batch_size: int = 16  # episodes (responses) per rollout = prompts per rollout * num_generations
    num_generations: int = 4  # responses per prompt (the group the baseline is taken from)
    mini_batch_size: int = 8  # episodes per optimizer step
    micro_batch_size: int = 4  # episodes per forward/backward (gradient accumulation)
    num_iterations: int = 1  # passes over each batch (PPOConfig.ppo_epochs)
    learning_rate: float = 3e-5  # AdamW, constant as in labkit.ppo
    adam_eps: float = 1e-5  # AdamW epsilon (labkit.ppo's default)
    max_grad_norm: float = 1.0  # clip the global gradient norm to this
    # generation and reward
    max_completion_length: int = 40  # response length limit (PPOConfig.max_new_tokens)
    temperature: float = 0.7  # sampling temperature, also applied in the log-probs
    beta: float = 0.05  # KL coefficient to the SFT model (PPOConfig.kl_coef)
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response without EOS
    # precision and logging
    bf16: bool = True  # bf16 autocast where the hardware is fast, fp32 master weights
    dashboard: bool = True  # live plotly dashboard in notebooks (always recorded; saved as dashboard.html)
    callbacks: list = field(default_factory=list, repr=False)  # more transformers TrainerCallbacks
    extra_args: dict = field(default_factory=dict)  # more TRL config fields, passed unchanged

    def __post_init__(self):
        if self.batch_size % self.num_generations:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of num_generations={self.num_generations}")
        if self.batch_size % self.mini_batch_size or self.mini_batch_size % self.micro_batch_size:
            raise ValueError("batch_size must be a multiple of mini_batch_size, and that of micro_batch_size")
        if self.num_generations < 2:
            raise ValueError("RLOO and GRPO compare responses to one prompt: num_generations must be >= 2")
        if min(self.steps, self.num_iterations, self.max_completion_length) < 1 or self.temperature <= 0:
            raise ValueError("need steps, num_iterations, max_completion_length >= 1 and temperature > 0")

    @property
    def optimizer_steps(self) -> int:
        return self.steps * self.num_iterations * self.batch_size // self.mini_batch_size


@dataclass
class GRPOConfig(RLOOConfig):
    """labkit's settings for TRL's ``GRPOTrainer`` (the same fields as :class:`RLOOConfig`)."""

    out_dir: str = "runs/grpo"  # model/ (the trained policy) and the stage files


@dataclass
class DPOConfig:
    """labkit's settings for TRL's ``DPOTrainer`` (not ``trl.DPOConfig``, built from this)."""

    model: str = "smollm2-135m"  # the starting policy: SFT folder (or built-in name); also the frozen reference
    pairs: list | object | None = field(default=None, repr=False)  # {prompt, chosen, rejected} dicts, ranking records, or a FeedbackStore
    out_dir: str = "runs/dpo"  # model/ (the trained policy) and the stage files
    seed: int = 0  # TRL's seed (data order)
    steps: int = 24  # optimizer steps
    batch_size: int = 8  # pairs per optimizer step
    micro_batch_size: int = 4  # pairs per forward/backward (gradient accumulation)
    learning_rate: float = 1e-6  # AdamW, constant (Rafailov et al. 2023 used 1e-6)
    adam_eps: float = 1e-5  # AdamW epsilon, as in the other stages
    max_grad_norm: float = 1.0  # clip the global gradient norm to this
    beta: float = 0.1  # DPO's beta: strength of the implicit KL constraint (paper: 0.1)
    max_length: int = 512  # prompt + response tokens; longer pairs are cut at the end
    bf16: bool = True  # bf16 autocast where the hardware is fast, fp32 master weights
    dashboard: bool = True  # live plotly dashboard in notebooks (always recorded; saved as dashboard.html)
    callbacks: list = field(default_factory=list, repr=False)  # more transformers TrainerCallbacks
    extra_args: dict = field(default_factory=dict)  # more TRL config fields, passed unchanged

    def __post_init__(self):
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of micro_batch_size={self.micro_batch_size}")
        if self.steps < 1 or self.beta <= 0:
            raise ValueError("need steps >= 1 and beta > 0")


# ----------------------------------------------------------------------------- shared plumbing


def trl_precision(bf16: bool = True, device: str | torch.device = "auto") -> dict:
    """TRL/Trainer precision arguments: bf16 autocast where fast, else fp32; CPU made explicit.

    Every TRL 1.16 config defaults to ``bf16=True``, which fails on hardware without bf16.
    On a CPU, ``use_cpu=True`` lets accelerate run bf16 *autocast* (weights stay fp32), the
    same scheme as ``labkit.models.autocast``.
    """
    device = resolve_device(device)
    fast = bf16 and fast_dtype(device) == torch.bfloat16
    return {"bf16": fast, "fp16": False, "use_cpu": device.type == "cpu"}


def policy_folder(policy: str, out_dir: Path) -> str:
    """A folder for TRL to load: built-in names are written out once (TRL reloads the
    reference from the policy's ``config._name_or_path``, which must be a real folder)."""
    if policy == BUNDLED:
        return str(bundled_model_dir())
    if policy == TINY:
        target = out_dir / "base_tiny"
        if not (target / "config.json").exists():
            model, tok = load_model(TINY, dtype="float32", device="cpu")
            model.save_pretrained(target)
            tok.save_pretrained(target)
        return str(target)
    return str(policy)


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    from labkit.models import setup_tokenizer

    return setup_tokenizer(AutoTokenizer.from_pretrained(path))


def _common_args(config, out: Path) -> dict:
    """Trainer arguments every method shares (logging, schedule, optimizer, precision)."""
    return dict(output_dir=str(out / "trainer"), seed=config.seed, learning_rate=config.learning_rate,
                lr_scheduler_type="constant", warmup_steps=0, adam_epsilon=config.adam_eps, weight_decay=0.0,
                max_grad_norm=config.max_grad_norm, logging_steps=1, save_strategy="no", report_to="none",
                disable_dropout=True, **trl_precision(config.bf16))


def _last(history: list[dict], key: str):
    """The most recent logged value of ``key`` (TRL logs rollout metrics only on rollout steps)."""
    return next((h[key] for h in reversed(history) if key in h), None)


def _train(method: str, config, trainer, tokenizer, episodes: int, extra: Callable[[list[dict]], dict]) -> dict:
    """Train under the stage contract (Ctrl-C and non-finite guards, ``labkit.stage``); save the
    policy in ``out_dir/model`` unless stopped; return the stage result.

    ``episodes`` counts the responses trained on (RLOO/GRPO) or the preference pairs (DPO);
    ``extra(history)`` turns TRL's log history into labkit's metric names.
    """
    out = Path(config.out_dir)
    with defer_interrupt(reraise=False) as flag:
        guard = trainer_guards(flag)
        trainer.add_callback(guard)
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    history = [h for h in trainer.state.log_history if "train_runtime" not in h]
    metrics = {"method": method, "train/episodes": episodes, "time/total_s": wall,
               "time/episodes_per_s": episodes / wall, **extra(history)}
    model_dir = None
    if guard.stopped is None:
        model_dir = out / "model"
        trainer.model.config.use_cache = True
        trainer.save_model(str(model_dir))
        tokenizer.save_pretrained(model_dir)
    return finish(config, metrics, trainer.labkit_dashboard, model_dir, guard.stopped, guard.message)


def _make_trainer(trainer_cls, config, title: str, **kwargs):
    """A TRL trainer with labkit's dashboard (always recorded; drawn live when ``config.dashboard``)."""
    from labkit.live import LiveDashboard

    dash = LiveDashboard(title, headless=None if config.dashboard else True)
    trainer = trainer_cls(callbacks=[dash.callback(), *config.callbacks], **kwargs)
    trainer.labkit_dashboard = dash
    return trainer


# ----------------------------------------------------------------------------- RLOO and GRPO


def _online_args(config: RLOOConfig, out: Path) -> dict:
    """Batch geometry as in labkit.ppo: one rollout of ``batch_size`` episodes per
    ``batch_size / mini_batch_size`` optimizer steps, each accumulating micro-batches."""
    return dict(_common_args(config, out),
                per_device_train_batch_size=config.micro_batch_size,
                gradient_accumulation_steps=config.mini_batch_size // config.micro_batch_size,
                steps_per_generation=config.batch_size // config.micro_batch_size,
                num_iterations=config.num_iterations, max_steps=config.optimizer_steps,
                num_generations=config.num_generations, max_completion_length=config.max_completion_length,
                temperature=config.temperature, top_p=1.0, top_k=0, beta=config.beta,
                log_completions=False, **config.extra_args)


def _train_online(method: str, config: RLOOConfig) -> dict:
    import trl

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy = policy_folder(config.model, out)
    tokenizer = _tokenizer(policy)
    if config.reward_model is not None:
        reward = reward_function(config.reward_model, config.missing_eos_penalty, batch_size=config.micro_batch_size)
    else:  # the gold score itself marks a response without EOS as truncated
        reward = gold_reward_function(tokenizer.eos_token_id)
    records = config.prompts
    if records is None:
        from labkit.data import load_prompts

        records = load_prompts("ppo")
    trainer_cls, args_cls = {"rloo": (trl.RLOOTrainer, trl.RLOOConfig),
                             "grpo": (trl.GRPOTrainer, trl.GRPOConfig)}[method]
    # The policy goes in as a folder path: TRL rebuilds the reference from config._name_or_path.
    trainer = _make_trainer(trainer_cls, config, method.upper(), model=policy, reward_funcs=reward,
                            args=args_cls(**_online_args(config, out)), train_dataset=prompt_dataset(records),
                            processing_class=tokenizer)
    episodes = config.steps * config.batch_size

    def extra(history: list[dict]) -> dict:
        # Each rollout logs the mean length of its responses; tokens = response tokens generated.
        lengths = [h["completions/mean_length"] for h in history if "completions/mean_length" in h]
        return {"objective/scores": _last(history, "reward"), "objective/kl": _last(history, "kl"),
                "loss/train": _last(history, "loss"), "response/length": _last(history, "completions/mean_length"),
                "train/tokens": episodes * sum(lengths) / max(1, len(lengths))}

    result = _train(method, config, trainer, tokenizer, episodes, extra)
    result["time/tokens_per_s"] = result["train/tokens"] / result["time/total_s"]
    return result


def train_rloo(config: RLOOConfig) -> dict:
    """RLOO with TRL's ``RLOOTrainer`` on labkit's prompts and RM; returns the stage result.

    >>> m = train_rloo(RLOOConfig(model="runs/sft/model", reward_model="runs/rm/model", steps=20))
    >>> m["objective/scores"], m["objective/kl"], m["time/total_s"], m["model_dir"]
    """
    return _train_online("rloo", config)


def train_grpo(config: GRPOConfig) -> dict:
    """GRPO with TRL's ``GRPOTrainer`` on labkit's prompts and RM; returns the stage result.

    >>> m = train_grpo(GRPOConfig(model="runs/sft/model", reward_model="runs/rm/model", steps=20))
    """
    return _train_online("grpo", config)


# ----------------------------------------------------------------------------- DPO


def _pair_rows(pairs) -> list[dict]:
    """Normalise DPO input: a FeedbackStore, ranking records, or preference pairs."""
    if pairs is None:
        raise ValueError("DPOConfig.pairs is empty: pass a FeedbackStore, ranking records or preference pairs")
    if hasattr(pairs, "to_pairs"):
        pairs = pairs.to_pairs()
    pairs = list(pairs)
    if pairs and "tiers" in pairs[0]:
        pairs = rankings_to_pairs(pairs)
    if not pairs:
        raise ValueError("no preference pairs to train on (all rankings tied, or none submitted)")
    for i, p in enumerate(pairs):
        missing = {"prompt", "chosen", "rejected"} - set(p)
        if missing:
            raise ValueError(f"preference pair {i} lacks {sorted(missing)}")
    return pairs


def train_dpo(config: DPOConfig) -> dict:
    """DPO with TRL's ``DPOTrainer`` on labkit's preference pairs; returns the stage result.

    Pairs are handed over as text ``format_prompt(prompt)`` / ``response`` (TRL appends EOS),
    so the policy is trained on the very tokens the reward model and PPO see.

    >>> m = train_dpo(DPOConfig(model="runs/sft/model", pairs=FeedbackStore("runs/feedback.sqlite")))
    >>> m["rewards/accuracies"], m["model_dir"]
    """
    import trl
    from datasets import Dataset

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy = policy_folder(config.model, out)
    tokenizer = _tokenizer(policy)
    rows = [{"prompt": format_prompt(tokenizer, p["prompt"]), "chosen": p["chosen"], "rejected": p["rejected"]}
            for p in _pair_rows(config.pairs)]
    args = trl.DPOConfig(**_common_args(config, out), per_device_train_batch_size=config.micro_batch_size,
                         gradient_accumulation_steps=config.batch_size // config.micro_batch_size,
                         max_steps=config.steps, beta=config.beta, max_length=config.max_length,
                         **config.extra_args)
    trainer = _make_trainer(trl.DPOTrainer, config, "DPO", model=policy, args=args,
                            train_dataset=Dataset.from_list(rows), processing_class=tokenizer)

    def extra(history: list[dict]) -> dict:
        # rewards/* keep TRL's documented names: DPO's implicit rewards, not an RM's scores
        keys = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
        return {"data/n_pairs": len(rows), "loss/train": _last(history, "loss"), **{k: _last(history, k) for k in keys}}

    return _train("dpo", config, trainer, tokenizer, config.steps * config.batch_size, extra)


# ----------------------------------------------------------------------------- comparison


@torch.no_grad()
def compare_methods(results: dict[str, dict | str], reference: str, records: list[dict] | None = None,
                    limit: int | None = 32, max_new_tokens: int = 64, batch_size: int = 16,
                    reward_model: str | None = None, include_reference: bool = True, seed: int = 0) -> list[dict]:
    """One row per method: ``method, wall_s, gold, kl, length`` (and ``rm`` with ``reward_model``).

    ``results`` maps a method name to its stage result (``train_ppo``, ``train_rloo``, ...: a
    dict holding ``model_dir`` and ``time/total_s``) or to a policy folder. Each policy answers the same
    eval prompts once, sampling at temperature 1 from the policy itself, so that
    ``kl_to_reference`` (mean over prompts of log pi(y|x) - log pi_SFT(y|x)) is an unbiased
    Monte-Carlo estimate of KL(pi || pi_SFT); ``gold`` is the gold scorer's mean on those
    responses and ``length`` their mean number of words.
    """
    from labkit.evaluate import answer, gold_figures, kl_to_reference

    if records is None:
        from labkit.data import load_prompts

        records = load_prompts("eval")
    records = list(records)[:limit] if limit else list(records)
    reference = str(reference)
    ref_model, tokenizer = load_model(reference, dtype="float32")
    ref_model.eval()
    rm = None
    if reward_model is not None:
        rm = reward_function(reward_model, batch_size=batch_size)
    entries = ([("sft", {"model_dir": reference, "time/total_s": 0.0})] if include_reference else []) + list(results.items())
    prompts = [r["prompt"] for r in records]
    rows = []
    for name, result in entries:
        result = {"model_dir": result} if isinstance(result, (str, Path)) else result
        if not result.get("model_dir"):
            raise ValueError(f"{name}: no trained policy folder (model_dir) in its result; stopped: {result.get('stopped')}")
        same = str(result["model_dir"]) == reference
        policy = ref_model if same else load_model(str(result["model_dir"]), dtype="float32")[0]
        responses, truncated = answer(policy, tokenizer, records, max_new_tokens=max_new_tokens, temperature=1.0,
                                      batch_size=batch_size, seed=seed)
        figures = gold_figures(records, responses, truncated)
        row = {"method": name, "wall_s": result.get("time/total_s"), "gold": figures["gold/mean"],
               "kl": kl_to_reference(policy, ref_model, tokenizer, prompts, responses),
               "length": figures["response/words_mean"], "stop_rate": figures["response/stop_rate"]}
        if rm is not None:
            row["rm"] = float(sum(rm(prompts, responses)) / len(responses))
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows of :func:`compare_methods` as a fixed-width text table."""
    cols = list(rows[0]) if rows else []

    def cell(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.3f}"
        return "-" if v is None else str(v)

    widths = [max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(cell(r.get(c)).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)

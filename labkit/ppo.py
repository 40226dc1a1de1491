"""Stage 3: PPO against the reward model, with a per-token KL penalty to the SFT model.

InstructGPT §3.5: sample a prompt, generate a response with the policy, score it with the RM,
and update the policy with PPO (Schulman et al. 2017). The reward of an episode is the RM
score at the last token minus ``kl_coef * KL(pi_RL || pi_SFT)`` at every token; the value
function is initialised from the RM; PPO-ptx adds ``ptx_coef`` times the language-modelling
loss on other text to limit the "alignment tax".

The file reads top to bottom: pure tensor functions (each tested on its own), the config,
the models, the rollout, the optimisation phase, checkpoints, :func:`ppo_step`, whose phases
are numbered 1-7, and :func:`train_ppo`, the loop around it. Every implementation detail is a named flag of :class:`PPOConfig`;
``docs/implementation_details.md`` lists them with their sources.

Shapes: B episodes (prompt + response), T tokens, Tq query tokens, R response tokens,
V vocabulary, H hidden size.

>>> result = train_ppo(PPOConfig(model="runs/sft/model", reward_model="runs/rm/model", steps=20))
>>> result["objective/rlhf_reward"], result["model_dir"]

Under several processes the same code runs unchanged::

    accelerate launch --config_file configs/accelerate/ddp_cpu.yaml my_ppo_script.py
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from labkit.doctor import hand_back_memory
from labkit.models import autocast, format_prompt, last_index, load_model, pad_rows, position_ids, resolve_device
from labkit.stage import NonFiniteError, defer_interrupt, finish, rng_state, set_rng_state

__all__ = ["logprobs_from_logits", "entropy_from_logits", "masked_mean", "masked_var", "masked_whiten",
           "kl_penalty", "shape_rewards", "leave_one_out", "compute_gae", "policy_loss", "value_loss", "FixedKLController",
           "AdaptiveKLController", "PPOConfig", "PolicyAndValue", "build_models", "Rollout", "rollout",
           "rollout_forward", "ppo_update", "ppo_step", "train_ppo", "DASHBOARD_LAYOUT"]

# ----------------------------------------------------------------------------- pure functions


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(label) from logits (B, T, V) and labels (B, T) -> (B, T), computed in fp32."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)


def response_logits(net: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, R: int) -> torch.Tensor:
    """Logits (B, R, V) that predict the last R columns of (left-padded query + response) rows;
    the unembedding (V = 49k columns on the bundled model) runs on those columns only."""
    return net(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
               use_cache=False, logits_to_keep=R + 1).logits[:, :-1]


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position: (B, T, V) -> (B, T)."""
    logits = logits.float()
    logp = F.log_softmax(logits, dim=-1)  # (B, T, V)
    return -(logp.exp() * logp).sum(-1)  # (B, T)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (over all, or along ``dim``)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions (Bessel-corrected unless ``unbiased=False``)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Standardise ``x`` over masked positions; ``shift_mean=False`` keeps the mean. Padding -> 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs, (B, T) -> (B, T).

    The tokens were sampled from pi, so with ``log_ratio = logprobs - ref_logprobs``:
    ``k1 = log_ratio`` (unbiased, can be negative; InstructGPT / Ziegler et al. 2019),
    ``k3 = exp(-log_ratio) - 1 + log_ratio`` (unbiased and >= 0; Schulman, "Approximating KL
    divergence", 2020), ``abs = |log_ratio|`` and ``mse = log_ratio**2 / 2`` (biased, >= 0).
    """
    log_ratio = logprobs - ref_logprobs  # (B, T)
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    if kind == "abs":
        return log_ratio.abs()
    if kind == "mse":
        return 0.5 * log_ratio.square()
    raise ValueError(f"unknown KL estimator {kind!r}; use 'k1', 'k3', 'abs' or 'mse'")


def shape_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                  mask: torch.Tensor, kl_coef: float, kl_estimator: str = "k1",
                  has_eos: torch.Tensor | None = None, missing_eos_penalty: float = 0.0):
    """Per-token rewards (B, T) and the KL estimate (B, T) of each response token.

    InstructGPT eq. 2: ``r_t = -kl_coef * KL_t`` at every response token, plus the RM score
    (B,) at the last response token. A response that hit the length limit without emitting
    EOS (``has_eos`` False) first has ``missing_eos_penalty`` subtracted from its score
    (Huang et al. 2023/2024: such responses are penalised so the policy learns to stop).
    """
    mask = mask.to(logprobs.dtype)
    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator) * mask  # (B, T)
    rewards = -kl_coef * kl  # (B, T)
    scores = scores.to(rewards.dtype)
    if has_eos is not None and missing_eos_penalty:
        scores = scores - missing_eos_penalty * (~has_eos.bool()).to(rewards.dtype)  # (B,)
    last = last_index(mask)  # (B,)
    rewards = rewards.scatter_add(1, last[:, None], scores[:, None] * mask.amax(1, keepdim=True))
    return rewards, kl


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation (Schulman et al. 2016): (advantages, returns), all (B, T).

    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``, where
    the state after the last masked-in token is terminal (V = 0, A = 0). Masked-out positions
    (left or right padding) take no part and get advantage and return 0.
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask  # (B, T): padding never leaks in
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)  # (B, T)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)  # (B,)
    next_adv = torch.zeros_like(next_value)  # (B,)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # (B,)
        adv = (delta + gamma * lam * next_adv) * mask[:, t]  # (B,)
        advantages[:, t] = adv
        # a padded position passes on nothing: the next real token sees V = A = 0 past the end
        next_value = values[:, t] * mask[:, t]
        next_adv = adv
    returns = (advantages + values) * mask  # (B, T)
    return advantages, returns


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float = 0.2):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) -> (loss, clipfrac, approxkl).

    ``ratio = pi/pi_old``; loss = masked mean of ``max(-A * ratio, -A * clip(ratio, 1-c, 1+c))``.
    ``clipfrac`` is the share of tokens where clipping changed the loss; ``approxkl`` is
    ``mean((log ratio)^2) / 2`` (cleanrl's ``approx_kl``).
    """
    log_ratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)  # (B, T)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approxkl = 0.5 * masked_mean(log_ratio.square(), mask)
    return loss, clipfrac.detach(), approxkl.detach()


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, cliprange_value: float = 0.2):
    """Clipped value loss -> (loss, clipfrac): ``0.5 * mean(max((V-R)^2, (V_clip-R)^2))``.

    ``V_clip = V_old + clip(V - V_old, -c, c)`` keeps the value function near the one that
    computed the advantages (OpenAI baselines' PPO2; Huang et al., "The 37 implementation
    details of PPO", detail 9).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)  # (B, T)
    loss_unclipped = (values - returns).square()  # (B, T)
    loss_clipped = (clipped_values - returns).square()  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    return loss, clipfrac.detach()


class FixedKLController:
    """A constant KL coefficient (InstructGPT used a fixed beta = 0.02)."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController:
    """Ziegler et al. 2019, §2.2: steer the observed KL towards ``target``.

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_steps / horizon)``,
    where ``n_steps`` counts the episodes seen since the last update.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = float(np.clip(current_kl / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


# ----------------------------------------------------------------------------- config


@dataclass
class PPOConfig:
    """Everything :func:`train_ppo` needs. Sizes count episodes (one prompt + one response).

    Defaults keep a run of the bundled 135M model on a 2-core laptop CPU short (8 steps x 8
    episodes x up to 40 tokens; about 20 s a step there); raise ``steps`` and ``batch_size``
    where there is time (``labkit run --preset cpu`` uses 20 steps of 16 episodes).
    """

    # models and data
    model: str = "smollm2-135m"  # the starting policy: SFT model folder (or built-in name); also the frozen reference
    reference: str | None = None  # frozen reference folder; None: the policy's starting weights (later rounds pass the SFT folder)
    reward_model: str | list[str] | None = None  # RewardModel folder (labkit.reward), or several: their mean
    #   score is the reward (labkit.reward.RewardEnsemble) and the value model starts as the first; None: reward_fn
    reward_fn: Callable[[list[str], list[str]], list[float]] | None = field(default=None, repr=False)  # scripted reward(prompts, responses) instead of an RM
    prompts: list | None = field(default=None, repr=False)  # prompt records or strings; None: load_prompts("ppo")
    out_dir: str = "runs/ppo"  # model/ (the final policy), checkpoint/, samples.jsonl and the stage files
    seed: int = 0  # seeds python, numpy and torch (each process adds its rank)
    # episodes and optimisation
    steps: int = 8  # PPO steps (each: rollout of batch_size episodes, then ppo_epochs of updates)
    batch_size: int = 8  # episodes per step, summed over processes
    mini_batch_size: int = 4  # episodes per optimizer step, summed over processes
    micro_batch_size: int = 4  # episodes per forward/backward on one process (gradient accumulation)
    rollout_batch_size: int | None = None  # episodes per generate() call and at most per no-grad forward
    #   (reference, value model, RM) on one process; None: all of them at once, the forwards in groups of
    #   similar length (fastest; lower it if memory runs short)
    ppo_epochs: int = 1  # passes over each batch of episodes
    learning_rate: float = 3e-5  # AdamW, policy and value function (135M on CPU: 1e-5 barely moved the policy in 8 steps)
    adam_eps: float = 1e-5  # AdamW epsilon (cleanrl PPO default; not 1e-8)
    max_grad_norm: float = 1.0  # clip the global gradient norm to this
    # generation
    max_prompt_length: int = 256  # longer prompts lose tokens from the left (counted and reported)
    max_new_tokens: int = 40  # response length limit
    temperature: float = 0.7  # sampling temperature; logits are divided by it in every log-prob too
    # rewards
    kl_coef: float = 0.05  # beta in r_t = -beta * KL_t (InstructGPT: 0.02)
    kl_estimator: str = "k1"  # per-token KL estimate: k1, k3, abs, mse (see kl_penalty)
    adaptive_kl: bool = False  # adapt kl_coef towards target_kl (Ziegler et al. 2019)
    target_kl: float = 6.0  # adaptive controller's target KL per episode (nats)
    kl_horizon: int = 10000  # adaptive controller's horizon (episodes)
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response without EOS; 0 = off
    whiten_scores: bool = False  # standardise the RM scores over each batch before shaping
    # Episodes per prompt in a step. Above 1, each score has the mean score of its prompt's other
    # episodes subtracted (a leave-one-out baseline, as in RLOO) before shaping, so how hard a
    # prompt is leaves the advantages: on the bundled model's held-out samples, differences
    # between prompts make about half of the RM scores' variance.
    group_size: int = 1
    # Pay each answer the chance that it beats the reference model's greedy answer to the same
    # prompt, read from the two scores as Bradley-Terry does: 4 * (sigmoid(s - s_ref) - 1/2), so a
    # small difference pays as the raw score would and a large one is capped at +-2. The mean of
    # raw scores can rise through a few large gains over many small losses; this counts
    # prompts won (docs/quality_ablations.md). The reference answers are made and scored once per
    # prompt, when the prompt first comes up.
    win_reward: bool = False
    whiten_rewards: bool = False  # standardise the shaped per-token rewards before GAE (scale only)
    # advantages and losses
    gamma: float = 1.0  # discount (1: an episode is one short response)
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = True  # standardise advantages over each batch (shift and scale)
    cliprange: float = 0.2  # PPO ratio clip epsilon
    cliprange_value: float = 0.2  # value clip around the rollout-time values
    # Steps at the start that train the value model alone (policy frozen, value loss unclipped;
    # with share_backbone only the value head); they count in `steps`. The value model starts
    # as the RM, whose outputs before the last token were never trained: on the bundled model
    # they run from about -4.5 at the prompt's end to the score at EOS without predicting it,
    # and with the 0.2 value clip they take ~10 steps to settle while their advantages move the policy.
    value_warmup_steps: int = 0
    value_warmup_epochs: int = 4  # passes over each warm-up step's episodes
    vf_coef: float = 0.1  # weight of the value loss
    ptx_coef: float = 0.0  # PPO-ptx: weight of the LM loss on ptx_texts (InstructGPT: 27.8)
    ptx_texts: list[str | dict] | None = field(default=None, repr=False)  # LM texts, or demonstration records
    #   ({"prompt", "response"}: formatted as the policy sees them, EOS appended); None: the SFT demonstrations
    ptx_max_length: int = 256  # ptx texts are cut to this many tokens
    ptx_batch_size: int | None = None  # ptx texts beside each micro-batch of episodes; None = micro_batch_size
    # False: a demonstration record's LM loss covers its response and EOS only, as the SFT stage's
    # (completion_only_loss); plain strings are LM texts and keep the loss on every token
    ptx_prompt_loss: bool = True
    # variants
    share_backbone: bool = False  # value head on the policy's backbone instead of a separate model
    use_lora: bool = False  # train LoRA adapters; the reference is the same model, adapters off
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling numerator
    ema_decay: float | None = None  # keep an EMA of the policy weights and save it; None = off
    bf16: bool = True  # compute under bf16 autocast where the hardware is fast (fp32 master weights)
    # logging and checkpoints
    gold_every: int = 2  # log objective/gold (GoldLabeler) every N steps; 0 = never
    sample_every: int = 2  # print and save sample responses every N steps; 0 = never
    save_every: int = 4  # write output_dir/checkpoint every N steps; 0 = only at the end
    resume: bool = False  # continue from output_dir/checkpoint if it exists
    dashboard: bool = True  # live plotly dashboard in notebooks (always recorded; saved as dashboard.html)
    progress: bool = True  # progress bar over steps

    def __post_init__(self):
        if self.reward_model is None and self.reward_fn is None:
            raise ValueError("PPOConfig needs a reward_model folder or a reward_fn")
        if isinstance(self.reward_model, (list, tuple)) and not self.reward_model:
            raise ValueError("reward_model is an empty list; give one RewardModel folder or several")
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of mini_batch_size={self.mini_batch_size}")
        if self.mini_batch_size % self.micro_batch_size:
            raise ValueError(f"mini_batch_size={self.mini_batch_size} must be a multiple of "
                             f"micro_batch_size={self.micro_batch_size}")
        if self.kl_estimator not in ("k1", "k3", "abs", "mse"):
            raise ValueError(f"unknown kl_estimator {self.kl_estimator!r}")
        if not (self.temperature > 0 and self.steps >= 1 and self.ppo_epochs >= 1 and self.max_new_tokens >= 1):
            raise ValueError("need temperature > 0, steps >= 1, ppo_epochs >= 1, max_new_tokens >= 1")
        if self.group_size < 1 or self.batch_size % self.group_size:
            raise ValueError(f"group_size={self.group_size} must be >= 1 and divide batch_size={self.batch_size}")
        if not 0 <= self.value_warmup_steps < self.steps or self.value_warmup_epochs < 1:
            raise ValueError(f"value_warmup_steps must lie in [0, steps={self.steps}) and value_warmup_epochs be >= 1")
        if self.rollout_batch_size is not None and self.rollout_batch_size < 1:
            raise ValueError("rollout_batch_size must be >= 1 (or None: the whole batch at once)")
        if self.ptx_batch_size is not None and self.ptx_batch_size < 1:
            raise ValueError("ptx_batch_size must be >= 1 (or None: micro_batch_size)")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError("ema_decay must lie in (0, 1)")
        if self.use_lora and self.reference not in (None, self.model):
            raise ValueError("with use_lora the reference is the policy with its adapters off; "
                             "a separate reference folder needs use_lora=False")

    @property
    def num_mini_batches(self) -> int:
        return self.batch_size // self.mini_batch_size

    def rollout_chunk(self, n: int) -> int:
        """Episodes per generate() call or no-grad forward when ``n`` are on this process."""
        return self.rollout_batch_size or n


# ----------------------------------------------------------------------------- models


class PolicyAndValue(nn.Module):
    """The trained parameters in one module (one optimizer, one DDP wrapper).

    ``value_model`` is a separate :class:`labkit.reward.RewardModel` (InstructGPT: value
    function initialised from the RM); with ``value_model=None`` a scalar ``value_head`` reads
    the policy's own last hidden state, so one forward gives logits and values.
    """

    def __init__(self, policy: nn.Module, value_model: nn.Module | None, value_head: nn.Linear | None = None):
        super().__init__()
        self.policy, self.value_model, self.value_head = policy, value_model, value_head
        self.policy_frozen = False  # value warm-up: the policy computes without a graph (no backward through it)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int | None):
        """Logits (B, R, V) predicting the last R tokens and values (B, R) before each of them.

        ``n_response=None``: logits (B, T, V) of the whole sequence, for the PPO-ptx LM loss.
        """
        positions = position_ids(attention_mask)  # (B, T): left padding
        if n_response is None:
            return self.policy(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=positions, use_cache=False).logits  # (B, T, V)
        R = n_response
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.policy_frozen):
            if self.value_model is not None:
                logits = response_logits(self.policy, input_ids, attention_mask, R)
            else:
                hidden = self._response_hidden(input_ids, attention_mask, positions, R)  # (B, R, H)
                logits = self.policy.get_output_embeddings()(hidden)
        if self.value_model is not None:
            return logits, self.values(input_ids, attention_mask, R)
        return logits, self._head_values(hidden)  # frozen: only the head gets a gradient

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int) -> torch.Tensor:
        """Values (B, R) before each of the last R tokens, without the policy's unembedding."""
        R = n_response
        if self.value_model is not None:
            return self.value_model.token_values(input_ids, attention_mask)[:, -R - 1:-1]  # (B, R)
        hidden = self._response_hidden(input_ids, attention_mask, position_ids(attention_mask), R)
        return self._head_values(hidden)

    def _response_hidden(self, input_ids, attention_mask, positions, R: int) -> torch.Tensor:
        """The policy's last hidden states (B, R, H) at the positions that predict the response."""
        hidden = self.policy.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=positions, use_cache=False).last_hidden_state
        return hidden[:, -R - 1:-1]

    def _head_values(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # values in fp32, as the RM's head
            return F.linear(hidden.float(), self.value_head.weight.float()).squeeze(-1)  # (B, R)


def build_models(config: PPOConfig, device: torch.device):
    """(PolicyAndValue, reference or None, reward model or None, tokenizer, RM tokenizer)."""
    from labkit.reward import RewardModel, load_reward_models

    policy, tokenizer = load_model(config.model, dtype="float32", device=device, seed=config.seed)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    # scripted reward, separate value model: a copy of the SFT backbone (taken before LoRA)
    value_source = copy.deepcopy(policy) if config.reward_model is None and not config.share_backbone else None
    reference = None
    if config.use_lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM")
        policy = get_peft_model(policy, lora)  # reference = this model with adapters disabled
    elif config.reference is not None and config.reference != config.model:
        # iterated rounds (InstructGPT §3.1): the policy starts from the last PPO policy while
        # the KL penalty keeps pointing at the SFT model
        reference, _ = load_model(config.reference, dtype="float32", device=device, seed=config.seed)
        reference.requires_grad_(False).eval()
    else:  # a frozen copy of the SFT weights (a copy is faster than loading them again)
        reference = copy.deepcopy(policy).requires_grad_(False).eval()

    reward_model = rm_tokenizer = first_rm = None
    if config.reward_model is not None:  # one RM, or several whose mean score is the reward
        reward_model, rm_tokenizer, members = load_reward_models(config.reward_model, dtype="float32", device=device)
        first_rm = members[0]

    value_model = value_head = None
    hidden_size = policy.config.hidden_size
    if config.share_backbone:
        value_head = nn.Linear(hidden_size, 1, bias=False).to(device)
        if first_rm is not None:
            value_head.weight.data.copy_(first_rm.head.weight.data)
        else:  # a scripted reward has no RM to start from: values start at 0
            nn.init.zeros_(value_head.weight)
    elif config.reward_model is not None:
        value_model = copy.deepcopy(first_rm).requires_grad_(True)  # InstructGPT §3.5: V starts as the RM
    else:  # scripted reward: value model = a second copy of the policy's backbone, zero head
        value_model = RewardModel.from_causal_lm(value_source)
        # A random head would start with values of arbitrary scale, and their errors would
        # swamp the advantages of the first steps; a zero head starts as "no idea" (V = 0).
        nn.init.zeros_(value_model.head.weight)
    model = PolicyAndValue(policy, value_model, value_head)
    model.eval()  # dropout off in policy and value (Huang et al. 2023); no layer here needs train()
    return model, reference, reward_model, tokenizer, rm_tokenizer


# ----------------------------------------------------------------------------- rollout


@dataclass
class Rollout:
    """One step's episodes on this process: B prompts, each with one sampled response of up to R tokens."""

    prompts: list[str]  # B raw user prompts
    texts: list[str]  # B decoded responses
    input_ids: torch.Tensor  # (B, Tq + R): left-padded query, then the response (padding after its EOS)
    attention_mask: torch.Tensor  # (B, Tq + R)
    responses: torch.Tensor  # (B, R): response tokens up to and including the first EOS
    response_mask: torch.Tensor  # (B, R): 1 on response tokens
    logprobs: torch.Tensor  # (B, R): log pi_old of each token, from the logits it was sampled from (fp32)
    entropy: torch.Tensor  # (B, R): entropy of those sampling distributions
    has_eos: torch.Tensor  # (B,) bool: the response stopped on its own
    n_truncated_prompts: int  # prompts cut to max_prompt_length
    ref_logprobs: torch.Tensor | None = None  # (B, R): log pi_SFT, set by rollout_forward
    values: torch.Tensor | None = None  # (B, R): V before each token, set by rollout_forward


def _prompt_text(record) -> str:
    return record if isinstance(record, str) else record["prompt"]


def leave_one_out(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``scores`` (B,) of consecutive groups of ``group_size`` episodes of one prompt, each minus
    the mean of the other episodes of its group."""
    s = scores.view(-1, group_size)  # (B / g, g)
    return (s - (s.sum(1, keepdim=True) - s) / (group_size - 1)).view(-1)


def _step_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Prompt indices of ``step``: a fresh permutation of the n prompts per pass over them."""
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, j = divmod(i, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[j]))
    return out


def _encode_queries(tokenizer, prompts: list[str], config: PPOConfig, device: torch.device):
    """Chat-formatted ``prompts``, left-padded -> (queries (B, Tq), mask (B, Tq), prompts cut)."""
    from labkit.generation import encode_prompts

    ids, n_cut = encode_prompts(tokenizer, prompts, config.max_prompt_length)
    queries, mask = (x.to(device) for x in pad_rows(ids, tokenizer.pad_token_id, side="left"))
    return queries, mask, n_cut


def _sample_in_chunks(model: nn.Module, tokenizer, queries: torch.Tensor, mask: torch.Tensor, config: PPOConfig,
                      do_sample: bool = True) -> list[tuple]:
    """labkit's sampler over ``rollout_chunk`` rows at a time: (responses (g, r), log-probs, entropy)
    per chunk, pad and 0 after a row's EOS; greedy (``do_sample=False``) skips the log-probs.
    Few, large calls: on a CPU a decoding step costs about as much for 8 rows as for 4."""
    from labkit.generation import sample_tokens

    size = config.rollout_chunk(len(queries))
    return [sample_tokens(model, queries[s:s + size], mask[s:s + size], config.max_new_tokens,
                          temperature=config.temperature, top_p=1.0, do_sample=do_sample,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                          bf16=config.bf16, return_logprobs=do_sample)
            for s in range(0, len(queries), size)]


@torch.no_grad()
def rollout(model: PolicyAndValue, tokenizer, prompts: list[str], config: PPOConfig, device: torch.device) -> Rollout:
    """Sample one response per prompt with labkit's KV-cached sampler (left-padded, no grad).

    Plain sampling at ``config.temperature`` (no top-p/top-k), so the log-probs the sampler
    returns, of the distribution each token was drawn from, are the behaviour policy's "old"
    log-probs of the PPO ratio, without a second forward pass over the episode.
    """
    queries, query_mask, n_cut = _encode_queries(tokenizer, prompts, config, device)  # (B, Tq)
    chunks, logprobs, entropy = zip(*_sample_in_chunks(model.policy, tokenizer, queries, query_mask, config))
    R = max(c.shape[1] for c in chunks)

    def pad(xs, value):  # chunks (g, r) -> (B, R)
        return torch.cat([F.pad(x, (0, R - x.shape[1]), value=value) for x in xs])

    responses = pad(chunks, tokenizer.pad_token_id)  # (B, R)
    # The response runs up to and including the first EOS; anything after it is padding.
    is_eos = responses == tokenizer.eos_token_id  # (B, R)
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # (B, R): strictly after the first EOS
    response_mask = (~after_eos).long()  # (B, R)
    responses = responses.masked_fill(after_eos, tokenizer.pad_token_id)
    return Rollout(prompts=prompts, texts=tokenizer.batch_decode(responses, skip_special_tokens=True),
                   input_ids=torch.cat([queries, responses], 1), attention_mask=torch.cat([query_mask, response_mask], 1),
                   responses=responses, response_mask=response_mask,
                   logprobs=pad(logprobs, 0.0), entropy=pad(entropy, 0.0),  # (B, R): masked later
                   has_eos=is_eos.any(1), n_truncated_prompts=n_cut)


@torch.no_grad()
def rollout_forward(model: PolicyAndValue, reference: nn.Module | None, batch: Rollout, config: PPOConfig) -> Rollout:
    """Fill in ``values`` and ``ref_logprobs`` (B, R) of the sampled responses: one forward per model.

    The policy's own log-probs came with generation; a shared backbone still runs the policy's
    decoder (its values read the policy's hidden states), a separate value model runs alone.
    Episodes go through in groups of similar length (:func:`labkit.generation.prefill_groups`,
    at most ``rollout_chunk`` a group), each as whole sequences without padding inside
    (:func:`_packed_rows`). On a step of the cpu preset (16 episodes, 1,470 tokens) that is
    1,560 columns per model, where one batch with the rollout's padding took 3,568.
    """
    from labkit.generation import prefill_groups

    B, R = batch.responses.shape
    device = batch.responses.device
    values, ref_logprobs = (torch.zeros(B, R, device=device) for _ in range(2))  # zeros past every response
    lengths = batch.attention_mask.sum(1).tolist()
    size = config.rollout_chunk(B)
    for group, _ in prefill_groups(lengths):
        for s in range(0, len(group), size):
            idx = torch.tensor(group[s:s + size], device=device)
            ids, am, r, shift = _packed_rows(batch, idx)
            with autocast(device, enabled=config.bf16):
                v = model.values(ids, am, r).float()  # (b, r), right-aligned
                lp = _reference_logprobs(model, reference, ids, am, ids[:, -r:], r, config.temperature)
            values[idx, :r], ref_logprobs[idx, :r] = _left_align(v, shift), _left_align(lp, shift)
    values *= batch.response_mask
    ref_logprobs *= batch.response_mask
    batch.values, batch.ref_logprobs = values, ref_logprobs  # (B, R)
    return batch


def _packed_rows(batch: Rollout, idx: torch.Tensor):
    """Rows ``idx`` as whole sequences, prompt then response with no padding between them,
    left-padded to the longest row -> (input_ids (b, W), attention_mask (b, W), r, shift).

    A rollout keeps prompts left-padded and responses right-padded (padding after EOS), so a
    long prompt with a short answer leaves padding in the middle of the rows it is batched with;
    here every row's real tokens end at the last column, and the model computes the longest
    row's W tokens, not the longest prompt plus the longest response. The last ``r`` columns
    hold every row's response, right-aligned: response token j of row i is at index
    ``shift[i] + j`` among them (:func:`_left_align` turns (b, r) results back). Masked
    padding and positions counted over real tokens make this exact.
    """
    am = batch.attention_mask[idx]  # (b, Tq + R)
    order = torch.sort(am, dim=1, stable=True).indices  # padding first, then the real tokens in order
    W = int(am.sum(1).max())
    n_response = batch.response_mask[idx].sum(1)  # (b,)
    r = max(int(n_response.max()), 1)
    return batch.input_ids[idx].gather(1, order)[:, -W:], am.gather(1, order)[:, -W:], r, r - n_response


def _left_align(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(b, r) per-token results of :func:`_packed_rows`' right-aligned responses -> response
    token j of each row at column j, as the rollout keeps them (past a response: filler)."""
    r = x.shape[1]
    cols = (shift[:, None] + torch.arange(r, device=x.device)).clamp(max=r - 1)  # (b, r)
    return x.gather(1, cols)


@contextlib.contextmanager
def _reference_net(model: PolicyAndValue, reference: nn.Module | None):
    """The reference (SFT) network: the frozen copy, or (LoRA) the policy with its adapters off."""
    if reference is not None:
        yield reference
    else:
        with model.policy.disable_adapter():
            yield model.policy


def _reference_logprobs(model: PolicyAndValue, reference, input_ids, attention_mask, responses, R, temperature):
    """log pi_SFT of the response tokens (B, R)."""
    with _reference_net(model, reference) as net:
        logits = response_logits(net, input_ids, attention_mask, R)
    return logprobs_from_logits(logits.float() / temperature, responses)


def _score_responses(prompts: list[str], texts: list[str], reward_model, rm_tokenizer, reward_fn, config,
                     device: torch.device) -> torch.Tensor:
    """Scores (B,) from the RM (read at the EOS after the response) or the scripted reward_fn."""
    if reward_fn is not None:
        scores = reward_fn(prompts, texts)
    else:
        scores = reward_model.score(rm_tokenizer, prompts, texts, batch_size=config.rollout_chunk(len(texts)),
                                    progress=False)
    return torch.tensor([float(s) for s in scores], dtype=torch.float32, device=device)


def win_reward(scores: torch.Tensor, ref_scores: torch.Tensor) -> torch.Tensor:
    """4 * (sigmoid(s - s_ref) - 1/2) = 2 tanh((s - s_ref) / 2): the Bradley-Terry chance that an
    answer beats the reference answer, centred and scaled to slope 1 at a tie."""
    return 2 * torch.tanh((scores - ref_scores) / 2)


@torch.no_grad()
def _reference_scores(run: _Run, prompts: list[str], config: PPOConfig) -> torch.Tensor:
    """Scores (B,) of the reference (SFT) model's greedy answers to ``prompts``, each prompt's
    answer made and scored once (``run.ref_answers`` keeps them)."""
    device = run.accelerator.device
    new = list(dict.fromkeys(p for p in prompts if p not in run.ref_answers))
    if new:
        queries, mask, _ = _encode_queries(run.tokenizer, new, config, device)
        with _reference_net(run.model, run.reference) as net:
            chunks = _sample_in_chunks(net, run.tokenizer, queries, mask, config, do_sample=False)
        texts = [t for resp, _, _ in chunks for t in run.tokenizer.batch_decode(resp, skip_special_tokens=True)]
        scores = _score_responses(new, texts, run.reward_model, run.rm_tokenizer, config.reward_fn, config, device)
        run.ref_answers.update({p: (t, float(x)) for p, t, x in zip(new, texts, scores.tolist())})
    return torch.tensor([run.ref_answers[p][1] for p in prompts], dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------- optimisation


def ppo_update(ddp_model, model: PolicyAndValue, optimizer, accelerator, batch: Rollout, advantages, returns,
               config: PPOConfig, ptx_batches: list | None, ema: dict | None, value_only: bool = False):
    """``ppo_epochs`` passes over the batch in shuffled minibatches; returns mean statistics.

    ``value_only`` (the value warm-up): the value loss unclipped, the policy left as it is."""
    device = advantages.device
    B = advantages.shape[0]  # episodes on this process
    mini = config.mini_batch_size // accelerator.num_processes
    micro = config.micro_batch_size
    n_micro = mini // micro  # gradient accumulation steps
    lengths = batch.attention_mask.sum(1)  # (B,) prompt + response tokens
    params = [p for p in ddp_model.parameters() if p.requires_grad]
    stats = {k: [] for k in ("loss/policy", "loss/value", "loss/ptx", "policy/clipfrac", "policy/approxkl",
                             "val/clipfrac")}
    ptx_i = 0
    cliprange_value = float("inf") if value_only else config.cliprange_value
    model.policy_frozen = value_only
    for epoch in range(config.value_warmup_epochs if value_only else config.ppo_epochs):
        order = torch.randperm(B, device=device)
        for start in range(0, B, mini):
            optimizer.zero_grad(set_to_none=True)
            # Episodes of similar length share a micro-batch (less padding to compute on). The
            # losses are token means over the whole minibatch, so how the minibatch is split
            # into micro-batches does not change the gradient.
            minibatch = order[start:start + mini]
            minibatch = minibatch[torch.argsort(lengths[minibatch], stable=True)]
            n_tokens = batch.response_mask[minibatch].sum().clamp(min=1)
            for m in range(n_micro):
                idx = minibatch[m * micro:(m + 1) * micro]
                ids, am, r, shift = _packed_rows(batch, idx)
                mask = batch.response_mask[idx, :r]  # (b, r)
                with autocast(device, enabled=config.bf16):
                    logits, values = ddp_model(ids, am, r)  # (b, r, V), (b, r): right-aligned
                    logprobs = logprobs_from_logits(logits.float() / config.temperature, ids[:, -r:])
                logprobs, values = _left_align(logprobs, shift), _left_align(values, shift)
                pg_loss, pg_clipfrac, approxkl = policy_loss(logprobs, batch.logprobs[idx, :r],
                                                             advantages[idx, :r], mask, config.cliprange)
                vf_loss, vf_clipfrac = value_loss(values.float(), batch.values[idx, :r], returns[idx, :r], mask,
                                                  cliprange_value)
                loss = config.vf_coef * vf_loss if value_only else pg_loss + config.vf_coef * vf_loss
                _check_finite(accelerator, loss, "PPO loss")
                accelerator.backward(loss * (mask.sum() / n_tokens))  # this micro-batch's share of the tokens
                ptx_loss = torch.zeros((), device=device)
                if config.ptx_coef > 0 and not value_only:  # PPO-ptx (InstructGPT eq. 2): a separate forward/backward
                    ids, am, in_loss = (x.to(device) for x in ptx_batches[ptx_i % len(ptx_batches)])
                    ptx_i += 1
                    with autocast(device, enabled=config.bf16):
                        ptx_logits = ddp_model(ids, am, None)  # (b, T, V)
                    ptx_loss = masked_mean(-logprobs_from_logits(ptx_logits[:, :-1], ids[:, 1:]), in_loss[:, 1:])
                    _check_finite(accelerator, ptx_loss, "PPO-ptx loss")
                    accelerator.backward(config.ptx_coef * ptx_loss / n_micro)
                for k, v in zip(stats, (pg_loss, vf_loss, ptx_loss, pg_clipfrac, approxkl, vf_clipfrac)):
                    stats[k].append(float(v.detach()))
            grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
            _check_finite(accelerator, torch.as_tensor(grad_norm), "gradient norm")
            optimizer.step()
            if ema is not None and not value_only:
                _update_ema(ema, model.policy, config.ema_decay)
    optimizer.zero_grad(set_to_none=True)
    model.policy_frozen = False
    return {k: float(np.mean(v)) for k, v in stats.items()}


def _check_finite(accelerator, value: torch.Tensor, what: str) -> None:
    bad = torch.tensor(0.0 if torch.isfinite(value).all() else 1.0, device=value.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    if bad > 0:
        raise NonFiniteError(f"{what} is not finite")


def _trainable_policy_params(policy: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in policy.named_parameters() if p.requires_grad}


def _update_ema(ema: dict, policy: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights, after every optimizer step."""
    with torch.no_grad():
        for name, p in _trainable_policy_params(policy).items():
            ema[name].mul_(decay).add_(p.detach(), alpha=1.0 - decay)


def _ptx_micro_batches(texts: list[tuple[str, str]], config: PPOConfig, tokenizer, step: int) -> list:
    """Right-padded (input_ids, attention_mask, loss_mask) micro-batches of ptx texts for one step.

    A text is (prompt, completion), tokenized apart as generation sees them; ``loss_mask`` covers
    every real token, or only the completion's with ``ptx_prompt_loss=False``."""
    n = config.batch_size // config.micro_batch_size * config.ppo_epochs
    size = config.ptx_batch_size or config.micro_batch_size
    rng = np.random.default_rng([config.seed, 7, step])
    chosen = [texts[i] for i in rng.integers(0, len(texts), n * size)]
    out = []
    for s in range(0, len(chosen), size):
        rows, masks = [], []
        for prompt, completion in chosen[s:s + size]:
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
            c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
            ids = (p_ids + c_ids)[:config.ptx_max_length]  # cut on the right
            in_loss = [int(config.ptx_prompt_loss)] * len(p_ids) + [1] * len(c_ids)
            rows.append(ids)
            masks.append(in_loss[:len(ids)])
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        am = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        loss_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks])
        out.append((ids, am, loss_mask))
    return out


def _ptx_texts(tokenizer, texts: list[str | dict] | None) -> list[tuple[str, str]]:
    """PPO-ptx texts as the model sees them, as (prompt, completion): a string is ("", string), a
    demonstration record (formatted prompt, response + EOS); None: the SFT demonstrations."""
    if texts is None:
        from labkit.data import load_demonstrations

        texts = load_demonstrations()
    return [("", t) if isinstance(t, str) else (format_prompt(tokenizer, t["prompt"]), t["response"] + tokenizer.eos_token)
            for t in texts]


# ----------------------------------------------------------------------------- checkpoints


def _save_checkpoint(path: Path, accelerator, model: PolicyAndValue, optimizer, step: int, kl_ctl,
                    ema: dict | None, history: list, rng: dict) -> None:
    """Weights, optimizer, EMA, KL controller, metrics so far and every process's RNG states."""
    from safetensors.torch import save_file, save_model

    tmp = path.with_name(path.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng, tmp / f"rng_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "kl_ctl": kl_ctl.state_dict(),
                                                    "world_size": accelerator.num_processes,
                                                    "history": history}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # swap in the new checkpoint; the old one goes last
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _load_checkpoint(path: Path, accelerator, model: PolicyAndValue, optimizer, kl_ctl, ema: dict | None):
    """Restore what :func:`_save_checkpoint` wrote; returns (step, history, rng state of this process)."""
    from safetensors.torch import load_file, load_model as load_safetensors

    if not path.exists() and path.with_name(path.name + ".old").exists():
        path = path.with_name(path.name + ".old")  # a crash between the two renames
    state = json.loads((path / "state.json").read_text())
    if state["world_size"] != accelerator.num_processes:
        raise ValueError(f"checkpoint {path} was written by {state['world_size']} processes; "
                         f"resume with the same number (now {accelerator.num_processes})")
    load_safetensors(model, str(path / "model.safetensors"), device=str(accelerator.device))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location=accelerator.device))
    if ema is not None:
        for k, v in load_file(str(path / "ema.safetensors"), device=str(accelerator.device)).items():
            ema[k].copy_(v)
    kl_ctl.load_state_dict(state["kl_ctl"])
    rng = torch.load(path / f"rng_{accelerator.process_index}.pt", weights_only=True)
    return state["step"], state["history"], rng


def _save_policy(path: Path, model: PolicyAndValue, tokenizer, ema: dict | None) -> str:
    """The final policy as a folder ``load_model(path)`` reads (EMA weights if kept, LoRA merged)."""
    policy = model.policy
    if ema is not None:
        with torch.no_grad():
            for name, p in _trainable_policy_params(policy).items():
                p.copy_(ema[name])
    if hasattr(policy, "merge_and_unload"):
        policy = policy.merge_and_unload()
    policy.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


# ----------------------------------------------------------------------------- training


def _reduce_mean(accelerator, values: dict[str, float]) -> dict[str, float]:
    """Average scalar statistics over processes (every process holds the same number of episodes)."""
    if accelerator.num_processes == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=accelerator.device)
    t = accelerator.reduce(t, "mean")
    return dict(zip(values, t.tolist()))


def _step_metrics(batch: Rollout, scores, kl, rlhf_reward, train_stats: dict, gold, records: list) -> dict:
    """This process's statistics of one step (cleanrl / TRL metric names)."""
    mask = batch.response_mask  # (B, R)
    local = {
        "objective/kl": float(kl.sum(1).mean()),  # per-episode sum of the per-token estimate
        "objective/entropy": float((batch.entropy * mask).sum(1).mean()),
        "objective/rlhf_reward": float(rlhf_reward.mean()),  # score - EOS penalty - kl_coef * KL
        "objective/scores": float(scores.mean()),
        "val/mean": float(masked_mean(batch.values, mask)),
        "response/length": float(mask.sum(1).float().mean()),
        "response/eos_rate": float(batch.has_eos.float().mean()),
        "prompts/truncated": float(batch.n_truncated_prompts),
        **train_stats,
    }
    if gold is not None:  # the gold scorer needs prompt records; a bare string has no checks
        local["objective/gold"] = float(np.mean([
            gold.score(r if isinstance(r, dict) else {"prompt": r}, text, truncated=not eos)
            for r, text, eos in zip(records, batch.texts, batch.has_eos.tolist())]))
    return local


# The live plot's panels: the quantities of one kind share an axis (history.json keeps every metric).
DASHBOARD_LAYOUT = {
    "reward-model score": ["objective/scores", "objective/rlhf_reward"],
    "gold score (training prompts)": ["objective/gold"],
    "chance of beating the reference's answer (win_reward)": ["objective/win"],
    "KL to the reference (nats / episode)": ["objective/kl"],
    "entropy (nats / episode)": ["objective/entropy"],
    "response length (tokens)": ["response/length"],
    "share of responses that stop": ["response/eos_rate"],
    "losses": ["loss/policy", "loss/value", "loss/ptx"],
    "clipping and approx. KL of an update": ["policy/clipfrac", "val/clipfrac", "policy/approxkl"],
    "episodes / s": ["time/episodes_per_s"],
}


@dataclass
class _Run:
    """What :func:`train_ppo` sets up once: the process group, the models, the optimizer, the data."""

    accelerator: object
    model: PolicyAndValue  # the trained parameters (policy + value function)
    ddp_model: nn.Module  # the same, wrapped for several processes
    optimizer: torch.optim.Optimizer
    reference: nn.Module | None  # frozen SFT model (None with LoRA: adapters off)
    reward_model: nn.Module | None
    tokenizer: object
    rm_tokenizer: object
    kl_ctl: FixedKLController | AdaptiveKLController
    ema: dict | None  # EMA of the policy weights, when config.ema_decay is set
    records: list  # PPO prompt records (or strings)
    ptx_texts: list[tuple[str, str]] | None  # PPO-ptx language-modelling texts as (prompt, completion)
    gold: object  # GoldLabeler for objective/gold, or None
    ref_answers: dict = field(default_factory=dict)  # win_reward: prompt -> (reference's greedy answer, its score)


def _set_up(config: PPOConfig) -> _Run:
    """Processes, seeds, models, optimizer (fused AdamW), KL controller, EMA, prompts, ptx texts."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # PPO-ptx's forward and the value warm-up's leave parameters without a gradient
    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=config.ptx_coef > 0 or config.value_warmup_steps > 0)
    # cpu=True on machines without a GPU: accelerate then joins CPU processes with gloo
    accelerator = Accelerator(cpu=resolve_device("auto").type == "cpu", kwargs_handlers=[ddp_kwargs])
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if config.batch_size % world or (config.mini_batch_size // world) % config.micro_batch_size:
        raise ValueError(f"with {world} processes, batch_size and mini_batch_size must split into "
                         f"equal per-process parts that are multiples of micro_batch_size={config.micro_batch_size}")
    if (config.batch_size // config.group_size) % world:
        raise ValueError(f"with {world} processes, the batch's {config.batch_size // config.group_size} prompt groups "
                         "must split evenly between them")
    if accelerator.distributed_type == "DEEPSPEED" and (
            config.mini_batch_size // world != config.micro_batch_size or config.ptx_coef > 0):
        # accelerate steps a DeepSpeed engine inside backward(), so every backward is an update
        raise ValueError("under DeepSpeed use micro_batch_size = mini_batch_size / processes and ptx_coef = 0")
    random.seed(config.seed + rank)
    np.random.seed(config.seed + rank)
    torch.manual_seed(config.seed + rank)

    model, reference, reward_model, tokenizer, rm_tokenizer = build_models(config, device)
    # fused AdamW: one kernel per step instead of several per tensor (see docs/implementation_details.md)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                  eps=config.adam_eps, weight_decay=0.0, fused=device.type in ("cpu", "cuda"))
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    kl_ctl = (AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon) if config.adaptive_kl
              else FixedKLController(config.kl_coef))
    ema = ({k: v.detach().clone() for k, v in _trainable_policy_params(model.policy).items()}
           if config.ema_decay is not None else None)

    records = config.prompts
    if records is None:
        from labkit.data import load_prompts

        records = load_prompts("ppo")
    ptx_texts = _ptx_texts(tokenizer, config.ptx_texts) if config.ptx_coef > 0 else None  # read only with ptx on
    gold = None
    if config.gold_every:
        from labkit.labelers import GoldLabeler

        gold = GoldLabeler()
    return _Run(accelerator, model, ddp_model, optimizer, reference, reward_model, tokenizer, rm_tokenizer,
                kl_ctl, ema, records, ptx_texts, gold)


def ppo_step(run: _Run, config: PPOConfig, step: int) -> tuple[dict, Rollout, torch.Tensor, bool]:
    """One PPO step, phases 1-7; returns (metrics averaged over processes, the rollout, its scores,
    whether a Ctrl-C arrived during the update).

    A Ctrl-C in phases 1-3 raises ``KeyboardInterrupt`` (nothing was updated yet); from phase 4 on
    it is held, the step completes, and the flag tells the caller to stop after it.
    """
    acc, world = run.accelerator, run.accelerator.num_processes
    t_step = time.perf_counter()
    g = config.group_size  # a prompt's episodes stay together on one process
    groups = _step_indices(step, config.batch_size // g, len(run.records), config.seed)[acc.process_index::world]
    idx = [i for i in groups for _ in range(g)]
    step_records = [run.records[i] for i in idx]

    # 1. rollout: sample one response per episode, group_size episodes a prompt (KV-cached, left-padded, plain sampling)
    batch = rollout(run.model, run.tokenizer, [_prompt_text(r) for r in step_records], config, acc.device)
    t_generate = time.perf_counter() - t_step

    # 2. score: RM (or scripted reward) on the decoded text
    t0 = time.perf_counter()
    scores = _score_responses(batch.prompts, batch.texts, run.reward_model, run.rm_tokenizer, config.reward_fn, config,
                              acc.device)  # (B,)
    _check_finite(acc, scores, "reward score")
    wins = None
    if config.win_reward:  # the same scorer on the reference's greedy answer to each prompt
        wins = win_reward(scores, _reference_scores(run, batch.prompts, config))
    t_score = time.perf_counter() - t0

    # 3. ref_logprobs and values: one forward of the reference and of the value model
    t0 = time.perf_counter()
    rollout_forward(run.model, run.reference, batch, config)
    t_forward = time.perf_counter() - t0

    with defer_interrupt(reraise=False) as interrupted:
        t0 = time.perf_counter()
        mask = batch.response_mask  # (B, R)
        # 4. shaped rewards: -kl_coef * KL per token, score (minus EOS penalty) at the last token
        shaped = scores if wins is None else wins
        shaped = leave_one_out(shaped, g) if g > 1 else shaped
        shaped = masked_whiten(shaped, torch.ones_like(shaped)) if config.whiten_scores else shaped
        rewards, kl = shape_rewards(shaped, batch.logprobs, batch.ref_logprobs, mask, run.kl_ctl.value,
                                    config.kl_estimator, batch.has_eos, config.missing_eos_penalty)
        rlhf_reward = rewards.sum(1)  # (B,)
        if config.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        # 5. advantages (GAE) and returns; advantage whitening
        advantages, returns = compute_gae(rewards, batch.values, mask, config.gamma, config.lam)
        if config.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        # 6. ppo_epochs of clipped policy + value updates over minibatches (a warm-up step: value only)
        value_only = step < config.value_warmup_steps
        ptx = (_ptx_micro_batches(run.ptx_texts, config, run.tokenizer, step)
               if config.ptx_coef > 0 and not value_only else None)
        train_stats = ppo_update(run.ddp_model, run.model, run.optimizer, acc, batch, advantages, returns,
                                 config, ptx, run.ema, value_only)
        t_train = time.perf_counter() - t0

        # 7. metrics, averaged over processes; then the KL controller sees the batch's KL
        gold = run.gold if config.gold_every and step % config.gold_every == 0 else None
        local = _step_metrics(batch, scores, kl, rlhf_reward, train_stats, gold, step_records)
        if wins is not None:  # the scorer's chance that an answer beats the reference's
            local["objective/win"] = float((wins / 4 + 0.5).mean())
        metrics = _reduce_mean(acc, local)
        metrics["prompts/truncated"] *= world
        dt = time.perf_counter() - t_step
        metrics.update({"step": step + 1, "objective/kl_coef": run.kl_ctl.value,
                        "time/rollout_s": t_generate + t_forward, "time/generate_s": t_generate,
                        "time/score_s": t_score, "time/train_s": t_train, "time/step_s": dt,
                        "time/tokens_per_s": metrics["response/length"] * config.batch_size / dt,
                        "time/episodes_per_s": config.batch_size / dt})
        run.kl_ctl.update(metrics["objective/kl"], config.batch_size)
    return metrics, batch, scores, interrupted["set"]


def train_ppo(config: PPOConfig) -> dict:
    """Run PPO; returns the stage result (``labkit.stage``): the last step's metrics, ``out_dir``,
    ``model_dir`` (the final policy, ``load_model`` reads it) and ``stopped``.

    >>> result = train_ppo(PPOConfig(model="tiny", reward_fn=lambda p, r: [len(x) / 100 for x in r], steps=5))
    >>> result["objective/scores"], result["model_dir"]
    """
    from tqdm.auto import tqdm

    from labkit.live import LiveDashboard

    run = _set_up(config)
    acc = run.accelerator
    out_dir = Path(config.out_dir)
    ckpt_dir = out_dir / "checkpoint"
    start_step, history = 0, []
    if config.resume and (ckpt_dir.exists() or ckpt_dir.with_name("checkpoint.old").exists()):
        start_step, history, rng = _load_checkpoint(ckpt_dir, acc, run.model, run.optimizer, run.kl_ctl, run.ema)
        set_rng_state(rng)
        acc.print(f"labkit.ppo: resumed from {ckpt_dir} at step {start_step}")
    dash = LiveDashboard("PPO", layout=DASHBOARD_LAYOUT,
                         headless=None if config.dashboard and acc.is_main_process else True)
    for h in history:
        dash.log(h["step"], h)
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)

    def checkpoint(step: int, rng: dict) -> None:
        _save_checkpoint(ckpt_dir, acc, run.model, run.optimizer, step, run.kl_ctl, run.ema, history, rng)

    stopped = message = None
    bar = tqdm(range(start_step, config.steps), desc="PPO", disable=not (config.progress and acc.is_main_process))
    for step in bar:
        rng_at_start = rng_state()
        try:
            metrics, batch, scores, interrupted = ppo_step(run, config, step)
        except KeyboardInterrupt:  # during rollout or scoring: nothing was updated yet
            checkpoint(step, rng_at_start)
            stopped, message = "interrupted", f"before step {step + 1}; resume=True continues from {ckpt_dir}"
            break
        except NonFiniteError as e:
            stopped, message = "non-finite", (f"step {step + 1}: {e}; the last good checkpoint (if any) stays in "
                                              f"{ckpt_dir}; try a lower learning_rate or check the reward")
            break
        with defer_interrupt(reraise=False) as late:  # the step is done: record and save it whole
            history.append(metrics)
            dash.log(step + 1, metrics)
            if config.sample_every and step % config.sample_every == 0 and acc.is_main_process:
                _log_samples(out_dir / "samples.jsonl", step + 1, batch, scores)
            bar.set_postfix({"score": f"{metrics['objective/scores']:.3f}", "kl": f"{metrics['objective/kl']:.3f}"})
            due = config.save_every and (step + 1) % config.save_every == 0
            if step + 1 < config.steps and (due or interrupted):
                checkpoint(step + 1, rng_state())
        if (interrupted or late["set"]) and step + 1 < config.steps:
            if not (due or interrupted):
                checkpoint(step + 1, rng_state())
            stopped, message = "interrupted", f"after step {step + 1}; resume=True continues from {ckpt_dir}"
            break

    model_dir = None
    if stopped is None:
        checkpoint(config.steps, rng_state())
        if acc.is_main_process:
            model_dir = _save_policy(out_dir / "model", run.model, run.tokenizer, run.ema)
        acc.wait_for_everyone()
    final = dict(history[-1]) if history else {}
    final["time/total_s"] = sum(h["time/step_s"] for h in history)  # all steps, resumed ones included
    hand_back_memory()  # what the run's sampling left in glibc's heap and the run freed since
    if not acc.is_main_process:  # the stage files are the main process's
        return {"out_dir": str(out_dir), "model_dir": None, "stopped": stopped, "message": message, **final}
    return finish(config, final, dash, model_dir, stopped, message)


def _log_samples(path: Path, step: int, batch: Rollout, scores: torch.Tensor, n: int = 2) -> None:
    """Print a few responses with their scores and append them to ``samples.jsonl``."""
    with path.open("a") as f:
        for prompt, text, score in list(zip(batch.prompts, batch.texts, scores.tolist()))[:n]:
            f.write(json.dumps({"step": step, "prompt": prompt, "response": text, "score": score}) + "\n")
            print(f"[step {step}] score {score:+.3f} | {prompt[:60]!r} -> {text[:120]!r}")

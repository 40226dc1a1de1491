"""Stage 2: the reward model (RM) and the K-way ranking loss.

InstructGPT §3.5: the RM is the SFT model with the unembedding layer removed and a scalar
head added; it maps (prompt, response) to a scalar reward. A labeler ranks K responses to one
prompt, which gives C(K,2) comparisons; all of them go into one batch element, so K forward
passes serve C(K,2) comparisons. After training, a bias is set so that the labelers'
demonstrations score 0 on average.

>>> rm = RewardModel.from_causal_lm(load_model("tiny", dtype="float32")[0])
>>> rm.score(tok, ["Say hi."], ["Hi!"])           # [0.013...]
>>> train_reward_model(RewardConfig(base="runs/sft", rankings=store))  # -> "runs/rm"
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from labkit.models import autocast, format_prompt, resolve_device, resolve_dtype

CONFIG_FILE = "reward_model.json"
HEAD_FILE = "reward_head.safetensors"


# ----------------------------------------------------------------------------- the model

class RewardModel(nn.Module):
    """Causal-LM backbone without the unembedding, plus a scalar head read at the last token."""

    def __init__(self, backbone: nn.Module, hidden_size: int | None = None):
        super().__init__()
        self.backbone = backbone  # e.g. LlamaModel: embeddings, blocks, final norm; no lm_head
        hidden_size = hidden_size or backbone.config.hidden_size
        # No bias term: a ranking loss only sees reward differences, so a learned offset gets
        # no gradient; the offset is set after training by the demo-mean normalisation below.
        self.head = nn.Linear(hidden_size, 1, bias=False)
        # Init N(0, 1/sqrt(d+1)) as in OpenAI's lm-human-preferences reward head ("The N
        # implementation details of RLHF with PPO", Huang et al. 2023, reward model details).
        nn.init.normal_(self.head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        # InstructGPT §3.5: "a bias so that labeler demonstrations achieve a mean score of 0".
        self.register_buffer("bias", torch.zeros((), dtype=torch.float32))

    @classmethod
    def from_causal_lm(cls, model: nn.Module) -> "RewardModel":
        """Take the decoder of a ``*ForCausalLM`` (shared, not copied) and add a fresh head."""
        backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        rm = cls(backbone, model.config.hidden_size)
        param = next(backbone.parameters())
        return rm.to(device=param.device, dtype=param.dtype)

    @property
    def config(self):
        return self.backbone.config

    def token_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token scalars (B, T), minus ``bias``; the reward is the value at the last real token."""
        # Positions count real tokens only, so left and right padding give the same numbers
        # (HF decoders would otherwise number left-padded tokens from the pad columns).
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, use_cache=False).last_hidden_state  # (B, T, H)
        # The head runs in fp32 even under autocast: bf16 would round rewards to ~3 digits,
        # coarser than the differences between similar responses.
        with torch.autocast(hidden.device.type, enabled=False):
            values = F.linear(hidden.float(), self.head.weight.float()).squeeze(-1)  # (B, T)
        return values - self.bias

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) read at the last non-padding token of each row (left or right padding)."""
        values = self.token_values(input_ids, attention_mask)  # (B, T)
        return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)  # (B,)

    # ------------------------------------------------------------------ scoring text
    @torch.no_grad()
    def score(self, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 8,
              max_length: int = 1024, progress: bool = True) -> list[float]:
        """Rewards for (prompt, response) pairs; the RM's view of the text is :func:`encode`."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        from tqdm.auto import tqdm

        device = next(self.parameters()).device
        ids, n_cut = encode(tokenizer, prompts, responses, max_length)
        if n_cut:
            warnings.warn(f"RewardModel.score: {n_cut} of {len(ids)} texts were longer than "
                          f"max_length={max_length} and lost the start of their prompt")
        was_training = self.training
        self.eval()
        out: list[float] = []
        starts = range(0, len(ids), batch_size)
        for s in tqdm(starts, desc="scoring", disable=not progress or len(starts) < 2, leave=False):
            input_ids, mask = pad_right(ids[s:s + batch_size], tokenizer.pad_token_id)
            with autocast(device):
                out += self(input_ids.to(device), mask.to(device)).tolist()
        self.train(was_training)
        return out

    # ------------------------------------------------------------------ saving and loading
    def save_pretrained(self, path: str | Path, tokenizer=None, **extra) -> str:
        """Backbone (HF safetensors), head (safetensors), ``reward_model.json``, tokenizer."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path, safe_serialization=True)
        save_file({"weight": self.head.weight.detach().float().cpu().contiguous()}, path / HEAD_FILE)
        meta = {"format": "labkit-reward-model", "hidden_size": self.head.in_features,
                "bias": float(self.bias), **extra}
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return str(path)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype = "auto",
                        device: str | torch.device = "auto") -> "RewardModel":
        """Load a folder written by :meth:`save_pretrained` (safetensors only)."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        path = Path(path)
        if not (path / CONFIG_FILE).exists():
            raise ValueError(f"{path} is not a labkit reward model folder (no {CONFIG_FILE})")
        meta = json.loads((path / CONFIG_FILE).read_text())
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        backbone = AutoModel.from_pretrained(path, dtype=dtype)
        rm = cls(backbone, meta["hidden_size"])
        rm.head.load_state_dict(load_file(path / HEAD_FILE))
        rm.bias.fill_(meta["bias"])
        return rm.to(device=device, dtype=dtype)

    def _apply(self, fn, recurse=True):
        # The bias stays fp32 whatever dtype the weights get (.to, .bfloat16, ...): it is one
        # number subtracted from fp32 outputs, and bf16 would round it to 3 digits.
        bias = self.bias.detach().clone()
        super()._apply(fn, recurse)
        device = fn(torch.zeros(1, device=bias.device)).device
        self.bias = bias.to(device=device, dtype=torch.float32)
        return self


def load_reward_model(path: str | Path, dtype: str | torch.dtype = "auto",
                      device: str | torch.device = "auto"):
    """``(reward_model, tokenizer)`` from a folder written by :func:`train_reward_model`."""
    from transformers import AutoTokenizer

    from labkit.models import setup_tokenizer

    rm = RewardModel.from_pretrained(path, dtype=dtype, device=device)
    return rm, setup_tokenizer(AutoTokenizer.from_pretrained(path))


# ----------------------------------------------------------------------------- tensors

def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index (B,) of the last position whose mask is 1 (works for left or right padding)."""
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)  # (B, T)
    return torch.where(attention_mask.bool(), positions, -1).max(dim=1).values  # (B,)


def encode(tokenizer, prompts: list[str], responses: list[str], max_length: int = 1024):
    """Token ids of ``format_prompt(prompt) + response + EOS``, and how many were truncated.

    Texts over ``max_length`` lose tokens from the left, i.e. the start of the prompt: the
    response and the EOS the reward is read at are kept (BRIEF §5, truncated and counted).
    """
    ids, n_cut = [], 0
    for prompt, response in zip(prompts, responses):
        text = format_prompt(tokenizer, prompt) + response
        row = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(row) > max_length:
            row, n_cut = row[-max_length:], n_cut + 1
        ids.append(row)
    return ids, n_cut


def pad_right(rows: list[list[int]], pad_id: int):
    """Right-padded ``input_ids`` (B, T) and ``attention_mask`` (B, T)."""
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        input_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return input_ids, mask


def ranking_loss(rewards: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """K-way ranking loss (InstructGPT eq. 1) from rewards (B, K) and tiers ranks (B, K).

    ``ranks[b, k]`` is the tier of response k (0 = best, equal = tie, -1 = padding for
    prompts with fewer than K responses). The loss is the mean over prompts of the mean over
    ordered, non-tied pairs (w above l) of ``-log sigmoid(r_w - r_l)``; with no ties that
    mean is the paper's 1/C(K,2) normalisation. Prompts without such a pair contribute
    nothing; if no prompt in the batch has one, the loss is a zero that still has a grad_fn,
    so a training loop can call backward on it unchanged.
    """
    if rewards.shape != ranks.shape or rewards.dim() != 2:
        raise ValueError(f"rewards and ranks must both be (B, K); got {tuple(rewards.shape)} "
                         f"and {tuple(ranks.shape)}")
    valid = ranks >= 0  # (B, K)
    # better[b, i, j]: response i is ranked strictly above response j, both real.
    better = (ranks[:, :, None] < ranks[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # (B, K, K)
    diff = rewards[:, :, None] - rewards[:, None, :]  # (B, K, K): r_i - r_j
    pair_loss = torch.where(better, -F.logsigmoid(diff), torch.zeros_like(diff))  # (B, K, K)
    n_pairs = better.sum(dim=(1, 2))  # (B,)
    per_prompt = pair_loss.sum(dim=(1, 2)) / n_pairs.clamp(min=1)  # (B,)
    has_pair = n_pairs > 0  # (B,)
    if not has_pair.any():
        return (rewards * 0.0).sum()
    return per_prompt[has_pair].mean()


def pairwise_accuracy(rewards: torch.Tensor, ranks: torch.Tensor) -> tuple[int, int]:
    """(correct, total) over ordered, non-tied pairs: how often r_better > r_worse."""
    valid = ranks >= 0  # (B, K)
    better = (ranks[:, :, None] < ranks[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # (B, K, K)
    correct = (rewards[:, :, None] > rewards[:, None, :]) & better  # (B, K, K)
    return int(correct.sum()), int(better.sum())


def tiers_to_ranks(tiers: list[list[int]], k: int) -> list[int]:
    """Tiers (best first) of n responses -> ranks of length k (tier index; -1 pads n..k-1)."""
    flat = [i for tier in tiers for i in tier]
    n = len(flat)
    if sorted(flat) != list(range(n)):
        raise ValueError(f"tiers {tiers} must list each response index 0..{n - 1} exactly once")
    if n > k:
        raise ValueError(f"tiers cover {n} responses but k={k}")
    ranks = [-1] * k
    for t, tier in enumerate(tiers):
        for i in tier:
            ranks[i] = t
    return ranks

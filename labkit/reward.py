"""Stage 2: the reward model (RM) and the K-way ranking loss.

InstructGPT §3.5: the RM is the SFT model with the unembedding layer removed and a scalar
head added; it maps (prompt, response) to a scalar reward. A labeler ranks K responses to one
prompt, which gives C(K,2) comparisons; all of them go into one batch element, so K forward
passes serve C(K,2) comparisons. After training, a bias is set so that the labelers'
demonstrations score 0 on average.

>>> model, tok = load_model("tiny", dtype="float32")
>>> rm = RewardModel.from_causal_lm(model)           # untrained head: rewards are noise
>>> rm.score(tok, ["Say hi."], ["Hi!"])              # one float per (prompt, response)
>>> result = train_reward_model(RewardConfig(model="runs/sft/model", rankings=store, out_dir="runs/rm"))
>>> rm, tok = load_reward_model(result["model_dir"])
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from labkit.doctor import steady_memory
from labkit.live import LiveDashboard, progress
from labkit.models import (TRAINING_ATTENTION, autocast, format_prompt, last_index, pad_rows, position_ids,
                           resolve_device, resolve_dtype, use_training_attention)
from labkit.rankings import (consensus, n_comparisons, normalize_tiers, ordered_pairs, pairwise_accuracy, scores_to_ranks,
                             tiers_to_ranks)
from labkit.stage import NonFiniteError, defer_interrupt, finish

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

    def token_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     positions: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token scalars (B, T), minus ``bias``; the reward is the value at the last real token.

        ``attention_mask`` is (B, T) padding, or (B, 1, T, T) bool (True = may attend) with
        ``positions`` (B, T) for rows packed by :func:`pack`.
        """
        if attention_mask.dim() == 4:
            if positions is None:
                raise ValueError("a 4D attention mask needs position ids")
            if self.config._attn_implementation not in ("sdpa", TRAINING_ATTENTION):
                # transformers hands a 4D mask to the attention as it is: SDPA takes booleans,
                # eager attention adds the mask to the scores, so it needs 0 / -inf-like numbers.
                blocked = torch.finfo(torch.float32).min
                attention_mask = torch.zeros(attention_mask.shape, device=attention_mask.device).masked_fill(
                    ~attention_mask, blocked)
        elif positions is None and not bool(attention_mask[:, 0].all()):
            # Positions count real tokens only, so left and right padding give the same numbers
            # (HF decoders would otherwise number left-padded tokens from the pad columns). Without
            # left padding the decoder's default 0..T-1 is the same thing and cheaper (shared by rows).
            positions = position_ids(attention_mask)  # (B, T)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=positions, use_cache=False).last_hidden_state  # (B, T, H)
        # The head runs in fp32 even under autocast: bf16 would round rewards to ~3 digits,
        # coarser than the differences between similar responses.
        with torch.autocast(hidden.device.type, enabled=False):
            values = F.linear(hidden.float(), self.head.weight.float()).squeeze(-1)  # (B, T)
        return values - self.bias

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards (B,) read at the last non-padding token of each row (left or right padding)."""
        values = self.token_values(input_ids, attention_mask)  # (B, T)
        return values.gather(1, last_index(attention_mask)[:, None]).squeeze(1)  # (B,)

    # ------------------------------------------------------------------ scoring text
    @torch.no_grad()
    def score(self, tokenizer, prompts: list[str], responses: list[str], batch_size: int = 8,
              max_length: int = 1024, progress: bool = True, prefix_sharing: bool = True) -> list[float]:
        """Rewards for (prompt, response) pairs; the RM's view of the text is :func:`encode`.

        With ``prefix_sharing``, consecutive pairs with the same prompt (K responses to one
        prompt) go through the model as one packed row that holds the prompt once (:func:`pack`).
        """
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
        # Groups: runs of consecutive pairs with the same prompt (one pair each without sharing).
        groups: list[list[int]] = []
        for i in range(len(ids)):
            if prefix_sharing and groups and prompts[i] == prompts[groups[-1][0]]:
                groups[-1].append(i)
            else:
                groups.append([i])
        # Longest first, so each batch holds texts of similar length (little padding) and the
        # largest batch comes first (an out-of-memory error shows up at once). A batch holds
        # about batch_size texts, whole groups only.
        groups.sort(key=lambda g: -sum(len(ids[i]) for i in g))
        batches: list[list[list[int]]] = [[]]
        for g in groups:
            if batches[-1] and sum(map(len, batches[-1])) + len(g) > batch_size:
                batches.append([])
            batches[-1].append(g)
        out = [0.0] * len(ids)
        for batch in tqdm(batches, desc="scoring", disable=not progress or len(batches) < 2, leave=False):
            rows = collate_rows([[ids[i] for i in g] for g in batch], tokenizer.pad_token_id, prefix_sharing)
            with autocast(device):
                rewards = batch_rewards(self, {k: v.to(device) for k, v in rows.items()})  # (b, K)
            for g, r in zip(batch, rewards.tolist()):
                for i, x in zip(g, r):
                    out[i] = x
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
        use_training_attention(backbone)
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


class RewardEnsemble:
    """Reward models trained apart (other seeds, other data), scoring as one: the mean of
    their scores. Members share a tokenizer (the same starting model). ``score`` has
    :meth:`RewardModel.score`'s signature."""

    def __init__(self, members: list[RewardModel]):
        if not members:
            raise ValueError("RewardEnsemble needs at least one reward model")
        self.members = members

    def score(self, tokenizer, prompts: list[str], responses: list[str], **kwargs) -> list[float]:
        per_member = [m.score(tokenizer, prompts, responses, **kwargs) for m in self.members]
        return [sum(xs) / len(xs) for xs in zip(*per_member)]


def load_reward_model(path: str | Path, dtype: str | torch.dtype = "auto",
                      device: str | torch.device = "auto"):
    """``(reward_model, tokenizer)`` from a folder written by :func:`train_reward_model`."""
    from transformers import AutoTokenizer

    from labkit.models import setup_tokenizer

    rm = RewardModel.from_pretrained(path, dtype=dtype, device=device)
    return rm, setup_tokenizer(AutoTokenizer.from_pretrained(path))


def load_reward_models(paths: str | Path | list, dtype: str | torch.dtype = "auto",
                       device: str | torch.device = "auto"):
    """``(reward, tokenizer, members)`` from one RM folder or several: ``reward`` is the one
    :class:`RewardModel`, or a :class:`RewardEnsemble` of several; ``members`` lists them all
    (frozen, in eval mode), the first being the one a value model or a report starts from."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("no reward model folder given")
    members = []
    for path in paths:
        rm, tokenizer = load_reward_model(path, dtype=dtype, device=device)
        members.append(rm.requires_grad_(False).eval())
    return (members[0] if len(members) == 1 else RewardEnsemble(members)), tokenizer, members


# ----------------------------------------------------------------------------- tensors

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
    better = ordered_pairs(ranks)  # (B, K, K): response i ranked strictly above response j, both real
    diff = rewards[:, :, None] - rewards[:, None, :]  # (B, K, K): r_i - r_j
    pair_loss = torch.where(better, -F.logsigmoid(diff), torch.zeros_like(diff))  # (B, K, K)
    n_pairs = better.sum(dim=(1, 2))  # (B,)
    per_prompt = pair_loss.sum(dim=(1, 2)) / n_pairs.clamp(min=1)  # (B,)
    has_pair = n_pairs > 0  # (B,)
    if not has_pair.any():
        return (rewards * 0.0).sum()
    return per_prompt[has_pair].mean()


# ----------------------------------------------------------------------------- data

def as_rankings(source) -> list[dict]:
    """Validated K-way records ``{"prompt", "responses", "tiers", "prompt_id"}`` from any source.

    ``source``: a list (or ``datasets.Dataset``) of K-way records or TRL preference pairs
    ``{"prompt", "chosen", "rejected"}`` (a K=2 ranking), anything with a ``.rankings()``
    method (``labkit.feedback.FeedbackStore``), or a JSONL file of such records.
    """
    if source is None:
        raise ValueError("no rankings given: pass a list of records, a FeedbackStore or a JSONL path")
    where = "rankings"
    if hasattr(source, "rankings"):
        source = source.rankings()
    elif isinstance(source, (str, Path)):
        where = str(source)
        lines = Path(source).read_text(encoding="utf-8").splitlines()
        try:
            source = [json.loads(line) for line in lines if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON Lines ({e})") from e
    records = [_check_ranking(r, i, where) for i, r in enumerate(source)]
    if not records:
        raise ValueError(f"{where}: no rankings to train on (empty dataset)")
    return records


def _check_ranking(r, i: int, where: str) -> dict:
    """One record in the universal K-way format, or a ValueError naming the record and field."""
    at = f"{where}[{i}]"
    if not isinstance(r, dict):
        raise ValueError(f"{at}: expected a dict, got {type(r).__name__}")
    if "chosen" in r and "rejected" in r and "responses" not in r:
        r = {**r, "responses": [r["chosen"], r["rejected"]], "tiers": [[0], [1]]}
    for field in ("prompt", "responses", "tiers"):
        if field not in r:
            raise ValueError(f"{at}: missing field {field!r}")
    prompt, responses, tiers = r["prompt"], r["responses"], r["tiers"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{at}: 'prompt' must be a non-empty string")
    # Empty responses are allowed: a model can produce one, and the ranking says it is bad.
    if not isinstance(responses, list) or not all(isinstance(x, str) for x in responses):
        raise ValueError(f"{at}: 'responses' must be a list of strings")
    if len(responses) < 2:
        raise ValueError(f"{at}: a ranking needs at least 2 responses (K={len(responses)})")
    try:
        tiers = normalize_tiers(tiers, len(responses))
    except ValueError as e:
        raise ValueError(f"{at}: {e}") from None
    return {"prompt": prompt, "responses": list(responses), "tiers": tiers, "prompt_id": r.get("prompt_id")}


def split_rankings(records: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Train / held-out split by prompt, so no held-out prompt is seen in training."""
    keys = sorted({r["prompt_id"] or r["prompt"] for r in records})
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = round(eval_fraction * len(keys))
    if eval_fraction > 0 and len(keys) >= 2:
        n_eval = min(max(n_eval, 1), len(keys) - 1)
    held = {keys[i] for i in order[:n_eval]}
    train = [r for r in records if (r["prompt_id"] or r["prompt"]) not in held]
    return train, [r for r in records if (r["prompt_id"] or r["prompt"]) in held]


def shared_prefix_length(rows: list[list[int]]) -> int:
    """How many leading tokens all ``rows`` share, leaving every row at least its last token
    (the EOS its reward is read at). Compared as token ids, not text, so a tokenizer that merges
    the prompt's last characters with the response's first still gives exact sequences."""
    n = min(len(r) for r in rows) - 1
    first = rows[0]
    for r in rows[1:]:
        i = 0
        while i < n and r[i] == first[i]:
            i += 1
        n = i
    return n


def pack(groups: list[list[list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Prefix sharing: each group of rows (K responses to one prompt, each ``encode``d with the
    prompt) becomes one packed row: their shared prefix once, then each row's remaining tokens.

    A block attention mask lets each response see the prefix and itself (causally), never the
    other responses, and each response's positions continue from the prefix's end, so every
    token computes what it computes in its own sequence. A prompt of P tokens with K answers of
    A tokens costs P + K·A tokens instead of K·(P + A). Returns ``input_ids`` (G, T),
    ``positions`` (G, T), ``attention_mask`` (G, 1, T, T) bool (True = may attend) and ``ends``
    (G, K): the flat index ``g*T + t`` of each row's last token, -1 for padding slots.
    """
    K = max(len(g) for g in groups)
    packed = []  # per group: token ids, positions, segment (0 = prefix, k+1 = response k), last indices
    for rows in groups:
        n = shared_prefix_length(rows)
        ids, pos, seg, last = list(rows[0][:n]), list(range(n)), [0] * n, []
        for k, r in enumerate(rows):
            ids += r[n:]
            pos += range(n, len(r))
            seg += [k + 1] * (len(r) - n)
            last.append(len(ids) - 1)
        packed.append((ids, pos, seg, last))
    T = max(len(ids) for ids, *_ in packed)
    input_ids = torch.full((len(groups), T), pad_id, dtype=torch.long)  # (G, T)
    positions = torch.zeros((len(groups), T), dtype=torch.long)  # (G, T)
    segments = torch.full((len(groups), T), -1, dtype=torch.long)  # (G, T): -1 = padding
    ends = torch.full((len(groups), K), -1, dtype=torch.long)  # (G, K)
    for g, (ids, pos, seg, last) in enumerate(packed):
        input_ids[g, :len(ids)] = torch.tensor(ids)
        positions[g, :len(ids)] = torch.tensor(pos)
        segments[g, :len(ids)] = torch.tensor(seg)
        ends[g, :len(last)] = torch.tensor(last) + g * T
    query, key = segments[:, :, None], segments[:, None, :]  # (G, T, 1), (G, 1, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
    # Same segment (prefix within prefix, a response within itself), or a real token looking at
    # the prefix. Padding sees only earlier padding and itself: no row is fully masked, which
    # would give NaN in the attention and poison the gradients through 0 * NaN.
    mask = causal & ((query == key) | ((key == 0) & (query > 0)))  # (G, T, T)
    return {"input_ids": input_ids, "positions": positions, "attention_mask": mask[:, None], "ends": ends}


def collate_rows(groups: list[list[list[int]]], pad_id: int, prefix_sharing: bool = True) -> dict[str, torch.Tensor]:
    """Token rows grouped by prompt -> the model's inputs and ``ends`` (G, K), the flat index
    into the (rows, T) values of each row's last token (-1 for padding slots).

    With ``prefix_sharing`` (and some group of two or more), one packed row per group
    (:func:`pack`); otherwise one right-padded row per response.
    """
    if prefix_sharing and any(len(g) > 1 for g in groups):
        return pack(groups, pad_id)
    K = max(len(g) for g in groups)
    flat = [r for g in groups for r in g]
    input_ids, mask = pad_rows(flat, pad_id)  # (N, T)
    T = input_ids.shape[1]
    ends = torch.full((len(groups), K), -1, dtype=torch.long)  # (G, K)
    n = 0
    for g, rows in enumerate(groups):
        for k, r in enumerate(rows):
            ends[g, k] = n * T + len(r) - 1
            n += 1
    return {"input_ids": input_ids, "attention_mask": mask, "ends": ends}


def collate(items: list[dict], pad_id: int, prefix_sharing: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Prompts with their K responses (``{"ids": K token rows, "ranks"}``) -> the model's inputs
    (:func:`collate_rows`) and ``ranks`` (B, K) with -1 padding."""
    K = max(len(it["ranks"]) for it in items)
    ranks = torch.full((len(items), K), -1, dtype=torch.long)  # (B, K)
    for b, it in enumerate(items):
        ranks[b, :len(it["ranks"])] = torch.tensor(it["ranks"], dtype=torch.long)
    return collate_rows([it["ids"] for it in items], pad_id, prefix_sharing), ranks


def batch_rewards(rm: RewardModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rewards (B, K) of all responses of all prompts in one forward pass (padding slots = 0)."""
    values = rm.token_values(batch["input_ids"], batch["attention_mask"], batch.get("positions"))  # (rows, T)
    ends = batch["ends"]  # (B, K)
    rewards = values.flatten()[ends.clamp(min=0)]  # (B, K)
    return torch.where(ends >= 0, rewards, torch.zeros_like(rewards))


# ----------------------------------------------------------------------------- training

@dataclass
class RewardConfig:
    """Stage 2 settings; the defaults run the bundled 135M model on a laptop CPU."""

    model: str = "smollm2-135m"  # SFT model folder (InstructGPT §3.5), a model name, or an RM folder to continue
    rankings: Any = None  # K-way records / preference pairs, a FeedbackStore (.rankings()), or a JSONL path
    out_dir: str = "runs/reward_model"  # model/ (the RM + tokenizer) and the stage files
    epochs: int = 1  # InstructGPT trains one epoch: the RM overfits after one (§3.5 / App. C.2)
    max_steps: int | None = None  # stop after this many optimiser steps (smoke runs); None = all epochs
    batch_size: int = 8  # prompts per optimiser step, each with all its K responses (§3.5)
    micro_batch_size: int | None = None  # prompts per forward pass (gradient accumulation); None = batch_size
    learning_rate: float = 5e-5  # AdamW; the paper used 9e-6 at 6B. At 135M on ~200 rankings, 1e-5 left the RM near
    # chance (held-out accuracy 0.54, gold agreement 0.49); 5e-5 reached 0.69 / 0.63 (1e-4: 0.68 / 0.71)
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of lr, as in App. C.2
    warmup_steps: int = 0  # linear warm-up steps before the cosine
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping (global L2 norm); 0 disables
    # Decoder blocks trained, counted from the top, with the final norm and the head; the rest
    # (embeddings included) stay as the SFT model has them, and the backward pass stops there.
    # None: every parameter trains.
    train_layers: int | None = None
    max_length: int = 512  # tokens per (prompt, response); longer ones lose the start of the prompt
    # Compute each prompt once for its K responses: one packed row, block attention mask (see pack()).
    # Same loss and gradients as K separate sequences; the RM stage is compute-bound and a
    # prompt is often longer than an answer (benchmarks/rm_kway.py measures the saving).
    prefix_sharing: bool = True
    # Several annotators' rankings of the same K responses become one, by mean rank (rankings.consensus).
    # On one run's samples ranked by all five simulated labelers, the consensus RM agreed with gold
    # on 0.688 of held-out pairs against 0.599 for one labeler per prompt (docs/quality_ablations.md).
    consensus: bool = False
    eval_fraction: float = 0.1  # share of prompts held out for accuracy (split by prompt)
    eval_batch_size: int = 16  # sequences per forward pass when scoring held-out data and demonstrations
    normalize: bool = True  # set `bias` so the demonstrations score 0 on average (§3.5)
    demonstrations: list[dict] | None = None  # {"prompt", "response"} records; None = labkit.data.load_demonstrations()
    gold: bool = True  # also measure agreement with the gold labeler on held-out responses
    precision: str = "auto"  # "auto": fp32 master weights + bf16 autocast where fast; "fp32": no autocast
    device: str = "auto"  # "auto", "cpu", "cuda", ...
    seed: int = 0  # data order, held-out split and head init
    dashboard: bool = True  # live plot in notebooks (always recorded; saved to out_dir/dashboard.html)
    progress: bool = True  # progress bars
    log_every: int = 1  # optimiser steps between dashboard points

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 8 or self.eval_batch_size < 1:
            raise ValueError("epochs, batch_size, eval_batch_size must be >= 1 and max_length >= 8")
        if self.micro_batch_size is not None and not 1 <= self.micro_batch_size <= self.batch_size:
            raise ValueError("micro_batch_size must lie in [1, batch_size]")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError("eval_fraction must lie in [0, 1)")
        if self.learning_rate <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("learning_rate must be > 0 and min_lr_ratio in [0, 1]")
        if self.precision not in ("auto", "fp32"):
            raise ValueError("precision must be 'auto' or 'fp32'")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be >= 1 or None")
        if self.train_layers is not None and self.train_layers < 0:
            raise ValueError("train_layers must be >= 0 (the head alone) or None (everything)")


def freeze_below(rm: RewardModel, n: int) -> None:
    """Train only the top ``n`` decoder blocks, the final norm and the head of ``rm``."""
    if not (hasattr(rm.backbone, "layers") and hasattr(rm.backbone, "norm")):
        raise ValueError(f"train_layers needs a decoder laid out as embed_tokens, layers, norm (Llama and its "
                         f"kin); {type(rm.backbone).__name__} is not")
    blocks = rm.backbone.layers
    if n > len(blocks):
        raise ValueError(f"train_layers={n} but the model has {len(blocks)} decoder blocks")
    rm.backbone.requires_grad_(False)
    for block in blocks[len(blocks) - n:]:
        block.requires_grad_(True)
    rm.backbone.norm.requires_grad_(True)
    rm.head.requires_grad_(True)


def _tokenize(tokenizer, records: list[dict], max_length: int) -> tuple[list[dict], int]:
    items, n_cut = [], 0
    for r in records:
        ids, cut = encode(tokenizer, [r["prompt"]] * len(r["responses"]), r["responses"], max_length)
        items.append({"ids": ids, "ranks": tiers_to_ranks(r["tiers"], len(r["responses"]))})
        n_cut += cut
    return items, n_cut


def _lr_at(step: int, total: int, config: RewardConfig) -> float:
    """Linear warm-up, then cosine decay from learning_rate to min_lr_ratio of it (InstructGPT App. C.2)."""
    lr = config.learning_rate
    if step < config.warmup_steps:
        return lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def train_step(rm: RewardModel, items: list[dict], pad_id: int, micro: int, device, use_autocast: bool,
               prefix_sharing: bool = True):
    """Forward and backward one batch of prompts, ``micro`` prompts per pass; returns (loss, correct, pairs).

    Gradients equal those of one pass over the whole batch: each micro-batch's mean is
    weighted by its share of the batch's prompts (every item has at least one pair).
    """
    total, correct, pairs = 0.0, 0, 0
    for s in range(0, len(items), micro):
        chunk = items[s:s + micro]
        batch, ranks = collate(chunk, pad_id, prefix_sharing)
        with autocast(device, enabled=use_autocast):
            rewards = batch_rewards(rm, {k: v.to(device) for k, v in batch.items()})  # (b, K)
        loss = ranking_loss(rewards, ranks.to(device)) * (len(chunk) / len(items))
        if not torch.isfinite(loss):
            raise NonFiniteError(f"non-finite ranking loss ({loss.item()})")
        loss.backward()
        total += loss.item()
        c, n = pairwise_accuracy(rewards.detach(), ranks.to(device))
        correct, pairs = correct + c, pairs + n
    return total, correct, pairs


@steady_memory()  # one training step's large blocks reused at the next, handed back after
def train_reward_model(config: RewardConfig) -> dict:
    """Train an RM on K-way rankings; returns the stage result (``labkit.stage``), whose
    ``model_dir`` :func:`load_reward_model` reads.

    >>> result = train_reward_model(RewardConfig(model="tiny", rankings=records, out_dir="runs/rm"))
    >>> result["eval/accuracy"], result["model_dir"]

    Why a plain loop and not TRL's ``RewardTrainer``: that trainer only knows (chosen,
    rejected) pairs, one pair per example. InstructGPT's K-way batching (all K responses of
    a prompt in one batch element, loss over their C(K,2) pairs) would need a custom
    dataset format, collator and ``compute_loss``, i.e. most of the trainer replaced; the
    loop below is shorter and shows the method. ``benchmarks/rm_kway.py`` measures what the
    pairwise expansion through ``RewardTrainer`` costs instead.
    """
    from labkit.models import load_model

    t_start = time.time()
    device = resolve_device(config.device)
    use_autocast = config.precision == "auto"
    out = Path(config.out_dir)

    # 1. Data: validate, merge annotators' rankings of the same responses if asked, drop
    #    rankings without an ordered pair (all tied), split by prompt.
    records = as_rankings(config.rankings)
    n_submitted = len(records)
    if config.consensus:
        records = consensus(records)
    usable = [r for r in records if n_comparisons(r["tiers"]) > 0]
    if not usable:
        raise ValueError("every ranking is a single tie: no comparisons to train on")
    train, held = split_rankings(usable, config.eval_fraction, config.seed)

    # 2. Model: SFT backbone + fresh scalar head, fp32 master weights.
    torch.manual_seed(config.seed)
    if (Path(config.model) / CONFIG_FILE).exists():
        rm, tok = load_reward_model(config.model, dtype="float32", device=device)
    else:
        model, tok = load_model(config.model, dtype="float32", device=device, seed=config.seed)
        rm = RewardModel.from_causal_lm(model)
        rm.bias.zero_()
    items, n_cut = _tokenize(tok, train, config.max_length)
    if n_cut:
        warnings.warn(f"{n_cut} training texts were longer than max_length={config.max_length} "
                      "and lost the start of their prompt")

    # 3. Optimiser and schedule.
    # Fused AdamW: one kernel per step instead of several per tensor (the HF Trainer's default too).
    fused = device.type in ("cpu", "cuda")
    if config.train_layers is not None:
        freeze_below(rm, config.train_layers)
    optimizer = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=config.learning_rate,
                                  weight_decay=config.weight_decay, fused=fused)
    steps_per_epoch = math.ceil(len(items) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    micro = config.micro_batch_size or config.batch_size
    dash = LiveDashboard("Reward model", headless=None if config.dashboard else True)
    curve_loss: list[float] = []
    metrics: dict[str, Any] = {
        "data/n_rankings": n_submitted, "data/n_merged": len(records), "data/n_without_pairs": len(records) - len(usable),
        "data/n_train": len(train), "data/n_eval": len(held),
        "data/n_comparisons": sum(n_comparisons(r["tiers"]) for r in train),
        "data/n_truncated": n_cut, "train/steps": total_steps,
    }

    # 4. Training loop: each step sees batch_size prompts with all their K responses. A Ctrl-C
    #    waits for the step to finish; a non-finite loss stops before the optimizer step.
    rm.train()
    step, stopped, message = 0, None, None
    gen = torch.Generator().manual_seed(config.seed)
    bar = progress(total=total_steps, desc="reward model", disable=not config.progress)
    t_train, cpu_train = time.time(), time.process_time()
    try:
        for epoch in range(config.epochs):
            order = torch.randperm(len(items), generator=gen).tolist()
            for s in range(0, len(order), config.batch_size):
                if step >= total_steps:
                    break
                with defer_interrupt():
                    lr = _lr_at(step, total_steps, config)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    batch = [items[i] for i in order[s:s + config.batch_size]]
                    optimizer.zero_grad(set_to_none=True)
                    loss, correct, pairs = train_step(rm, batch, tok.pad_token_id, micro, device, use_autocast,
                                                           config.prefix_sharing)
                    if config.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(rm.parameters(), config.max_grad_norm)
                    optimizer.step()
                    step += 1  # counted inside: a Ctrl-C held during the step is raised after it
                curve_loss.append(loss)
                if step % config.log_every == 0 or step == total_steps:
                    dash.log(step, {"loss/ranking": loss, "accuracy/train": correct / pairs, "lr": lr})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
    except NonFiniteError as e:  # BRIEF §5: stop with a message, keep the last good weights
        optimizer.zero_grad(set_to_none=True)
        stopped, message = "non-finite", f"step {step + 1}: {e}; the weights of step {step} are kept"
    except KeyboardInterrupt:
        stopped, message = "interrupted", f"interrupted after step {step}; the weights of that step are saved"
    finally:
        bar.close()
    metrics["time/train_s"] = time.time() - t_train
    metrics["time/train_cpu_s"] = time.process_time() - cpu_train  # this process's CPU time, all threads
    metrics["time/per_epoch_s"] = metrics["time/train_s"] * steps_per_epoch / max(1, step)
    metrics["train/steps_done"] = step
    if curve_loss:
        k = max(1, len(curve_loss) // 10)
        metrics["loss/first"] = curve_loss[0]
        metrics["loss/last"] = sum(curve_loss[-k:]) / k  # mean of the last tenth

    # 5. Demo-mean normalisation (§3.5), then held-out accuracy and gold agreement.
    rm.eval()
    if config.normalize:
        metrics.update(normalize_bias(rm, tok, config))
    if held:
        metrics.update(evaluate_rankings(rm, tok, held, config))
        dash.log(step, {"accuracy/eval": metrics["eval/accuracy"]})
    metrics["time/total_s"] = time.time() - t_start

    # 6. Save the RM and tokenizer in out_dir/model (the last good weights, also when stopped), and the stage files.
    rm.save_pretrained(out / "model", tokenizer=tok, base=str(config.model))
    return finish(config, metrics, dash, out / "model", stopped, message)


def normalize_bias(rm: RewardModel, tokenizer, config: RewardConfig) -> dict:
    """Set ``rm.bias`` so the demonstrations' mean reward is 0 (InstructGPT §3.5)."""
    demos = config.demonstrations
    if demos is None:
        try:
            from labkit.data import load_demonstrations
        except ImportError:
            warnings.warn("labkit.data is unavailable: no demonstrations, bias left at 0")
            return {"reward/bias": float(rm.bias), "reward/n_demonstrations": 0}
        demos = load_demonstrations()
    if not demos:
        warnings.warn("no demonstrations: bias left at 0")
        return {"reward/bias": float(rm.bias), "reward/n_demonstrations": 0}
    rm.bias.zero_()
    scores = rm.score(tokenizer, [d["prompt"] for d in demos], [d["response"] for d in demos],
                      batch_size=config.eval_batch_size, max_length=config.max_length,
                      progress=config.progress)
    rm.bias.fill_(sum(scores) / len(scores))
    return {"reward/bias": float(rm.bias), "reward/n_demonstrations": len(demos)}


def evaluate_rankings(rm: RewardModel, tokenizer, held: list[dict], config: RewardConfig) -> dict:
    """Held-out pairwise accuracy against the rankings and, where the prompt record is known,
    against the gold labeler (pairs whose gold scores differ)."""
    prompts = [r["prompt"] for r in held for _ in r["responses"]]
    responses = [x for r in held for x in r["responses"]]
    flat = rm.score(tokenizer, prompts, responses, batch_size=config.eval_batch_size,
                    max_length=config.max_length, progress=config.progress, prefix_sharing=config.prefix_sharing)
    K = max(len(r["responses"]) for r in held)
    rewards = torch.zeros(len(held), K)  # (B, K)
    ranks = torch.full((len(held), K), -1, dtype=torch.long)  # (B, K)
    i = 0
    for b, r in enumerate(held):
        k = len(r["responses"])
        rewards[b, :k] = torch.tensor(flat[i:i + k])
        ranks[b, :k] = torch.tensor(tiers_to_ranks(r["tiers"], k))
        i += k
    correct, pairs = pairwise_accuracy(rewards, ranks)
    m = {"eval/accuracy": correct / pairs, "eval/n_pairs": pairs, "eval/n_prompts": len(held),
         "eval/loss": float(ranking_loss(rewards, ranks)), "eval/reward_mean": sum(flat) / len(flat)}
    if config.gold:
        m.update(_gold_agreement(held, rewards, ranks))
    return m


def _gold_agreement(held: list[dict], rewards: torch.Tensor, ranks: torch.Tensor) -> dict:
    try:
        from labkit.data import load_prompts
        from labkit.labelers import GoldLabeler
        by_id = {p["id"]: p for p in load_prompts()}
    except ImportError as e:
        return {"eval/gold_skipped": f"gold labeler or prompt set unavailable ({e})"}
    gold = GoldLabeler()
    known = [b for b, r in enumerate(held) if r["prompt_id"] in by_id]
    if not known:
        return {"eval/gold_skipped": "no held-out ranking has a prompt_id of the prompt set"}
    g = torch.full_like(rewards, float("nan"))  # (B, K)
    for b in known:
        rec = held[b]
        g[b, :len(rec["responses"])] = torch.tensor([gold.score(by_id[rec["prompt_id"]], x)
                                                      for x in rec["responses"]])
    rows = torch.tensor(known)
    gold_ranks = scores_to_ranks(g[rows])  # (B', K): higher gold score = better tier
    rm_correct, n = pairwise_accuracy(rewards[rows], gold_ranks)
    # The labelers' own rankings against gold, as a ceiling (a tie in their ranking counts as wrong).
    lab_correct, _ = pairwise_accuracy(-ranks[rows].float(), gold_ranks)
    return {"eval/gold_accuracy": rm_correct / n if n else float("nan"), "eval/gold_n_pairs": n,
            "eval/labeler_gold_accuracy": lab_correct / n if n else float("nan"),
            "eval/gold_n_unknown": len(held) - len(known)}

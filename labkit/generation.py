"""Sampling responses: batched, KV-cached, left-padded, reproducible.

Every stage that needs model outputs goes through here: SFT samples for inspection, the K
responses per prompt that labelers rank (InstructGPT §3.5: K = 4..9), PPO rollouts,
evaluation, and the chat playground.

- **Left padding.** A batch of prompts of different lengths is padded on the left, so every
  prompt ends at the same column and the first new token of every row is sampled at the
  same step. Position ids count real tokens only and the attention mask hides the padding.
- **KV cache, allocated once.** Keys and values of the prompt and of every new token go
  into one buffer per layer sized for prompt + ``max_new_tokens`` (:class:`KVSlab`); a
  decoding step feeds one token per row, writes one column and attends over the filled
  part, with no per-step ``torch.cat`` of the whole cache.
- **bf16 weights, cast and packed once.** Under bf16 autocast every ``nn.Linear`` would re-cast its
  fp32 weight to bf16 at every step, and oneDNN re-packs a bf16 weight into its kernel's
  blocked layout at every call; a decoding step of a few rows is then mostly that memory
  traffic. The loop uses a bf16 copy of each linear weight, cast (and, on CPUs where oneDNN's
  packed bf16 linear works, packed) once per ``generate`` call for all its batches, once per
  stream for all its tokens (:func:`bf16_linear_weights`; labkit's own forward makes its fused
  copies the same way); the result is the same numbers autocast computes, since autocast
  rounds the same weights the same way. Embeddings, norms and the residual stream stay in the
  weights' own dtype. On a CPU without fast bf16 (AVX2 only) the loop runs in fp32, and labkit's
  forward fuses and packs the fp32 weights the same way (:data:`FP32_PACKED`): oneDNN's packed fp32
  product beat ``F.linear``'s on a decoding step's few rows, at the cost of a second copy of the
  linear weights while a ``generate`` call runs (about 0.5 GB for the bundled model).
- **Its own forward for Llama-architecture models** (the bundled SmolLM2, Llama 2/3 and
  kin; :class:`_LeanDecoder`). ``model.forward`` is general, and a decoding step of a few rows
  through 30 small layers spends most of its time outside the products: in masks built per
  call, in casts of the whole cache under autocast, in PyTorch's fused attention kernel (built
  for long queries: one query row per head costs it as much as a hundred) and in small
  element-wise operations. labkit's forward computes the same function with fewer, larger
  operations: q/k/v and gate/up as one product each, rotary positions once per step for all
  layers (by the model's own rotary module), fused RMSNorm, keys and values in fp32 in a cache
  allocated once, a decoding step's attention as two small fp32 products, and the unembedding
  on the last position only. In fp32 it gives ``model.forward``'s tokens and log-probs (a test
  checks it); models with adapters on their layers (LoRA) or other architectures go through
  ``model.forward`` with the same loop.
- **Last position only.** The unembedding (49k columns for SmolLM2) runs on the last
  position of each row (``logits_to_keep=1``), in the prompt pass too.
- **Sampling in labkit.** Greedy = argmax. Sampling draws from ``softmax(logits / T)`` by
  inverse CDF (one uniform per row); top-p keeps the smallest set of most likely tokens
  whose mass reaches ``top_p``, found among the top 256 tokens when they hold that mass
  (a full sort of 49k columns per row per step costs more than the model's step), with a
  full sort for rows where they do not.
- **Finished rows leave the batch.** A row that emitted EOS gets pad tokens from then on;
  once half the rows are finished the cache, mask and positions are compacted to the
  unfinished rows, so a long tail of one response does not cost a full batch.
- **Sorted batches, a prompt pass without padding or repeats.** ``generate`` sorts prompts by
  token length before batching (less padding); results come back in the caller's order. The
  prompt pass computes the tokens every prompt of the batch starts with (the chat template's
  system turn) once and copies their keys and values to each row, then runs the rest in groups
  of rows of similar length, each over its own columns, not the batch's widest
  (:func:`prefill_groups`); PPO's rollouts, whose prompts come unsorted, gain most.
  ``sample_k`` repeats each prompt K times, so the K copies land side by side in the same
  batch, and the loop runs the prompt pass once for each run of identical rows, copying its
  keys and values to the K rows.
- **Stop at EOS.** A response ends at the chat template's end-of-turn token
  ``<|im_end|>`` (``tokenizer.eos_token_id``); a response that hits ``max_new_tokens``
  first is *truncated*, which PPO penalises and the gold labeler notices.
- **Other architectures.** Models whose cache is not plain full attention (sliding windows
  shorter than the sequence, recurrent or linear-attention layers, encoder-decoders) go
  through Hugging Face ``model.generate`` with the same settings instead.

**What greedy decoding guarantees across batches.** In fp32 (``bf16=False`` with fp32
weights) a row's greedy tokens do not depend on which other prompts share its batch, nor on
its left padding: padded positions are masked out and positions count real tokens, so the
row's logits differ from the same prompt run alone only by float rounding (matrix kernels
may block a different number of rows differently), far below the gap between the two best
tokens except at exact ties. Under bf16 the same holds with bf16 rounding, which is coarse
enough to flip a near-tie (two best logits within about 1%), after which the two
continuations differ; a test checks the fp32 guarantee on the tiny model.

Speed against ``transformers``' ``generate`` and the machine's compute bound:
``benchmarks/generation.py`` (results in ``benchmarks/results/generation.json``).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer

from labkit.doctor import steady_memory
from labkit.live import progress
from labkit.models import autocast, fast_dtype, format_prompt, position_ids

__all__ = ["generate", "sample_k", "encode_prompts", "sample_tokens", "stream", "KVSlab"]

TOP_P_CANDIDATES = 256  # top-p looks for the nucleus among this many most likely tokens first


def encode_prompts(tokenizer, prompts: Sequence[str], max_length: int | None = None) -> tuple[list[list[int]], int]:
    """Chat-formatted token ids for raw user prompts (no padding) and how many were truncated.

    Over-long prompts keep their *last* ``max_length`` tokens: the generation prompt
    (``<|im_start|>assistant``) at the end is what the model must see to answer.
    """
    texts = [format_prompt(tokenizer, p) for p in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    n_truncated = 0
    if max_length is not None:
        n_truncated = sum(len(x) > max_length for x in ids)
        ids = [x[-max_length:] for x in ids]
    return ids, n_truncated


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists: ``input_ids`` and ``attention_mask``, both (B, T)."""
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        if r:
            input_ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, T - len(r):] = 1
    return input_ids, attention_mask


def _cut_at_eos(tokens: list[int], eos_id: int) -> tuple[list[int], bool]:
    """Response tokens before the first EOS, and whether there was none (truncated)."""
    if eos_id in tokens:
        return tokens[: tokens.index(eos_id)], False
    return tokens, True


# ----------------------------------------------------------------------------- the KV cache


class KVSlab(DynamicLayer):
    """One layer's keys and values in a buffer of ``capacity`` positions, allocated at the
    first update; each update writes its columns in place and returns views of the filled
    part, (B, H, t, D), so attention never sees the empty tail and nothing is re-allocated."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            B, H, _, D = key_states.shape
            self.device = key_states.device
            self._keys = key_states.new_empty(B, H, self.capacity, D)  # (B, H, capacity, D)
            self._values = value_states.new_empty(B, H, self.capacity, value_states.shape[-1])
            self.is_initialized = True
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: {end} positions > capacity {self.capacity}")
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._keys[:, :, :end], self._values[:, :, :end]
        return self.keys, self.values

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (finished responses leave the batch)."""
        if self.is_initialized:
            self._keys, self._values = self._keys[rows], self._values[rows]
            self.keys, self.values = self._keys[:, :, :self.length], self._values[:, :, :self.length]


def _cache_argument(model) -> str | None:
    """The name under which ``model.forward`` takes a KV cache (transformers renamed it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrappers
    params = inspect.signature(base.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def fast_path_supported(model, total_length: int) -> bool:
    """True when labkit's decoding loop can run ``model``: a decoder-only HF model with full
    attention over ``total_length`` positions in every layer. Others use HF ``generate``."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or _cache_argument(model) is None:
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        return False
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < total_length:
        return False
    return True


# ----------------------------------------------------------------------------- bf16 weights

_PACKED_OK: dict[torch.dtype, bool] = {}

# fp32 products in labkit's forward through oneDNN's pre-packed linear (CPU, where it works): on a CPU without
# fast bf16 (AVX2 only) the sampler runs in fp32, and a packed fp32 product of a decoding step's few rows ran
# 1.1-1.4x faster than F.linear's (MKL) on an AMD EPYC with AVX2; the fused, packed copies cost the model's
# linear weights once more in memory for the duration of a ``generate`` call. False: the modules' own weights.
FP32_PACKED = os.environ.get("LABKIT_FP32_PACKED", "1") != "0"


def _packed_linear_works(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether oneDNN's pre-packed linear runs here in ``dtype`` and gives F.linear's numbers
    (probed once per dtype: bf16 bit for bit; fp32 to fp32 rounding, the kernels sum in other orders).

    A bf16 matmul through ``F.linear`` re-orders (packs) the weight into the kernel's blocked
    layout on every call; at decoding sizes (a few rows per step) that costs as much as the
    product itself. Packing once per call of the sampler removes it."""
    if dtype not in _PACKED_OK:
        try:  # a private generator: the probe must not move the global RNG (PPO's sampling draws from it)
            g = torch.Generator().manual_seed(0)
            w = torch.randn(64, 32, generator=g).to(dtype)
            x = torch.randn(3, 5, 32, generator=g).to(dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
            out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            ref = torch.nn.functional.linear(x, w)
            _PACKED_OK[dtype] = bool(torch.equal(out, ref) if dtype == torch.bfloat16
                                     else torch.allclose(out, ref, rtol=1e-5, atol=1e-5))
        except (AttributeError, RuntimeError, NotImplementedError):
            _PACKED_OK[dtype] = False
    return _PACKED_OK[dtype]


def _packed_forward(packed: torch.Tensor, bias: torch.Tensor | None):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.to(packed.dtype), packed, bias, "none", [], "")
    return forward


@contextmanager
def bf16_linear_weights(model, enabled: bool = True, cache: dict | None = None):
    """Within the block, every ``nn.Linear`` with an fp32 weight uses a bf16 copy of it.

    On a CPU where oneDNN's pre-packed bf16 linear works (:func:`_packed_linear_works`) the copy
    is packed into the kernel's layout too, and the module's forward calls the packed kernel
    (the same products, bit for bit, without re-packing at every call); elsewhere the bf16
    copy replaces the weight and autocast does the rest.

    The copies are cast on entry, so they always match the current weights (an optimizer step
    updates weights in place, and PyTorch's fused AdamW does so without bumping the version
    counter, so no stamp on the weight can tell a stale copy). A caller that enters the block
    many times with unchanged weights (one ``stream``, once per token) passes a ``cache`` dict
    it owns: copies made under it are reused for as long as the caller keeps it. Embeddings
    keep their weights, so a tied unembedding gets its own bf16 copy while the embedding
    lookup (and the residual stream) stays fp32, as under autocast.
    """
    swapped, patched = [], []
    if enabled:
        copies = {} if cache is None else cache
        for module in model.modules():
            w = module._parameters.get("weight") if isinstance(module, torch.nn.Linear) else None
            if w is None or w.dtype != torch.float32:
                continue
            if w.device.type == "cpu" and _packed_linear_works():
                if id(w) not in copies:
                    b = module.bias
                    copies[id(w)] = (torch.ops.mkldnn._reorder_linear_weight(w.detach().to(torch.bfloat16), None),
                                     None if b is None else b.detach().to(torch.bfloat16))
                patched.append((module, module.__dict__.get("forward")))
                module.forward = _packed_forward(*copies[id(w)])
                continue
            if id(w) not in copies:
                copies[id(w)] = torch.nn.Parameter(w.detach().to(torch.bfloat16), requires_grad=False)
            module._parameters["weight"] = copies[id(w)]
            swapped.append((module, w))
    try:
        yield
    finally:
        for module, w in swapped:
            module._parameters["weight"] = w
        for module, own in patched:
            if own is None:
                del module.forward  # back to the class's forward
            else:
                module.forward = own


# ----------------------------------------------------------------------------- labkit's own forward

# Run Llama-architecture models through _LeanDecoder; False (or LABKIT_LEAN_FORWARD=0): through model.forward.
LEAN_FORWARD = os.environ.get("LABKIT_LEAN_FORWARD", "1") != "0"


def lean_supported(model) -> bool:
    """True when :class:`_LeanDecoder` can run ``model``: a Llama-architecture decoder (SmolLM2,
    Llama 2/3 and their kin: pre-norm RMSNorm, rotary positions, grouped-query attention, SwiGLU)
    whose linear layers are plain ``nn.Linear`` (no adapters wrapped around them)."""
    config = getattr(model, "config", None)
    core = getattr(model, "model", None)
    if (config is None or getattr(config, "model_type", None) != "llama" or getattr(config, "hidden_act", None) != "silu"
            or getattr(config, "pretraining_tp", 1) != 1 or not hasattr(core, "rotary_emb")
            or not hasattr(core, "layers") or type(getattr(model, "lm_head", None)) is not torch.nn.Linear):
        return False
    for layer in core.layers:
        a, m = layer.self_attn, layer.mlp
        if any(type(p) is not torch.nn.Linear for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj,
                                                         m.gate_proj, m.up_proj, m.down_proj)):
            return False
    return True


def _use_lean(model) -> bool:
    return LEAN_FORWARD and lean_supported(model)


@contextmanager
def lean_forward(enabled: bool):
    """Within the block, Llama-architecture models are sampled through labkit's forward
    (``enabled``) or through ``model.forward``; the setting before is restored after (A/B runs)."""
    global LEAN_FORWARD
    before, LEAN_FORWARD = LEAN_FORWARD, enabled
    try:
        yield
    finally:
        LEAN_FORWARD = before


def _compute_dtype(model, device: torch.device) -> torch.dtype:
    """The dtype of products and attention in the decoding loop: autocast's where it is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


# A group's fixed cost in the prompt pass, in padded tokens: a pass through every layer costs time beyond its
# tokens' products. On the bundled model 16, 48 and 128 gave the same prompt-pass times within 5%.
PREFILL_GROUP_COST = 48
PREFILL_SHARED_MIN = 8  # a prefix all prompts of a batch share is computed once from this many tokens on


def prefill_groups(lengths: Sequence[int], group_cost: int | None = None) -> list[tuple[list[int], int]]:
    """Rows of a left-padded prompt pass, grouped by length: ``[(rows, width)]``, each group
    computed over its longest prompt's ``width`` columns instead of the whole batch's.

    Rows are sorted by length and cut into runs that minimise the tokens computed, padding
    included, plus ``group_cost`` per group (a pass through every layer has a fixed cost, and
    fewer rows make smaller products; default :data:`PREFILL_GROUP_COST`): an exact split by
    dynamic programming over the sorted lengths. A batch of equal lengths stays one group.

    >>> prefill_groups([100, 10, 12, 95], group_cost=10)
    [([1, 2], 12), ([3, 0], 100)]
    """
    group_cost = PREFILL_GROUP_COST if group_cost is None else group_cost
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        width = lengths[order[j - 1]]  # the longest of rows i..j-1
        for i in range(j):
            cost = best[i] + (j - i) * width + group_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        i = cut[j]
        groups.append(([order[r] for r in range(i, j)], lengths[order[j - 1]]))
        j = i
    return groups[::-1]


class _Projection:
    """One or more ``nn.Linear`` applied to the same input, their outputs side by side: q, k and v
    become one product, gate and up another (fewer, larger products; a decoding step of a few rows
    pays a fixed cost per product). In bf16 the weights are cast (and on a CPU packed, see
    :func:`_packed_linear_works`) once; in fp32 they are fused and packed once on a CPU where
    oneDNN's packed fp32 linear works (:data:`FP32_PACKED`), else the modules' own weights are
    used, not copied."""

    def __init__(self, linears: list, dtype: torch.dtype):
        self.dtype, self.linears = dtype, linears
        self.forward = None  # the fused product; None: the modules' own, outputs concatenated
        pack = (linears[0].weight.device.type == "cpu"
                and (dtype == torch.bfloat16 or (dtype == torch.float32 and FP32_PACKED)) and _packed_linear_works(dtype))
        if not pack and dtype == torch.float32 and all(lin.weight.dtype == torch.float32 for lin in linears):
            return
        w = torch.cat([lin.weight.detach() for lin in linears]).to(dtype)  # (sum of outs, in)
        bias = None
        if any(lin.bias is not None for lin in linears):
            bias = torch.cat([lin.bias.detach() if lin.bias is not None else w.new_zeros(lin.out_features)
                              for lin in linears]).to(dtype)
        if pack:
            self.forward = _packed_forward(torch.ops.mkldnn._reorder_linear_weight(w, None), bias)
        else:
            self.forward = lambda x: F.linear(x, w, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.forward is not None:
            return self.forward(x)
        outs = [lin(x) for lin in self.linears]
        return outs[0] if len(outs) == 1 else torch.cat(outs, -1)


class _LeanDecoder:
    """A Llama-architecture model's forward for sampling, written for the decoding loop.

    ``model.forward`` is general (masks built per call, hooks, output records, per-step casts of the
    whole cache under autocast); a decoding step of a 30-layer 135M model on a CPU then spends more
    time in that general code and in small element-wise operations than in its products. This
    forward computes the same function with fewer operations: fused q/k/v and gate/up products,
    rotary positions computed once per step for all layers (by the model's own rotary module, so
    its scaling rules apply), fused RMSNorm, keys and values kept in fp32 in a cache allocated once,
    attention of a decoding step as two small products (:meth:`_attend`), and the unembedding on the
    last position only. Precision: the residual stream and norms in the weights' dtype, the
    products in ``dtype`` (bf16 under bf16 autocast, as autocast computes them), rotary positions
    and attention in fp32.
    """

    def __init__(self, model, capacity: int, dtype: torch.dtype, cache: dict | None = None):
        config, core = model.config, model.model
        self.embed, self.rotary, self.dtype, self.capacity = core.embed_tokens, core.rotary_emb, dtype, capacity
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.norm = (core.norm.weight, core.norm.variance_epsilon)
        # Casting, fusing and packing the products' weights takes about half a second for the bundled
        # model (mostly fresh memory); a caller with several batches on unchanged weights keeps `cache`.
        cache = {} if cache is None else cache
        key = ("lean", dtype, FP32_PACKED)
        if key not in cache:
            cache[key] = self._weights(model, dtype)
        self.layers, self.unembed = cache[key]
        self.keys = self.values = None  # per layer (B, kv_heads, capacity, head_dim), allocated at the first call
        self.length = 0

    @staticmethod
    def _weights(model, dtype: torch.dtype) -> tuple[list[dict], _Projection]:
        """Per layer its norms and fused products; and the unembedding."""
        layers = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            layers.append(dict(
                norm1=(layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                qkv=_Projection([a.q_proj, a.k_proj, a.v_proj], dtype), o=_Projection([a.o_proj], dtype),
                norm2=(layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
                gate_up=_Projection([m.gate_proj, m.up_proj], dtype), down=_Projection([m.down_proj], dtype),
                scale=a.scaling, intermediate=m.gate_proj.out_features))
        return layers, _Projection([model.lm_head], dtype)

    @staticmethod
    def _rms_norm(x: torch.Tensor, norm: tuple) -> torch.Tensor:
        weight, eps = norm
        return F.rms_norm(x, weight.shape, weight, eps)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed ``input_ids`` (b, t) at ``positions`` (b, t) after the cached columns;
        ``attention_mask`` (b, cached + t) marks the real tokens among all columns (0 = left padding).
        Returns the last position's logits (b, V), fp32.

        The prompt pass (the first call) skips two kinds of repeated work. The tokens every prompt
        starts with (the chat template's system turn: 24 of the eval prompts' 73 tokens on average)
        are computed once and their keys and values copied to each row. The rest runs in groups of
        rows of similar length, each over its own longest prompt's columns (:func:`prefill_groups`),
        so a short prompt in a batch with a long one is not computed through the long one's padding."""
        b, t = input_ids.shape
        start, end = self.length, attention_mask.shape[1]
        if end != start + t:
            raise ValueError(f"attention_mask covers {end} columns; the cache holds {start} and {t} are new")
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: {end} positions > capacity {self.capacity}")
        with torch.autocast(input_ids.device.type, enabled=False):
            if self.keys is None:  # zeros: the padding columns a grouped prompt pass skips stay finite
                shape = (b, self.kv_heads, self.capacity, self.head_dim)
                self.keys = [torch.zeros(shape, device=input_ids.device) for _ in self.layers]
                self.values = [torch.zeros(shape, device=input_ids.device) for _ in self.layers]
            if start == 0 and t > 1:
                logits = self._prompt_pass(input_ids, attention_mask, positions)
            else:
                def cache(i, k, v):  # write the new columns, attend over every column so far
                    self.keys[i][:, :, start:end], self.values[i][:, :, start:end] = k, v
                    return self.keys[i][:, :, :end], self.values[i][:, :, :end]
                logits = self._layers(input_ids, attention_mask, positions, cache)
            self.length = end
            return logits

    def _prompt_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The first call (see :meth:`__call__`): the shared prefix once, then groups by length."""
        b, T = input_ids.shape
        device = input_ids.device
        lengths = attention_mask.sum(1).tolist()
        rows_ids = [row[T - n:] for row, n in zip(input_ids.tolist(), lengths)]
        shared = len(os.path.commonprefix(rows_ids)) if b > 1 else 0
        shared = min(shared, min(lengths) - 1)  # every row keeps a token of its own to predict from
        if shared < PREFILL_SHARED_MIN:
            shared = 0
        if shared:  # computed as one row; its keys and values go to each row's first real columns
            prefix = {}

            def keep(i, k, v):
                prefix[i] = (k[0].transpose(0, 1), v[0].transpose(0, 1))  # (P, KV, D)
                return k, v
            first = torch.tensor([T - n for n in lengths], device=device)  # (b,): each row's first real column
            row0 = slice(T - lengths[0], T - lengths[0] + shared)  # the prefix's columns in row 0
            self._layers(input_ids[:1, row0], attention_mask.new_ones(1, shared), positions[:1, row0], keep)
            rows = torch.arange(b, device=device)[:, None]  # (b, 1)
            cols = first[:, None] + torch.arange(shared, device=device)  # (b, P)
            for i, (k, v) in prefix.items():
                self.keys[i][rows, :, cols], self.values[i][rows, :, cols] = k, v  # (b, P, KV, D) each
        logits = None
        for group, width in prefill_groups([n - shared for n in lengths]):
            idx = torch.tensor(group, device=device)
            lo = T - max(lengths[r] for r in group)  # the group's first real column

            def cache(i, k, v):  # write the new columns, attend over the group's real columns
                self.keys[i][idx, :, T - width:T], self.values[i][idx, :, T - width:T] = k, v
                return self.keys[i][idx, :, lo:T], self.values[i][idx, :, lo:T]
            out = self._layers(input_ids[idx, T - width:], attention_mask[idx, lo:], positions[idx, T - width:],
                               cache)  # (g, V)
            logits = out.new_empty(b, out.shape[1]) if logits is None else logits
            logits[idx] = out
        return logits

    def _layers(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
                cache) -> torch.Tensor:
        """The layers over the new tokens ``input_ids`` (b, t) at ``positions``; ``attention_mask``
        (b, L) marks the real tokens among the L columns attended over, the new ones last.
        ``cache(i, k, v)`` stores layer i's new keys and values (b, KV, t, D) and returns the keys
        and values to attend over (b, KV, L, D). Returns the last position's logits (b, V), fp32."""
        b, t = input_ids.shape
        H, KV, D = self.heads, self.kv_heads, self.head_dim
        x = self.embed(input_ids)  # (b, t, E), the weights' dtype
        cos, sin = self.rotary(x, positions)  # (b, t, D)
        cos, sin = cos[:, :, None].float(), sin[:, :, None].float()  # over heads: (b, t, 1, D)
        mask = self._mask(attention_mask, t)
        half = D // 2
        for i, layer in enumerate(self.layers):
            qkv = layer["qkv"](self._rms_norm(x, layer["norm1"])).view(b, t, H + 2 * KV, D)
            qk = qkv[:, :, :H + KV].float()  # rotary positions in fp32, as the model's own forward
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), -1) * sin
            k, v = cache(i, qk[:, :, H:].transpose(1, 2), qkv[:, :, H + KV:].transpose(1, 2).float())
            a = self._attend(qk[:, :, :H].transpose(1, 2), k, v, mask, layer["scale"])  # (b, H, t, D)
            x = x + layer["o"](a.transpose(1, 2).reshape(b, t, H * D))
            gate_up = layer["gate_up"](self._rms_norm(x, layer["norm2"]))
            gate, up = gate_up.split(layer["intermediate"], -1)
            x = x + layer["down"](F.silu(gate) * up)
        return self.unembed(self._rms_norm(x[:, -1], self.norm)).float()  # (b, V)

    def _mask(self, attention_mask: torch.Tensor, t: int) -> torch.Tensor | None:
        """Additive fp32 mask (b, 1, t, end) of the columns each new position attends to; None when
        that is every column (one new position per row and no padding)."""
        b, end = attention_mask.shape
        if t == 1 and bool(attention_mask.all()):
            return None
        allowed = attention_mask.bool()[:, None, None, :].expand(b, 1, t, end).clone()  # (b, 1, t, end)
        if t > 1:  # causal among the new positions; a pad position attends to itself (no empty rows)
            new = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device)
            allowed[..., end - t:] &= new.tril()
            allowed[..., end - t:] |= torch.eye(t, dtype=torch.bool, device=attention_mask.device)
        return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, float("-inf"))

    ATTEND_DIRECT_MAX = 1 << 20  # score elements (b x heads x t x columns) up to which attention runs as two products

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                scale: float) -> torch.Tensor:
        """Attention of ``q`` (b, H, t, D) over the cache ``k``, ``v`` (b, KV, end, D), all fp32.

        A decoding step (t = 1) is two small fp32 products per layer, the H / KV query heads of a
        key head stacked as rows of one product. PyTorch's fused CPU kernel is built for long
        queries: at t = 1 it took 1.7 ms for 32 rows over 130 columns where the two products take
        0.13 (AMD EPYC, 2 threads). Long prompt passes go through the fused kernel in ``dtype``."""
        b, H, t, D = q.shape
        KV, end = k.shape[1], k.shape[2]
        if b * H * t * end > self.ATTEND_DIRECT_MAX:
            dt = self.dtype
            return F.scaled_dot_product_attention(q.to(dt), k.to(dt), v.to(dt), scale=scale, enable_gqa=KV != H,
                                                  attn_mask=None if mask is None else mask.to(dt))
        g = H // KV  # query heads per key head (query head h reads key head h // g)
        scores = torch.matmul(q.reshape(b, KV, g * t, D), k.transpose(-1, -2)).view(b, KV, g, t, end) * scale
        if mask is not None:
            scores = scores + mask[:, :, None]  # (b, 1, 1, t, end)
        return torch.matmul(scores.softmax(-1).view(b, KV, g * t, end), v).view(b, H, t, D)

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (finished responses leave; copies of a prompt join)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]


class _ModelForward:
    """The decoding loop's forward through ``model.forward`` (any decoder whose layers all attend
    over the full sequence), with the same call as :class:`_LeanDecoder`."""

    def __init__(self, model, capacity: int):
        self.model, self.cache_arg = model, _cache_argument(model)
        self.slabs = [KVSlab(capacity) for _ in range(model.config.num_hidden_layers)]
        self.cache = Cache(layers=self.slabs)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache})
        return out.logits[:, -1].float()  # (b, V)

    def keep_rows(self, rows: torch.Tensor) -> None:
        for slab in self.slabs:
            slab.keep_rows(rows)


# ----------------------------------------------------------------------------- sampling


def _top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean (B, V): the smallest set of most likely tokens whose probability reaches ``top_p``.

    Searched among the top ``TOP_P_CANDIDATES`` tokens first; rows whose candidates hold less
    than ``top_p`` of the mass fall back to a full sort.
    """
    probs = logits.softmax(-1)  # (B, V)
    k = min(TOP_P_CANDIDATES, logits.shape[-1])
    top, idx = probs.topk(k, dim=-1)  # (B, k), descending
    mass_before = top.cumsum(-1) - top  # (B, k): mass of the more likely tokens
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, idx, mass_before < top_p)  # (B, V)
    short = (mass_before[:, -1] + top[:, -1]) < top_p  # (B,): nucleus not within the candidates
    if short.any():
        rows = short.nonzero().squeeze(1)
        sorted_p, order = probs[rows].sort(-1, descending=True)  # (b, V)
        keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
        keep[rows] = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
    return keep


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, do_sample: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token (B,) from last-position logits (B, V): argmax, or a draw from
    ``softmax(logits / temperature)`` restricted to the top-p nucleus."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_p < 1.0:
        logits = logits.masked_fill(~_top_p_mask(logits, top_p), float("-inf"))
    cdf = logits.softmax(-1).cumsum(-1)  # (B, V)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, generator=generator) * cdf[:, -1:]  # (B, 1)
    # Inverse CDF: one uniform per row instead of torch.multinomial (several times slower at 49k columns).
    return torch.searchsorted(cdf, u).squeeze(1).clamp_(max=cdf.shape[1] - 1)


# ----------------------------------------------------------------------------- the decoding loop


def _decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
            temperature: float, top_p: float, do_sample: bool, eos_token_id: int | None, pad_token_id: int,
            with_logprobs: bool, generator: torch.Generator | None, cache: dict | None = None) -> Iterator[tuple]:
    """Yield, per step, ``(tokens, logprobs, entropy)``, each (B,) for all rows of the batch
    (pad token, 0 and 0 for finished rows; logprobs and entropy None unless asked for).

    Runs under the caller's autocast and weight context; stops when every row has emitted EOS.
    """
    B, T = input_ids.shape
    device = input_ids.device
    forward = (_LeanDecoder(model, T + max_new_tokens, _compute_dtype(model, device), cache) if _use_lean(model)
               else _ModelForward(model, T + max_new_tokens))
    mask = torch.ones(B, T + max_new_tokens, dtype=attention_mask.dtype, device=device)  # (B, T + R)
    mask[:, :T] = attention_mask
    positions = position_ids(attention_mask)  # (B, T)
    next_position = positions[:, -1:] + 1  # (B, 1)
    active = torch.arange(B, device=device)  # rows of the full batch still in the running batch
    done = torch.zeros(B, dtype=torch.bool, device=device)  # (b,): emitted EOS, awaiting compaction
    # Identical prompts side by side (sample_k's K copies of a prompt) share one prompt pass: the
    # first copy's keys and values are copied to the others' rows before the first token is drawn.
    new_prompt = torch.ones(B, dtype=torch.bool, device=device)  # (B,): differs from the row above
    new_prompt[1:] = (input_ids[1:] != input_ids[:-1]).any(1) | (attention_mask[1:] != attention_mask[:-1]).any(1)
    source_row = new_prompt.cumsum(0) - 1  # (B,): each row's first copy, among the distinct prompts
    tokens_in, n_filled = input_ids, T
    for step in range(max_new_tokens):
        if step == 0 and not new_prompt.all():
            first = new_prompt.nonzero().squeeze(1)  # (P,)
            logits = forward(input_ids[first], mask[first, :T], positions[first])[source_row]  # (B, V)
            forward.keep_rows(source_row)  # (P, ...) -> (B, ...)
        else:
            logits = forward(tokens_in, mask[:, :n_filled], positions)  # (b, V)
        tokens = sample_next(logits, temperature, top_p, do_sample, generator).masked_fill_(done, pad_token_id)  # (b,)
        full = torch.full((B,), pad_token_id, dtype=torch.long, device=device).index_copy_(0, active, tokens)  # (B,)
        logprobs = entropy = None
        if with_logprobs:  # under the temperature-scaled distribution, as PPO's forward computes them
            logp = (logits / temperature).log_softmax(-1)  # (b, V)
            picked = logp.gather(1, tokens[:, None])[:, 0].masked_fill_(done, 0.0)  # (b,)
            ent = (-(logp.exp() * logp).sum(-1)).masked_fill_(done, 0.0)  # (b,)
            logprobs = torch.zeros(B, device=device).index_copy_(0, active, picked)
            entropy = torch.zeros(B, device=device).index_copy_(0, active, ent)
        yield full, logprobs, entropy
        if eos_token_id is not None:
            done |= tokens == eos_token_id
        n_running = len(active) - int(done.sum())
        if n_running == 0 or step == max_new_tokens - 1:
            return
        if n_running <= len(active) // 2:  # compact: finished rows leave the batch
            keep = (~done).nonzero().squeeze(1)
            forward.keep_rows(keep)
            active, tokens, mask, next_position, done = (active[keep], tokens[keep], mask[keep],
                                                         next_position[keep], done[keep])
        tokens_in, positions = tokens[:, None], next_position  # (b, 1)
        next_position, n_filled = next_position + 1, n_filled + 1


@torch.no_grad()
def sample_tokens(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  temperature: float = 1.0, top_p: float = 1.0, do_sample: bool = True,
                  eos_token_id: int | None = None, pad_token_id: int = 0, bf16: bool = True,
                  generator: torch.Generator | None = None, return_logprobs: bool = True, cache: dict | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Sample responses to left-padded prompts ``input_ids``/``attention_mask`` (B, T).

    Returns ``responses`` (B, R) long, pad id after each row's first EOS (the EOS is kept),
    R <= ``max_new_tokens`` (the loop stops when every row has stopped); ``logprobs`` (B, R)
    fp32 of the sampled tokens under ``softmax(logits / temperature)`` (the full distribution,
    also when ``top_p`` < 1 narrows the draw), and its ``entropy`` (B, R) fp32; both 0 after EOS.
    ``bf16`` runs under bf16 autocast where the hardware is fast at it (``labkit.models.autocast``).
    ``return_logprobs=False`` skips the two (B, V) softmaxes per step and returns None for both.
    ``cache``: a dict the caller keeps over several calls on unchanged weights (the batches of one
    ``generate`` call): the weights' bf16 copies are made once for all of them.
    """
    device = input_ids.device
    steps = []
    with _sampling_context(model, device, bf16, cache=cache):
        if not fast_path_supported(model, input_ids.shape[1] + max_new_tokens):
            return _hf_sample_tokens(model, input_ids, attention_mask, max_new_tokens, temperature, top_p, do_sample,
                                     eos_token_id, pad_token_id, return_logprobs)
        for step in _decode(model, input_ids, attention_mask, max_new_tokens, temperature, top_p, do_sample,
                            eos_token_id, pad_token_id, with_logprobs=return_logprobs, generator=generator,
                            cache=cache):
            steps.append(step)
    responses = torch.stack([s[0] for s in steps], 1)  # (B, R)
    if not return_logprobs:
        return responses, None, None
    return responses, torch.stack([s[1] for s in steps], 1), torch.stack([s[2] for s in steps], 1)


@contextmanager
def _sampling_context(model, device: torch.device, bf16: bool, cache: dict | None = None):
    """eval mode, bf16 autocast (if asked for and fast here) with bf16 linear weights cast once
    (the lean decoder makes its own bf16 weights and needs no swap), and an allocator that keeps
    the blocks every step frees for the next (:func:`labkit.doctor.steady_memory`)."""
    use_bf16 = bf16 and fast_dtype(device) == torch.bfloat16
    was_training = model.training
    model.eval()
    try:
        with steady_memory(), autocast(device, enabled=use_bf16), \
                bf16_linear_weights(model, enabled=use_bf16 and not _use_lean(model), cache=cache):
            yield
    finally:
        model.train(was_training)


def _hf_sample_tokens(model, input_ids, attention_mask, max_new_tokens, temperature, top_p, do_sample,
                      eos_token_id, pad_token_id, return_logprobs):
    """The same contract through HF ``generate`` (architectures the fast path does not run)."""
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample,
                           temperature=temperature if do_sample else None, top_p=top_p if do_sample else None,
                           top_k=0 if do_sample else None, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                           output_logits=return_logprobs, return_dict_in_generate=True)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen)
    responses = out.sequences[:, input_ids.shape[1]:]  # (B, R)
    is_eos = responses == eos_token_id if eos_token_id is not None else torch.zeros_like(responses, dtype=torch.bool)
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # (B, R): strictly after the first EOS
    responses = responses.masked_fill(after, pad_token_id)
    if not return_logprobs:
        return responses, None, None
    logp = (torch.stack(out.logits, 1).float() / temperature).log_softmax(-1)  # (B, R, V)
    logprobs = logp.gather(2, responses[..., None])[..., 0]  # (B, R)
    entropy = -(logp.exp() * logp).sum(-1)  # (B, R)
    return responses, logprobs.masked_fill(after, 0.0), entropy.masked_fill(after, 0.0)


# ----------------------------------------------------------------------------- public entry points


def _settings(model, tokenizer, max_new_tokens: int, max_prompt_length: int | None) -> tuple:
    """The model's device, the EOS and pad ids, and the prompt length that leaves room for the
    answer in the model's context (``max_prompt_length`` if given)."""
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if max_prompt_length is None:
        context = getattr(model.config, "max_position_embeddings", None) or 2048
        max_prompt_length = max(1, context - max_new_tokens)
    return next(model.parameters()).device, eos_id, pad_id, max_prompt_length


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64,
             temperature: float = 0.7, top_p: float = 0.9, do_sample: bool = True,
             batch_size: int = 32, seed: int | None = None, return_truncated: bool = False,
             max_prompt_length: int | None = None, show_progress: bool = True,
             desc: str = "generate", bf16: bool = True):
    """Responses (str) to raw user ``prompts``; with ``return_truncated`` also a list of bools
    telling which responses hit ``max_new_tokens`` before EOS.

    >>> model, tok = load_model("tiny")
    >>> generate(model, tok, ["Say hi."], max_new_tokens=8, seed=0)
    """
    if not prompts:
        return ([], []) if return_truncated else []
    device, eos_id, pad_id, max_prompt_length = _settings(model, tokenizer, max_new_tokens, max_prompt_length)
    ids, n_long = encode_prompts(tokenizer, prompts, max_prompt_length)
    if n_long:
        print(f"labkit.generate: {n_long} prompt(s) longer than {max_prompt_length} tokens were "
              "truncated from the left")

    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch
    responses: list[str] = [""] * len(ids)
    truncated: list[bool] = [False] * len(ids)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    copies: dict = {}  # the weights' bf16 copies, made once for all batches of this call
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None), steady_memory():
        if seed is not None:
            torch.manual_seed(seed)
        for batch in progress(batches, desc=desc, disable=not show_progress, leave=False):
            input_ids, attention_mask = _left_pad([ids[i] for i in batch], pad_id)  # (B, T)
            new_tokens, _, _ = sample_tokens(model, input_ids.to(device), attention_mask.to(device),
                                             max_new_tokens, temperature, top_p, do_sample, eos_id, pad_id,
                                             bf16=bf16, return_logprobs=False, cache=copies)  # (B, R)
            for i, tokens in zip(batch, new_tokens.tolist()):
                tokens, cut = _cut_at_eos(tokens, eos_id)
                responses[i] = tokenizer.decode(tokens, skip_special_tokens=True)
                truncated[i] = cut
    return (responses, truncated) if return_truncated else responses


def sample_k(model, tokenizer, records: Sequence[dict | str], k: int = 4, **kwargs) -> list[dict]:
    """K sampled responses per prompt record: ``[{"prompt_id", "prompt", "responses", "truncated"}]``.

    ``records`` are prompt records (``labkit.data.load_prompts``) or plain strings. Each
    prompt is repeated K times inside the batches (InstructGPT §3.5 ranks K = 4..9 samples
    per prompt); the K copies sit side by side, so the decoding loop computes the prompt's
    keys and values once and copies them to the K rows (the prompt pass costs one copy, not K).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    records = [{"prompt": r} if isinstance(r, str) else r for r in records]
    repeated = [r["prompt"] for r in records for _ in range(k)]
    kwargs.setdefault("desc", f"sample {k} per prompt")
    responses, truncated = generate(model, tokenizer, repeated, return_truncated=True, **kwargs)
    out = []
    for j, r in enumerate(records):
        out.append({"prompt_id": r.get("id", r.get("prompt_id")), "prompt": r["prompt"],
                    "responses": responses[j * k:(j + 1) * k], "truncated": truncated[j * k:(j + 1) * k]})
    return out


def stream(model, tokenizer, prompt: str, max_new_tokens: int = 256, temperature: float = 0.7,
           top_p: float = 0.9, do_sample: bool = True, seed: int | None = None,
           max_prompt_length: int | None = None, bf16: bool = True) -> Iterator[str]:
    """Yield the response to one raw user ``prompt`` as text pieces, as tokens are produced
    (for a chat view); joined, the pieces equal ``generate``'s response at the same settings.

    ``seed`` draws from a private generator (the global RNG is left alone). Stops at EOS.
    """
    device, eos_id, pad_id, max_prompt_length = _settings(model, tokenizer, max_new_tokens, max_prompt_length)
    ids, _ = encode_prompts(tokenizer, [prompt], max_prompt_length)
    input_ids = torch.tensor(ids, dtype=torch.long, device=device)  # (1, T)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    if not fast_path_supported(model, input_ids.shape[1] + max_new_tokens):  # whole response, then one piece
        response = generate(model, tokenizer, [prompt], max_new_tokens, temperature, top_p, do_sample,
                            seed=seed, max_prompt_length=max_prompt_length, show_progress=False, bf16=bf16)[0]
        if response:
            yield response
        return
    tokens: list[int] = []
    sent = ""
    copies: dict = {}  # this stream's bf16 weights: cast at its first token, reused for the rest
    steps = _decode(model, input_ids, torch.ones_like(input_ids), max_new_tokens, temperature, top_p, do_sample,
                    eos_id, pad_id, with_logprobs=False, generator=generator, cache=copies)
    try:
        while True:
            # The contexts (no_grad, eval mode, autocast, bf16 weights) are entered per token and left
            # before each yield: the caller's code between pieces, or another stream interleaved with
            # this one (the chat view), must not run inside them.
            with torch.no_grad(), _sampling_context(model, device, bf16, cache=copies):
                step = next(steps, None)
            if step is None or int(step[0]) == eos_id:
                break
            tokens.append(int(step[0]))
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
                continue
            if len(text) > len(sent) and text.startswith(sent):
                yield text[len(sent):]
                sent = text
    finally:
        steps.close()
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if len(text) > len(sent) and text.startswith(sent):
        yield text[len(sent):]

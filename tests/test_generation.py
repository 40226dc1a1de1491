"""Batched, left-padded, KV-cached sampling on the tiny model."""

import pytest
import torch

from labkit.generation import _cut_at_eos, _left_pad, encode_prompts, generate, sample_k
from labkit.models import build_tiny, format_prompt, load_model

PROMPTS = ["Hi.", "Write a short poem about the sea and the wind and the rain, please.", "List three colours."]


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(2)
    return load_model("tiny", dtype="float32")


def force_next_token(model, token_id: int):
    """Make the model predict ``token_id`` at every position (a new lm_head with a large bias)."""
    hidden = model.config.hidden_size
    head = torch.nn.Linear(hidden, model.config.vocab_size, bias=True, device=model.device)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[token_id] = 10.0
    model.lm_head = head
    return model


def test_left_pad_shapes_and_mask():
    ids, mask = _left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_cut_at_eos():
    assert _cut_at_eos([4, 5, 2, 0, 0], eos_id=2) == ([4, 5], False)
    assert _cut_at_eos([4, 5, 6], eos_id=2) == ([4, 5, 6], True)


def test_encode_prompts_uses_chat_format_and_truncates_from_left(tiny):
    _, tok = tiny
    ids, n_long = encode_prompts(tok, PROMPTS)
    assert n_long == 0
    assert tok.decode(ids[0]) == format_prompt(tok, PROMPTS[0])
    short, n_long = encode_prompts(tok, PROMPTS, max_length=8)
    assert n_long == 3 and all(len(x) == 8 for x in short)
    assert short[1] == ids[1][-8:]  # the generation prompt at the end survives


def test_generate_returns_one_string_per_prompt_in_order(tiny):
    model, tok = tiny
    out, truncated = generate(model, tok, PROMPTS, max_new_tokens=6, seed=0, batch_size=2,
                              return_truncated=True, show_progress=False)
    assert len(out) == len(truncated) == 3 and all(isinstance(s, str) for s in out)
    # A random tiny model practically never says <|im_end|> within 6 tokens.
    assert all(truncated)
    assert generate(model, tok, [], show_progress=False) == []


def test_left_padding_does_not_change_greedy_output():
    # Larger init than the default 0.02: a random model whose greedy output depends on the prompt.
    model, tok = build_tiny(initializer_range=0.2)
    batched, truncated = generate(model, tok, PROMPTS, max_new_tokens=8, do_sample=False,
                                  batch_size=3, return_truncated=True, show_progress=False)
    single = [generate(model, tok, [p], max_new_tokens=8, do_sample=False, show_progress=False)[0]
              for p in PROMPTS]
    assert batched == single
    assert all(truncated) and all(batched)  # 8 tokens each, no early EOS
    assert len(set(batched)) > 1  # different prompts, different continuations


def test_seed_makes_sampling_reproducible_and_leaves_global_rng_alone(tiny):
    model, tok = tiny
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = generate(model, tok, PROMPTS, max_new_tokens=8, seed=7, temperature=1.0, show_progress=False)
    after = torch.rand(1)
    b = generate(model, tok, PROMPTS, max_new_tokens=8, seed=7, temperature=1.0, show_progress=False)
    c = generate(model, tok, PROMPTS, max_new_tokens=8, seed=8, temperature=1.0, show_progress=False)
    assert a == b
    assert a != c
    assert torch.equal(before, after)  # seeded generation ran in a forked RNG


def test_stops_at_eos_when_the_model_emits_it(tiny):
    _, tok = load_model("tiny", dtype="float32")
    model = force_next_token(load_model("tiny", dtype="float32")[0], tok.eos_token_id)
    out, truncated = generate(model, tok, PROMPTS, max_new_tokens=16, seed=0, return_truncated=True,
                              show_progress=False)
    assert out == ["", "", ""] and truncated == [False, False, False]


def test_hits_the_length_limit_without_eos(tiny):
    _, tok = tiny
    word = tok("hello", add_special_tokens=False)["input_ids"][0]
    model = force_next_token(load_model("tiny", dtype="float32")[0], word)
    out, truncated = generate(model, tok, PROMPTS[:2], max_new_tokens=5, return_truncated=True,
                              show_progress=False)
    assert truncated == [True, True]
    assert out == [tok.decode([word] * 5)] * 2


def test_sample_k_gives_k_responses_per_record(tiny):
    model, tok = tiny
    records = [{"id": "x-1", "prompt": PROMPTS[0]}, {"id": "x-2", "prompt": PROMPTS[1]}, PROMPTS[2]]
    out = sample_k(model, tok, records, k=4, max_new_tokens=5, seed=0, temperature=1.0,
                   show_progress=False)
    assert [o["prompt_id"] for o in out] == ["x-1", "x-2", None]
    assert [o["prompt"] for o in out] == PROMPTS
    assert all(len(o["responses"]) == 4 and len(o["truncated"]) == 4 for o in out)
    # Sampled at temperature 1 from a random model, the K copies differ.
    assert all(len(set(o["responses"])) > 1 for o in out)
    with pytest.raises(ValueError):
        sample_k(model, tok, records, k=0)


def test_sample_k_repeats_prompts_within_batches(tiny, monkeypatch):
    """K responses cost one pass over the prompts: with batch_size = 2K, 3 prompts take 2 batches."""
    model, tok = tiny
    calls = []
    real = model.generate

    def counting_generate(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", counting_generate)
    sample_k(model, tok, PROMPTS, k=4, batch_size=8, max_new_tokens=2, show_progress=False)
    assert [s[0] for s in calls] == [8, 4]

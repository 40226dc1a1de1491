"""Batched, left-padded, KV-cached sampling on the tiny model."""

import itertools
import os
import random

import pytest
import torch

from labkit import generation
from labkit.generation import (_cut_at_eos, _left_pad, _top_p_mask, bf16_linear_weights, encode_prompts, generate,
                               sample_k, sample_next, sample_tokens, stream)
from labkit.models import autocast, build_tiny, fast_dtype, format_prompt, load_model, position_ids

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


def test_the_packed_kernel_probe_leaves_the_global_rng_alone(monkeypatch):
    """The first sampling call of a process probes oneDNN's packed linear; were the probe to draw
    from the global RNG, a PPO run's episodes would depend on whether anything sampled before it
    in the same process (they did: the same PPO gave other figures after an eval)."""
    monkeypatch.setattr(generation, "_PACKED_OK", {})  # as in a fresh process
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    generation._packed_linear_works(torch.bfloat16)
    generation._packed_linear_works(torch.float32)
    assert set(generation._PACKED_OK) == {torch.bfloat16, torch.float32}
    assert torch.equal(torch.rand(3), expected)


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
    real = generation.sample_tokens

    def counting_sample_tokens(model, input_ids, *args, **kwargs):
        calls.append(input_ids.shape)
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(generation, "sample_tokens", counting_sample_tokens)
    sample_k(model, tok, PROMPTS, k=4, batch_size=8, max_new_tokens=2, show_progress=False)
    assert [s[0] for s in calls] == [8, 4]


# ----------------------------------------------------------------------------- the decoding loop


@pytest.fixture(scope="module")
def peaked():
    """A random tiny model whose greedy output depends on the prompt (init 0.2, not 0.02), fp32."""
    torch.set_num_threads(2)
    return build_tiny(initializer_range=0.2)


def batch(tok, prompts):
    ids, _ = encode_prompts(tok, prompts)
    return _left_pad(ids, tok.pad_token_id)  # (B, T) each


def test_greedy_matches_transformers_generate(peaked):
    model, tok = peaked
    input_ids, mask = batch(tok, PROMPTS)
    ours, _, _ = sample_tokens(model, input_ids, mask, 8, do_sample=False, pad_token_id=tok.pad_token_id, bf16=False)
    theirs = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                            pad_token_id=tok.pad_token_id, eos_token_id=None)[:, input_ids.shape[1]:]
    assert torch.equal(ours, theirs)


def test_fp32_greedy_is_batch_invariant(peaked):
    """The guarantee in the module docstring: in fp32 a prompt's greedy tokens do not depend on
    its batch (here: alone vs between a shorter and a longer prompt, so it is left-padded)."""
    model, tok = peaked
    target = PROMPTS[2]
    alone, _, _ = sample_tokens(model, *batch(tok, [target]), 12, do_sample=False, bf16=False)
    input_ids, mask = batch(tok, [PROMPTS[0], target, PROMPTS[1]])
    assert mask[1].sum() < mask.shape[1]  # the target row is padded in the batch
    batched, _, _ = sample_tokens(model, input_ids, mask, 12, do_sample=False, bf16=False)
    assert torch.equal(batched[1], alone[0])


@pytest.mark.parametrize("bf16", [False, True])
def test_sample_tokens_logprobs_match_a_teacher_forced_forward(peaked, bf16):
    """PPO's old log-probs come from sampling; they must equal the log-probs of a forward pass
    over prompt + response (exactly in fp32, up to bf16 rounding under bf16 autocast)."""
    model, tok = peaked
    input_ids, mask = batch(tok, PROMPTS)
    torch.manual_seed(0)
    T, temperature = input_ids.shape[1], 0.7
    responses, logprobs, entropy = sample_tokens(model, input_ids, mask, 10, temperature=temperature,
                                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                                 bf16=bf16)
    assert responses.shape == logprobs.shape == entropy.shape == (3, 10)
    assert logprobs.dtype == entropy.dtype == torch.float32
    full = torch.cat([input_ids, responses], 1)  # (B, T + R)
    full_mask = torch.cat([mask, torch.ones_like(responses)], 1)
    with torch.no_grad(), autocast("cpu", enabled=bf16):
        logits = model(input_ids=full, attention_mask=full_mask, position_ids=position_ids(full_mask)).logits
    logp = (logits[:, T - 1:-1].float() / temperature).log_softmax(-1)  # (B, R, V)
    expected = logp.gather(2, responses[..., None])[..., 0]
    expected_entropy = -(logp.exp() * logp).sum(-1)
    # bf16: the sampler's attention runs in fp32, the teacher-forced pass's in bf16. On the bundled
    # model both sampling paths (labkit's forward, model.forward) differ from a bf16 teacher-forced
    # pass by 0.03 on average and 0.23 at most over 700 sampled tokens; on this peaked model by < 0.1.
    tol = 1e-1 if bf16 and fast_dtype("cpu") == torch.bfloat16 else 1e-4
    torch.testing.assert_close(logprobs, expected, atol=tol, rtol=0)
    torch.testing.assert_close(entropy, expected_entropy, atol=tol, rtol=0)


def test_finished_rows_get_pad_and_leave_the_batch(peaked):
    """Rows that emit EOS get pad tokens and zero log-probs after it; the others go on as if
    alone (three of four rows stop at step 2, so the batch is compacted to one row)."""
    model, tok = peaked
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]]
    input_ids, mask = batch(tok, prompts)
    free, _, _ = sample_tokens(model, input_ids, mask, 8, do_sample=False, pad_token_id=tok.pad_token_id, bf16=False)
    eos = int(free[0, 1])
    responses, logprobs, _ = sample_tokens(model, input_ids, mask, 8, do_sample=False, eos_token_id=eos,
                                           pad_token_id=tok.pad_token_id, bf16=False)
    for row, ref in zip(responses.tolist(), free.tolist()):
        n = ref.index(eos) + 1 if eos in ref else len(ref)
        expected = ref[:n] + [tok.pad_token_id] * (len(ref) - n)
        assert row == expected[:len(row)] and set(expected[len(row):]) <= {tok.pad_token_id}
    assert responses[0, 1] == eos and (logprobs[:3, 2:] == 0).all()


def test_sample_tokens_stops_when_every_row_has_stopped(tiny):
    _, tok = tiny
    model = force_next_token(load_model("tiny", dtype="float32")[0], tok.eos_token_id)
    input_ids, mask = batch(tok, PROMPTS)
    responses, logprobs, entropy = sample_tokens(model, input_ids, mask, 16, eos_token_id=tok.eos_token_id,
                                                 pad_token_id=tok.pad_token_id)
    assert responses.tolist() == [[tok.eos_token_id]] * 3 and logprobs.shape == entropy.shape == (3, 1)


def naive_top_p(logits, top_p):
    """Reference nucleus: sort everything, keep tokens while the mass before them is < top_p."""
    probs = logits.softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < top_p
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def test_top_p_mask_matches_a_full_sort():
    g = torch.Generator().manual_seed(0)
    peaked_rows = torch.randn(4, 5000, generator=g) * 4  # nucleus among the top candidates
    flat_rows = torch.randn(2, 5000, generator=g) * 0.1  # nucleus of thousands: the fallback sort
    logits = torch.cat([peaked_rows, flat_rows])
    for top_p in (0.5, 0.9, 0.99):
        assert torch.equal(_top_p_mask(logits, top_p), naive_top_p(logits, top_p))


def test_sample_next_draws_from_the_tempered_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample_next(logits, 1.0, 1.0, generator=g), minlength=4) / 20000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.015, rtol=0)
    counts = torch.bincount(sample_next(logits, 1.0, 0.75, generator=g), minlength=4) / 20000  # keeps 0.5 + 0.3
    torch.testing.assert_close(counts, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.015, rtol=0)
    counts = torch.bincount(sample_next(logits, 0.5, 1.0, generator=g), minlength=4) / 20000  # p^2, renormalised
    p2 = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    torch.testing.assert_close(counts, p2 / p2.sum(), atol=0.015, rtol=0)
    assert torch.equal(sample_next(logits[:2], do_sample=False), torch.tensor([0, 0]))


def test_stream_pieces_join_to_the_generated_response(peaked):
    model, tok = peaked
    pieces = list(stream(model, tok, PROMPTS[1], max_new_tokens=12, do_sample=False, bf16=False))
    assert len(pieces) > 1
    assert "".join(pieces) == generate(model, tok, [PROMPTS[1]], max_new_tokens=12, do_sample=False,
                                       show_progress=False, bf16=False)[0]
    a = "".join(stream(model, tok, PROMPTS[0], max_new_tokens=12, seed=3, temperature=1.0))
    assert a == "".join(stream(model, tok, PROMPTS[0], max_new_tokens=12, seed=3, temperature=1.0))


def test_unsupported_architectures_fall_back_to_transformers_generate(peaked, monkeypatch):
    model, tok = peaked
    fast = generate(model, tok, PROMPTS, max_new_tokens=6, do_sample=False, show_progress=False, bf16=False)
    monkeypatch.setattr(generation, "fast_path_supported", lambda model, total_length: False)
    assert generate(model, tok, PROMPTS, max_new_tokens=6, do_sample=False, show_progress=False, bf16=False) == fast
    input_ids, mask = batch(tok, PROMPTS)
    responses, logprobs, _ = sample_tokens(model, input_ids, mask, 6, do_sample=False, bf16=False)
    assert responses.shape == logprobs.shape == (3, 6)


@pytest.mark.parametrize("packed", [False, True], ids=["bf16-copy", "onednn-packed"])
def test_bf16_weight_copies_follow_weight_updates(packed, monkeypatch):
    from labkit import generation

    if packed and not generation._packed_linear_works():
        pytest.skip("oneDNN's packed bf16 linear does not run here")
    monkeypatch.setitem(generation._PACKED_OK, torch.bfloat16, packed)
    model, _ = build_tiny()
    linear = model.model.layers[0].mlp.up_proj
    original = linear.weight
    x = torch.randn(2, 3, original.shape[1])

    def bf16_product(w):  # what autocast computes: both sides rounded to bf16
        return torch.nn.functional.linear(x.to(torch.bfloat16), w.detach().to(torch.bfloat16))

    amp = torch.autocast("cpu", dtype=torch.bfloat16)  # as the sampler runs it
    cache = {}
    with torch.no_grad(), amp, bf16_linear_weights(model, cache=cache):
        out = linear(x)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, bf16_product(original), atol=0, rtol=0)
        assert model.model.embed_tokens.weight.dtype == torch.float32  # the tied embedding keeps fp32
        first = dict(cache)
    assert linear.weight is original and model.lm_head.weight is model.model.embed_tokens.weight
    assert "forward" not in linear.__dict__  # the module's own forward again
    with torch.no_grad(), bf16_linear_weights(model, cache=cache):
        assert all(cache[k] is v for k, v in first.items())  # the caller's cache: no second cast
    # A fused AdamW step changes the weights in place without bumping their version counter:
    # the next call must still see the new weights.
    optimizer = torch.optim.AdamW([original], lr=0.5, fused=True)
    linear(torch.randn(2, original.shape[1])).sum().backward()
    optimizer.step()
    with torch.no_grad(), amp, bf16_linear_weights(model):
        after = linear(x)
    torch.testing.assert_close(after, bf16_product(original), atol=0, rtol=0)
    assert not torch.equal(after, out)


def test_interleaved_streams_leave_no_context_behind(peaked):
    """Between pieces the caller runs with its own grad mode, autocast and weights (the chat view
    interleaves one stream per model), and interleaving does not change either stream's text."""
    model, tok = peaked
    alone = ["".join(stream(model, tok, p, max_new_tokens=8, do_sample=False)) for p in PROMPTS[:2]]
    a, b = (stream(model, tok, p, max_new_tokens=8, do_sample=False) for p in PROMPTS[:2])
    mode = model.training
    texts = ["", ""]
    for pieces in zip(a, b):
        assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
        assert model.lm_head.weight.dtype == torch.float32 and model.training is mode
        texts = [t + p for t, p in zip(texts, pieces)]
    texts = [t + "".join(rest) for t, rest in zip(texts, (a, b))]
    assert texts == alone


def test_identical_prompts_share_one_prompt_pass(peaked):
    """sample_k's K copies of a prompt sit side by side: the prompt pass runs once per distinct
    prompt and the copies get its keys and values; the answers equal those of separate passes."""
    model, tok = peaked
    ids, _ = encode_prompts(tok, [PROMPTS[1], PROMPTS[1], PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[2]])
    input_ids, mask = _left_pad(ids, tok.pad_token_id)
    rows_seen = []  # the token ids each forward embeds (labkit's own forward and model.forward both embed)
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, args: rows_seen.append(args[0].shape))
    try:
        shared, _, _ = sample_tokens(model, input_ids, mask, max_new_tokens=6, do_sample=False,
                                     pad_token_id=tok.pad_token_id, bf16=False, return_logprobs=False)
    finally:
        hook.remove()
    first_step = rows_seen.index((6, 1))  # the first decoding step runs all 6 rows
    prompt_pass = rows_seen[:first_step]  # the system turn the 3 prompts share once, then the 3 prompts in groups
    assert prompt_pass[0][0] == 1 and sum(rows for rows, _ in prompt_pass[1:]) == 3
    for i in range(6):  # each row alone (no copies to share with): the same greedy answer
        alone, _, _ = sample_tokens(model, input_ids[i:i + 1], mask[i:i + 1], max_new_tokens=6, do_sample=False,
                                    pad_token_id=tok.pad_token_id, bf16=False, return_logprobs=False)
        assert shared[i, :alone.shape[1]].tolist() == alone[0].tolist()
    # sampled: the copies draw their own tokens
    g = torch.Generator().manual_seed(0)
    drawn, _, _ = sample_tokens(model, input_ids, mask, max_new_tokens=6, temperature=2.0,
                                pad_token_id=tok.pad_token_id, bf16=False, generator=g, return_logprobs=False)
    assert len({tuple(r) for r in drawn[:3].tolist()}) > 1


@pytest.mark.parametrize("fp32_packed", [True, False], ids=["packed", "own-weights"])
@pytest.mark.parametrize("do_sample,eos_at", [(True, None), (False, 3)])
def test_lean_forward_equals_the_models_own_forward_in_fp32(peaked, monkeypatch, do_sample, eos_at, fp32_packed):
    """labkit's forward for Llama-architecture models (fused products, fp32 attention as two products,
    its own cache) against the loop through ``model.forward``: in fp32 the same tokens and log-probs,
    with left padding, copies of one prompt sharing its pass, and (greedy, eos_at=3) rows leaving the batch;
    with its fp32 products fused and packed for oneDNN (the default where that kernel works) or through
    the modules' own weights."""
    model, tok = peaked
    assert generation.lean_supported(model)
    if fp32_packed and not generation._packed_linear_works(torch.float32):
        pytest.skip("oneDNN's packed fp32 linear does not run here")
    monkeypatch.setattr(generation, "FP32_PACKED", fp32_packed)
    layers, unembed = generation._LeanDecoder._weights(model, torch.float32)
    assert (layers[0]["qkv"].forward is not None) == (unembed.forward is not None) == fp32_packed
    ids, _ = encode_prompts(tok, [PROMPTS[1], PROMPTS[1], PROMPTS[0], PROMPTS[2]])
    input_ids, mask = _left_pad(ids, tok.pad_token_id)
    eos = None
    if eos_at is not None:  # the token row 0 greedily emits at step 3: rows stop there, others go on
        first, _, _ = sample_tokens(model, input_ids, mask, eos_at + 1, do_sample=False, bf16=False)
        eos = int(first[0, eos_at])
    out = {}
    for lean in (True, False):
        monkeypatch.setattr(generation, "LEAN_FORWARD", lean)
        g = torch.Generator().manual_seed(0)
        out[lean] = sample_tokens(model, input_ids, mask, 12, temperature=1.5, do_sample=do_sample, eos_token_id=eos,
                                  pad_token_id=tok.pad_token_id, bf16=False, generator=g)
    (r1, lp1, e1), (r2, lp2, e2) = out[True], out[False]
    assert torch.equal(r1, r2)
    torch.testing.assert_close(lp1, lp2, atol=1e-4, rtol=0)
    torch.testing.assert_close(e1, e2, atol=1e-4, rtol=0)
    if eos_at is not None:  # rows 0 and 1 (one prompt) stop at step 3, half the batch: it is compacted
        assert (r1[:2, eos_at] == eos).all() and (r1[:2, eos_at + 1:] == tok.pad_token_id).all()


def test_prefill_groups_is_the_cheapest_split_by_length():
    """Every row in exactly one group, each group as wide as its longest prompt, and the split's
    cost (tokens computed + a fixed cost per group) the least over all splits of the sorted rows."""
    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 7))]
        cost_per_group = rng.choice([0, 5, 40])
        groups = generation.prefill_groups(lengths, cost_per_group)
        assert sorted(r for rows, _ in groups for r in rows) == list(range(len(lengths)))
        assert all(width == max(lengths[r] for r in rows) for rows, width in groups)
        cost = sum(len(rows) * width + cost_per_group for rows, width in groups)
        s = sorted(lengths)
        best = min(sum((b - a) * s[b - 1] + cost_per_group for a, b in zip((0, *cuts), (*cuts, len(s))))
                   for k in range(len(s)) for cuts in itertools.combinations(range(1, len(s)), k))
        assert cost == best
    assert generation.prefill_groups([7, 7, 7]) == [([0, 1, 2], 7)]  # equal lengths: one group


@pytest.mark.parametrize("do_sample", [False, True])
def test_prompt_pass_by_groups_and_shared_prefix_changes_nothing_in_fp32(peaked, monkeypatch, do_sample):
    """The prompt pass with the prefix all prompts share computed once and the rest in groups by
    length, each over its own width, gives the same tokens and log-probs as one pass over the
    whole padded batch (fp32), copies of a prompt included; and the passes really run over fewer
    columns."""
    model, tok = peaked
    ids, _ = encode_prompts(tok, [PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[2]])
    input_ids, mask = _left_pad(ids, tok.pad_token_id)
    distinct = [ids[0], ids[1], ids[3]]
    shared = len(os.path.commonprefix(distinct))
    assert shared >= 8  # the chat template's system turn
    out, widths = {}, {}
    settings = {"one pass": (10 ** 9, 10 ** 9), "groups": (0, 10 ** 9), "groups + prefix": (0, 8)}
    for name, (cost, shared_min) in settings.items():  # group cost 0: a group per distinct length
        monkeypatch.setattr(generation, "PREFILL_GROUP_COST", cost)
        monkeypatch.setattr(generation, "PREFILL_SHARED_MIN", shared_min)
        seen = []
        hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
        try:
            out[name] = sample_tokens(model, input_ids, mask, 10, temperature=1.5, do_sample=do_sample,
                                      pad_token_id=tok.pad_token_id, bf16=False,
                                      generator=torch.Generator().manual_seed(0))
        finally:
            hook.remove()
        widths[name] = sorted(shape for shape in seen if shape[1] > 1)
    assert widths["one pass"] == [(3, input_ids.shape[1])]
    assert widths["groups"] == sorted((1, len(i)) for i in distinct)
    assert widths["groups + prefix"] == sorted([(1, shared)] + [(1, len(i) - shared) for i in distinct])
    r0, lp0, e0 = out["one pass"]
    for name in ("groups", "groups + prefix"):
        r, lp, e = out[name]
        assert torch.equal(r, r0), name
        torch.testing.assert_close(lp, lp0, atol=1e-4, rtol=0)
        torch.testing.assert_close(e, e0, atol=1e-4, rtol=0)


def test_lean_forward_is_only_for_plain_llama_layers(tiny):
    """Adapters wrapped around a linear layer (LoRA) or another architecture: the loop falls back
    to ``model.forward``, which knows them."""
    model, _ = tiny
    assert generation.lean_supported(model)
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(build_tiny()[0], peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert not generation.lean_supported(wrapped)
    assert not generation.lean_supported(wrapped.get_base_model())  # its q_proj is a LoRA layer now
    gpt2 = pytest.importorskip("transformers").GPT2LMHeadModel(
        __import__("transformers").GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert not generation.lean_supported(gpt2)

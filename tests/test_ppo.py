"""PPO: pure functions against hand-computed numbers and naive loops; tiny-model smoke runs."""

import copy
import math

import pytest
import torch

from labkit import ppo
from labkit.models import load_model
from labkit.stage import history_rows

torch.set_num_threads(2)


# ----------------------------------------------------------------------------- pure functions

def naive_gae(rewards, values, gamma, lam):
    """Textbook GAE over one episode given as plain Python lists."""
    T = len(rewards)
    adv = [0.0] * T
    last = 0.0
    for t in reversed(range(T)):
        next_v = values[t + 1] if t + 1 < T else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values)]


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.zeros(1, 3)
    adv, ret = ppo.compute_gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.95)
    assert torch.allclose(adv, torch.tensor([[0.9025, 0.95, 1.0]]))
    assert torch.allclose(ret, adv)
    # with values: delta_2 = 1 - 0.5; delta_1 = 0 + 0.5 - 0.2; A_1 = 0.3 + 0.95 * 0.5
    adv, ret = ppo.compute_gae(rewards, torch.tensor([[0.0, 0.2, 0.5]]), torch.ones(1, 3), 1.0, 0.95)
    assert adv[0, 2].item() == pytest.approx(0.5)
    assert adv[0, 1].item() == pytest.approx(0.3 + 0.95 * 0.5)
    assert ret[0, 1].item() == pytest.approx(adv[0, 1].item() + 0.2)


@pytest.mark.parametrize("side", ["right", "left"])
def test_gae_matches_naive_loop_and_ignores_padding(side):
    g = torch.Generator().manual_seed(0)
    B, T, gamma, lam = 6, 9, 0.9, 0.8
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lengths = torch.tensor([9, 1, 4, 7, 0, 5])
    pos = torch.arange(T)[None]
    mask = (pos < lengths[:, None]) if side == "right" else (pos >= T - lengths[:, None])
    adv, ret = ppo.compute_gae(rewards, values, mask, gamma, lam)
    for b in range(B):
        keep = mask[b]
        ref_adv, ref_ret = naive_gae(rewards[b][keep].tolist(), values[b][keep].tolist(), gamma, lam)
        assert torch.allclose(adv[b][keep], torch.tensor(ref_adv), atol=1e-5)
        assert torch.allclose(ret[b][keep], torch.tensor(ref_ret), atol=1e-5)
        assert (adv[b][~keep] == 0).all() and (ret[b][~keep] == 0).all()
    # garbage in the padding changes nothing
    noisy = ppo.compute_gae(rewards.masked_fill(~mask, 1e6), values.masked_fill(~mask, -1e6), mask, gamma, lam)
    assert torch.equal(noisy[0], adv) and torch.equal(noisy[1], ret)


def test_policy_loss_hand_cases():
    # four tokens: (ratio, advantage) = (1.5, +1), (0.5, +1), (0.5, -1), (1.5, -1); cliprange 0.2
    # per-token max(-A r, -A clip(r)) = max(-1.5, -1.2), max(-0.5, -0.8), max(0.5, 0.8), max(1.5, 1.2)
    old = torch.zeros(1, 5)
    new = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.5, 9.0]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])  # the last token is padding and must not count
    loss, clipfrac, approxkl = ppo.policy_loss(new, old, adv, mask, cliprange=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 1.5) / 4)
    assert clipfrac.item() == pytest.approx(0.5)  # tokens 1 and 3 were clipped
    assert approxkl.item() == pytest.approx(0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4)
    # clipped tokens get no gradient; unclipped ones get -A * ratio / n
    new = new.clone().requires_grad_(True)
    ppo.policy_loss(new, old, adv, mask, 0.2)[0].backward()
    assert torch.allclose(new.grad, torch.tensor([[0.0, -0.5 / 4, 0.0, 1.5 / 4, 0.0]]))


def test_value_loss_hand_cases():
    old = torch.zeros(1, 4)
    returns = torch.tensor([[1.0, 1.0, -1.0, 5.0]])
    values = torch.tensor([[0.5, 0.1, 0.5, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac = ppo.value_loss(values, old, returns, mask, cliprange_value=0.2)
    # token 0: V clipped to 0.2: max(0.25, 0.64); token 1: inside the clip range: 0.81;
    # token 2: V clipped to 0.2: max(2.25, 1.44) = 2.25 (clipping only ever makes the loss larger)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 2.25) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)


def test_masked_statistics():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 7, generator=g)
    mask = torch.rand(4, 7, generator=g) > 0.4
    sel = x[mask]
    assert ppo.masked_mean(x, mask).item() == pytest.approx(sel.mean().item(), abs=1e-6)
    assert ppo.masked_var(x, mask).item() == pytest.approx(sel.var(unbiased=True).item(), abs=1e-5)
    assert ppo.masked_var(x, mask, unbiased=False).item() == pytest.approx(sel.var(unbiased=False).item(), abs=1e-5)
    assert torch.allclose(ppo.masked_mean(x, mask, dim=1),
                          torch.stack([x[b][mask[b]].mean() for b in range(4)]), atol=1e-6)
    w = ppo.masked_whiten(x, mask)
    assert w[mask].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert w[mask].std().item() == pytest.approx(1.0, abs=1e-4)
    assert (w[~mask] == 0).all()
    w2 = ppo.masked_whiten(x, mask, shift_mean=False)
    assert w2[mask].mean().item() == pytest.approx(sel.mean().item(), abs=1e-5)  # scale only
    assert w2[mask].std().item() == pytest.approx(1.0, abs=1e-4)


def test_kl_estimators_hand_values_and_monte_carlo():
    lp, ref = torch.tensor([[-1.0]]), torch.tensor([[-2.0]])  # log ratio 1
    assert ppo.kl_penalty(lp, ref, "k1").item() == pytest.approx(1.0)
    assert ppo.kl_penalty(lp, ref, "k3").item() == pytest.approx(math.exp(-1) - 1 + 1)
    assert ppo.kl_penalty(ref, lp, "abs").item() == pytest.approx(1.0)
    assert ppo.kl_penalty(lp, ref, "mse").item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        ppo.kl_penalty(lp, ref, "k2")
    # k1 and k3 are unbiased: their mean over samples from p approaches KL(p || q)
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g), 0)
    q = torch.softmax(torch.randn(6, generator=g), 0)
    true_kl = (p * (p / q).log()).sum().item()
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=g)[None]
    lp, ref = p.log()[tokens], q.log()[tokens]
    for kind in ("k1", "k3"):
        assert ppo.kl_penalty(lp, ref, kind).mean().item() == pytest.approx(true_kl, rel=0.03)
    assert (ppo.kl_penalty(lp, ref, "k3") >= 0).all()


def test_shape_rewards_kl_per_token_score_at_last_and_eos_penalty():
    logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-0.5, -2.0, -9.0]])
    ref_logprobs = torch.tensor([[-1.5, -0.5, -1.0], [-1.0, -1.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = torch.tensor([2.0, 3.0])
    has_eos = torch.tensor([False, True])
    rewards, kl = ppo.shape_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=0.1,
                                    has_eos=has_eos, missing_eos_penalty=1.0)
    assert torch.allclose(kl, torch.tensor([[0.5, -0.5, 0.0], [0.5, -1.0, 0.0]]))
    # row 0 hit the length limit: score 2 - 1; row 1 ends at index 1 (index 2 is padding)
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.05, 1.0], [-0.05, 0.1 + 3.0, 0.0]]))
    rewards0, _ = ppo.shape_rewards(scores, logprobs, ref_logprobs, mask, 0.1, has_eos=has_eos)
    assert rewards0[0, 2].item() == pytest.approx(2.0)  # penalty off by default in the function


def test_leave_one_out_hand_values():
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 4.0])
    out = ppo.leave_one_out(scores, 3)  # two prompts of three episodes
    assert torch.allclose(out, torch.tensor([1 - 2.5, 2 - 2.0, 3 - 1.5, 10 - 7.0, 10 - 7.0, 4 - 10.0]))
    assert torch.allclose(ppo.leave_one_out(torch.tensor([0.5, 1.5]), 2), torch.tensor([-1.0, 1.0]))


def test_win_reward_is_the_bradley_terry_chance_rescaled():
    s, ref = torch.tensor([0.0, 1.0, 3.0, -2.0, 40.0, -40.0]), torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    out = ppo.win_reward(s, ref)
    assert torch.allclose(out, 4 * (torch.sigmoid(s - ref) - 0.5), atol=1e-6)
    assert out[0] == 0 and out[1] == pytest.approx(2 * math.tanh(0.5))
    assert out[2] == pytest.approx(2 * math.tanh(1.0)) and out[3] == pytest.approx(-2 * math.tanh(1.5))
    assert out[4] == pytest.approx(2.0) and out[5] == pytest.approx(-2.0)  # capped
    h, zero = torch.tensor(1e-3), torch.tensor(0.0)  # a small difference pays as the raw score does
    slope = (ppo.win_reward(h, zero) - ppo.win_reward(-h, zero)) / (2 * h)
    assert float(slope) == pytest.approx(1.0, abs=1e-3)


def test_kl_controllers():
    fixed = ppo.FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    ctl = ppo.AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(12.0, 256)  # error 1 -> clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    ctl.update(5.4, 100)  # error -0.1
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000) * (1 - 0.1 * 100 / 10_000))
    other = ppo.AdaptiveKLController(1.0, 6.0, 10_000)
    other.load_state_dict(ctl.state_dict())
    assert other.value == ctl.value


def test_logprobs_and_entropy_from_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, generator=g)
    labels = torch.randint(0, 11, (2, 3), generator=g)
    dist = torch.distributions.Categorical(logits=logits)
    assert torch.allclose(ppo.logprobs_from_logits(logits, labels), dist.log_prob(labels), atol=1e-6)
    assert torch.allclose(ppo.entropy_from_logits(logits), dist.entropy(), atol=1e-5)
    assert torch.equal(ppo.last_index(torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0]])), torch.tensor([1, 2, 0]))


def test_config_checks():
    with pytest.raises(ValueError, match="reward_model"):
        ppo.PPOConfig(model="tiny")
    with pytest.raises(ValueError, match="mini_batch_size"):
        ppo.PPOConfig(model="tiny", reward_fn=len, batch_size=10, mini_batch_size=4)
    with pytest.raises(ValueError, match="micro_batch_size"):
        ppo.PPOConfig(model="tiny", reward_fn=len, batch_size=8, mini_batch_size=8, micro_batch_size=3)
    with pytest.raises(ValueError, match="group_size"):
        ppo.PPOConfig(model="tiny", reward_fn=len, batch_size=8, mini_batch_size=8, group_size=3)
    with pytest.raises(ValueError, match="value_warmup_steps"):
        ppo.PPOConfig(model="tiny", reward_fn=len, steps=4, value_warmup_steps=4)
    assert ppo.PPOConfig(model="tiny", reward_fn=len, batch_size=16, mini_batch_size=8).num_mini_batches == 2


# ----------------------------------------------------------------------------- smoke runs

PROMPTS = [{"id": f"t-{i}", "prompt": f"Tell me about topic number {i}.", "category": "open_qa",
            "style": "plain", "checks": [{"type": "max_words", "n": 5}], "harmful": False} for i in range(32)]


def newline_reward(prompts, responses):
    return [r.count("\n") / 8 for r in responses]


def small_config(policy, out, **kw):
    base = dict(model=policy, reward_fn=newline_reward, prompts=PROMPTS, out_dir=str(out), steps=2,
                batch_size=8, mini_batch_size=8, micro_batch_size=8, max_new_tokens=8, temperature=1.0,
                learning_rate=2e-4, kl_coef=0.01, dashboard=False, progress=False, gold_every=0,
                sample_every=0, save_every=0,
                # fp32: these runs test PPO's behaviour over a few steps of 16 episodes, which bf16
                # rounding of a tiny model's very peaked logits makes needlessly seed-dependent
                bf16=False)
    base.update(kw)
    return ppo.PPOConfig(**base)


@pytest.fixture(scope="module")
def learning_run(peaked_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_learn")
    return ppo.train_ppo(small_config(peaked_tiny, out, steps=6, batch_size=16, gold_every=4, sample_every=4))


def test_reward_rises_with_bounded_kl(learning_run):
    h = history_rows(learning_run["out_dir"])
    first, last = h[0]["objective/scores"], sum(m["objective/scores"] for m in h[-3:]) / 3
    assert first < 0.35 and last > first + 0.3, [m["objective/scores"] for m in h]
    assert all(m["objective/kl"] < 10 for m in h)
    assert h[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollout is the reference's
    for name in ("objective/entropy", "objective/rlhf_reward", "objective/kl_coef", "policy/approxkl",
                 "policy/clipfrac", "loss/policy", "loss/value", "loss/ptx", "val/clipfrac", "val/mean",
                 "response/length", "response/eos_rate", "time/tokens_per_s", "time/episodes_per_s"):
        assert all(math.isfinite(m[name]) for m in h), name
    assert 0 <= h[0]["objective/gold"] <= 1 and "objective/gold" not in h[1]
    assert h[0]["response/length"] == 8 and h[0]["response/eos_rate"] == 0  # the random model never stops
    # rlhf_reward = score - missing-EOS penalty - kl_coef * KL, summed over the episode
    assert h[0]["objective/rlhf_reward"] == pytest.approx(h[0]["objective/scores"] - 1.0 - 0.01 * h[0]["objective/kl"], abs=1e-4)


def test_final_policy_loads_and_generates(learning_run, peaked_tiny):
    model, tok = load_model(learning_run["model_dir"], dtype="float32")
    ref, _ = load_model(peaked_tiny, dtype="float32")
    assert not torch.equal(model.model.norm.weight, ref.model.norm.weight)
    enc = tok(["Tell me about topic number 3."], return_tensors="pt")
    out = model.generate(**enc.to(model.device), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, enc.input_ids.shape[1] + 4)


def test_huge_kl_coef_keeps_the_policy_near_the_reference(learning_run, peaked_tiny, tmp_path):
    m = ppo.train_ppo(small_config(peaked_tiny, tmp_path, steps=6, batch_size=16, kl_coef=10.0))
    # Adam moves every weight by about lr per step whatever the reward's scale, so even a huge
    # kl_coef cannot hold the policy exactly still; it keeps pulling it back instead.
    mean3 = lambda h, k: sum(x[k] for x in h[-3:]) / 3  # noqa: E731
    huge, small = history_rows(m["out_dir"]), history_rows(learning_run["out_dir"])
    assert mean3(huge, "objective/kl") < 0.5 * mean3(small, "objective/kl"), (huge, small)
    gain = lambda h: mean3(h, "objective/scores") - h[0]["objective/scores"]  # noqa: E731
    assert gain(huge) < 0.5 * gain(small)


def interrupting_reward(calls_before_interrupt):
    calls = []

    def reward(prompts, responses):
        calls.append(1)
        if len(calls) > calls_before_interrupt:
            raise KeyboardInterrupt
        return newline_reward(prompts, responses)
    return reward


def test_ctrl_c_saves_and_resume_continues_exactly(peaked_tiny, tmp_path):
    kw = dict(steps=3, adaptive_kl=True, target_kl=0.5, kl_horizon=100, ema_decay=0.9, mini_batch_size=4,
              micro_batch_size=2, max_new_tokens=6)
    full = ppo.train_ppo(small_config(peaked_tiny, tmp_path / "full", **kw))
    part = ppo.train_ppo(small_config(peaked_tiny, tmp_path / "cut", reward_fn=interrupting_reward(1), **kw))
    assert part["stopped"] == "interrupted" and len(history_rows(part["out_dir"])) == 1 and part["model_dir"] is None
    rest = ppo.train_ppo(small_config(peaked_tiny, tmp_path / "cut", resume=True, **kw))
    assert rest["stopped"] is None and len(history_rows(rest["out_dir"])) == 3
    drop_time = lambda h: {k: v for k, v in h.items() if not k.startswith("time/")}  # noqa: E731
    assert [drop_time(h) for h in history_rows(rest["out_dir"])] == [drop_time(h) for h in history_rows(full["out_dir"])]
    assert history_rows(full["out_dir"])[-1]["objective/kl_coef"] != 0.01  # the adaptive controller moved (and was restored)
    a, _ = load_model(full["model_dir"], dtype="float32")
    b, _ = load_model(rest["model_dir"], dtype="float32")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_non_finite_score_stops_and_keeps_last_good_checkpoint(peaked_tiny, tmp_path):
    calls = []

    def reward(prompts, responses):
        calls.append(1)
        return [float("nan") if len(calls) == 3 else 0.5] * len(responses)

    m = ppo.train_ppo(small_config(peaked_tiny, tmp_path, steps=4, reward_fn=reward, save_every=1))
    assert m["stopped"] == "non-finite" and len(history_rows(m["out_dir"])) == 2 and m["model_dir"] is None
    import json
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["step"] == 2
    from safetensors.torch import load_file
    weights = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_lora_reference_is_the_adapter_free_model(peaked_tiny, tmp_path):
    pytest.importorskip("peft")
    m = ppo.train_ppo(small_config(peaked_tiny, tmp_path, steps=2, use_lora=True, learning_rate=1e-3))
    h = history_rows(m["out_dir"])
    # LoRA's B starts at zero: policy == reference, up to the float rounding that separates the
    # sampler's cached decoding from the reference's full forward
    assert h[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)
    assert h[-1]["objective/kl"] != 0.0  # the adapters learned something
    merged, _ = load_model(m["model_dir"], dtype="float32")
    base, _ = load_model(peaked_tiny, dtype="float32")
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[w], base.state_dict()[w])


def test_shared_backbone_and_ptx(peaked_tiny, tmp_path):
    texts = ["Tell me about topic number 1.\nIt is a number."] * 4
    m = ppo.train_ppo(small_config(peaked_tiny, tmp_path, steps=2, share_backbone=True, ptx_coef=0.5,
                                   ptx_texts=texts))
    h = history_rows(m["out_dir"])
    assert all(math.isfinite(x["loss/ptx"]) and x["loss/ptx"] > 0 for x in h)
    assert h[0]["val/mean"] == 0.0  # a scripted reward starts the value head at zero


def test_ptx_texts_format_demonstration_records_as_the_policy_sees_them():
    from labkit.models import format_prompt, load_tokenizer

    tok = load_tokenizer()
    record = {"prompt": "Name a colour.", "response": "Blue.", "prompt_id": "x1", "n_annotators": 5}
    texts = ppo._ptx_texts(tok, ["already a text", record])
    assert texts[0] == ("", "already a text")
    assert texts[1] == (format_prompt(tok, "Name a colour."), "Blue." + tok.eos_token)
    assert texts[1][0].startswith("<|im_start|>") and texts[1][1].endswith("Blue.<|im_end|>")
    assert len(ppo._ptx_texts(tok, None)) > 100  # None: the SFT demonstrations


@pytest.mark.parametrize("prompt_loss", [True, False])
def test_ptx_batches_put_the_prompt_in_the_loss_only_when_asked(prompt_loss):
    """ptx_prompt_loss=False: a record's loss covers its response and EOS, as the SFT stage's does;
    a plain string is all completion either way. Ids are the prompt's then the response's, as
    generation sees them, right-padded."""
    from labkit.models import format_prompt, load_tokenizer

    tok = load_tokenizer()
    record = {"prompt": "Name a colour.", "response": "Blue."}
    texts = ppo._ptx_texts(tok, [record, "Just some text."])
    config = ppo.PPOConfig(reward_fn=lambda prompts, responses: [0.0] * len(responses), batch_size=2,
                           mini_batch_size=2, micro_batch_size=2, ppo_epochs=1, ptx_prompt_loss=prompt_loss)
    (ids, am, in_loss), = ppo._ptx_micro_batches(texts * 50, config, tok, step=0)
    n_prompt = len(tok(format_prompt(tok, "Name a colour."), add_special_tokens=False)["input_ids"])
    n_response = len(tok("Blue." + tok.eos_token, add_special_tokens=False)["input_ids"])
    n_text = len(tok("Just some text.", add_special_tokens=False)["input_ids"])
    for row in range(2):
        n = int(am[row].sum())
        assert am[row, :n].all() and not am[row, n:].any()  # right padding
        assert not in_loss[row, n:].any()
        if n == n_prompt + n_response:  # the record
            assert tok.decode(ids[row, n_prompt:n]) == "Blue." + tok.eos_token
            assert int(in_loss[row, :n_prompt].sum()) == (n_prompt if prompt_loss else 0)
            assert in_loss[row, n_prompt:n].all()
        else:
            assert n == n_text and in_loss[row, :n].all()
    config.ptx_batch_size = 1  # fewer texts beside each micro-batch of episodes: the cheaper LM term
    batches = ppo._ptx_micro_batches(texts * 50, config, tok, step=0)
    assert len(batches) == 1 and batches[0][0].shape[0] == 1


def test_win_reward_scores_each_prompts_greedy_reference_answer_once(peaked_tiny, tmp_path):
    """win_reward: the reference's answers are the SFT model's greedy answers, scored once per
    prompt by the same reward; every step logs the chance of beating them."""
    from labkit.generation import generate

    calls = []

    def reward(prompts, responses):
        calls.append(list(prompts))
        return newline_reward(prompts, responses)

    config = small_config(peaked_tiny, tmp_path, steps=4, reward_fn=reward, win_reward=True, group_size=4)
    run = ppo._set_up(config)
    history = [ppo.ppo_step(run, config, step)[0] for step in range(config.steps)]
    prompts = [ppo._prompt_text(r) for r in PROMPTS]
    used = {p for p in prompts if p in run.ref_answers}
    assert len(used) == 8  # 4 steps of 2 prompts, each new
    model, tok = load_model(peaked_tiny, dtype="float32")
    greedy = generate(model, tok, sorted(used), max_new_tokens=8, do_sample=False, show_progress=False, bf16=False)
    assert [run.ref_answers[p][0] for p in sorted(used)] == greedy
    assert all(run.ref_answers[p][1] == newline_reward([p], [run.ref_answers[p][0]])[0] for p in used)
    ref_calls = [c for c in calls if len(c) != config.batch_size]  # the policy's episodes come 8 at a time
    assert sorted(p for c in ref_calls for p in c) == sorted(used)  # each reference scored once
    assert all(0 <= m["objective/win"] <= 1 for m in history)
    assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)


def test_groups_of_episodes_per_prompt_with_a_value_warmup(peaked_tiny, tmp_path, monkeypatch):
    """group_size=4: each step's 8 episodes are 2 prompts x 4, side by side, two new prompts a
    step; a run with a value warm-up step first runs to the end."""
    seen = []
    real_rollout = ppo.rollout

    def recording_rollout(model, tokenizer, prompts, config, device):
        seen.append(list(prompts))
        return real_rollout(model, tokenizer, prompts, config, device)

    monkeypatch.setattr(ppo, "rollout", recording_rollout)
    m = ppo.train_ppo(small_config(peaked_tiny, tmp_path, steps=3, group_size=4, value_warmup_steps=1))
    assert m["stopped"] is None and len(seen) == 3
    for prompts in seen:
        groups = [prompts[i:i + 4] for i in range(0, 8, 4)]
        assert all(len(set(g)) == 1 for g in groups) and groups[0][0] != groups[1][0]
    assert len({g for prompts in seen for g in prompts}) == 6
    assert all(math.isfinite(x["loss/value"]) for x in history_rows(m["out_dir"]))


def test_value_model_starts_as_the_reward_model(tmp_path):
    from labkit.reward import RewardModel

    lm, tok = load_model("tiny", dtype="float32", device="cpu", seed=3)
    rm = RewardModel.from_causal_lm(lm)
    torch.nn.init.normal_(rm.head.weight, std=0.5)
    rm.bias.fill_(0.25)
    rm.save_pretrained(tmp_path / "rm", tokenizer=tok)
    config = ppo.PPOConfig(model="tiny", reward_model=str(tmp_path / "rm"), dashboard=False)
    model, reference, reward_model, _, _ = ppo.build_models(config, torch.device("cpu"))
    enc = tok(["Hello there, how are you?", "Hi"], return_tensors="pt", padding=True)
    expected = rm.token_values(enc.input_ids, enc.attention_mask)
    got = model.value_model.token_values(enc.input_ids, enc.attention_mask)
    assert torch.allclose(got, expected, atol=1e-5)
    assert model.value_model is not reward_model and not reward_model.head.weight.requires_grad
    assert not any(p.requires_grad for p in reference.parameters())


def test_several_reward_models_score_their_mean_and_the_value_model_starts_as_the_first(tmp_path):
    from labkit.reward import RewardEnsemble, RewardModel

    lm, tok = load_model("tiny", dtype="float32", device="cpu", seed=3)
    rms = []
    for i in range(2):
        rm = RewardModel.from_causal_lm(copy.deepcopy(lm))
        torch.nn.init.normal_(rm.head.weight, std=0.5, generator=torch.Generator().manual_seed(i))
        rm.save_pretrained(tmp_path / f"rm{i}", tokenizer=tok)
        rms.append(rm)
    config = ppo.PPOConfig(model="tiny", reward_model=[str(tmp_path / "rm0"), str(tmp_path / "rm1")], dashboard=False)
    model, _, reward_model, _, rm_tok = ppo.build_models(config, torch.device("cpu"))
    assert isinstance(reward_model, RewardEnsemble)
    prompts, texts = ["Say hi."] * 2, ["Hello there.", "Hi"]
    each = [rm.score(tok, prompts, texts, progress=False) for rm in rms]
    assert each[0] != pytest.approx(each[1], abs=1e-3)
    assert reward_model.score(rm_tok, prompts, texts, progress=False) == pytest.approx(
        [(a + b) / 2 for a, b in zip(*each)], abs=1e-5)
    enc = tok(texts, return_tensors="pt", padding=True)
    assert torch.allclose(model.value_model.token_values(enc.input_ids, enc.attention_mask),
                          rms[0].token_values(enc.input_ids, enc.attention_mask), atol=1e-5)
    with pytest.raises(ValueError, match="empty list"):
        ppo.PPOConfig(model="tiny", reward_model=[])


@pytest.mark.parametrize("share_backbone", [False, True])
def test_generation_logprobs_equal_a_full_forward(peaked_tiny, share_backbone):
    """The rollout keeps the log-probs and entropy of the logits it sampled from; a separate
    forward pass over the finished episodes (left padding, EOS masking) gives the same numbers."""
    config = small_config(peaked_tiny, "unused", temperature=0.7, bf16=False, batch_size=6, mini_batch_size=6,
                          micro_batch_size=3, rollout_batch_size=4, share_backbone=share_backbone)  # chunks 4 + 2
    model, reference, _, tok, _ = ppo.build_models(config, torch.device("cpu"))
    torch.manual_seed(0)
    prompts = [p["prompt"] for p in PROMPTS[:5]] + ["Hi"]  # mixed lengths: left padding
    batch = ppo.rollout(model, tok, prompts, config, torch.device("cpu"))
    ppo.rollout_forward(model, reference, batch, config)
    R, mask = batch.responses.shape[1], batch.response_mask.bool()
    with torch.no_grad():
        logits, values = model(batch.input_ids, batch.attention_mask, R)
    logits = logits / config.temperature
    assert torch.allclose(batch.logprobs[mask], ppo.logprobs_from_logits(logits, batch.responses)[mask],
                          atol=1e-4)
    assert torch.allclose(batch.entropy[mask], ppo.entropy_from_logits(logits)[mask], atol=1e-4)
    assert torch.allclose(batch.values[mask], values[mask], atol=1e-5)
    # the reference starts as the policy: its log-probs equal the policy's
    assert torch.allclose(batch.ref_logprobs[mask], batch.logprobs[mask], atol=1e-4)


def test_packed_rows_drop_the_padding_inside_and_left_align_undoes_the_shift():
    pad = 0
    batch = ppo.Rollout(
        prompts=["a", "b", "c"], texts=["", "", ""], logprobs=torch.zeros(3, 3), entropy=torch.zeros(3, 3),
        has_eos=torch.ones(3, dtype=torch.bool), n_truncated_prompts=0,
        input_ids=torch.tensor([[pad, pad, 5, 6, 7, 8, pad], [pad, 4, 5, 6, 7, pad, pad], [3, 3, 3, 9, 9, pad, pad]]),
        attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0]]),
        responses=torch.tensor([[7, 8, pad], [7, pad, pad], [9, 9, pad]]),
        response_mask=torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 0]]))
    ids, am, r, shift = ppo._packed_rows(batch, torch.tensor([0, 1]))
    assert r == 2 and shift.tolist() == [0, 1]
    assert ids.tolist() == [[5, 6, 7, 8], [4, 5, 6, 7]] and am.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    ids, am, r, shift = ppo._packed_rows(batch, torch.tensor([1, 2]))
    assert ids.tolist() == [[pad, 4, 5, 6, 7], [3, 3, 3, 9, 9]] and am.tolist() == [[0, 1, 1, 1, 1], [1] * 5]
    # each row's response tokens, right-aligned in the last r columns, come back at columns 0..
    responses = ppo._left_align(ids[:, -r:], shift)
    assert responses[0, :1].tolist() == [7] and responses[1].tolist() == [9, 9]


@pytest.mark.parametrize("share_backbone", [False, True])
def test_packed_rows_give_each_episode_the_numbers_it_has_alone(peaked_tiny, share_backbone):
    """Log-probs and values of a packed group of episodes with mixed prompt and response
    lengths equal each episode's own, computed alone without padding (fp32)."""
    config = small_config(peaked_tiny, "unused", temperature=0.7, bf16=False, batch_size=4, mini_batch_size=4,
                          micro_batch_size=4, max_new_tokens=6, share_backbone=share_backbone)
    model, _, _, tok, _ = ppo.build_models(config, torch.device("cpu"))
    torch.manual_seed(0)
    prompts = ["Hi", "A much longer prompt than the others, with more words", PROMPTS[0]["prompt"], "Two words"]
    batch = ppo.rollout(model, tok, prompts, config, torch.device("cpu"))
    end_responses_early(batch, [6, 1, 3, 2], tok.pad_token_id)  # as if EOS had come there
    ids, am, r, shift = ppo._packed_rows(batch, torch.arange(4))
    assert ids.shape[1] == int(batch.attention_mask.sum(1).max())  # the longest episode, no padding inside
    with torch.no_grad():
        logits, values = model(ids, am, r)
    logprobs = ppo._left_align(ppo.logprobs_from_logits(logits / config.temperature, ids[:, -r:]), shift)
    values = ppo._left_align(values, shift)
    for i in range(4):
        row = batch.input_ids[i][batch.attention_mask[i].bool()][None]  # (1, n): the episode alone
        n = int(batch.response_mask[i].sum())
        assert row[0, -n:].tolist() == batch.responses[i, :n].tolist()
        with torch.no_grad():
            own_logits, own_values = model(row, torch.ones_like(row), n)
        own = ppo.logprobs_from_logits(own_logits / config.temperature, row[:, -n:])
        assert torch.allclose(logprobs[i, :n], own[0], atol=1e-5)
        assert torch.allclose(values[i, :n], own_values[0], atol=1e-5)


def end_responses_early(batch, lengths, pad_id):
    """Cut response i to lengths[i] tokens, padding the rest as the rollout pads after an EOS."""
    R = batch.responses.shape[1]
    Tq = batch.input_ids.shape[1] - R
    for i, n in enumerate(lengths):
        batch.responses[i, n:] = pad_id
        batch.response_mask[i, n:] = 0
        batch.input_ids[i, Tq + n:] = pad_id
        batch.attention_mask[i, Tq + n:] = 0


def test_micro_batch_split_does_not_change_the_update(peaked_tiny):
    """Losses are token means over the minibatch, so 1 micro-batch of 6 and 3 of 2 (grouped by
    length, padding trimmed) give the same parameters after the optimizer step."""
    from accelerate import Accelerator

    results = []
    for micro in (6, 2):
        config = small_config(peaked_tiny, "unused", temperature=0.7, bf16=False, batch_size=6, mini_batch_size=6,
                              micro_batch_size=micro, max_new_tokens=6)
        model, reference, _, tok, _ = ppo.build_models(config, torch.device("cpu"))
        torch.manual_seed(0)
        prompts = [p["prompt"] for p in PROMPTS[:4]] + ["Hi", "A much longer prompt than the others, with more words"]
        batch = ppo.rollout(model, tok, prompts, config, torch.device("cpu"))
        end_responses_early(batch, [6, 2, 4, 1, 6, 3], tok.pad_token_id)  # as if EOS had come there
        ppo.rollout_forward(model, reference, batch, config)
        scores = torch.linspace(-1, 1, 6)
        rewards, _ = ppo.shape_rewards(scores, batch.logprobs, batch.ref_logprobs, batch.response_mask, 0.05)
        adv, ret = ppo.compute_gae(rewards, batch.values, batch.response_mask)
        adv = ppo.masked_whiten(adv, batch.response_mask)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        torch.manual_seed(1)
        ppo.ppo_update(model, model, optimizer, Accelerator(cpu=True), batch, adv, ret, config, None, None)
        results.append((batch.response_mask.sum(1), [p.detach().clone() for p in model.parameters()]))
    (lengths_a, params_a), (lengths_b, params_b) = results
    assert torch.equal(lengths_a, lengths_b) and len(set(lengths_a.tolist())) > 1  # same episodes, mixed lengths
    for a, b in zip(params_a, params_b):
        assert torch.allclose(a, b, atol=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(params_a, ppo.build_models(config, torch.device("cpu"))[0].parameters()))


@pytest.mark.parametrize("share_backbone", [False, True])
def test_value_warmup_moves_only_the_value_and_unclipped(peaked_tiny, share_backbone):
    """A warm-up update (``value_warmup_epochs`` unclipped passes) leaves every policy weight as
    it was and moves the value model (a shared backbone: the value head); with returns far from
    the values it ends closer to them than a clipped PPO update does."""
    from accelerate import Accelerator

    config = small_config(peaked_tiny, "unused", temperature=0.7, bf16=False, batch_size=4, mini_batch_size=4,
                          micro_batch_size=4, max_new_tokens=6, cliprange_value=0.2, share_backbone=share_backbone)
    losses = {}
    for value_only in (True, False):
        model, reference, _, tok, _ = ppo.build_models(config, torch.device("cpu"))
        torch.manual_seed(0)
        batch = ppo.rollout(model, tok, [p["prompt"] for p in PROMPTS[:4]], config, torch.device("cpu"))
        ppo.rollout_forward(model, reference, batch, config)
        scores = torch.full((4,), 5.0)  # far above the values the model starts with
        rewards, _ = ppo.shape_rewards(scores, batch.logprobs, batch.ref_logprobs, batch.response_mask, 0.05)
        adv, ret = ppo.compute_gae(rewards, batch.values, batch.response_mask)
        adv = ppo.masked_whiten(adv, batch.response_mask)
        value_params = list(model.value_model.parameters()) if model.value_model is not None else [model.value_head.weight]
        policy_before = [p.detach().clone() for p in model.policy.parameters()]
        value_before = [p.detach().clone() for p in value_params]
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02)
        stats = ppo.ppo_update(model, model, optimizer, Accelerator(cpu=True), batch, adv, ret, config, None, None,
                               value_only=value_only)
        assert not model.policy_frozen  # the next PPO update trains the policy again
        with torch.no_grad():  # the value loss after the update, unclipped
            values = model.values(batch.input_ids, batch.attention_mask, batch.responses.shape[1])
        losses[value_only] = ppo.masked_mean((values - ret).square(), batch.response_mask).item()
        policy_same = all(torch.equal(a, b) for a, b in zip(policy_before, model.policy.parameters()))
        assert policy_same == value_only
        assert any(not torch.equal(a, b) for a, b in zip(value_before, value_params))
        if value_only:
            assert stats["val/clipfrac"] == 0.0
    assert losses[True] < losses[False]


def test_ctrl_c_during_the_update_finishes_the_step_then_stops(peaked_tiny, tmp_path, monkeypatch):
    import json
    import os
    import signal

    real_update = ppo.ppo_update

    def update_then_ctrl_c(*args, **kwargs):
        out = real_update(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the update phase holds Ctrl-C
        return out

    monkeypatch.setattr(ppo, "ppo_update", update_then_ctrl_c)
    m = ppo.train_ppo(small_config(peaked_tiny, tmp_path, steps=3))
    assert m["stopped"] == "interrupted" and m["model_dir"] is None
    assert len(history_rows(tmp_path)) == 1  # the step whose update ran is recorded, not lost
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 1

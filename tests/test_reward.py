"""Stage 2: ranking loss numbers, RM equivalences, a tiny training run, save/load, validation."""

import copy
import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch

from labkit.models import load_model, pad_rows
from labkit.rankings import tiers_to_ranks
from labkit.reward import (RewardConfig, RewardModel, as_rankings, batch_rewards, collate, encode,
                           evaluate_rankings, load_reward_model, pack, ranking_loss, shared_prefix_length,
                           train_reward_model, train_step)
from labkit.stage import read_history

torch.set_num_threads(2)


def naive_loss(rewards, ranks):
    """Reference: a double loop over response pairs, per prompt, in Python floats."""
    per_prompt = []
    for r, k in zip(rewards.tolist(), ranks.tolist()):
        terms = [math.log1p(math.exp(-(r[i] - r[j])))
                 for i in range(len(r)) for j in range(len(r))
                 if k[i] >= 0 and k[j] >= 0 and k[i] < k[j]]
        if terms:
            per_prompt.append(sum(terms) / len(terms))
    return sum(per_prompt) / len(per_prompt)


# ----------------------------------------------------------------------------- ranking_loss

def test_ranking_loss_k2_hand_value():
    loss = ranking_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0, 1]]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)  # 0.31326
    assert loss.item() == pytest.approx(0.31326, abs=1e-5)


def test_ranking_loss_k3_hand_value():
    # rewards (2, 1, 0), strict order: pairs (0,1), (0,2), (1,2) with margins 1, 2, 1.
    loss = ranking_loss(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[0, 1, 2]]))
    expected = (2 * math.log1p(math.exp(-1)) + math.log1p(math.exp(-2))) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_ranking_loss_matches_naive_loop_with_ties_and_padding():
    g = torch.Generator().manual_seed(0)
    B, K = 16, 7
    rewards = torch.randn(B, K, generator=g) * 3
    ranks = torch.randint(0, 3, (B, K), generator=g)  # 3 tiers: many ties
    n_real = torch.randint(2, K + 1, (B,), generator=g)
    ranks[torch.arange(K)[None, :] >= n_real[:, None]] = -1  # padding
    rewards[ranks < 0] = float("nan")  # padding values must not leak into the loss
    ranks[0] = 1  # one prompt fully tied: contributes nothing
    assert ranking_loss(rewards, ranks).item() == pytest.approx(naive_loss(rewards, ranks), rel=1e-6)


def test_ranking_loss_gradcheck():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(3, 5, dtype=torch.double, generator=g, requires_grad=True)
    ranks = torch.tensor([[0, 1, 1, 2, -1], [3, 2, 1, 0, 0], [0, 0, 1, -1, -1]])
    assert torch.autograd.gradcheck(lambda r: ranking_loss(r, ranks), (rewards,))


def test_ranking_loss_padding_rows_contribute_nothing():
    rewards = torch.tensor([[1.0, 0.0, 5.0], [3.0, -2.0, 0.0], [7.0, 7.0, 0.0]])
    ranks = torch.tensor([[0, 1, -1], [-1, -1, -1], [0, 0, -1]])  # row 1 all padding, row 2 all tied
    loss = ranking_loss(rewards, ranks)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)
    rewards.requires_grad_(True)
    ranking_loss(rewards, ranks).backward()
    assert rewards.grad[1:].abs().sum() == 0 and rewards.grad[0, 2] == 0
    assert rewards.grad[0, 0].item() == pytest.approx(-1 / (1 + math.e), abs=1e-6)  # -sigmoid(-1)


def test_ranking_loss_all_invalid_batch_is_zero_with_grad():
    rewards = torch.randn(2, 3, requires_grad=True)
    loss = ranking_loss(rewards, torch.tensor([[0, 0, -1], [-1, -1, -1]]))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(rewards.grad, torch.zeros(2, 3))


def test_ranking_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="ranks"):
        ranking_loss(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long))


# ----------------------------------------------------------------------------- the model

@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model("tiny", dtype="float32", device="cpu")
    torch.manual_seed(0)
    return RewardModel.from_causal_lm(model), tok


def test_left_and_right_padding_give_the_same_reward(tiny):
    rm, tok = tiny
    ids, _ = encode(tok, ["Say hi.", "Name three rivers in Europe, please."], ["Hi!", "Rhine, Danube, Seine."])
    right, right_mask = pad_rows(ids, tok.pad_token_id)  # (B, T)
    T = right.shape[1]
    left = torch.full_like(right, tok.pad_token_id)
    left_mask = torch.zeros_like(right_mask)
    for i, row in enumerate(ids):
        left[i, T - len(row):] = torch.tensor(row)
        left_mask[i, T - len(row):] = 1
    with torch.no_grad():
        r_right, r_left = rm(right, right_mask), rm(left, left_mask)
        alone = torch.stack([rm(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))[0] for row in ids])
    assert len(ids[0]) != len(ids[1])  # so padding really happens
    torch.testing.assert_close(r_left, r_right, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r_right, alone, atol=1e-5, rtol=1e-5)


def test_token_values_end_in_the_reward_and_bias_is_subtracted(tiny):
    rm, tok = tiny
    ids, _ = encode(tok, ["a", "bb"], ["x", "a longer response"])
    input_ids, mask = pad_rows(ids, tok.pad_token_id)
    with torch.no_grad():
        values = rm.token_values(input_ids, mask)  # (B, T)
        rewards = rm(input_ids, mask)
        assert values.shape == input_ids.shape
        torch.testing.assert_close(rewards, torch.stack([values[i, len(r) - 1] for i, r in enumerate(ids)]))
        rm.bias.fill_(0.25)
        torch.testing.assert_close(rm(input_ids, mask), rewards - 0.25)
        rm.bias.zero_()


def test_encode_appends_eos_and_truncates_the_prompt_start(tiny):
    _, tok = tiny
    (full,), cut = encode(tok, ["word " * 50], ["the answer"], max_length=1000)
    assert cut == 0 and full[-1] == tok.eos_token_id
    (short,), cut = encode(tok, ["word " * 50], ["the answer"], max_length=20)
    assert cut == 1 and short == full[-20:]
    assert tok.decode(short).endswith("the answer<|im_end|>")


def test_save_load_round_trip_gives_identical_scores(tiny, tmp_path):
    rm, tok = tiny
    rm.bias.fill_(0.123456789)
    prompts, responses = ["Say hi.", "What is 2+2?", "List two colours."], ["Hi!", "4", "- red\n- blue"]
    before = rm.score(tok, prompts, responses, progress=False)
    rm.save_pretrained(tmp_path, tokenizer=tok)
    rm2, tok2 = load_reward_model(tmp_path, dtype="float32", device="cpu")
    rm.bias.zero_()
    assert rm2.bias.item() == pytest.approx(0.123456789, abs=1e-7) and rm2.bias.dtype == torch.float32
    assert rm2.score(tok2, prompts, responses, progress=False) == before
    # Batches are sorted by length inside score(); the order of the results must not change.
    assert rm2.score(tok2, prompts, responses, batch_size=2, progress=False) == pytest.approx(before, abs=1e-4)
    assert not any(p.suffix in (".bin", ".pt", ".pth") for p in tmp_path.iterdir())  # safetensors only


def test_kway_loss_and_gradients_equal_the_pairwise_expansion(tiny):
    """K forward passes per prompt give the same loss and gradients as 2 passes per pair."""
    rm, tok = tiny
    rm.zero_grad()
    rng = random.Random(0)
    records = [{"prompt": f"Prompt {b}", "responses": [f"answer {b}-{k} " + "x" * rng.randint(0, 9) for k in range(4)],
                "tiers": [[2], [0], [3], [1]]} for b in range(3)]  # no ties: C(4,2)=6 pairs each
    items = [{"ids": encode(tok, [r["prompt"]] * 4, r["responses"])[0], "ranks": tiers_to_ranks(r["tiers"], 4)}
             for r in records]
    batch, ranks = collate(items, tok.pad_token_id, prefix_sharing=False)
    kway = ranking_loss(batch_rewards(rm, batch), ranks)
    kway.backward()
    g_kway = [p.grad.clone() for p in rm.parameters()]
    rm.zero_grad()

    # Pairwise: every (better, worse) pair as its own two-row batch, mean over all pairs
    # (equal to the per-prompt mean here since every prompt has 6 pairs), as a pairwise trainer does.
    losses = []
    for it in items:
        for i, j in itertools.permutations(range(4), 2):
            if it["ranks"][i] < it["ranks"][j]:
                x, m = pad_rows([it["ids"][i], it["ids"][j]], tok.pad_token_id)
                r = rm(x, m)
                losses.append(-torch.nn.functional.logsigmoid(r[0] - r[1]))
    assert len(losses) == 3 * 6
    pairwise = torch.stack(losses).mean()
    pairwise.backward()
    g_pair = [p.grad.clone() for p in rm.parameters()]
    rm.zero_grad()
    assert kway.item() == pytest.approx(pairwise.item(), rel=1e-5)
    for a, b in zip(g_kway, g_pair):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_micro_batches_accumulate_to_the_full_batch_gradient(tiny):
    rm, tok = tiny
    items = [{"ids": encode(tok, [f"p{b}"] * k, [f"r{b}{i}" * (i + 1) for i in range(k)])[0],
              "ranks": list(range(k))} for b, k in enumerate([2, 3, 4, 3])]  # K differs per prompt
    grads = []
    for micro in (4, 1):
        rm.zero_grad()
        loss, correct, pairs = train_step(rm, items, tok.pad_token_id, micro, "cpu", use_autocast=False)
        grads.append([p.grad.clone() for p in rm.parameters()])
        assert pairs == 1 + 3 + 6 + 3
    rm.zero_grad()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------- prefix sharing

def packed_vs_separate(rm, items, pad_id):
    """Rewards, loss and parameter gradients of one batch, each response as its own sequence and packed."""
    out = []
    for sharing in (False, True):
        rm.zero_grad()
        batch, ranks = collate(items, pad_id, prefix_sharing=sharing)
        rewards = batch_rewards(rm, batch)  # (B, K)
        loss = ranking_loss(rewards, ranks)
        loss.backward()
        out.append((rewards.detach(), loss.item(), [p.grad.clone() for p in rm.parameters()], batch))
    rm.zero_grad()
    return out


def ranked_items(tok, prompts, ks, ranks, max_length=1024, seed=0):
    rng = random.Random(seed)
    items = []
    for prompt, k, r in zip(prompts, ks, ranks):
        responses = [" ".join(rng.choice(["yes", "no", "maybe", "the", "answer", "is"]) for _ in range(rng.randint(1, 12)))
                     for _ in range(k)]
        items.append({"ids": encode(tok, [prompt] * k, responses, max_length)[0], "ranks": r})
    return items


def test_prefix_sharing_equals_separate_sequences(tiny):
    """Packed rows (prompt once, block mask, continued positions) give the rewards, loss and
    parameter gradients of K separate sequences: prompts of different lengths, K from 2 to 5
    (padding ranks -1), ties."""
    rm, tok = tiny
    prompts = ["Hi.", "Name three rivers in Europe and say which is longest, please.", "Sum 2 and 3.",
               "Write a haiku " + "about the sea " * 6]
    ranks = [[0, 1, 1, 2, 3], [1, 0], [0, 0, 1], [2, 0, 1, 1]]  # ties in three prompts
    items = ranked_items(tok, prompts, [5, 2, 3, 4], ranks)
    (r_sep, l_sep, g_sep, sep), (r_pack, l_pack, g_pack, packed) = packed_vs_separate(rm, items, tok.pad_token_id)
    assert packed["input_ids"].shape[0] == 4 and sep["input_ids"].shape[0] == 14  # one row per prompt
    assert packed["input_ids"].numel() < sep["input_ids"].numel()
    assert (packed["ends"] < 0).sum() == 6 and (r_pack[packed["ends"] < 0] == 0).all()
    torch.testing.assert_close(r_pack, r_sep, atol=1e-5, rtol=1e-5)
    assert l_pack == pytest.approx(l_sep, abs=1e-6)
    for a, b in zip(g_pack, g_sep):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_prefix_sharing_with_truncated_prompts(tiny):
    """max_length cuts each text's prompt start by a different amount, so the rows share less
    (or nothing) of the prompt; the packed rows still compute exactly the separate sequences."""
    rm, tok = tiny
    prompts = ["word " * 40, "short one"]
    items = ranked_items(tok, prompts, [4, 3], [[0, 1, 2, 3], [0, 1, 1]], max_length=30, seed=1)
    full = ranked_items(tok, prompts, [4, 3], [[0, 1, 2, 3], [0, 1, 1]], seed=1)
    assert all(len(r) == 30 for r in items[0]["ids"]) and len(full[0]["ids"][0]) > 30  # truncated
    assert shared_prefix_length(items[0]["ids"]) < shared_prefix_length(full[0]["ids"])
    (r_sep, l_sep, g_sep, _), (r_pack, l_pack, g_pack, _) = packed_vs_separate(rm, items, tok.pad_token_id)
    torch.testing.assert_close(r_pack, r_sep, atol=1e-5, rtol=1e-5)
    assert l_pack == pytest.approx(l_sep, abs=1e-6)
    for a, b in zip(g_pack, g_sep):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_pack_layout_by_hand():
    """Prefix once, then each row's tail; positions continue from the prefix; each tail sees the
    prefix and itself; padding sees only padding; identical rows keep their last token apart."""
    batch = pack([[[1, 2, 3, 4], [1, 2, 5]], [[7, 8], [7, 8]]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 8, 0, 0]]
    assert batch["positions"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 0, 0]]
    assert batch["ends"].tolist() == [[3, 4], [5 + 1, 5 + 2]]  # flat index g*T + t
    mask = batch["attention_mask"][:, 0].int().tolist()
    assert mask[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 1]]
    assert mask[1] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    assert shared_prefix_length([[5, 6], [5, 6, 7]]) == 1


def test_train_step_with_and_without_prefix_sharing_gives_the_same_gradients(tiny):
    rm, tok = tiny
    items = ranked_items(tok, ["p one", "a longer second prompt here", "p3"], [3, 4, 2],
                         [[0, 1, 2], [1, 1, 0, 2], [0, 1]])
    grads, results = [], []
    for sharing, micro in ((False, 3), (True, 3), (True, 1)):
        rm.zero_grad()
        results.append(train_step(rm, items, tok.pad_token_id, micro, "cpu", use_autocast=False,
                                  prefix_sharing=sharing))
        grads.append([p.grad.clone() for p in rm.parameters()])
    rm.zero_grad()
    assert results[1][0] == pytest.approx(results[0][0], abs=1e-6) and results[1][1:] == results[0][1:]
    for g in grads[1:]:
        for a, b in zip(g, grads[0]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_score_shares_consecutive_prompts_and_keeps_the_order(tiny):
    rm, tok = tiny
    prompts = ["Say hi."] * 3 + ["What is 2+2?"] * 2 + ["Say hi."]
    responses = ["Hi!", "Hello there, friend.", "", "4", "four", "hey"]
    separate = rm.score(tok, prompts, responses, prefix_sharing=False, progress=False)
    for batch_size in (1, 2, 8):
        shared = rm.score(tok, prompts, responses, batch_size=batch_size, progress=False)
        assert shared == pytest.approx(separate, abs=1e-5)
    held = [{"prompt": "Say hi.", "responses": responses[:3], "tiers": [[1], [0, 2]], "prompt_id": None},
            {"prompt": "What is 2+2?", "responses": responses[3:5], "tiers": [[0], [1]], "prompt_id": None}]
    m = [evaluate_rankings(rm, tok, held, RewardConfig(gold=False, progress=False, prefix_sharing=s)) for s in (0, 1)]
    assert m[0]["eval/loss"] == pytest.approx(m[1]["eval/loss"], abs=1e-6)


def test_ensemble_scores_the_members_mean(tiny):
    from labkit.reward import RewardEnsemble

    rm, tok = tiny
    other = copy.deepcopy(rm)
    with torch.no_grad():
        other.head.weight.mul_(-3.0)
    prompts, responses = ["Say hi."] * 2 + ["What is 2+2?"], ["Hi!", "Hello.", "4"]
    a, b = (m.score(tok, prompts, responses, progress=False) for m in (rm, other))
    mean = RewardEnsemble([rm, other]).score(tok, prompts, responses, progress=False)
    assert mean == pytest.approx([(x + y) / 2 for x, y in zip(a, b)], abs=1e-6)
    assert a != pytest.approx(b, abs=1e-3)  # the members differ, so the mean is not either one
    with pytest.raises(ValueError, match="at least one"):
        RewardEnsemble([])


def test_win_rate_with_an_rm_judge_scores_each_pair_in_one_pass(tiny, monkeypatch):
    from labkit import evaluate

    rm, tok = tiny
    recs = [{"id": str(i), "prompt": p, "category": "other"} for i, p in enumerate(["Say hi.", "What is 2+2?", "Name a river."])]
    a, b = ["Hi!", "4", "The Rhine."], ["Hello there, friend.", "four", "The Rhine."]  # the last: the same answer
    prompts = [r["prompt"] for r in recs]
    sa = rm.score(tok, prompts, a, prefix_sharing=False, progress=False)
    sb = rm.score(tok, prompts, b, prefix_sharing=False, progress=False)
    calls = []
    score = rm.score
    monkeypatch.setattr(rm, "score", lambda *args, **kw: calls.append(args[1]) or score(*args, **kw))
    w = evaluate.win_rate(a, b, recs, rm, tokenizer=tok)
    assert calls == [[prompts[0], prompts[0], prompts[1], prompts[1], prompts[2]]]  # one call, A and B side by side
    assert w["ties"] == 1 + sum(x == y for x, y in zip(sa[:2], sb[:2]))  # one answer, one score: an exact tie
    assert w["score_a"] == pytest.approx(sum(sa) / 3, abs=1e-5) and w["score_b"] == pytest.approx(sum(sb) / 3, abs=1e-5)
    assert w["wins"] == sum(x > y for x, y in zip(sa, sb)) and w["losses"] == sum(x < y for x, y in zip(sa, sb))


# ----------------------------------------------------------------------------- training

def keyword_rankings(n: int, k: int = 4, seed: int = 0) -> list[dict]:
    """An easy preference: responses containing "banana" beat those without (a tie within each group)."""
    rng = random.Random(seed)
    filler = "the a is very some old blue small quiet good and it".split()
    out = []
    for i in range(n):
        n_good = rng.randint(1, k - 1)
        responses = []
        for j in range(k):
            words = [rng.choice(filler) for _ in range(rng.randint(4, 8))]
            if j < n_good:
                words.insert(rng.randrange(len(words)), "banana")
            responses.append(" ".join(words))
        order = rng.sample(range(k), k)
        out.append({"prompt": f"Write something ({i}).", "responses": [responses[o] for o in order],
                    "tiers": [[p for p, o in enumerate(order) if o < n_good],
                              [p for p, o in enumerate(order) if o >= n_good]]})
    return out


def test_tiny_rm_learns_an_easy_preference(tmp_path):
    demos = [{"prompt": "Say hi.", "response": "hi there"}, {"prompt": "Fruit?", "response": "a banana"}]
    config = RewardConfig(model="tiny", rankings=keyword_rankings(240), out_dir=str(tmp_path / "rm"),
                          learning_rate=1e-3, batch_size=8, eval_fraction=0.2, demonstrations=demos,
                          dashboard=False, progress=False)
    result = train_reward_model(config)
    m = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert m == json.loads(json.dumps(result)) and result["stopped"] is None
    assert m["data/n_train"] == 192 and m["data/n_eval"] == 48 and m["train/steps_done"] == 24
    losses = [v for _, v in read_history(tmp_path / "rm")["loss/ranking"]]
    assert len(losses) == 24 and all(math.isfinite(x) for x in losses)
    assert m["loss/first"] == pytest.approx(math.log(2), abs=0.15)  # untrained: r_w - r_l near 0
    assert m["loss/last"] < 0.2
    assert m["eval/accuracy"] > 0.9  # chance is 0.5; held-out prompts were never trained on
    rm, tok = load_reward_model(result["model_dir"], dtype="float32", device="cpu")
    # Demo-mean normalisation: the demonstrations average 0 after training.
    scores = rm.score(tok, [d["prompt"] for d in demos], [d["response"] for d in demos], progress=False)
    assert sum(scores) / 2 == pytest.approx(0.0, abs=1e-4)
    assert m["reward/bias"] == pytest.approx(rm.bias.item(), abs=1e-6)
    for name in ("config.json", "history.json", "dashboard.html"):
        assert (tmp_path / "rm" / name).exists()


def test_train_layers_trains_the_top_blocks_and_leaves_the_rest_as_the_sft_model_has_them(tmp_path):
    from labkit.models import load_model

    start, _ = load_model("tiny", dtype="float32", device="cpu", seed=0)
    n_blocks = len(start.get_decoder().layers)
    assert n_blocks >= 2
    result = train_reward_model(RewardConfig(model="tiny", rankings=keyword_rankings(32), out_dir=str(tmp_path / "rm"),
                                             learning_rate=1e-3, batch_size=8, train_layers=1, seed=0,
                                             dashboard=False, progress=False, gold=False))
    rm, _ = load_reward_model(result["model_dir"], dtype="float32", device="cpu")
    before = start.get_decoder().state_dict()
    top = f"layers.{n_blocks - 1}."
    for name, value in rm.backbone.state_dict().items():
        moved = not torch.equal(value, before[name])
        assert moved == (name.startswith(top) or name.startswith("norm.")), name
    with pytest.raises(ValueError, match="decoder blocks"):
        train_reward_model(RewardConfig(model="tiny", rankings=keyword_rankings(8), out_dir=str(tmp_path / "rm2"),
                                        train_layers=n_blocks + 1, dashboard=False, progress=False, gold=False))


def test_held_out_gold_agreement_uses_prompt_records(tmp_path):
    data = pytest.importorskip("labkit.data")
    from labkit.labelers import GoldLabeler

    prompts = [p for p in data.load_prompts("rm") if not p.get("harmful")][:6]
    gold = GoldLabeler()
    records = []
    for p in prompts:  # ranked by the gold scorer itself, so labeler-vs-gold agreement is 1
        responses = ["", "I'm sorry, but I can't help with that.", p["prompt"], "ok " * 3]
        scores = [gold.score(p, r) for r in responses]
        order = sorted(range(4), key=lambda i: -scores[i])
        tiers = []
        for i in order:
            if tiers and scores[tiers[-1][0]] == scores[i]:
                tiers[-1].append(i)
            else:
                tiers.append([i])
        records.append({"prompt": p["prompt"], "responses": responses, "tiers": tiers, "prompt_id": p["id"]})
    config = RewardConfig(model="tiny", rankings=records, out_dir=str(tmp_path), eval_fraction=0.5, max_steps=1,
                          batch_size=2, normalize=False, dashboard=False, progress=False)
    result = train_reward_model(config)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert result["model_dir"] == str(tmp_path / "model") and m["data/n_eval"] == 3
    assert m["eval/gold_n_pairs"] > 0 and m["eval/gold_n_unknown"] == 0
    assert m["eval/labeler_gold_accuracy"] == 1.0
    assert 0.0 <= m["eval/gold_accuracy"] <= 1.0


# ----------------------------------------------------------------------------- validation

GOOD = {"prompt": "p", "responses": ["a", "b", "c"], "tiers": [[1], [0, 2]]}


@pytest.mark.parametrize("bad, message", [
    ({**GOOD, "tiers": [[1], [0, 3]]}, r"rankings\[1\]: tier 1: response index 3 is out of range 0..2"),
    ({**GOOD, "responses": ["a"], "tiers": [[0]]}, "at least 2"),
    ({**GOOD, "tiers": [[1], [0]]}, r"miss response\(s\) \[2\]"),
    ({**GOOD, "tiers": [[1, 1], [0, 2]]}, "twice"),
    ({**GOOD, "tiers": [[1], []]}, "tier 1 is empty"),
    ({"prompt": "p", "responses": ["a", "b"]}, "tiers"),
    ({**GOOD, "prompt": ""}, "prompt"),
    ({**GOOD, "responses": ["a", None, "c"]}, "list of strings"),
])
def test_bad_rankings_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        as_rankings([GOOD, bad])


def test_empty_dataset_and_all_tied_raise(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        as_rankings([])
    with pytest.raises(ValueError, match="no rankings"):
        as_rankings(None)
    config = RewardConfig(model="tiny", rankings=[{"prompt": "p", "responses": ["a", "b"], "tiers": [[0, 1]]}],
                          out_dir=str(tmp_path), dashboard=False, progress=False)
    with pytest.raises(ValueError, match="tie"):
        train_reward_model(config)


def test_config_checks():
    with pytest.raises(ValueError):
        RewardConfig(eval_fraction=1.0)
    with pytest.raises(ValueError):
        RewardConfig(batch_size=4, micro_batch_size=8)
    with pytest.raises(ValueError):
        RewardConfig(precision="fp8")
    with pytest.raises(ValueError, match="train_layers"):
        RewardConfig(train_layers=-1)


def test_sources_pairs_jsonl_and_feedback_store(tmp_path):
    pair = {"prompt": "p", "chosen": "good", "rejected": "bad"}
    assert as_rankings([pair]) == [{"prompt": "p", "responses": ["good", "bad"], "tiers": [[0], [1]], "prompt_id": None}]
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(pair) + "\n")
    assert [len(r["responses"]) for r in as_rankings(path)] == [3, 2]
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="r.jsonl"):
        as_rankings(path)

    feedback = pytest.importorskip("labkit.feedback")
    store = feedback.FeedbackStore(tmp_path / "fb.sqlite")
    store.add_ranking("rm-0001", ["one", "two", "three"], [[2], [0, 1]], annotator="ann", prompt="Count.")
    (rec,) = as_rankings(store)
    assert rec["responses"] == ["one", "two", "three"] and rec["tiers"] == [[2], [0, 1]]
    assert rec["prompt_id"] == "rm-0001" and rec["prompt"] == "Count."


def test_non_finite_loss_stops_and_keeps_the_last_good_weights(tmp_path, monkeypatch):
    import labkit.reward as reward

    calls = {"n": 0}
    real_loss = reward.ranking_loss

    def loss_nan_on_third_step(rewards, ranks):
        calls["n"] += 1
        loss = real_loss(rewards, ranks)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(reward, "ranking_loss", loss_nan_on_third_step)
    config = RewardConfig(model="tiny", rankings=keyword_rankings(40), out_dir=str(tmp_path), batch_size=4,
                          eval_fraction=0.0, normalize=False, dashboard=False, progress=False)
    result = train_reward_model(config)
    assert result["stopped"] == "non-finite" and "step 3" in result["message"]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["train/steps_done"] == 2 and m["stopped"] == "non-finite"
    rm, _ = load_reward_model(result["model_dir"], dtype="float32", device="cpu")
    assert all(torch.isfinite(p).all() for p in rm.parameters())


def test_trains_directly_from_a_feedback_store(tmp_path):
    feedback = pytest.importorskip("labkit.feedback")
    store = feedback.FeedbackStore(tmp_path / "fb.sqlite")
    for i, r in enumerate(keyword_rankings(6)):
        store.add_ranking(f"rm-{i:04d}", r["responses"], r["tiers"], annotator="sim", prompt=r["prompt"])
    config = RewardConfig(model="tiny", rankings=store, out_dir=str(tmp_path / "rm"), batch_size=2, max_steps=2,
                          eval_fraction=0.34, normalize=False, dashboard=False, progress=False)
    result = train_reward_model(config)
    m = json.loads((Path(result["out_dir"]) / "metrics.json").read_text())
    assert m["data/n_rankings"] == 6 and m["data/n_eval"] == 2 and m["train/steps_done"] == 2
    saved = json.loads((Path(result["out_dir"]) / "config.json").read_text())
    assert saved["model"] == "tiny" and saved["rankings"] == "<FeedbackStore>"


def test_consensus_trains_on_one_merged_ranking_per_prompt(tmp_path):
    records = keyword_rankings(6)
    flipped = [{**r, "tiers": r["tiers"][::-1]} for r in records[:3]]  # a second annotator, who disagrees
    config = RewardConfig(model="tiny", rankings=records + flipped, out_dir=str(tmp_path / "rm"), batch_size=2,
                          max_steps=1, eval_fraction=0.34, normalize=False, consensus=True, dashboard=False,
                          progress=False, gold=False)
    m = json.loads((Path(train_reward_model(config)["out_dir"]) / "metrics.json").read_text())
    assert m["data/n_rankings"] == 9 and m["data/n_merged"] == 6
    # two tiers each, in opposite orders: every merged response has the same mean rank, nothing to compare
    assert m["data/n_without_pairs"] == 3


def test_ctrl_c_saves_the_last_finished_step_and_returns_interrupted(tmp_path, monkeypatch):
    import os
    import signal

    import labkit.reward as reward

    calls = {"n": 0}
    real_step = reward.train_step

    def ctrl_c_during_second_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # held until the step is done, then honoured
        return real_step(*args, **kwargs)

    monkeypatch.setattr(reward, "train_step", ctrl_c_during_second_step)
    config = RewardConfig(model="tiny", rankings=keyword_rankings(40), out_dir=str(tmp_path), batch_size=4,
                          eval_fraction=0.0, normalize=False, dashboard=False, progress=False)
    result = train_reward_model(config)
    assert result["stopped"] == "interrupted" and result["train/steps_done"] == 2
    rm, _ = load_reward_model(result["model_dir"], dtype="float32", device="cpu")
    assert all(torch.isfinite(p).all() for p in rm.parameters())

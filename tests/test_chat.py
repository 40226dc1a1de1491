"""ChatWidget without a browser: streaming order, RM scores, "beat the RM", typed prompts, escaping."""

import html

import pytest
import torch

import labkit.chat as chat
from labkit.chat import ChatWidget, interleave, user_prompts
from labkit.feedback import FeedbackStore
from labkit.generation import generate
from labkit.models import load_model
from labkit.reward import RewardModel

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def rm(tiny):
    model, tok = load_model("tiny", dtype="float32", device="cpu", seed=1)
    return RewardModel.from_causal_lm(model), tok


def test_interleave_takes_one_piece_from_each_stream_in_turn():
    out = list(interleave({"a": iter(["a1", "a2", "a3"]), "b": iter(["b1"]), "c": iter(["c1", "c2"])}))
    assert out == [("a", "a1"), ("b", "b1"), ("c", "c1"), ("a", "a2"), ("c", "c2"), ("a", "a3")]


def test_streamed_answer_equals_greedy_generate(tiny):
    model, tok = tiny
    w = ChatWidget({"base": (model, tok)}, max_new_tokens=12, temperature=0)
    pieces = [piece for _, piece in w.stream_answers("Name a colour.")]
    assert len(pieces) > 1 and all(isinstance(p, str) and p for p in pieces)  # token by token, not at once
    assert "".join(pieces) == generate(model, tok, ["Name a colour."], max_new_tokens=12, do_sample=False,
                                       show_progress=False)[0]


def test_sampled_answers_are_seeded(tiny):
    model, tok = tiny
    a = ChatWidget({"base": (model, tok)}, max_new_tokens=10, seed=3).ask("Say hi.")
    b = ChatWidget({"base": (model, tok)}, max_new_tokens=10, seed=3).ask("Say hi.")
    assert a == b and a["base"]


def test_answers_stream_side_by_side_then_get_rm_scores(tiny, rm, tmp_path):
    model, tok = tiny
    w = ChatWidget({"base": (model, tok), "sft": (model, tok)}, reward=rm, max_new_tokens=8, temperature=0)
    seen = []
    for name, piece in w.stream_answers("List two fruits."):
        seen.append(name)
        assert w.answers[name].endswith(piece)  # the answer grows as pieces arrive
    assert seen[:2] == ["base", "sft"]  # both columns start before either finishes
    answers = w.ask("List two fruits.")
    assert answers["base"] == answers["sft"] == w.answers["base"]  # greedy, same weights
    expected = rm[0].score(rm[1], ["List two fruits."] * 2, [answers["base"], answers["sft"]], progress=False)
    assert [w.scores["base"], w.scores["sft"]] == pytest.approx(expected)
    for view, name in zip(w.columns, ("base", "sft")):
        assert f"RM {w.scores[name]:+.3f}" in view.value and "gold" in view.value


def test_beat_the_rm_score_equals_reward_model_score(tiny, rm):
    model, tok = tiny
    w = ChatWidget({"ppo": (model, tok)}, reward=rm, max_new_tokens=6)
    assert w.score_answer("anything") is None and "Ask a prompt first" in w.message
    w.ask("Write one word in lowercase.")
    mine = w.score_answer("hello")
    assert mine == pytest.approx(rm[0].score(rm[1], ["Write one word in lowercase."], ["hello"], progress=False)[0])
    assert f"RM {mine:+.3f}" in w.beat_html.value
    assert ("beats ppo" in w.beat_html.value) == (mine > w.scores["ppo"])


def test_dataset_prompt_shows_its_checks(tiny, rm):
    model, tok = tiny
    record = {"id": "eval-x", "prompt": "Answer in lowercase.", "category": "generation", "style": "plain",
              "checks": [{"type": "lowercase"}, {"type": "max_words", "n": 5}]}
    w = ChatWidget({"base": (model, tok)}, reward=rm, max_new_tokens=6, prompts=[record])
    w.ask(record)
    checks = w.gold["base"]["checks"]
    assert [words for words, _ in checks] == ["only lowercase letters", "at most 5 words"]
    assert all(("✓ " if ok else "✗ ") + words in w.columns[0].value for words, ok in checks)


def test_typed_prompts_are_stored_once_with_their_author(tiny, tmp_path):
    model, tok = tiny
    store = FeedbackStore(tmp_path / "fb.sqlite")
    w = ChatWidget({"base": (model, tok)}, store=store, author="alice", max_new_tokens=4)
    w.category.value = "brainstorming"
    w.ask("Give me ideas for a picnic.")
    w.ask("Give me ideas for a picnic.")  # asked again: stored once
    w.author = "bob"
    w.ask("Give me ideas for a picnic.")
    w.ask({"id": "eval-1", "prompt": "From the set.", "checks": []})  # a dataset prompt: not stored
    kept = user_prompts(store)
    assert [(p["author"], p["prompt"], p["style"], p["category"]) for p in kept] == [
        ("alice", "Give me ideas for a picnic.", "user_based", "brainstorming"),
        ("bob", "Give me ideas for a picnic.", "user_based", "brainstorming")]
    assert kept[0]["id"].startswith("user-") and user_prompts(store, author="bob")[0]["author"] == "bob"
    assert store.demonstrations() == []  # nothing reaches SFT's submitted demonstrations


def test_everything_shown_is_escaped(tiny, rm, monkeypatch):
    model, tok = tiny
    evil = '<img src=x onerror="alert(1)">'
    monkeypatch.setattr(chat, "stream", lambda *a, **k: iter([evil[:10], evil[10:]]))
    w = ChatWidget({"<b>base</b>": (model, tok)}, reward=rm, max_new_tokens=50)
    w.ask("<script>alert(2)</script>")
    assert w.answers["<b>base</b>"] == evil
    w.score_answer("<script>alert(3)</script>")
    shown = w.columns[0].value + w.beat_html.value
    assert "<img" not in shown and "<script>" not in shown and "<b>base</b>" not in shown
    assert html.escape(evil) in w.columns[0].value and "&lt;b&gt;base&lt;/b&gt;" in w.columns[0].value
    assert html.escape("<script>alert(3)</script>") in w.beat_html.value


def test_empty_prompt_asks_for_text(tiny):
    model, tok = tiny
    w = ChatWidget({"base": (model, tok)})
    assert w.ask("   ") == {} and w.message == "Type a prompt first."


def test_widgets_module_reexports_chat_widget():
    import labkit.widgets

    assert labkit.widgets.ChatWidget is ChatWidget

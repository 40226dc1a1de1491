"""Widget state machines driven from Python (no browser): ranking, demonstrations, A/B."""

import html

import pytest

from labkit.feedback import FeedbackStore
from labkit.labelers import CHECKS, describe_check
from labkit.widgets import ComparisonWidget, DemonstrationWidget, RankingWidget


def _items(n=3, k=4):
    return [{"prompt_id": f"rm-{i:04d}", "prompt": f"Prompt {i}", "responses": [f"answer {i}.{j}" for j in range(k)],
             "models": [f"model-{j}" for j in range(k)]} for i in range(n)]


@pytest.fixture
def store(tmp_path):
    return FeedbackStore(tmp_path / "fb.sqlite")


def test_click_to_rank_with_tie_undo_and_submit(store):
    w = RankingWidget(store, _items(), annotator="alice")
    assert (w.item["prompt_id"], w.done, w.total, w.tiers) == ("rm-0000", 0, 3, [])
    w.rank(2)
    w.tie()
    assert w.tie_next
    w.rank(0)
    assert w.tiers == [[2, 0]] and not w.tie_next
    w.rank(3)
    w.rank(3)  # already ranked: refused, explained
    assert w.tiers == [[2, 0], [3]] and "already ranked" in w.message
    w.undo()
    assert w.tiers == [[2, 0]]
    w.undo()
    assert w.tiers == [[2]]
    w.rank(1)
    w.rank(0)
    w.score, w.flags, w.comment = 5, ["hallucination"], "response 4 invents a date"
    row = w.submit()  # response 3 (index 3) is the only one left: it goes last
    assert row is not None and w.message.startswith("Saved rm-0000: 3 > 2 > 1 > 4")
    (r,) = store.rankings()
    assert r["tiers"] == [[2], [1], [0], [3]] and r["annotator"] == "alice"
    assert (r["score"], r["flags"], r["comment"]) == (5, ["hallucination"], "response 4 invents a date")
    assert r["models"] == [f"model-{j}" for j in range(4)] and r["seconds"] >= 0
    # The next item is on screen with a clean slate.
    assert (w.item["prompt_id"], w.done, w.tiers, w.score, w.flags, w.comment) == ("rm-0001", 1, [], 0, [], "")


def test_submit_needs_all_but_one_ranked_and_tie_applies_to_the_last(store):
    w = RankingWidget(store, _items(1), annotator="bob")
    w.rank(0)
    assert w.submit() is None and "3 left" in w.message and store.rankings() == []
    w.rank(1)
    w.rank(2)
    w.tie()  # the last one, placed by submit, ties with response 3
    w.submit()
    assert store.rankings()[0]["tiers"] == [[0], [1], [2, 3]]
    assert w.finished and w.item == {} and w.submit() is None and w.rank(0) is None


def test_reset_out_of_range_and_tie_first(store):
    w = RankingWidget(store, _items(1), annotator="bob")
    w.tie()
    assert not w.tie_next and "Rank a response first" in w.message
    w.rank(7)
    assert w.tiers == [] and "no response 8" in w.message
    w.rank(1)
    w.tie()
    w.undo()  # cancels the pending tie only
    assert w.tiers == [[1]] and not w.tie_next
    w.reset()
    assert w.tiers == [] and not w.tie_next


def test_board_commands_are_the_same_state_machine(store):
    w = RankingWidget(store, _items(1, k=2), annotator="carol")
    for msg in [{"cmd": "rank", "index": 1}, {"cmd": "bogus"}, {"cmd": "submit"}]:
        w._on_msg(w, msg, [])
    assert store.rankings()[0]["tiers"] == [[1], [0]]


def test_skip_and_resume_per_annotator(store):
    items = _items(3)
    w = RankingWidget(store, items, annotator="dave")
    w.skip()
    w.rank(0), w.rank(1), w.rank(2), w.submit()
    assert w.item["prompt_id"] == "rm-0002"
    # A new session (kernel restart) for dave starts at the first unfinished item.
    again = RankingWidget(store, items, annotator="dave")
    assert (again.item["prompt_id"], again.done) == ("rm-0002", 2)
    assert store.rankings(status="skipped")[0]["prompt_id"] == "rm-0000"
    assert [r["prompt_id"] for r in store.rankings()] == ["rm-0001"]
    # Another annotator starts from the beginning; switching names switches queues.
    other = RankingWidget(store, items, annotator="erin")
    assert (other.item["prompt_id"], other.done) == ("rm-0000", 0)
    other.annotator = "dave"
    assert (other.item["prompt_id"], other.done) == ("rm-0002", 2)


def test_a_name_typed_mid_item_keeps_the_item(store):
    w = RankingWidget(store, _items(2))
    w.rank(1), w.rank(0), w.rank(2)
    assert w.submit() is None and "Not saved" in w.message and "annotator" in w.message
    assert store.rankings(status=None) == []
    w.annotator = "  frank "
    assert w.annotator == "frank" and w.tiers == [[1], [0], [2]] and w.item["prompt_id"] == "rm-0000"
    w.submit()
    assert store.rankings()[0]["annotator"] == "frank" and store.rankings()[0]["tiers"] == [[1], [0], [2], [3]]


def test_board_never_sees_model_names_and_items_are_validated(store):
    w = RankingWidget(store, _items(1), annotator="gina")
    assert "models" not in w.item and "model-0" not in repr(w.get_state())
    with pytest.raises(ValueError, match="2..9 responses"):
        RankingWidget(store, [{"prompt_id": "x", "prompt": "p", "responses": ["only one"]}])
    with pytest.raises(ValueError, match="2..9 responses"):
        RankingWidget(store, _items(1, k=10))
    with pytest.raises(ValueError, match="ui"):
        RankingWidget(store, _items(1), ui="fancy")


def test_board_front_end_uses_text_only(store):
    js = RankingWidget._esm
    assert "textContent" in js and "innerHTML" not in js and "insertAdjacentHTML" not in js


def test_classic_view_escapes_and_drives_the_same_state(store):
    evil = ["<img src=x onerror=alert(1)>", "<script>alert(2)</script>", "fine", "also fine"]
    w = RankingWidget(store, [{"prompt_id": "x-1", "prompt": "<b>bold?</b>", "responses": evil}],
                      annotator="hank", ui="classic")
    view = w.classic_view()
    bundle = w._repr_mimebundle_()
    assert view.model_id in str(bundle)  # the classic box is what gets displayed
    ui = w._classic_ui
    shown = ui.cards.value + ui.prompt.value
    assert "<script>" not in shown and "<img" not in shown and "<b>bold" not in shown
    assert html.escape(evil[1]) in shown and html.escape(evil[0]) in shown
    ui.rank_buttons.children[3].click()
    ui.rank_buttons.children[0].click()
    assert w.tiers == [[3], [0]] and "#1" in ui.cards.value
    ui.score.value = 4
    ui.flag_boxes["inappropriate"].value = True
    ui.rank_buttons.children[1].click()
    [b for b in ui.toolbar.children if b.description == "Submit"][0].click()
    (r,) = store.rankings()
    assert r["tiers"] == [[3], [0], [1], [2]] and r["score"] == 4 and r["flags"] == ["inappropriate"]


# ----------------------------------------------------------------------------- demonstrations

PROMPTS = [
    {"id": "sft-0001", "prompt": "Describe rain in lowercase, in at most 5 words.", "category": "generation",
     "checks": [{"type": "lowercase"}, {"type": "max_words", "n": 5}]},
    {"id": "sft-0002", "prompt": "Say hi.", "category": "chat", "checks": []},
]


def test_demonstration_widget_checks_live_and_stores(store):
    pytest.importorskip("labkit.labelers")
    w = DemonstrationWidget(store, PROMPTS, annotator="ivy")
    assert w.current["prompt_id"] == "sft-0001" and w.check_results == [False, False]  # empty draft fails
    w.write("soft grey rain")
    assert w.check_results == [True, True] and "✓" in w.checks_html.value
    w.write("Soft grey rain falls on the roofs")
    assert w.check_results == [False, False] and "✗" in w.checks_html.value
    w.editor.value = "soft grey rain falls"  # typing in the text area is the same
    assert w.draft == "soft grey rain falls" and w.check_results == [True, True]
    w.submit()
    assert store.demonstrations()[0]["response"] == "soft grey rain falls"
    assert w.current["prompt_id"] == "sft-0002" and w.draft == "" and w.done == 1
    assert w.submit() is None and "empty" in w.message  # nothing written yet
    w.skip()
    assert w.finished and store.done_ids("ivy", "demonstration") == {"sft-0001", "sft-0002"}
    assert len(store.demonstrations()) == 1
    assert DemonstrationWidget(store, PROMPTS, annotator="ivy").finished


def test_demonstration_prompt_is_escaped(store):
    w = DemonstrationWidget(store, [{"id": "p1", "prompt": "<script>x()</script>", "checks": []}], annotator="j")
    assert "<script>" not in w.prompt_html.value and "&lt;script&gt;" in w.prompt_html.value


# ----------------------------------------------------------------------------- A/B

def _pairs(n):
    return [{"prompt_id": f"eval-{i:04d}", "prompt": f"Q{i}", "responses": [f"first answer {i}", f"second answer {i}"],
             "models": ["sft", "ppo"]} for i in range(n)]


def test_comparison_sides_are_seeded_and_mapped_back(store):
    items = _pairs(40)
    assert ComparisonWidget(store, items, annotator="nobody", seed=3).revealed == ""
    w1 = ComparisonWidget(store, items, annotator="kim", seed=3)
    w2 = ComparisonWidget(FeedbackStore(store.path), items, annotator="lee", seed=3)
    assert w1.shown == w2.shown  # same seed, same item -> same sides
    orders = []
    for _ in range(40):
        orders.append(tuple(w1.shown))
        a_index = w1.shown[0]
        on_screen = w1.prompt_html.value + w1.side_a.value + w1.side_b.value
        assert "sft" not in on_screen and "ppo" not in on_screen  # blind until judged
        assert html.escape(items[len(orders) - 1]["responses"][a_index]) in w1.side_a.value
        w1.choose("A")
        # Stored in the item's own order: 'a' is responses[0] (sft), whatever was shown as A.
        last = store.comparisons(annotator="kim")[-1]
        assert last["choice"] == "ab"[a_index] and (last["model_a"], last["model_b"]) == ("sft", "ppo")
        assert last["a_shown_first"] == (a_index == 0)
        assert w1.revealed == f"A was {['sft', 'ppo'][a_index]}, B was {['sft', 'ppo'][1 - a_index]}"
    assert {(0, 1), (1, 0)} == set(orders)  # both sides drawn over 40 items
    assert w1.finished


def test_comparison_tie_skip_and_resume(store):
    items = _pairs(3)
    w = ComparisonWidget(store, items, annotator="max")
    w.choose("tie")
    w.skip()
    assert [c["choice"] for c in store.comparisons()] == ["tie"]
    assert store.comparisons(status="skipped")[0]["prompt_id"] == "eval-0001"
    again = ComparisonWidget(store, items, annotator="max")
    assert again.current["prompt_id"] == "eval-0002" and again.done == 2
    with pytest.raises(ValueError):
        again.choose("left")
    with pytest.raises(ValueError, match="exactly 2"):
        ComparisonWidget(store, [{"prompt_id": "x", "responses": ["a", "b", "c"]}])


def test_every_check_kind_reads_as_words():
    examples = {"n": 3, "words": ["sea", "salt"], "text": "Dear", "keys": ["name"], "options": ["yes", "no"]}
    for kind, (_, params, _) in CHECKS.items():
        check = {"type": kind, **{p: examples[p] for p in params}}
        text = describe_check(check)
        assert not text.startswith(kind) and "=" not in text, (kind, text)  # not the generic fallback
    assert describe_check({"type": "max_words", "n": 50}) == "at most 50 words"
    assert describe_check({"type": "include_words", "words": ["a", "b"]}) == 'mentions "a", "b"'


def test_drag_and_drop_moves(store):
    w = RankingWidget(store, _items(1, k=5), annotator="olga")
    w.rank(0), w.rank(1), w.rank(2)  # 1 > 2 > 3
    w.move(2, before=0)  # drag 3 above 1
    assert w.tiers == [[2], [0], [1]]
    w.move(3, before=0, tie=True)  # unranked 4 dropped on 1 with Shift: ties with it
    assert w.tiers == [[2], [0, 3], [1]]
    w.move(2, before=None)  # dropped on the ranking line: last
    assert w.tiers == [[0, 3], [1], [2]]
    w.move(0, before=4)  # onto an unranked response: nothing to order against
    assert w.tiers == [[0, 3], [1], [2]]
    w._on_msg(w, {"cmd": "move", "index": 1, "before": 0, "tie": False}, [])
    assert w.tiers == [[1], [0, 3], [2]]
    w.submit()
    assert store.rankings()[0]["tiers"] == [[1], [0, 3], [2], [4]]


def test_bundled_demonstrations_pass_their_live_checks(store):
    data = pytest.importorskip("labkit.data")
    demos = [d for d in data.load_demonstrations() if d["checks"]][:5]
    w = DemonstrationWidget(store, demos, annotator="paul")
    for d in demos:
        assert w.current["prompt_id"] == d["id"]
        w.write(d["response"])
        assert w.check_results and all(w.check_results), (d["id"], w.check_results)
        w.submit()
    assert [r["response"] for r in store.demonstrations()] == [d["response"] for d in demos]


def test_cut_off_answers_are_marked_and_a_name_is_asked_for(store):
    items = _items(1)
    items[0]["truncated"] = [False, True, False, False]
    w = RankingWidget(store, items)
    assert w.item["truncated"] == [False, True, False, False]
    assert "Type your name" in w.message and w.annotator == ""
    cards = w.classic_view() and w._classic_ui.cards.value
    assert cards.count("cut off") == 1
    plain = RankingWidget(store, _items(1), annotator="hal")
    assert plain.item["truncated"] == [False] * 4 and plain.message == ""
    w.annotator = "ivy"
    assert w.message == ""


def test_a_store_path_opens_a_store(tmp_path):
    w = RankingWidget(str(tmp_path / "fb.sqlite"), _items(1), annotator="jo")
    assert isinstance(w.store, FeedbackStore)
    d = DemonstrationWidget(tmp_path / "fb.sqlite", [{"id": "sft-1", "prompt": "Say hi."}], annotator="jo")
    assert isinstance(d.store, FeedbackStore)

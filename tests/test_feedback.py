"""FeedbackStore: round trips, exports, validation, resume, agreement, concurrency and kill safety."""

import math
import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from labkit.feedback import FLAGS, FeedbackStore, prompt_key

RESPONSES = ["alpha", "bravo", "charlie", "delta"]


@pytest.fixture
def store(tmp_path):
    return FeedbackStore(tmp_path / "feedback.sqlite")


def test_ranking_round_trip_keeps_everything(store):
    rid = store.add_ranking("rm-0001", RESPONSES, [[2], [0, 3], [1]], "alice", prompt="Say a word.",
                            models=["sft", "sft", "ppo", "base"], score=6,
                            flags={"hallucination": True, "inappropriate": False}, comment="ok", seconds=12.5)
    (r,) = store.rankings()
    assert r["id"] == rid
    assert r["prompt"] == "Say a word." and r["responses"] == RESPONSES
    assert r["tiers"] == [[2], [0, 3], [1]]
    assert r["prompt_id"] == "rm-0001" and r["annotator"] == "alice"
    assert r["models"] == ["sft", "sft", "ppo", "base"]
    assert r["response_ids"] == ["rm-0001/0", "rm-0001/1", "rm-0001/2", "rm-0001/3"]
    assert (r["score"], r["flags"], r["comment"], r["seconds"]) == (6, ["hallucination"], "ok", 12.5)
    assert r["status"] == "submitted"
    # A second handle on the same file (another kernel) sees the same data.
    assert FeedbackStore(store.path).rankings()[0]["tiers"] == [[2], [0, 3], [1]]


def test_tiers_may_name_response_ids(store):
    store.add_ranking("p1", ["x", "y", "z"], [["r-z"], ["r-x", "r-y"]], "bob",
                      response_ids=["r-x", "r-y", "r-z"])
    assert store.rankings()[0]["tiers"] == [[2], [0, 1]]


def test_to_pairs_counts_and_order(store):
    # K=4 with one tie: C(4,2) = 6 pairs, minus the tied pair (0, 3) -> 5.
    store.add_ranking("rm-0001", RESPONSES, [[2], [0, 3], [1]], "alice", prompt="P")
    pairs = store.to_pairs()
    assert len(pairs) == 5
    got = {(p["chosen"], p["rejected"]) for p in pairs}
    assert got == {("charlie", "alpha"), ("charlie", "delta"), ("charlie", "bravo"),
                   ("alpha", "bravo"), ("delta", "bravo")}
    assert all(set(p) == {"prompt", "chosen", "rejected"} and p["prompt"] == "P" for p in pairs)
    with_margin = {(p["chosen"], p["rejected"]): p["margin"] for p in store.to_pairs(margin=True)}
    assert with_margin[("charlie", "bravo")] == 2.0 and with_margin[("alpha", "bravo")] == 1.0
    ties = store.to_pairs(include_ties=True)
    assert len(ties) == 6 and sum(p["tie"] for p in ties) == 1
    # K=9 strict ranking: C(9,2) = 36 pairs; together 41.
    store.add_ranking("rm-0002", [f"r{i}" for i in range(9)], [[i] for i in range(9)], "alice", prompt="Q")
    assert len(store.to_pairs()) == 5 + 36


def test_skipped_rankings_are_not_exported(store):
    store.add_ranking("rm-0001", RESPONSES, None, "alice", prompt="P", status="skipped")
    assert store.rankings() == [] and store.to_pairs() == []
    assert len(store.rankings(status="skipped")) == 1
    assert store.done_ids("alice", "ranking") == {"rm-0001"}


def test_to_kway_and_datasets(store):
    store.add_ranking("rm-0001", RESPONSES, [[2], [0, 3], [1]], "alice", prompt="P")
    store.add_demonstration("sft-0001", "Write hi.", "hi", "alice")
    store.add_comparison("eval-0001", "Q", "ans a", "ans b", "b", "carol", model_a="sft", model_b="ppo",
                         a_shown_first=False)
    assert store.to_kway() == [{"prompt": "P", "responses": RESPONSES, "tiers": [[2], [0, 3], [1]],
                                "prompt_id": "rm-0001", "annotator": "alice"}]
    ds = store.to_dataset("pairs")
    assert ds.num_rows == 5 and set(ds.column_names) == {"prompt", "chosen", "rejected"}
    assert store.to_dataset("kway")[0]["tiers"] == [[2], [0, 3], [1]]
    assert store.to_dataset("demonstrations")[0]["response"] == "hi"
    (c,) = store.comparisons()
    assert (c["choice"], c["model_a"], c["model_b"], c["a_shown_first"]) == ("b", "sft", "ppo", False)
    with pytest.raises(ValueError, match="kind"):
        store.to_dataset("nope")


def test_empty_exports_keep_their_columns(store):
    assert store.to_dataset("pairs").column_names == ["prompt", "chosen", "rejected"]
    assert store.to_dataset("kway").column_names == ["prompt", "responses", "tiers", "prompt_id", "annotator"]
    assert "choice" in store.to_dataset("comparisons").column_names
    assert store.to_dataset("demonstrations").num_rows == 0


def test_imports_mix_with_human_rankings(store):
    store.add_ranking("rm-0001", RESPONSES, [[0], [1], [2], [3]], "alice", prompt="P")
    n = store.import_rankings([
        {"prompt": "P", "prompt_id": "rm-0001", "responses": RESPONSES, "tiers": [[1], [0], [2, 3]]},
        {"prompt": "Q", "responses": ["u", "v"], "tiers": [[1], [0]], "annotator": "sim:bob"},
    ], annotator="sim:alice")
    assert n == 2
    assert store.import_pairs([{"prompt": "R", "chosen": "good", "rejected": "bad"}], annotator="hh") == 1
    anns = [r["annotator"] for r in store.rankings()]
    assert anns == ["alice", "sim:alice", "sim:bob", "hh"]
    assert store.rankings(annotator="hh")[0]["prompt_id"] == prompt_key("R")
    assert store.rankings(annotator="hh")[0]["tiers"] == [[0], [1]]
    assert len(store.to_pairs()) == 6 + 5 + 1 + 1


def test_import_is_all_or_nothing(store):
    good = {"prompt": "Q", "responses": ["u", "v"], "tiers": [[0], [1]]}
    bad = {"prompt": "Q", "responses": ["u", "v"], "tiers": [[0], [0]]}
    with pytest.raises(ValueError, match="record 1"):
        store.import_rankings([good, bad], annotator="sim:x")
    assert store.rankings() == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(tiers=[[0], [1], [2]]), r"miss response\(s\) \[3\]"),
    (dict(tiers=[[0, 1], [1], [2], [3]]), "ranked twice"),
    (dict(tiers=[[0], [1], [2], [7]]), "out of range"),
    (dict(tiers=[[0], [1], [2], ["r9"]]), "unknown response 'r9'"),
    (dict(tiers=[[0], [], [1, 2, 3]]), "tier 1 is empty"),
    (dict(tiers=[]), "non-empty list"),
    (dict(responses=["a", "  ", "c", "d"]), "response 1 is empty"),
    (dict(responses=["a"], tiers=[[0]]), r"K = 2..9"),
    (dict(responses=[f"r{i}" for i in range(10)], tiers=[[i] for i in range(10)]), r"K = 2..9"),
    (dict(annotator=""), "annotator"),
    (dict(annotator="   "), "annotator"),
    (dict(score=8), "1..7"),
    (dict(flags=["rude"]), "unknown flag"),
    (dict(models=["m1", "m2"]), "one model name per response"),
    (dict(response_ids=["a", "a", "b", "c"]), "distinct ids"),
    (dict(status="maybe"), "status"),
])
def test_validation_errors_write_nothing(store, kwargs, message):
    args = dict(prompt_id="rm-0001", responses=RESPONSES, tiers=[[0], [1], [2], [3]], annotator="alice")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        store.add_ranking(**args)
    assert store.rankings(status=None) == []
    assert store.done_ids("alice", "ranking") == set()
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 0


def test_other_validation_errors(store):
    with pytest.raises(ValueError, match="response is empty"):
        store.add_demonstration("sft-1", "Write.", "   ", "alice")
    with pytest.raises(ValueError, match="choice"):
        store.add_comparison("e-1", "Q", "a", "b", "left", "alice")
    with pytest.raises(ValueError, match="response_b is empty"):
        store.add_comparison("e-1", "Q", "a", "", "a", "alice")
    with pytest.raises(ValueError, match="kind"):
        store.done_ids("alice", "rankings")
    assert store.counts() == {"demonstrations": 0, "rankings": 0, "comparisons": 0}


def test_resume_tracks_finished_items_per_annotator_and_kind(store):
    store.mark_seen("alice", "ranking", "rm-0003")  # shown, not finished: not done
    store.add_ranking("rm-0001", RESPONSES, [[0], [1], [2], [3]], "alice")
    store.add_ranking("rm-0002", RESPONSES, None, "alice", status="skipped")
    store.add_demonstration("sft-0001", "Write.", "Text.", "alice")
    store.add_ranking("rm-0009", RESPONSES, [[0], [1], [2], [3]], "bob")
    assert store.done_ids("alice", "ranking") == {"rm-0001", "rm-0002"}
    assert store.done_ids("alice", "demonstration") == {"sft-0001"}
    assert store.done_ids("bob", "ranking") == {"rm-0009"}
    assert store.done_ids("carol", "ranking") == set()
    store.mark_seen("alice", "ranking", "rm-0001")  # never downgrades a finished item
    assert "rm-0001" in store.done_ids("alice", "ranking")


def test_agreement_between_annotators_and_with_gold(store):
    gold_scores = {"alpha": 0.9, "bravo": 0.1, "charlie": 0.6, "delta": 0.3}  # a > c > d > b
    store.add_ranking("rm-0001", RESPONSES, [[0], [2], [3], [1]], "alice", prompt="P")  # = gold
    # bob saw the same responses in another order: [delta, charlie, bravo, alpha]; he swaps a and c.
    store.add_ranking("rm-0001", RESPONSES[::-1], [[1], [3], [0], [2]], "bob", prompt="P")
    store.add_ranking("rm-0002", ["x", "y"], [[0], [1]], "alice", prompt="Q")  # not shared, no gold record
    out = store.agreement(gold=lambda rec, r: gold_scores[r], prompts=[{"id": "rm-0001"}])
    (pair,) = out["pairs"]
    assert (pair["a"], pair["b"], pair["items"], pair["pairs"]) == ("alice", "bob", 1, 6)
    assert pair["agreement"] == pytest.approx(5 / 6)
    assert pair["kendall_tau"] == pytest.approx((5 - 1) / 6)
    assert out["inter_annotator"] == pytest.approx(5 / 6)
    gold = {g["annotator"]: g for g in out["gold"]}
    assert gold["alice"]["agreement"] == 1.0 and gold["alice"]["kendall_tau"] == pytest.approx(1.0)
    assert gold["bob"]["agreement"] == pytest.approx(5 / 6)


def test_agreement_with_repeated_response_texts(store):
    """K samples may repeat a text; each copy keeps its own slot (no error, no lost response)."""
    scores = {"same": 0.5, "good": 0.9, "bad": 0.1}
    store.add_ranking("rm-0001", ["same", "good", "same", "bad"], [[1], [0, 2], [3]], "alice", prompt="P")
    store.add_ranking("rm-0001", ["bad", "same", "same", "good"], [[3], [1], [2], [0]], "bob", prompt="P")
    out = store.agreement(gold=lambda rec, r: scores[r], prompts=[{"id": "rm-0001"}])
    (pair,) = out["pairs"]
    assert pair["items"] == 1 and pair["pairs"] == 5  # alice's tie between the two copies is skipped
    assert pair["agreement"] == pytest.approx(1.0)
    gold = {g["annotator"]: g for g in out["gold"]}
    assert gold["alice"]["agreement"] == 1.0 and gold["bob"]["pairs"] == 5


def test_agreement_with_the_gold_labeler(store):
    labelers = pytest.importorskip("labkit.labelers")
    data = pytest.importorskip("labkit.data")
    rec = next(p for p in data.load_prompts() if any(c["type"] == "lowercase" for c in p["checks"]))
    good, bad = "all lowercase here.", "SHOUTING IN CAPITALS."
    assert labelers.GoldLabeler().score(rec, good) > labelers.GoldLabeler().score(rec, bad)
    store.add_ranking(rec["id"], [bad, good], [[1], [0]], "alice", prompt=rec["prompt"])
    store.add_ranking(rec["id"], [bad, good], [[0], [1]], "mallory", prompt=rec["prompt"])
    gold = {g["annotator"]: g["agreement"] for g in store.agreement()["gold"]}
    assert gold == {"alice": 1.0, "mallory": 0.0}


# ----------------------------------------------------------------------------- concurrency

def _writer(path: str, name: str, n: int) -> int:
    store = FeedbackStore(path)
    for i in range(n):
        store.add_ranking(f"{name}-{i:04d}", [f"{name} a {i}", f"{name} b {i}", f"{name} c {i}", f"{name} d {i}"],
                          [[i % 4], [(i + 1) % 4, (i + 2) % 4], [(i + 3) % 4]], name, prompt=f"prompt {i}")
    return n


def test_four_processes_writing_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    FeedbackStore(path)  # create the schema once; the workers open their own connections
    t0 = time.time()
    with mp.get_context("spawn").Pool(4) as pool:
        counts = pool.starmap(_writer, [(path, f"w{j}", 200) for j in range(4)])
    elapsed = time.time() - t0
    store = FeedbackStore(path)
    rows = store.rankings()
    assert counts == [200] * 4 and len(rows) == 800
    for j in range(4):
        mine = [r for r in rows if r["annotator"] == f"w{j}"]
        assert len(mine) == 200 and len({r["prompt_id"] for r in mine}) == 200
        assert all(len(r["responses"]) == 4 and r["responses"][0].startswith(f"w{j} a") for r in mine)
    assert len(store.to_pairs()) == 800 * 5
    print(f"800 rankings from 4 processes in {elapsed:.1f}s")


KILLED_WRITER = textwrap.dedent("""
    import sys
    from labkit.feedback import FeedbackStore
    store = FeedbackStore(sys.argv[1])
    i = 0
    while True:
        store.add_ranking(f"k-{i:05d}", ["one", "two", "three"], [[2], [0], [1]], "victim", prompt="p")
        print(f"k-{i:05d}", flush=True)  # reported only after the commit returned
        i += 1
""")


def test_writer_killed_mid_run_keeps_every_reported_item(tmp_path):
    path = tmp_path / "killed.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    reported = []
    try:
        for line in proc.stdout:
            reported.append(line.strip())
            if len(reported) >= 60:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # mid-run: the writer is inside its loop
        proc.wait(timeout=10)
    reported += [line.strip() for line in proc.stdout]  # lines printed before it died
    assert proc.returncode == -signal.SIGKILL and len(reported) >= 60
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    stored = {r["prompt_id"] for r in FeedbackStore(path).rankings()}
    assert set(reported) <= stored
    assert len(stored) - len(reported) <= 1  # at most the one committed but not yet printed
    assert all(len(r["responses"]) == 3 for r in FeedbackStore(path).rankings())
    print(f"SIGKILL: {len(reported)} rankings reported as committed, {len(stored)} in the store")


def test_flags_are_the_papers_metadata():
    assert {"fails_to_follow_instruction", "hallucination", "inappropriate"} <= set(FLAGS)


def test_human_win_rate_from_comparisons(store):
    for choice, a, b in [("a", "ppo", "sft"), ("b", "sft", "ppo"), ("tie", "ppo", "sft"), ("a", "sft", "ppo"),
                         ("a", "ppo", "base")]:
        store.add_comparison("e", "Q", "x", "y", choice, "zoe", model_a=a, model_b=b)
    assert store.win_rate("ppo", baseline="sft") == {"wins": 2, "losses": 1, "ties": 1, "n": 4, "win_rate": 2.5 / 4}
    assert store.win_rate("ppo")["n"] == 5 and store.win_rate("ppo")["win_rate"] == pytest.approx(3.5 / 5)
    assert math.isnan(store.win_rate("nobody")["win_rate"])


def test_comparisons_feed_the_evaluation_win_rate(store):
    evaluate = pytest.importorskip("labkit.evaluate")
    store.add_comparison("e1", "Q", "x", "y", "a", "zoe", model_a="ppo", model_b="sft", a_shown_first=False)
    store.add_comparison("e2", "Q", "x", "y", "a", "zoe", model_a="sft", model_b="ppo", a_shown_first=True)
    store.add_comparison("e3", "Q", "x", "y", "tie", "zoe", model_a="ppo", model_b="sft")
    w = evaluate.win_rate("ppo", "sft", [], judge=store)
    assert w["win_rate"] == pytest.approx(1.5 / 3) and (w["wins"], w["ties"], w["losses"], w["n"]) == (1, 1, 1, 3)
    with pytest.raises(ValueError, match="no human comparisons"):
        evaluate.win_rate("ppo", "base", [], judge=store)
    assert store.win_rate("ppo", baseline="sft")["win_rate"] == pytest.approx(1.5 / 3)


KILLED_IMPORTER = textwrap.dedent("""
    import sys
    from labkit.feedback import FeedbackStore
    store = FeedbackStore(sys.argv[1])
    b = 0
    while True:
        batch = [{"prompt": f"batch {b} item {i}", "prompt_id": f"b{b:04d}-{i:02d}", "responses": ["x", "y"],
                  "tiers": [[1], [0]]} for i in range(50)]
        store.import_rankings(batch, annotator="sim:bulk")  # one transaction of 50 rankings
        print(b, flush=True)
        b += 1
""")


def test_killed_bulk_import_leaves_whole_batches_only(tmp_path):
    path = tmp_path / "bulk.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_IMPORTER, str(path)], stdout=subprocess.PIPE, text=True)
    reported = []
    try:
        for line in proc.stdout:
            reported.append(int(line))
            if len(reported) >= 8:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    reported += [int(line) for line in proc.stdout]
    batches = {}
    for r in FeedbackStore(path).rankings():
        batches.setdefault(int(r["prompt_id"][1:5]), []).append(r)
    assert set(reported) <= set(batches)
    assert all(len(rows) == 50 for rows in batches.values())  # all or nothing per transaction
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 2 * 50 * len(batches)

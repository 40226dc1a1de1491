"""The workshop room: server refusals, client = local store, outbox through a killed server,
and export / merge for rooms without a network. Loopback only; every server is a subprocess
on a free port that the test kills itself."""

import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest

from labkit.cli import main as cli
from labkit.feedback import FeedbackStore, export_jsonl, merge, open_store, records
from labkit.room import MAX_BODY, RoomClient

XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_CACHE", str(tmp_path / "cache"))  # outboxes stay in the test folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(store, port: int, token: str = "room-token") -> tuple[subprocess.Popen, str]:
    """Start `labkit room serve`, read its join URL, wait until it answers."""
    proc = subprocess.Popen([sys.executable, "-m", "labkit", "room", "serve", "--store", str(store),
                             "--port", str(port), "--token", token],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = None
    while url is None:
        line = proc.stdout.readline()
        assert line, "the room server exited before printing its join URL"
        m = re.search(r"join URL (\S+)", line)
        url = m and m.group(1)
    assert url == f"http://127.0.0.1:{port}/?token={token}"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/ping?token={token}", timeout=1).read()
            return proc, url
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, "the room server did not come up"
            time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    proc.stdout.close()


@pytest.fixture(scope="module")
def room(tmp_path_factory):
    path = tmp_path_factory.mktemp("room") / "room.sqlite"
    proc, url = _serve(path, _free_port())
    yield url, path
    _stop(proc)


def _http(url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _written(path) -> tuple:
    db = sqlite3.connect(path)
    try:
        return tuple(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                     for t in ("demonstrations", "rankings", "comparisons", "progress", "room_submissions"))
    finally:
        db.close()


# ----------------------------------------------------------------------------- kill and restart

WORKER = textwrap.dedent("""
    import json, sys, time
    from labkit.feedback import open_store

    url, outbox, w, n, out = sys.argv[1:]
    store = open_store(url, outbox=outbox)
    acked, queued = [], []
    for i in range(int(n)):
        pid = f"w{w}-{i:02d}"
        row = store.add_ranking(pid, [pid + " a", pid + " b", pid + " c"], [[i % 3], [(i + 1) % 3, (i + 2) % 3]],
                                "seat" + w, prompt="prompt " + pid)
        (acked if row is not None else queued).append(pid)
        time.sleep(0.1)
    left = store.flush(timeout=30)
    with open(out, "w") as f:
        json.dump({"acked": acked, "queued": queued, "left": left}, f)
""")


def test_outbox_survives_a_killed_server(tmp_path):
    n_workers, n_items = 8, 25
    path, port, outbox = tmp_path / "room.sqlite", _free_port(), tmp_path / "outbox.sqlite"
    server, url = _serve(path, port)
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, url, str(outbox), str(w), str(n_items),
                                 str(tmp_path / f"w{w}.json")]) for w in range(n_workers)]
    # One more participant with an outbox of its own, whose kernel dies while the room is down.
    lost_outbox = tmp_path / "lost-outbox.sqlite"
    lost = subprocess.Popen([sys.executable, "-c", WORKER, url, str(lost_outbox), "99", str(n_items), "/dev/null"])
    workers.append(lost)
    try:
        deadline = time.monotonic() + 30
        while _written(path)[1] < 40:  # kill the room mid-stream, with every worker still submitting
            assert time.monotonic() < deadline, "the workers did not start submitting"
            time.sleep(0.02)
        os.kill(server.pid, signal.SIGKILL)
        _stop(server)
        time.sleep(1.0)  # the room is down: submissions go to the outbox
        lost.kill()
        lost.wait()
        db = sqlite3.connect(lost_outbox)
        left = {json.loads(a)["prompt_id"] for (a,) in db.execute("SELECT args FROM outbox")}
        db.close()
        server, _ = _serve(path, port)
        for w in workers[:n_workers]:
            assert w.wait(timeout=60) == 0
        # A later client of the same room on the same machine sends whatever is still waiting.
        assert open_store(url, outbox=outbox).flush(timeout=20) == 0
        assert open_store(url, outbox=lost_outbox).flush(timeout=20) == 0
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        _stop(server)

    results = [json.loads((tmp_path / f"w{w}.json").read_text()) for w in range(n_workers)]
    acked = sum(len(r["acked"]) for r in results)
    queued = sum(len(r["queued"]) for r in results)
    stored = Counter(r["prompt_id"] for r in FeedbackStore(path).rankings())
    from_lost = {pid for pid in stored if pid.startswith("w99-")}
    expected = {f"w{w}-{i:02d}" for w in range(n_workers) for i in range(n_items)}
    print(f"\nroom kill test: {acked} acknowledged, {queued} outboxed, {sum(stored.values())} stored, "
          f"{sum(n - 1 for n in stored.values())} duplicates; the killed client left {len(left)} "
          f"in its outbox, {len(from_lost)} of its rankings are stored")
    assert acked + queued == len(expected)
    assert queued > 0 and left, "the kill should have sent some submissions to the outbox"
    assert set(stored) == expected | from_lost and set(stored.values()) == {1}  # every one, exactly once
    assert left <= from_lost  # what the dead client left was sent by a later one
    assert _written(path)[4] == len(stored)  # one submission id per ranking


# ----------------------------------------------------------------------------- refusals

def test_tokens_bodies_and_validation_are_enforced(room, tmp_path):
    url, path = room
    base = url.split("/?")[0]
    before = _written(path)
    good = json.dumps({"id": "x1", "kind": "ranking",
                       "args": {"prompt_id": "p", "responses": ["a", "b"], "tiers": [[0], [1]], "annotator": "eve"}})
    assert _http(f"{base}/api/submit", good.encode())[0] == 401
    assert _http(f"{base}/api/submit?token=nope", good.encode())[0] == 403
    assert _http(f"{base}/api/submit", good.encode(), {"Authorization": "Bearer nope"})[0] == 403
    assert _http(f"{base}/api/rankings")[0] == 401
    assert _http(f"{base}/api/rankings?token=nope")[0] == 403
    status, headers, body = _http(f"{base}/")
    assert status == 401 and headers["content-type"] == "application/json"

    auth = {"X-Labkit-Token": "room-token"}
    bad = {"id": "x2", "kind": "ranking",
           "args": {"prompt_id": "p", "responses": ["a", "b", "c"], "tiers": [[0], [1]], "annotator": "eve"}}
    with pytest.raises(ValueError) as local:
        FeedbackStore(tmp_path / "local.sqlite").add_ranking(**bad["args"])
    status, _, body = _http(f"{base}/api/submit", json.dumps(bad).encode(), auth)
    assert status == 400 and json.loads(body)["error"] == str(local.value)
    assert _http(f"{base}/api/submit", b"{not json", auth)[0] == 400
    assert _http(f"{base}/api/submit", b'{"id": "x3", "kind": "drop_tables", "args": {}}', auth)[0] == 400
    huge = dict(bad, id="x4", args=dict(bad["args"], tiers=[[0], [1], [2]], comment="x" * MAX_BODY))
    # The room answers 413 from the declared length and reads no further (a client still
    # sending would then meet a closed socket, so this one sends only the headers).
    conn = http.client.HTTPConnection(*base.split("//")[1].split(":"), timeout=10)
    conn.putrequest("POST", "/api/submit")
    conn.putheader("X-Labkit-Token", "room-token")
    conn.putheader("Content-Length", str(len(json.dumps(huge))))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    assert _written(path) == before  # nothing refused was written

    # The client refuses the same things at once and queues none of them.
    with pytest.raises(PermissionError):
        open_store(base + "/?token=nope", outbox=tmp_path / "o.sqlite")
    with pytest.raises(PermissionError):
        open_store(base + "/", outbox=tmp_path / "o.sqlite")
    client = open_store(url, outbox=tmp_path / "o.sqlite")
    with pytest.raises(ValueError, match=re.escape(str(local.value))):
        client.add_ranking(**bad["args"])
    with pytest.raises(ValueError, match="limit"):
        client.add_ranking(**huge["args"])
    with pytest.raises(ValueError, match="score"):
        client.add_ranking("p", ["a", "b"], [[0], [1]], "eve", score=8)
    assert client.outbox.count() == 0 and _written(path) == before

    # Untrusted text goes in and comes out verbatim, as JSON only.
    client.add_ranking("xss", [XSS, "plain"], [[0], [1]], XSS, prompt=XSS, comment=XSS)
    client.add_demonstration("xss", XSS, XSS, "eve")
    (r,) = client.rankings(annotator=XSS)
    assert r["responses"][0] == r["prompt"] == r["comment"] == r["annotator"] == XSS
    assert FeedbackStore(path).demonstrations(annotator="eve")[0]["response"] == XSS
    status, headers, body = _http(f"{base}/api/rankings?token=room-token")
    assert status == 200 and headers["content-type"] == "application/json"
    assert headers["x-content-type-options"] == "nosniff" and XSS.encode() in body


# ----------------------------------------------------------------------------- same as local

def test_client_answers_like_the_local_store(room, tmp_path):
    url, path = room
    assert isinstance(open_store(tmp_path / "f.sqlite"), FeedbackStore)
    client = open_store(url, outbox=tmp_path / "o.sqlite")
    assert isinstance(client, RoomClient)
    texts = ["alpha", "bravo", "charlie", "delta"]
    assert isinstance(client.add_ranking("rm-1", texts, [[2], [0, 3], [1]], "alice", prompt="P1",
                                         models=["sft", "sft", "ppo", "base"], score=6,
                                         flags={"hallucination": True}, comment="ok", seconds=3.5), int)
    client.add_ranking("rm-1", texts, [[2], [1], [0, 3]], "bob", prompt="P1")
    client.add_ranking("rm-2", texts[:2], None, "alice", prompt="P2", status="skipped")
    client.import_pairs([{"prompt": "P3", "chosen": "yes", "rejected": "no"}], annotator="sim:carol")
    client.add_demonstration("sft-1", "Say hi.", "Hi!", "alice", seconds=2.0)
    client.add_comparison("ev-1", "Q", "left", "right", "a", "alice", model_a="ppo", model_b="sft", a_shown_first=False)
    client.add_comparison("ev-2", "Q2", "l", "r", "tie", "bob", model_a="sft", model_b="ppo")
    client.mark_seen("alice", "ranking", "rm-9")
    local = FeedbackStore(path)

    def same(a, b):
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # nan == nan here

    same(client.rankings(), local.rankings())
    same(client.rankings(status=None), local.rankings(status=None))
    same(client.rankings(annotator="bob"), local.rankings(annotator="bob"))
    same(client.demonstrations(), local.demonstrations())
    same(client.comparisons(), local.comparisons())
    same(client.to_kway(), local.to_kway())
    same(client.to_pairs(margin=True), local.to_pairs(margin=True))
    same(client.to_pairs(include_ties=True), local.to_pairs(include_ties=True))
    same(client.counts(), local.counts())
    same(client.annotators(), local.annotators())
    assert client.done_ids("alice") == local.done_ids("alice") == {"rm-1", "rm-2"}
    assert client.done_ids("alice", "comparison") == local.done_ids("alice", "comparison")
    same(client.win_rate("ppo"), local.win_rate("ppo"))
    same(client.agreement(gold=None), local.agreement(gold=None))
    same(client.agreement(gold=lambda rec, text: len(text), prompts=[{"id": "rm-1"}]),
         local.agreement(gold=lambda rec, text: len(text), prompts=[{"id": "rm-1"}]))
    with pytest.raises(ValueError, match="kind"):
        client.done_ids("alice", "votes")
    same(client.to_dataset("pairs").to_list(), local.to_dataset("pairs").to_list())
    # nothing of a kind yet: the same empty columns as a local store
    none = client.to_dataset("pairs", annotator="nobody")
    assert none.num_rows == 0 and none.column_names == local.to_dataset("pairs", annotator="nobody").column_names


# ----------------------------------------------------------------------------- files

def _fill(store: FeedbackStore) -> None:
    store.add_demonstration("sft-1", "Say hi.", "Hi!", "alice", seconds=1.5, comment="first")
    store.add_demonstration("sft-2", "Say bye.", "", "alice", status="skipped")
    store.add_ranking("rm-1", ["a", "b", "c"], [[1], [0, 2]], "alice", prompt="P", models=["sft", "ppo", "base"],
                      score=5, flags=["hallucination", "inappropriate"], comment=XSS, seconds=9.25)
    store.add_ranking("rm-2", ["x", "y"], None, "bob", prompt="Q", status="skipped")
    for _ in range(2):  # the same simulated ranking twice: a merge keeps both copies
        store.add_ranking("rm-1", ["a", "b", "c"], [[0], [1], [2]], "sim:ann", prompt="P")
    store.add_comparison("ev-1", "Q", "left", "right", "b", "bob", model_a="ppo", model_b="sft", a_shown_first=True)
    store.add_comparison("ev-2", None, "l", "r", None, "alice", status="skipped")


def test_export_merge_round_trip(tmp_path, capsys):
    src = FeedbackStore(tmp_path / "laptop.sqlite")
    _fill(src)
    out, into = tmp_path / "laptop.jsonl", tmp_path / "room.sqlite"
    assert cli(["feedback", "export", str(src.path), str(out)]) == 0
    assert len(out.read_text().splitlines()) == 8
    assert cli(["feedback", "merge", str(into), str(out)]) == 0
    assert "2 demonstrations, 4 rankings, 2 comparisons" in capsys.readouterr().out
    merged = FeedbackStore(into)
    assert records(merged) == records(src)  # every field, the commit time included
    assert merged.done_ids("alice", "demonstration") == src.done_ids("alice", "demonstration")
    assert merged.to_pairs() == src.to_pairs()

    # Twice is once; a store file merges like its export; a merge into a fresh store copies all.
    assert merge(into, [out, src.path]) == {"demonstration": 0, "ranking": 0, "comparison": 0}
    assert records(merged) == records(src)
    assert merge(tmp_path / "other.sqlite", [src.path])["ranking"] == 4
    assert records(FeedbackStore(tmp_path / "other.sqlite")) == records(src)

    humans = tmp_path / "humans.jsonl"
    assert cli(["feedback", "export", str(src.path), str(humans), "--no-simulated"]) == 0
    assert {json.loads(line)["annotator"] for line in humans.read_text().splitlines()} == {"alice", "bob"}
    assert export_jsonl(src, tmp_path / "bob.jsonl", annotator="bob") == 2

    broken = tmp_path / "broken.jsonl"
    broken.write_text(out.read_text().splitlines()[0] + "\n{oops\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl, line 2"):
        merge(tmp_path / "third.sqlite", [broken])


# ----------------------------------------------------------------------------- seats and a late room

def test_seats_share_a_few_items_and_split_the_rest():
    from labkit.room import seat_queue

    items = [{"id": f"rm-{i:03d}", "prompt": f"P{i}"} for i in range(53)]
    queues = [seat_queue(items, seat=s, n_seats=4, shared=5) for s in range(4)]
    shared = [q[:5] for q in queues]
    assert all(s == shared[0] for s in shared)  # every seat ranks the same shared items
    own = [{it["id"] for it in q[5:]} for q in queues]
    assert sum(map(len, own)) == 48 and len(set().union(*own)) == 48  # disjoint, and all of them
    assert seat_queue(list(reversed(items)), seat=2, n_seats=4) == queues[2]  # input order does not matter
    assert seat_queue(items, annotator="alice", n_seats=4) == seat_queue(items, annotator=" alice", n_seats=4)
    assert len(seat_queue(items, seat=0, n_seats=4, per_seat=3)) == 8
    with pytest.raises(ValueError):
        seat_queue(items, seat=4, n_seats=4)


def test_a_client_started_before_the_room_sends_later(tmp_path):
    port = _free_port()
    url, outbox = f"http://127.0.0.1:{port}/?token=room-token", tmp_path / "outbox.sqlite"
    with pytest.warns(UserWarning, match="does not answer"):
        client = open_store(url, outbox=outbox)
    assert client.add_demonstration("sft-1", "Say hi.", "Hi!", "alice") is None  # waits in the outbox
    with pytest.raises(ConnectionError):
        client.rankings()  # reads need the room
    assert client.flush(timeout=0.3) == 1
    server, _ = _serve(tmp_path / "room.sqlite", port)
    try:
        assert client.flush(timeout=20) == 0
        assert [d["response"] for d in client.demonstrations()] == ["Hi!"]
        assert client.done_ids("alice", "demonstration") == {"sft-1"}
    finally:
        client.close()
        _stop(server)


def test_the_background_retry_ends_when_its_outbox_is_gone_or_the_client_closes(tmp_path, monkeypatch):
    import shutil
    import threading

    crashed = []
    monkeypatch.setattr(threading, "excepthook", lambda args: crashed.append(args.exc_value))
    monkeypatch.setattr(RoomClient, "retry_s", (0.1, 0.2))
    url = f"http://127.0.0.1:{_free_port()}/?token=room-token"  # nothing listens there
    folder = tmp_path / "cache"
    folder.mkdir()
    with pytest.warns(UserWarning, match="does not answer"):
        client = open_store(url, outbox=folder / "outbox.sqlite", timeout_s=0.2)
    client.add_demonstration("sft-1", "Say hi.", "Hi!", "alice")  # queued; the retry thread keeps trying
    retry = client._retry
    assert retry is not None and retry.is_alive()
    client.outbox.close()
    shutil.rmtree(folder)  # e.g. a cleaned-up cache folder under a running kernel
    with pytest.warns(UserWarning, match="background retry stops"):
        retry.join(timeout=10)
    assert not retry.is_alive() and crashed == []

    with pytest.warns(UserWarning, match="does not answer"):
        other = open_store(url, outbox=tmp_path / "o2.sqlite", timeout_s=0.2)
    other.add_demonstration("sft-2", "Say hi.", "Hi!", "alice")
    retry = other._retry
    other.close()
    retry.join(timeout=10)
    assert not retry.is_alive() and crashed == []
    with pytest.warns(UserWarning, match="does not answer"):
        later = open_store(url, outbox=tmp_path / "o2.sqlite", timeout_s=0.2)
    assert later.outbox.count() == 1  # what waited is kept for a later client
    later.close()


# ----------------------------------------------------------------------------- the room in the notebooks

def test_widgets_take_a_room_url_and_names_are_unique_per_laptop(room, tmp_path):
    from labkit.widgets import RankingWidget

    url, path = room
    items = [{"prompt_id": f"nm-{i}", "prompt": f"P{i}", "responses": ["a", "b", "c"]} for i in range(2)]
    board = RankingWidget(url, items, annotator="zoe")  # a room URL opens a client, like open_store
    assert isinstance(board.store, RoomClient) and board.annotator == "zoe"
    board.rank(1), board.rank(0), board.submit()
    assert [r["annotator"] for r in FeedbackStore(path).rankings() if r["prompt_id"] == "nm-0"] == ["zoe"]
    # a second laptop (another device id) cannot take the name; the same laptop may (a restarted kernel)
    other = open_store(url, outbox=tmp_path / "o2.sqlite", device="laptop-2")
    with pytest.raises(ValueError, match="already taken"):
        other.claim("zoe")
    taken = RankingWidget(other, items, annotator="zoe")
    assert taken.annotator == "" and "already taken" in taken.message
    taken.rank(0), taken.rank(1)
    assert taken.submit() is None and "annotator" in taken.message  # nothing is stored under no name
    taken.annotator = "zoe b"
    assert taken.annotator == "zoe b" and taken.item["prompt_id"] == "nm-0"
    again = RankingWidget(open_store(url, outbox=tmp_path / "o3.sqlite"), items, annotator="zoe")
    assert again.annotator == "zoe" and again.item["prompt_id"] == "nm-1"  # resumed past nm-0
    with pytest.raises(ValueError, match="1-64 characters"):
        other.claim("x" * 65)
    for client in (board.store, other, again.store):
        client.close()  # no retry thread outlives the test


def test_human_count_and_the_waiting_message(tmp_path, capsys):
    from labkit.feedback import human_count, report_human

    store = FeedbackStore(tmp_path / "f.sqlite")
    store.add_ranking("rm-1", ["a", "b"], [[0], [1]], "sim:ada")
    assert human_count(store) == 0 and report_human(store, "ranking", "alice") == 0
    assert "No ranking from 'alice' has reached the store yet" in capsys.readouterr().out
    assert report_human(store, "ranking", "") == 0 and "type your name" in capsys.readouterr().out
    store.add_ranking("rm-1", ["a", "b"], [[1], [0]], "alice")
    store.add_ranking("rm-2", ["a", "b"], None, "alice", status="skipped")  # a skip is not a submission
    assert human_count(store) == 1 and human_count(store, annotator="bob") == 0
    assert report_human(store, "ranking", "alice") == 1 and "1 ranking from 'alice'" in capsys.readouterr().out
    assert human_count(store, "demonstration") == 0
    with pytest.raises(ValueError, match="kind"):
        human_count(store, "votes")


def test_pooled_demonstrations_keep_every_annotators_answer(tmp_path):
    from labkit.feedback import pooled_demonstrations

    store = FeedbackStore(tmp_path / "f.sqlite")
    base = [{"id": "sft-1", "prompt": "Say hi.", "response": "Hello (embedded)."},
            {"id": "sft-2", "prompt": "Say bye.", "response": "Bye (embedded)."}]
    store.add_demonstration("sft-1", "Say hi.", "Hi from alice, draft.", "alice")
    store.add_demonstration("sft-1", "Say hi.", "Hi from bob.", "bob")
    store.add_demonstration("sft-1", "Say hi.", "Hi from alice.", "alice")  # alice again: the latest counts
    store.add_demonstration("sft-1", "Say hi.", "", "carol", status="skipped")
    store.add_demonstration("sft-1", "Say hi.", "Hi from a simulation.", "sim:ada")
    pooled = pooled_demonstrations(store, base, prompts=[{"id": "sft-1", "prompt": "Say hi.", "category": "chat"}])
    assert [d["response"] for d in pooled] == ["Hi from alice.", "Hi from bob.", "Bye (embedded)."]
    assert [d.get("annotator") for d in pooled] == ["alice", "bob", None]
    assert pooled[0]["category"] == "chat" and pooled[0]["id"] == "sft-1"
    assert [d["response"] for d in pooled_demonstrations(store, annotator="bob")] == ["Hi from bob."]


def test_agreement_matrix_people_then_simulated_then_gold(tmp_path):
    from labkit.feedback import agreement_matrix

    store = FeedbackStore(tmp_path / "f.sqlite")
    texts = ["w", "x", "y", "z"]
    store.add_ranking("rm-1", texts, [[0], [1], [2], [3]], "bob")
    store.add_ranking("rm-1", texts, [[0], [1], [3], [2]], "sim:ada")  # 5 of 6 pairs as bob
    store.add_ranking("rm-1", texts, [[3], [2], [1], [0]], "alice")  # bob reversed
    store.add_ranking("rm-2", texts, [[0], [1], [2], [3]], "carol")  # shares no item with anyone
    m = agreement_matrix(store.agreement(gold=lambda rec, t: -ord(t), prompts=[{"id": "rm-1"}, {"id": "rm-2"}]))
    assert m["names"] == ["alice", "bob", "carol", "sim:ada", "gold"]
    i = {n: k for k, n in enumerate(m["names"])}
    cell = lambda a, b: m["matrix"][i[a]][i[b]]  # noqa: E731
    assert cell("bob", "alice") == cell("alice", "bob") == 0.0
    assert cell("bob", "sim:ada") == pytest.approx(5 / 6) and m["items"][i["bob"]][i["sim:ada"]] == 1
    assert cell("bob", "gold") == 1.0 and cell("alice", "gold") == 0.0 and cell("carol", "gold") == 1.0
    assert cell("carol", "bob") != cell("carol", "bob")  # nan: no shared item
    assert all(m["matrix"][k][k] == 1.0 for k in range(5))
    assert agreement_matrix(store.agreement(gold=None))["names"] == ["alice", "bob", "sim:ada"]


def test_a_room_started_in_a_notebook_publishes_items_and_stops(tmp_path):
    from labkit.room import agreement_figure, start_room
    from labkit.feedback import agreement_matrix

    running = start_room(tmp_path / "room.sqlite", port=0, token="t0k")
    try:
        assert running.url.startswith("http://127.0.0.1:") and running.url.endswith("/?token=t0k")
        client = open_store(running.url, outbox=tmp_path / "o.sqlite")
        items = [{"prompt_id": "rm-1", "prompt": "P", "responses": ["x", XSS], "truncated": [False, True]}]
        assert client.publish_items(items) == 1 and client.items() == items
        for who, tiers in (("ann", [[0], [1]]), ("ben", [[1], [0]])):
            client.add_ranking("rm-1", items[0]["responses"], tiers, who, prompt="P")
        m = agreement_matrix(client.agreement(gold=None))
        assert m["names"] == ["ann", "ben"] and m["matrix"][0][1] == 0.0
        fig = agreement_figure(m)
        assert list(fig.data[0].x) == ["ann", "ben"]
        assert _http(running.url.replace("/?token=t0k", "/api/items"))[0] == 401
    finally:
        running.stop()
    assert not running._thread.is_alive()

"""The workshop room: one small HTTP service in front of a FeedbackStore, and its client.

A room of 10-30 laptops pools its feedback into one store, live (BRIEF §2):

    instructor$ labkit room serve --store room.sqlite --host 0.0.0.0
    labkit room: join URL http://192.168.1.20:8765/?token=...
    participant>>> store = labkit.feedback.open_store("http://192.168.1.20:8765/?token=...")
    participant>>> RankingWidget(store, items, annotator="alice")

The server (:func:`make_app`, :func:`serve`) is Starlette on uvicorn, one process, one store:

- every request needs the room token (``Authorization: Bearer T``, ``X-Labkit-Token: T`` or
  ``?token=T``): none is 401, a wrong one 403, and nothing is read or written;
- ``POST /api/submit`` takes ``{"id", "kind", "args"}``: ``args`` are the keyword arguments of
  the store method (``add_ranking``, ...), validated by the store itself, so a bad item gets
  a 400 with the store's own ``ValueError`` text; bodies over :data:`MAX_BODY` get a 413;
- each submission id is stored once: it goes into ``room_submissions`` in the same
  transaction as the feedback rows, so a retry after a lost answer or a killed server is
  answered ``duplicate`` and adds nothing;
- ``GET /api/<read>`` answers the store's reads (``rankings``, ``to_pairs``, ``done_ids``, ...)
  with JSON-encoded query values; everything is JSON (``nosniff``), no endpoint renders HTML,
  so untrusted model outputs and comments are stored and returned verbatim and never shown.

The client (:class:`RoomClient`, what ``open_store(url)`` returns) has the store's methods.
A write is first validated locally by the store's own checks (``ValueError`` at once), then
committed to a local outbox (SQLite under ``~/.cache/labkit/outbox/``, one file per room) under
a fresh uuid, then sent; an acknowledged id leaves the outbox. A Wi-Fi drop or a server
restart leaves items in the outbox: a background thread retries, ``flush(timeout)`` sends
what waits, and a later client on the same machine and room sends what an earlier one left.
The HTTP client is the standard library's ``urllib``: a room needs only small JSON requests
with a timeout, and participants' laptops need no extra package for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import inspect
import json
import os
import secrets
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from pathlib import Path
from typing import Any

from labkit.feedback import FeedbackStore

MAX_BODY = 1 << 20  # 1 MiB: a K = 9 ranking of long responses is a few tens of KiB
DEFAULT_PORT = 8765
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# What a client may submit: kind -> the FeedbackStore method that stores it.
WRITES = {"demonstration": "add_demonstration", "ranking": "add_ranking", "comparison": "add_comparison",
          "seen": "mark_seen", "rankings": "import_rankings"}
# What a client may read: the FeedbackStore methods answered by GET /api/<name>.
READS = ("rankings", "demonstrations", "comparisons", "to_pairs", "to_kway", "done_ids", "annotators",
         "counts", "win_rate", "agreement")

ROOM_SCHEMA = """
CREATE TABLE IF NOT EXISTS room_submissions (
    id       TEXT PRIMARY KEY,          -- the client's uuid: what makes a retry harmless
    kind     TEXT NOT NULL,
    received REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS room_settings (
    key   TEXT PRIMARY KEY,             -- 'token': a restart keeps the join URL
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS room_names (
    name    TEXT PRIMARY KEY,           -- an annotator name, held by the first laptop that claimed it
    device  TEXT NOT NULL,              -- that laptop's id (labkit.room.device_id)
    claimed REAL NOT NULL
)
"""
MAX_NAME = 64  # characters in an annotator name


def apply_submission(store: FeedbackStore, kind: str, args: Any) -> Any:
    """Call the store method for ``kind`` with keyword ``args``; every problem is a ``ValueError``."""
    if not isinstance(kind, str) or kind not in WRITES:
        raise ValueError(f"kind must be one of {sorted(WRITES)}, got {kind!r}")
    if not isinstance(args, dict):
        raise ValueError(f"args must be an object of {WRITES[kind]}'s keyword arguments, got {type(args).__name__}")
    method = getattr(store, WRITES[kind])
    try:
        inspect.signature(method).bind(**args)
    except TypeError as e:
        raise ValueError(f"{kind}: {e}") from None
    try:
        return method(**args)
    except (sqlite3.InterfaceError, sqlite3.ProgrammingError) as e:  # e.g. a comment that is a dict
        raise ValueError(f"{kind}: a field has a type the store cannot keep ({e})") from None


# ----------------------------------------------------------------------------- the server

class RoomStore(FeedbackStore):
    """A FeedbackStore that records each client submission id in the same transaction."""

    def __init__(self, path: str | os.PathLike, timeout_s: float = 30.0):
        self._submission = threading.local()  # the id being stored by this thread, if any
        super().__init__(path, timeout_s)
        with self._write() as db:
            for stmt in ROOM_SCHEMA.split(";"):
                db.execute(stmt)

    @contextlib.contextmanager
    def _write(self):
        sub_id = getattr(self._submission, "id", None)
        with super()._write() as db:
            yield db
            if sub_id is not None:  # a second insert of the same id fails and rolls the item back
                db.execute("INSERT INTO room_submissions VALUES (?, ?, ?)",
                           (sub_id, self._submission.kind, time.time()))

    def seen(self, sub_id: str) -> bool:
        return bool(self._read("SELECT 1 FROM room_submissions WHERE id = ?", (sub_id,)))

    def submit(self, sub_id: str, kind: str, args: dict) -> dict:
        """Store one submission unless its id was stored before: ``{"id", "row_id", "duplicate"}``."""
        if self.seen(sub_id):
            return {"id": sub_id, "row_id": None, "duplicate": True}
        self._submission.id, self._submission.kind = sub_id, kind
        try:
            row_id = apply_submission(self, kind, args)
        except sqlite3.IntegrityError:
            if not self.seen(sub_id):
                raise
            return {"id": sub_id, "row_id": None, "duplicate": True}  # a concurrent retry won
        finally:
            self._submission.id = None
        return {"id": sub_id, "row_id": row_id, "duplicate": False}

    def claim(self, name: str, device: str) -> dict:
        """Hold ``name`` for ``device``: the same laptop may claim it again (a restarted kernel
        resumes), another one gets a ``ValueError`` (two people must not share a name)."""
        if not isinstance(name, str) or not name.strip() or len(name.strip()) > MAX_NAME:
            raise ValueError(f"a name is 1-{MAX_NAME} characters, e.g. 'alice'")
        if not isinstance(device, str) or not 0 < len(device) <= 64:
            raise ValueError("device must be a laptop id of 1-64 characters")
        name = name.strip()
        with self._write() as db:
            row = db.execute("SELECT device FROM room_names WHERE name = ?", (name,)).fetchone()
            if row is None:
                db.execute("INSERT INTO room_names VALUES (?, ?, ?)", (name, device, time.time()))
            elif row[0] != device:
                raise ValueError(f"the name {name!r} is already taken in this room by another laptop; "
                                 "type another name (e.g. add your initial)")
        return {"name": name, "new": row is None}

    def set_items(self, items: list[dict]) -> int:
        """Publish the room's ranking items (what ``seat_queue`` splits); return how many."""
        if not isinstance(items, list) or not all(isinstance(it, dict) for it in items):
            raise ValueError("items must be a list of objects (prompt_id, prompt, responses, ...)")
        with self._write() as db:
            db.execute("INSERT INTO room_settings VALUES ('items', ?) ON CONFLICT(key) DO UPDATE "
                       "SET value = excluded.value", (json.dumps(items, ensure_ascii=False),))
        return len(items)

    def items(self) -> list[dict]:
        rows = self._read("SELECT value FROM room_settings WHERE key = 'items'")
        return json.loads(rows[0][0]) if rows else []

    def names(self) -> dict[str, str]:
        """Claimed names -> device ids."""
        return {r[0]: r[1] for r in self._read("SELECT name, device FROM room_names ORDER BY name")}

    def room_token(self, token: str | None = None) -> str:
        """The room's token: ``token`` if given (and kept), else the kept one, else a new random one."""
        with self._write() as db:
            row = db.execute("SELECT value FROM room_settings WHERE key = 'token'").fetchone()
            if token is None:
                token = row[0] if row else secrets.token_urlsafe(16)
            db.execute("INSERT INTO room_settings VALUES ('token', ?) ON CONFLICT(key) DO UPDATE "
                       "SET value = excluded.value", (token,))
        return token


def _json(data: Any, status: int = 200):
    from starlette.responses import Response

    # allow_nan: agreement() reports nan for "no shared pairs"; the client reads it back as nan.
    body = json.dumps(data, ensure_ascii=False, allow_nan=True)
    return Response(body, status_code=status, media_type="application/json",
                    headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})


def _error(status: int, message: str):
    return _json({"error": message}, status)


def _token_of(request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-labkit-token") or request.query_params.get("token")


async def _read_body(request, limit: int) -> bytes | None:
    """The request body, or None when it is larger than ``limit`` (read no further)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def make_app(store: RoomStore, token: str, max_body: int = MAX_BODY):
    """The room's Starlette app: token-checked JSON endpoints in front of ``store``."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.routing import Route

    def denied(request):
        given = _token_of(request)
        if not given:
            return _error(401, "this room needs its token: use the join URL printed by `labkit room serve`")
        if not secrets.compare_digest(given.encode(), token.encode()):
            return _error(403, "wrong room token: use the join URL printed by `labkit room serve`")
        return None

    async def root(request):
        if (refused := denied(request)) is not None:
            return refused
        counts = await run_in_threadpool(store.counts)
        return _json({"room": "labkit", "counts": counts,
                      "join": "labkit.feedback.open_store(<this URL, token included>)"})

    async def ping(request):
        if (refused := denied(request)) is not None:
            return refused
        return _json({"room": "labkit", "max_body": max_body})

    async def submit(request):
        if (refused := denied(request)) is not None:
            return refused
        body = await _read_body(request, max_body)
        if body is None:
            return _error(413, f"the body is larger than the room's limit of {max_body} bytes")
        try:
            sub = json.loads(body)
        except ValueError as e:
            return _error(400, f"the body is not JSON: {e}")
        if not isinstance(sub, dict) or not isinstance(sub.get("id"), str) or not 0 < len(sub["id"]) <= 64:
            return _error(400, 'the body must be {"id": "<1-64 characters>", "kind": ..., "args": {...}}')
        try:
            result = await run_in_threadpool(store.submit, sub["id"], sub.get("kind"), sub.get("args"))
        except ValueError as e:
            return _error(400, str(e))
        return _json(result)

    async def claim(request):
        if (refused := denied(request)) is not None:
            return refused
        body = await _read_body(request, 4096)
        try:
            ask = json.loads(body) if body is not None else None
        except ValueError:
            ask = None
        if not isinstance(ask, dict):
            return _error(400, 'the body must be {"name": ..., "device": ...}')
        try:
            return _json(await run_in_threadpool(store.claim, ask.get("name"), ask.get("device")))
        except ValueError as e:
            return _error(409 if "already taken" in str(e) else 400, str(e))

    async def items(request):
        if (refused := denied(request)) is not None:
            return refused
        if request.method == "GET":
            return _json(await run_in_threadpool(store.items))
        body = await _read_body(request, max_body * 8)  # K responses for a few hundred prompts
        if body is None:
            return _error(413, f"the items are larger than the room's limit of {max_body * 8} bytes")
        try:
            return _json({"items": await run_in_threadpool(store.set_items, json.loads(body))})
        except ValueError as e:
            return _error(400, str(e))

    def read(request):  # a plain def: Starlette runs it in its thread pool
        if (refused := denied(request)) is not None:
            return refused
        name = request.path_params["name"]
        if name not in READS:
            return _error(404, f"no such read {name!r}; reads: {list(READS)}")
        try:
            params = {k: json.loads(v) for k, v in request.query_params.items() if k != "token"}
        except ValueError as e:
            return _error(400, f"query values must be JSON: {e}")
        if name == "agreement" and params.get("gold", "auto") not in ("auto", None):
            return _error(400, "a room computes agreement with gold='auto' or None")
        method = getattr(store, name)
        try:
            inspect.signature(method).bind(**params)
            result = method(**params)
        except TypeError as e:
            return _error(400, f"{name}: {e}")
        except (ValueError, sqlite3.InterfaceError, sqlite3.ProgrammingError) as e:
            return _error(400, str(e))
        return _json(sorted(result) if isinstance(result, set) else result)

    return Starlette(routes=[
        Route("/", root), Route("/api/ping", ping), Route("/api/submit", submit, methods=["POST"]),
        Route("/api/claim", claim, methods=["POST"]), Route("/api/items", items, methods=["GET", "POST"]),
        Route("/api/{name}", read),
    ])


def _lan_address() -> str:
    """This machine's address on the local network (no packet is sent), for the join URL."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def serve(store_path: str | os.PathLike, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          token: str | None = None, max_body: int = MAX_BODY) -> None:
    """Run the room until Ctrl-C. The token is ``token``, else the one the store kept, else new."""
    import uvicorn

    store = RoomStore(store_path)
    token = store.room_token(token)
    shown = _lan_address() if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    print(f"labkit room: store {store.path}")
    print(f"labkit room: join URL http://{shown}:{port}/?token={token}")
    if host not in LOOPBACK:
        print(f"labkit room: WARNING: listening on {host}, beyond this machine: anyone on the network "
              "who has the join URL can write to the room; share it only with the room.")
    print("labkit room: Ctrl-C stops the room; restarting with the same --store keeps the join URL.", flush=True)
    uvicorn.run(make_app(store, token, max_body), host=host, port=port, log_level="warning", access_log=False)


class RunningRoom:
    """A room served from a background thread of this process (the instructor's notebook)."""

    def __init__(self, server, thread: threading.Thread, url: str, store: RoomStore):
        self._server, self._thread, self.url, self.store = server, thread, url, store

    def __repr__(self) -> str:
        return f"RunningRoom({self.url!r})"

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)


def start_room(store_path: str | os.PathLike, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
               token: str | None = None, max_body: int = MAX_BODY, timeout_s: float = 20.0) -> RunningRoom:
    """Serve a room from a background thread (what ``labkit room serve`` does, without blocking);
    ``port=0`` takes a free one. Returns when the room answers; ``.url`` is the join URL."""
    import uvicorn

    store = RoomStore(store_path)
    token = store.room_token(token)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(store, token, max_body), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="labkit-room", daemon=True)
    thread.start()
    shown = _lan_address() if host in ("0.0.0.0", "::") else host
    url = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/?token={token}"
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the room on {host}:{port} did not start")
        time.sleep(0.05)
    if host not in LOOPBACK:
        print(f"labkit room: listening on {host}, beyond this machine: share the join URL only with the room.")
    return RunningRoom(server, thread, url, store)


# ----------------------------------------------------------------------------- the instructor's view

def agreement_figure(matrix: dict, title: str = "Agreement between annotators (share of pairs ordered alike)"):
    """A plotly heatmap of :func:`labkit.feedback.agreement_matrix`'s table (names are escaped by plotly)."""
    import plotly.graph_objects as go

    names = matrix["names"]
    text = [[("" if v != v else f"{v:.0%}") + (f"<br>{n} items" if n and i != j else "")
             for j, (v, n) in enumerate(zip(row, counts))]
            for i, (row, counts) in enumerate(zip(matrix["matrix"], matrix["items"]))]
    fig = go.Figure(go.Heatmap(z=matrix["matrix"], x=names, y=names, zmin=0, zmax=1, colorscale="RdYlGn",
                               text=text, texttemplate="%{text}", hovertemplate="%{y} vs %{x}: %{z:.2f}<extra></extra>",
                               colorbar=dict(title="agree")))
    fig.update_layout(title=title, template="plotly_white", height=max(340, 160 + 28 * len(names)),
                      yaxis=dict(autorange="reversed"), xaxis=dict(side="top"))
    return fig


# ----------------------------------------------------------------------------- seats

def seat_queue(items: list[dict], seat: int | None = None, n_seats: int = 30, annotator: str | None = None,
               shared: int = 5, per_seat: int | None = None) -> list[dict]:
    """One participant's queue: ``shared`` items that every seat ranks, then this seat's own slice.

    The shared items give the room's agreement (every pair of annotators overlaps on them);
    the slices of different seats are disjoint, so the room covers ``n_seats`` times more
    items than one person. The order depends only on the item ids, so every laptop computes
    the same split from the same items. ``seat`` is 0..n_seats-1; without one it is derived
    from ``annotator`` (two names may then share a seat and a slice). ``per_seat`` caps the slice.
    """
    from labkit.widgets import _item_id  # the id rule of the widgets' queues and done_ids

    if seat is None:
        if not annotator or not annotator.strip():
            raise ValueError("give a seat number or an annotator name to derive one from")
        seat = int(hashlib.sha256(annotator.strip().encode()).hexdigest(), 16) % n_seats
    if not 0 <= seat < n_seats:
        raise ValueError(f"seat must be 0..{n_seats - 1}, got {seat}")
    order = sorted(items, key=lambda it: hashlib.sha256(_item_id(it).encode()).hexdigest())
    own = order[shared:][seat::n_seats]
    return order[:shared] + own[:per_seat]


# ----------------------------------------------------------------------------- the client

class RoomUnreachable(ConnectionError):
    """The room did not answer (network down, server restarting); submissions wait in the outbox."""


class _DryRunStore(FeedbackStore):
    """An in-memory FeedbackStore whose writes roll back: the local store's checks, nothing kept."""

    def __init__(self):
        self._dry = False
        super().__init__(":memory:")
        self._dry = True

    @contextlib.contextmanager
    def _write(self):
        if not self._dry:  # creating the schema
            with super()._write() as db:
                yield db
            return
        with self._lock:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            finally:
                db.execute("ROLLBACK")


def parse_room_url(url: str) -> tuple[str, str]:
    """``http://HOST:PORT/?token=T`` -> (``http://HOST:PORT``, ``T``); no token is a PermissionError."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"a room URL looks like http://HOST:PORT/?token=TOKEN, got {url!r}")
    token = urllib.parse.parse_qs(parts.query).get("token", [""])[0]
    if not token:
        raise PermissionError(f"the room URL {url!r} has no ?token=...: use the join URL the instructor shared")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}", token


def default_outbox(base_url: str, token: str) -> Path:
    """``$LABKIT_CACHE/outbox/<room>.sqlite`` (``~/.cache/labkit`` by default), one file per room.

    The folder follows ``labkit.models.cache_dir``; it is spelled out here so that a client
    does not import torch.
    """
    cache = Path(os.environ.get("LABKIT_CACHE", Path.home() / ".cache" / "labkit"))
    room = hashlib.sha256(f"{base_url} {token}".encode()).hexdigest()[:16]
    return cache / "outbox" / f"{room}.sqlite"


def device_id() -> str:
    """This laptop's random id (``$LABKIT_CACHE/device_id``, made once): what a room's name claim keys on."""
    path = Path(os.environ.get("LABKIT_CACHE", Path.home() / ".cache" / "labkit")) / "device_id"
    try:
        return path.read_text().strip()
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    new = uuid.uuid4().hex
    tmp = path.with_name(f"device_id.{new}")
    tmp.write_text(new)
    try:
        os.link(tmp, path)  # first writer wins; a racing kernel reads the winner's id
    except OSError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()


class Outbox:
    """Submissions waiting to be acknowledged by the room, in a local SQLite file (WAL).

    Several processes of one machine share the file; each row is one submission under its
    uuid. A row the room refused as invalid moves to ``rejected`` instead of vanishing.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None
        for table in ("outbox", "rejected"):
            self._run(f"CREATE TABLE IF NOT EXISTS {table} (id TEXT PRIMARY KEY, kind TEXT NOT NULL, "
                      "args TEXT NOT NULL, queued REAL NOT NULL, error TEXT)")

    def _db(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():  # a connection never crosses fork()
            self._conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._conn.execute("PRAGMA busy_timeout = 30000")
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = FULL")  # queued means on disk
            self._pid = os.getpid()
        return self._conn

    def _run(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db().execute(sql, args).fetchall()

    def put(self, sub_id: str, kind: str, body: str) -> None:
        self._run("INSERT INTO outbox VALUES (?, ?, ?, ?, NULL)", (sub_id, kind, body, time.time()))

    def pending(self) -> list[tuple[str, str, str]]:
        """(id, kind, args JSON), oldest first."""
        return self._run("SELECT id, kind, args FROM outbox ORDER BY queued, rowid")

    def count(self) -> int:
        return self._run("SELECT COUNT(*) FROM outbox")[0][0]

    def done(self, sub_id: str) -> None:
        self._run("DELETE FROM outbox WHERE id = ?", (sub_id,))

    def reject(self, sub_id: str, error: str) -> None:
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("INSERT OR IGNORE INTO rejected SELECT id, kind, args, queued, ? FROM outbox "
                           "WHERE id = ?", (error, sub_id))
                db.execute("DELETE FROM outbox WHERE id = ?", (sub_id,))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


def _plain(value: Any) -> Any:
    """JSON for what the local store also accepts: a set (e.g. of flags) becomes a sorted list."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} {value!r} cannot be sent to the room as JSON")


def _like(store_method, kind: str | None = None):
    """A client method with ``store_method``'s signature and doc: it submits a ``kind`` through
    the outbox, or (no kind) asks the room's read of the same name."""
    sig = inspect.signature(store_method)

    def method(self, *args, **kwargs):
        given = dict(list(sig.bind(self, *args, **kwargs).arguments.items())[1:])  # TypeError like the store
        return self._submit(kind, given) if kind else self._get(store_method.__name__, given)

    method.__name__ = method.__qualname__ = store_method.__name__
    method.__signature__, method.__doc__ = sig, store_method.__doc__
    return method


class RoomClient:
    """A room's FeedbackStore over HTTP, with a local outbox; see the module doc.

    Writes return the room's row id, or None when the item waits in the outbox (it is sent
    by the background retry, the next ``flush``, or a later client of the same room).
    A wrong token raises ``PermissionError`` and invalid feedback ``ValueError``, both at once.
    """

    retry_s = (0.5, 5.0)  # background retry: first and longest wait between attempts

    def __init__(self, url: str, outbox: str | os.PathLike | None = None, timeout_s: float = 5.0,
                 device: str | None = None):
        self.url, self._token = parse_room_url(url)
        self.device = device or device_id()  # what holds this laptop's annotator names in the room
        self.timeout_s = timeout_s  # per request; a dropped Wi-Fi costs at most this per submit
        self.outbox = Outbox(outbox or default_outbox(self.url, self._token))
        self._probe, self._probe_pid = _DryRunStore(), os.getpid()
        self._send_lock = threading.Lock()  # one sender per process at a time
        self._offline_until = 0.0  # after a failure, submits queue without trying until then
        self._retry: threading.Thread | None = None
        self._retry_lock = threading.Lock()
        self._gave_up_at = float("inf")  # set by close(): the retry thread ends with the client
        self.max_body = MAX_BODY
        try:
            self.max_body = self._request("GET", "/api/ping")["max_body"]
        except RoomUnreachable as e:
            warnings.warn(f"the room at {self.url} does not answer ({e}); submissions wait in the outbox "
                          f"{self.outbox.path} until it does", stacklevel=2)
            self._start_retry()

    def __repr__(self) -> str:
        return f"RoomClient({self.url!r})"

    # -- HTTP --------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: bytes | None = None, timeout: float | None = None) -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers={
            "Authorization": f"Bearer {self._token}", "Content-Type": "application/json"})
        try:
            with _OPENER.open(req, timeout=timeout or self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]
            except (ValueError, KeyError, TypeError, OSError):
                message = f"HTTP {e.code} {e.reason}"
            if e.code in (401, 403):
                raise PermissionError(f"the room at {self.url} refused the token: {message}") from None
            if e.code in (400, 409, 413):
                raise ValueError(message) from None
            if e.code == 404:
                raise ValueError(f"{self.url} is not a labkit room (404: {message})") from None
            raise RoomUnreachable(f"HTTP {e.code}: {message}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            raise RoomUnreachable(str(getattr(e, "reason", e)) or type(e).__name__) from None

    def _start_retry(self, offline: bool = True) -> None:
        """Let the background thread send what waits; ``offline``: submits queue without trying
        for a moment, so a dropped Wi-Fi does not cost ``timeout_s`` on every click."""
        if offline:
            self._offline_until = time.monotonic() + self.retry_s[0]
        with self._retry_lock:
            if self._retry is None:
                self._retry = threading.Thread(target=self._retry_loop, name="labkit-room-retry", daemon=True)
                self._retry.start()

    def _retry_loop(self) -> None:
        wait = self.retry_s[0]
        while True:
            time.sleep(wait)
            stop = time.monotonic() >= self._gave_up_at  # close()d while this thread slept: no more sends
            if not stop:
                try:
                    self.flush(timeout=self.timeout_s * 2)
                except PermissionError:
                    pass  # a refused token stays refused; the next submit or flush() reports it
                except sqlite3.Error as e:  # the outbox file (or its folder) is gone: nothing left to send
                    warnings.warn(f"the outbox {self.outbox.path} cannot be read ({e}); background retry stops",
                                  stacklevel=1)
                    stop = True
            with self._retry_lock:  # a submit that queues after this check starts a new thread
                if stop or time.monotonic() >= self._gave_up_at or self.outbox.count() == 0:
                    self._retry = None
                    return
            wait = min(wait * 2, self.retry_s[1])

    def _checks(self) -> _DryRunStore:
        """The in-memory store that runs the local store's checks (one per process: memory
        databases do not cross fork())."""
        if os.getpid() != self._probe_pid:
            self._probe, self._probe_pid = _DryRunStore(), os.getpid()
        return self._probe

    def _send(self, sub_id: str, kind: str, args_json: str) -> Any:
        """POST one outbox row; on an answer it leaves the outbox. Returns the row id."""
        body = f'{{"id": {json.dumps(sub_id)}, "kind": {json.dumps(kind)}, "args": {args_json}}}'.encode()
        answer = self._request("POST", "/api/submit", body)
        self.outbox.done(sub_id)
        return answer["row_id"]

    # -- writes ------------------------------------------------------------------------------

    def _submit(self, kind: str, args: dict) -> Any:
        try:
            args_json = json.dumps(args, ensure_ascii=False, default=_plain)
        except (TypeError, ValueError) as e:
            raise ValueError(str(e)) from None
        args = json.loads(args_json)  # validate exactly what the room will receive
        apply_submission(self._checks(), kind, args)  # the store's own checks: ValueError at once
        if len(args_json) + 200 > self.max_body:
            raise ValueError(f"this {kind} is larger than the room's limit of {self.max_body} bytes")
        sub_id = uuid.uuid4().hex
        self.outbox.put(sub_id, kind, args_json)  # durable before the first byte is sent
        if time.monotonic() < self._offline_until:
            self._start_retry(offline=False)
            return None
        if not self._send_lock.acquire(timeout=0.5):  # another thread is sending: it or the retry takes it
            self._start_retry(offline=False)
            return None
        try:
            row_id = self._send(sub_id, kind, args_json)
        except (PermissionError, ValueError):
            self.outbox.done(sub_id)  # refused at once: the caller is told, nothing is kept
            raise
        except RoomUnreachable:
            self._start_retry()
            return None
        finally:
            self._send_lock.release()
        if self.outbox.count():
            self._start_retry(offline=False)  # older items wait: the background thread sends them
        return row_id

    add_demonstration = _like(FeedbackStore.add_demonstration, "demonstration")
    add_ranking = _like(FeedbackStore.add_ranking, "ranking")
    add_comparison = _like(FeedbackStore.add_comparison, "comparison")
    mark_seen = _like(FeedbackStore.mark_seen, "seen")
    import_pairs = FeedbackStore.import_pairs  # builds K = 2 records and calls import_rankings below

    def import_rankings(self, records, annotator: str | None = None) -> int:
        """Same as ``FeedbackStore.import_rankings``: every record is checked before any is queued;
        they are sent in chunks under the room's body limit."""
        records = json.loads(json.dumps(list(records), ensure_ascii=False, default=_plain))
        self._checks().import_rankings(records, annotator=annotator)  # all checked before any is queued
        chunks, chunk, size = [], [], 0
        for n, rec in enumerate(records):
            rec_size = len(json.dumps(rec, ensure_ascii=False)) + 2
            if rec_size + 500 > self.max_body:
                raise ValueError(f"record {n}: larger than the room's limit of {self.max_body} bytes")
            if chunk and size + rec_size + 500 > self.max_body // 2:
                chunks.append(chunk)
                chunk, size = [], 0
            chunk.append(rec)
            size += rec_size
        chunks += [chunk] if chunk else []
        for chunk in chunks:
            self._submit("rankings", {"records": chunk, "annotator": annotator})
        return len(records)

    def flush(self, timeout: float = 30.0) -> int:
        """Send what waits in this room's outbox, oldest first, retrying an unreachable room until
        ``timeout`` s have passed; return how many items still wait.

        Raises ``PermissionError`` when the room refuses the token. An item the room refuses
        as invalid moves to the outbox's ``rejected`` table with the reason, with a warning.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self._send_once(deadline, wait=True) == "sent":
                self._offline_until = 0.0
                break
            if time.monotonic() + 0.25 > deadline:
                break
            time.sleep(0.25)  # a restarting room: try again until the deadline
        return self.outbox.count()

    def _send_once(self, deadline: float, wait: bool) -> str:
        """One pass over the outbox: 'sent' (all of it), 'unreachable', 'busy' or 'late'."""
        if not self._send_lock.acquire(timeout=max(0.0, deadline - time.monotonic()) if wait else 0):
            return "busy"
        try:
            for sub_id, kind, args_json in self.outbox.pending():
                if time.monotonic() > deadline:
                    return "late"
                try:
                    self._send(sub_id, kind, args_json)
                except ValueError as e:
                    self.outbox.reject(sub_id, str(e))
                    warnings.warn(f"the room refused a queued {kind} ({e}); it is kept in the "
                                  f"'rejected' table of {self.outbox.path}", stacklevel=3)
                except RoomUnreachable:
                    return "unreachable"
            return "sent"
        finally:
            self._send_lock.release()

    def items(self) -> list[dict]:
        """The ranking items the instructor published to the room (``publish_items``)."""
        return self._request("GET", "/api/items")

    def publish_items(self, items: list[dict]) -> int:
        """Publish the room's ranking items (K responses per prompt); participants read them with ``items()``."""
        body = json.dumps(list(items), ensure_ascii=False, default=_plain).encode()
        return self._request("POST", "/api/items", body, timeout=max(self.timeout_s, 30))["items"]

    def claim(self, name: str) -> dict:
        """Hold ``name`` in the room for this laptop; ``ValueError`` when another laptop holds it.
        An unreachable room cannot check: the name is used, and the room sorts it out later."""
        body = json.dumps({"name": name, "device": self.device}).encode()
        try:
            return self._request("POST", "/api/claim", body)
        except RoomUnreachable:
            return {"name": name, "new": None}

    # -- reads -------------------------------------------------------------------------------

    def _get(self, name: str, params: dict) -> Any:
        if self.outbox.count():  # read your own writes when the room answers
            self._send_once(time.monotonic() + self.timeout_s, wait=False)
        query = urllib.parse.urlencode({k: json.dumps(v, default=_plain) for k, v in params.items()})
        return self._request("GET", f"/api/{name}" + (f"?{query}" if query else ""))

    rankings = _like(FeedbackStore.rankings)
    demonstrations = _like(FeedbackStore.demonstrations)
    comparisons = _like(FeedbackStore.comparisons)
    annotators = _like(FeedbackStore.annotators)
    counts = _like(FeedbackStore.counts)
    to_kway = _like(FeedbackStore.to_kway)
    to_pairs = _like(FeedbackStore.to_pairs)
    win_rate = _like(FeedbackStore.win_rate)

    def done_ids(self, annotator: str, kind: str = "ranking") -> set[str]:
        """Item ids the annotator finished, in the room or still in this machine's outbox."""
        done = set(self._get("done_ids", {"annotator": annotator, "kind": kind}))
        for _, k, args_json in self.outbox.pending():
            args = json.loads(args_json)
            if k == kind and (args.get("annotator") or "").strip() == annotator:
                done.add(args.get("item_id") or args.get("prompt_id"))
        return done

    def agreement(self, gold: Any = "auto", prompts: list[dict] | None = None) -> dict:
        """Same as ``FeedbackStore.agreement``; a gold callable or own prompts are computed here."""
        if gold in ("auto", None) and prompts is None:
            return self._get("agreement", {"gold": gold})
        return FeedbackStore.agreement(self, gold, prompts)

    def to_dataset(self, kind: str = "pairs", **kwargs):
        """Same as ``FeedbackStore.to_dataset``, from the room's rows."""
        return FeedbackStore.to_dataset(self, kind, **kwargs)

    def _empty_dataset(self, kind: str):
        return self._checks()._empty_dataset(kind)  # the local store's columns

    def close(self) -> None:
        """Stop retrying in the background; what waits stays in the outbox for a later client."""
        self._gave_up_at = time.monotonic()
        self.outbox.close()


# Room traffic stays on the local network: never route it through an HTTP(S)_PROXY.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

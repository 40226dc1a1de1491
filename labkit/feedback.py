"""Human (and simulated) feedback: a crash-safe SQLite store shared by several annotators.

One store file per project or run holds what the recipe needs from people (Ouyang et al.
2022, §3.4 and Appendix B): demonstrations for SFT, K-way rankings for the reward model
(K = 2..9, ties allowed, with the labeling interface's metadata: an overall 1-7 score,
flags such as "fails to follow the instruction", "hallucination", "inappropriate", and a
comment), blind A/B comparisons for evaluation, and which items each annotator finished,
so a session resumes where it stopped.

Durability (BRIEF §5, "feedback is never lost"):

- every submit is ONE transaction (``BEGIN IMMEDIATE ... COMMIT``), validated before
  anything is written, so a ranking is either fully stored or not at all;
- the file runs in WAL mode with ``synchronous=FULL``: a committed item survives a
  killed kernel (and a power cut); readers never block the writer;
- ``busy_timeout`` lets several kernels (several annotators) write to one file at once;
- each process opens its own connection (a connection is never carried across ``fork``).

Keep the file on a local disk: SQLite's WAL mode needs shared memory, which network file
systems (NFS, SMB) do not provide reliably.

>>> store = FeedbackStore("runs/demo/feedback.sqlite")
>>> row_id = store.add_ranking("rm-0001", ["a", "b", "c", "d"], [[2], [0, 3], [1]], "alice",
...                            prompt="Write a haiku.", score=6)
>>> len(store.to_pairs())  # C(4,2) = 6 pairs minus the one tied pair (0, 3)
5
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from labkit.rankings import normalize_tiers, pair_stats, rankings_to_pairs, tiers_from_scores

# Metadata of the InstructGPT labeling interface (Ouyang et al. 2022, Table 3 / Fig. 12):
# each item gets an overall 1-7 Likert score and binary flags. These names are the columns
# of the paper's metadata table, spelled as identifiers.
FLAGS = (
    "fails_to_follow_instruction",  # "Fails to follow the correct instruction / task"
    "hallucination",  # "Makes up information" (closed-domain tasks)
    "inappropriate",  # "Inappropriate for customer assistant"
    "satisfies_constraints",  # "Satisfies constraint provided in the instruction"
    "sexual_content",
    "violent_content",
    "harmful_advice",  # "Gives harmful advice"
    "denigrates_protected_class",
    "expresses_opinion",
    "expresses_moral_judgment",
)
KINDS = ("demonstration", "ranking", "comparison")
STATUSES = ("submitted", "skipped")
MIN_K, MAX_K = 2, 9  # the paper ranks K = 4..9; K = 2 is a preference pair
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS demonstrations (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id   TEXT NOT NULL,            -- what resume keys on (defaults to prompt_id)
    prompt_id TEXT NOT NULL,
    prompt    TEXT NOT NULL,
    response  TEXT NOT NULL,            -- '' when skipped
    annotator TEXT NOT NULL,
    status    TEXT NOT NULL CHECK (status IN ('submitted', 'skipped')),
    seconds   REAL,                     -- time spent on the item
    comment   TEXT,
    created   REAL NOT NULL             -- unix time of the commit
);
CREATE TABLE IF NOT EXISTS rankings (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id   TEXT NOT NULL,
    prompt_id TEXT NOT NULL,
    prompt    TEXT,
    annotator TEXT NOT NULL,
    status    TEXT NOT NULL CHECK (status IN ('submitted', 'skipped')),
    tiers     TEXT NOT NULL,            -- JSON list of lists of response indices, best first
    score     INTEGER CHECK (score IS NULL OR score BETWEEN 1 AND 7),
    flags     TEXT NOT NULL,            -- JSON list of FLAGS names
    comment   TEXT,
    seconds   REAL,
    created   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS responses (
    ranking_id  INTEGER NOT NULL REFERENCES rankings(id) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,       -- position in the ranking's response list
    response_id TEXT NOT NULL,
    model       TEXT,                   -- which policy produced it
    text        TEXT NOT NULL,
    PRIMARY KEY (ranking_id, idx)
);
CREATE TABLE IF NOT EXISTS comparisons (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id     TEXT NOT NULL,
    prompt_id   TEXT NOT NULL,
    prompt      TEXT,
    response_a  TEXT NOT NULL,
    response_b  TEXT NOT NULL,
    model_a     TEXT,                   -- true model names, hidden from the annotator
    model_b     TEXT,
    choice      TEXT CHECK (choice IS NULL OR choice IN ('a', 'b', 'tie')),
    a_shown_first INTEGER,              -- 1 when response_a was the one displayed as "A"
    annotator   TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('submitted', 'skipped')),
    seconds     REAL,
    comment     TEXT,
    created     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS progress (
    annotator TEXT NOT NULL,
    kind      TEXT NOT NULL,            -- demonstration | ranking | comparison
    item_id   TEXT NOT NULL,
    status    TEXT NOT NULL,            -- seen | submitted | skipped
    updated   REAL NOT NULL,
    PRIMARY KEY (annotator, kind, item_id)
);
CREATE INDEX IF NOT EXISTS rankings_by_prompt ON rankings(prompt_id);
"""


# ----------------------------------------------------------------------------- validation

def _check_annotator(annotator: Any) -> str:
    if not isinstance(annotator, str) or not annotator.strip():
        raise ValueError("annotator must be a non-empty name, e.g. 'alice' or 'sim:alice'")
    return annotator.strip()


def _check_status(status: str) -> str:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    return status


EMPTY_RESPONSE = "(empty response)"


def rankable_responses(responses: list[str]) -> list[str]:
    """Model answers as the store takes them: an empty answer becomes ``EMPTY_RESPONSE`` (the
    store refuses empty text, and a labeler or a person should still see that nothing came)."""
    return [y if y.strip() else EMPTY_RESPONSE for y in responses]


def _check_responses(responses: Any) -> list[str]:
    if not isinstance(responses, (list, tuple)):
        raise ValueError(f"responses must be a list of strings, got {type(responses).__name__}")
    if not MIN_K <= len(responses) <= MAX_K:
        raise ValueError(f"a ranking needs K = {MIN_K}..{MAX_K} responses, got {len(responses)}")
    for i, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            raise ValueError(f"response {i} is empty or not a string: {r!r}")
    return list(responses)


def _check_flags(flags: Any) -> list[str]:
    if flags is None:
        return []
    if isinstance(flags, dict):  # {"hallucination": True, ...}
        flags = [name for name, on in flags.items() if on]
    if isinstance(flags, str):
        flags = [flags]
    unknown = [f for f in flags if f not in FLAGS]
    if unknown:
        raise ValueError(f"unknown flag(s) {unknown}; known flags: {list(FLAGS)}")
    return sorted(set(flags), key=FLAGS.index)


def _check_score(score: Any) -> int | None:
    if score is None:
        return None
    if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 7:
        raise ValueError(f"score must be an integer 1..7 (the paper's Likert scale) or None, got {score!r}")
    return score


def prompt_key(prompt: str) -> str:
    """A stable id for a prompt that has none (imported pairs): ``p-`` + 10 hex digits."""
    return "p-" + hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:10]


# ----------------------------------------------------------------------------- the store

class FeedbackStore:
    """Demonstrations, K-way rankings and A/B comparisons in one SQLite file (see module doc)."""

    def __init__(self, path: str | os.PathLike, timeout_s: float = 30.0):
        self.path = Path(path)
        self.timeout_s = timeout_s  # how long a writer waits for another kernel's transaction
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one connection per process, shared by its threads
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None
        with self._write() as db:
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def __repr__(self) -> str:
        return f"FeedbackStore({str(self.path)!r})"

    # -- connections and transactions ------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        # A connection must not cross fork(): a child process opens its own.
        if self._conn is None or self._pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")  # a commit is on disk when it returns
            conn.execute("PRAGMA foreign_keys = ON")
            conn.row_factory = sqlite3.Row
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    @contextlib.contextmanager
    def _write(self):
        """One write transaction. BEGIN IMMEDIATE takes the write lock up front, so two kernels
        never deadlock upgrading read locks; busy_timeout makes the second one wait its turn."""
        with self._lock:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:  # KeyboardInterrupt too: nothing half-written
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _read(self, sql: str, args: Iterable = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._connection().execute(sql, tuple(args)).fetchall()

    @staticmethod
    def _mark(db, annotator: str, kind: str, item_id: str, status: str) -> None:
        db.execute("INSERT INTO progress VALUES (?, ?, ?, ?, ?) ON CONFLICT(annotator, kind, item_id) "
                   "DO UPDATE SET status = excluded.status, updated = excluded.updated",
                   (annotator, kind, item_id, status, time.time()))

    # -- writes ------------------------------------------------------------------------------

    def add_demonstration(self, prompt_id: str, prompt: str, response: str, annotator: str,
                          status: str = "submitted", seconds: float | None = None,
                          comment: str | None = None, item_id: str | None = None) -> int:
        """Store one demonstration (or a skip) in one transaction; return its row id."""
        annotator, status = _check_annotator(annotator), _check_status(status)
        if not prompt_id or not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("a demonstration needs a prompt_id and a non-empty prompt")
        if status == "submitted" and (not isinstance(response, str) or not response.strip()):
            raise ValueError("the demonstration's response is empty; write an answer or skip the item")
        item_id = item_id or prompt_id
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO demonstrations (item_id, prompt_id, prompt, response, annotator, status, "
                "seconds, comment, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (item_id, prompt_id, prompt, response or "", annotator, status, seconds, comment, time.time()))
            self._mark(db, annotator, "demonstration", item_id, status)
            return cur.lastrowid

    def _validate_ranking(self, prompt_id, responses, tiers, annotator, prompt=None, response_ids=None,
                          models=None, status="submitted", score=None, flags=None, comment=None,
                          seconds=None, item_id=None) -> dict:
        annotator, status = _check_annotator(annotator), _check_status(status)
        if not prompt_id and prompt:
            prompt_id = prompt_key(prompt)
        if not isinstance(prompt_id, str) or not prompt_id:
            raise ValueError("a ranking needs a prompt_id (or a prompt to derive one from)")
        responses = _check_responses(responses)
        k = len(responses)
        if response_ids is None:
            response_ids = [f"{prompt_id}/{i}" for i in range(k)]
        response_ids = [str(r) for r in response_ids]
        if len(response_ids) != k or len(set(response_ids)) != k:
            raise ValueError(f"response_ids must be {k} distinct ids, got {response_ids!r}")
        if models is not None and (isinstance(models, str) or len(models) != k):
            raise ValueError(f"models must list one model name per response ({k}), got {models!r}")
        if status == "skipped" and not tiers:
            tiers = [list(range(k))]  # a skip ranks nothing; stored as one all-tied tier
        return dict(
            item_id=item_id or prompt_id, prompt_id=prompt_id, prompt=prompt, annotator=annotator,
            status=status, tiers=normalize_tiers(tiers, k, response_ids), score=_check_score(score),
            flags=_check_flags(flags), comment=comment, seconds=seconds, responses=responses,
            response_ids=response_ids, models=list(models) if models is not None else [None] * k)

    def _insert_ranking(self, db, r: dict) -> int:
        cur = db.execute(
            "INSERT INTO rankings (item_id, prompt_id, prompt, annotator, status, tiers, score, flags, "
            "comment, seconds, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (r["item_id"], r["prompt_id"], r["prompt"], r["annotator"], r["status"], json.dumps(r["tiers"]),
             r["score"], json.dumps(r["flags"]), r["comment"], r["seconds"], time.time()))
        rid = cur.lastrowid
        db.executemany("INSERT INTO responses VALUES (?, ?, ?, ?, ?)",
                       [(rid, i, r["response_ids"][i], r["models"][i], text)
                        for i, text in enumerate(r["responses"])])
        self._mark(db, r["annotator"], "ranking", r["item_id"], r["status"])
        return rid

    def add_ranking(self, prompt_id: str, responses: list[str], tiers: list[list[int | str]],
                    annotator: str, prompt: str | None = None, response_ids: list[str] | None = None,
                    models: list[str] | None = None, status: str = "submitted", score: int | None = None,
                    flags: list[str] | dict | None = None, comment: str | None = None,
                    seconds: float | None = None, item_id: str | None = None) -> int:
        """Store one K-way ranking (K = 2..9) in one transaction; return its row id.

        ``tiers`` lists response indices (or ids) best first; indices in one tier are tied.
        Everything is validated first: a bad ranking raises ``ValueError`` and writes nothing.
        """
        r = self._validate_ranking(prompt_id, responses, tiers, annotator, prompt, response_ids, models,
                                   status, score, flags, comment, seconds, item_id)
        with self._write() as db:
            return self._insert_ranking(db, r)

    def add_comparison(self, prompt_id: str, prompt: str | None, response_a: str, response_b: str,
                       choice: str | None, annotator: str, model_a: str | None = None,
                       model_b: str | None = None, a_shown_first: bool | None = None,
                       status: str = "submitted", seconds: float | None = None,
                       comment: str | None = None, item_id: str | None = None) -> int:
        """Store one A/B judgement; ``choice`` is 'a', 'b' or 'tie' in the item's own order."""
        annotator, status = _check_annotator(annotator), _check_status(status)
        if not prompt_id:
            raise ValueError("a comparison needs a prompt_id")
        for name, r in (("response_a", response_a), ("response_b", response_b)):
            if not isinstance(r, str) or not r.strip():
                raise ValueError(f"{name} is empty or not a string: {r!r}")
        if status == "submitted" and choice not in ("a", "b", "tie"):
            raise ValueError(f"choice must be 'a', 'b' or 'tie', got {choice!r}")
        if status == "skipped":
            choice = None
        item_id = item_id or prompt_id
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO comparisons (item_id, prompt_id, prompt, response_a, response_b, model_a, model_b, "
                "choice, a_shown_first, annotator, status, seconds, comment, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (item_id, prompt_id, prompt, response_a, response_b, model_a, model_b, choice,
                 None if a_shown_first is None else int(a_shown_first), annotator, status, seconds,
                 comment, time.time()))
            self._mark(db, annotator, "comparison", item_id, status)
            return cur.lastrowid

    def mark_seen(self, annotator: str, kind: str, item_id: str) -> None:
        """Record that an item was shown (never downgrades a finished item)."""
        annotator = _check_annotator(annotator)
        with self._write() as db:
            db.execute("INSERT INTO progress VALUES (?, ?, ?, 'seen', ?) ON CONFLICT DO NOTHING",
                       (annotator, kind, item_id, time.time()))

    def import_rankings(self, records: Iterable[dict], annotator: str | None = None) -> int:
        """Add universal K-way records (``prompt``, ``responses``, ``tiers``, optional
        ``prompt_id``, ``annotator``, ``models``, ...) in one transaction; return the count.

        ``annotator`` names records that carry none, e.g. ``"sim:alice"`` for simulated labelers.
        Every record is validated before the first is written.
        """
        rows = []
        for n, rec in enumerate(records):
            try:
                rows.append(self._validate_ranking(
                    rec.get("prompt_id"), rec.get("responses"), rec.get("tiers"),
                    rec.get("annotator") or annotator, prompt=rec.get("prompt"),
                    response_ids=rec.get("response_ids"), models=rec.get("models"),
                    status=rec.get("status", "submitted"), score=rec.get("score"), flags=rec.get("flags"),
                    comment=rec.get("comment"), seconds=rec.get("seconds"), item_id=rec.get("item_id")))
            except ValueError as e:
                raise ValueError(f"record {n}: {e}") from None
        with self._write() as db:
            for r in rows:
                self._insert_ranking(db, r)
        return len(rows)

    def import_pairs(self, pairs: Iterable[dict], annotator: str | None = None) -> int:
        """Add TRL preference pairs (``prompt``, ``chosen``, ``rejected``) as K = 2 rankings."""
        records = [dict(prompt=p.get("prompt"), prompt_id=p.get("prompt_id"),
                        responses=[p.get("chosen"), p.get("rejected")], tiers=[[0], [1]],
                        annotator=p.get("annotator")) for p in pairs]
        return self.import_rankings(records, annotator=annotator)

    # -- reads -------------------------------------------------------------------------------

    def rankings(self, annotator: str | None = None, status: str | None = "submitted") -> list[dict]:
        """Rankings in the universal K-way format plus metadata, oldest first."""
        where, args = [], []
        if annotator is not None:
            where.append("annotator = ?"), args.append(annotator)
        if status is not None:
            where.append("status = ?"), args.append(status)
        cond = " WHERE " + " AND ".join(where) if where else ""
        sql = f"SELECT * FROM rankings{cond} ORDER BY id"
        resp_sql = f"SELECT * FROM responses WHERE ranking_id IN (SELECT id FROM rankings{cond}) ORDER BY ranking_id, idx"
        with self._lock:
            db = self._connection()
            db.execute("BEGIN")  # one snapshot for both tables
            try:
                rows = db.execute(sql, args).fetchall()
                resp = db.execute(resp_sql, args).fetchall()
            finally:
                db.execute("COMMIT")
        by_ranking: dict[int, list[sqlite3.Row]] = {}
        for r in resp:
            by_ranking.setdefault(r["ranking_id"], []).append(r)
        out = []
        for row in rows:
            rs = by_ranking.get(row["id"], [])
            out.append({
                "prompt": row["prompt"], "responses": [r["text"] for r in rs], "tiers": json.loads(row["tiers"]),
                "prompt_id": row["prompt_id"], "annotator": row["annotator"],
                "response_ids": [r["response_id"] for r in rs], "models": [r["model"] for r in rs],
                "score": row["score"], "flags": json.loads(row["flags"]), "comment": row["comment"],
                "seconds": row["seconds"], "status": row["status"], "item_id": row["item_id"],
                "id": row["id"], "created": row["created"],
            })
        return out

    def demonstrations(self, annotator: str | None = None, status: str | None = "submitted") -> list[dict]:
        """Demonstrations as ``{prompt_id, prompt, response, annotator, ...}``, oldest first."""
        return self._select("demonstrations", annotator, status)

    def comparisons(self, annotator: str | None = None, status: str | None = "submitted") -> list[dict]:
        """A/B judgements with the true model names; ``choice`` (alias ``winner``) is 'a', 'b' or
        'tie' in the item's own order: 'a' means ``response_a`` / ``model_a`` won, whichever side
        it was shown on (``a_shown_first``)."""
        out = self._select("comparisons", annotator, status)
        for r in out:
            r["a_shown_first"] = None if r["a_shown_first"] is None else bool(r["a_shown_first"])
            r["winner"] = r["choice"]
        return out

    def _select(self, table: str, annotator: str | None, status: str | None) -> list[dict]:
        where, args = [], []
        if annotator is not None:
            where.append("annotator = ?"), args.append(annotator)
        if status is not None:
            where.append("status = ?"), args.append(status)
        sql = f"SELECT * FROM {table}" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        return [dict(r) for r in self._read(sql, args)]

    def done_ids(self, annotator: str, kind: str = "ranking") -> set[str]:
        """Item ids the annotator finished (submitted or skipped): what a session resumes past."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        rows = self._read("SELECT item_id FROM progress WHERE annotator = ? AND kind = ? AND status != 'seen'",
                          (annotator, kind))
        return {r["item_id"] for r in rows}

    def annotators(self) -> list[str]:
        return [r[0] for r in self._read("SELECT DISTINCT annotator FROM progress ORDER BY annotator")]

    def counts(self) -> dict[str, int]:
        """Submitted items per table, e.g. for a progress line."""
        return {t: self._read(f"SELECT COUNT(*) FROM {t} WHERE status = 'submitted'")[0][0]
                for t in ("demonstrations", "rankings", "comparisons")}

    # -- exports -----------------------------------------------------------------------------

    def to_kway(self, annotator: str | None = None) -> list[dict]:
        """Submitted rankings as plain K-way records: prompt, responses, tiers, prompt_id, annotator."""
        keys = ("prompt", "responses", "tiers", "prompt_id", "annotator")
        return [{k: r[k] for k in keys} for r in self.rankings(annotator=annotator)]

    def to_pairs(self, include_ties: bool = False, margin: bool = False,
                 annotator: str | None = None) -> list[dict]:
        """TRL preference pairs ``{prompt, chosen, rejected}`` from every submitted ranking
        (C(K,2) minus the tied pairs each; options as :func:`labkit.rankings.rankings_to_pairs`)."""
        return rankings_to_pairs(self.rankings(annotator=annotator), include_ties=include_ties, margin=margin)

    def to_dataset(self, kind: str = "pairs", **kwargs):
        """A ``datasets.Dataset`` of 'pairs', 'kway', 'demonstrations' or 'comparisons'."""
        from datasets import Dataset

        makers = {"pairs": self.to_pairs, "kway": self.to_kway, "rankings": self.to_kway,
                  "demonstrations": self.demonstrations, "comparisons": self.comparisons}
        if kind not in makers:
            raise ValueError(f"kind must be one of {sorted(makers)}, got {kind!r}")
        rows = makers[kind](**kwargs)
        return Dataset.from_list(rows) if rows else self._empty_dataset(kind)

    def _empty_dataset(self, kind: str):
        """An empty store still gives the right columns, so a trainer fails on "no rows", not on schema."""
        from datasets import Dataset

        if kind in ("demonstrations", "comparisons"):
            columns = [r["name"] for r in self._read(f"PRAGMA table_info({kind})")]
            columns += ["winner"] if kind == "comparisons" else []
        else:
            columns = ["prompt", "chosen", "rejected"] if kind == "pairs" else ["prompt", "responses", "tiers",
                                                                               "prompt_id", "annotator"]
        return Dataset.from_dict({c: [] for c in columns})

    def win_rate(self, model: str, baseline: str | None = None, annotator: str | None = None) -> dict:
        """Human win rate of ``model`` in the A/B comparisons (against ``baseline`` or any model).

        A tie counts half a win, as in the paper's preference plots (Ouyang et al. 2022, Fig. 1).
        """
        wins = losses = ties = 0
        for c in self.comparisons(annotator=annotator):
            sides = {"a": c["model_a"], "b": c["model_b"]}
            if model not in sides.values() or sides["a"] == sides["b"]:
                continue
            mine = "a" if sides["a"] == model else "b"
            other = sides["b" if mine == "a" else "a"]
            if baseline is not None and other != baseline:
                continue
            if c["choice"] == "tie":
                ties += 1
            elif c["choice"] == mine:
                wins += 1
            else:
                losses += 1
        n = wins + losses + ties
        return {"wins": wins, "losses": losses, "ties": ties, "n": n,
                "win_rate": (wins + 0.5 * ties) / n if n else math.nan}

    # -- agreement ---------------------------------------------------------------------------

    def agreement(self, gold: Any = "auto", prompts: list[dict] | None = None) -> dict:
        """Agreement between annotators on shared items, and of each annotator with a gold scorer.

        Two rankings are compared when they rank the same responses of the same prompt
        (matched by text, in any order). Returns ``{"pairs": [...], "gold": [...],
        "inter_annotator": float}``: per annotator pair the mean pairwise agreement and
        Kendall's tau-b over shared items, per annotator the same against the gold ranking
        (responses ordered by ``gold(record, response)``; ``"auto"`` =
        ``labkit.labelers.GoldLabeler().score`` on ``labkit.data.load_prompts()`` records,
        ``None`` = skip). The paper's labelers agree on about 73% of pairs (§5.1).
        """
        rankings = self.rankings()
        by_item: dict[tuple, dict[str, list[list[int]]]] = {}
        texts: dict[tuple, list[str]] = {}
        for r in rankings:
            key = (r["prompt_id"], tuple(sorted(r["responses"])))
            canon = texts.setdefault(key, sorted(r["responses"]))
            # Identical texts (a small model often samples the same short answer twice) take
            # distinct slots of the canonical list, in the order this ranking lists them.
            free: dict[str, list[int]] = {}
            for j, t in enumerate(canon):
                free.setdefault(t, []).append(j)
            to_canon = {i: free[t].pop(0) for i, t in enumerate(r["responses"])}
            # An annotator who ranked the same item twice: the latest ranking counts.
            by_item.setdefault(key, {})[r["annotator"]] = [[to_canon[i] for i in t] for t in r["tiers"]]
        pair_rows: dict[tuple[str, str], list[dict]] = {}
        for key, ranks in by_item.items():
            for a, b in itertools.combinations(sorted(ranks), 2):
                pair_rows.setdefault((a, b), []).append(pair_stats(ranks[a], ranks[b]))
        pairs_out = [dict(a=a, b=b, items=len(rows), **_mean_stats(rows)) for (a, b), rows in sorted(pair_rows.items())]
        weights = [(p["agreement"], p["pairs"]) for p in pairs_out if not math.isnan(p["agreement"])]
        total = sum(w for _, w in weights)
        result = {"pairs": pairs_out, "gold": [],
                  "inter_annotator": sum(a * w for a, w in weights) / total if total else math.nan}

        if gold is None:
            return result
        if gold == "auto":
            from labkit.labelers import GoldLabeler

            gold = GoldLabeler().score
        if prompts is None:
            from labkit.data import load_prompts

            prompts = load_prompts()
        records = {p["id"]: p for p in prompts}
        gold_rows: dict[str, list[dict]] = {}
        for key, ranks in by_item.items():
            record = records.get(key[0])
            if record is None:
                continue
            gold_tiers = tiers_from_scores([gold(record, t) for t in texts[key]])
            for ann, tiers in ranks.items():
                gold_rows.setdefault(ann, []).append(pair_stats(tiers, gold_tiers))
        result["gold"] = [dict(annotator=a, items=len(rows), **_mean_stats(rows)) for a, rows in sorted(gold_rows.items())]
        return result


def agreement_matrix(agreement: dict, stat: str = "agreement") -> dict:
    """Annotator-by-annotator table of ``FeedbackStore.agreement()``'s result (a store's or a room's).

    Rows and columns are the annotators, people first, then simulated labelers (``sim:...``),
    then ``"gold"`` when the result has gold rows. Returns ``{"names", "matrix", "items"}``:
    ``matrix[i][j]`` is ``stat`` ("agreement" or "kendall_tau") of the pair (nan when they share
    no item or no untied pair; 1.0 on the diagonal), ``items[i][j]`` the number of shared items.
    """
    if stat not in ("agreement", "kendall_tau"):
        raise ValueError(f"stat must be 'agreement' or 'kendall_tau', got {stat!r}")
    names = {p[side] for p in agreement.get("pairs", []) for side in ("a", "b")}
    names |= {g["annotator"] for g in agreement.get("gold", [])}
    names = sorted(names, key=lambda n: (is_simulated(n), n))
    if agreement.get("gold"):
        names.append("gold")
    index = {n: i for i, n in enumerate(names)}
    matrix = [[1.0 if i == j else math.nan for j in range(len(names))] for i in range(len(names))]
    items = [[0] * len(names) for _ in names]
    cells = [(p["a"], p["b"], p) for p in agreement.get("pairs", [])]
    cells += [(g["annotator"], "gold", g) for g in agreement.get("gold", [])]
    for a, b, row in cells:
        i, j = index[a], index[b]
        value = row[stat]
        matrix[i][j] = matrix[j][i] = float("nan") if value is None else float(value)
        items[i][j] = items[j][i] = row["items"]
    return {"names": names, "matrix": matrix, "items": items}


def _mean_stats(rows: list[dict]) -> dict[str, float]:
    """Pair-weighted agreement and mean tau over items (nan entries left out)."""
    strict = sum(r["pairs"] for r in rows)
    agree = sum(r["agreement"] * r["pairs"] for r in rows if r["pairs"])
    taus = [r["kendall_tau"] for r in rows if not math.isnan(r["kendall_tau"])]
    return {"agreement": agree / strict if strict else math.nan,
            "kendall_tau": sum(taus) / len(taus) if taus else math.nan, "pairs": strict}


# ----------------------------------------------------------------------------- people and simulated labelers

SIMULATED_PREFIX = "sim:"  # simulated labelers' annotator names start with this


def is_simulated(annotator: str) -> bool:
    return annotator.startswith(SIMULATED_PREFIX)


def human_count(store: Any, kind: str = "ranking", annotator: str | None = None) -> int:
    """Submitted items of ``kind`` by people (``annotator``, or anyone not ``sim:...``) in a store or room."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    rows = {"demonstration": store.demonstrations, "ranking": store.rankings, "comparison": store.comparisons}[kind](
        annotator=annotator.strip() if annotator else None)
    return sum(not is_simulated(r["annotator"]) for r in rows)


def report_human(store: Any, kind: str, annotator: str | None) -> int:
    """Say how many ``kind`` items ``annotator`` submitted, or clearly that none has arrived yet
    and what to do (interactive notebooks call it in the cells after a widget); return the count."""
    n = human_count(store, kind, annotator) if annotator and annotator.strip() else 0
    if not annotator or not annotator.strip():
        print(f"No {kind} from you yet: type your name in the widget above first (it names every item you "
              "submit), then submit and run this cell again. Until then the simulated labelers carry on alone.")
    elif n == 0:
        print(f"No {kind} from {annotator!r} has reached the store yet: use the widget above (each Submit saves "
              "one item at once), then run this cell again. Until then the simulated labelers carry on alone.")
    else:
        print(f"{n} {kind}{'s' if n != 1 else ''} from {annotator!r} in the store.")
    return n


def pooled_demonstrations(store: Any, base: list[dict] | None = None, prompts: list[dict] | None = None,
                          annotator: str | None = None) -> list[dict]:
    """SFT records from people's demonstrations in ``store``, every annotator's kept.

    Several annotators who answered one prompt give one record each (a room's demonstrations
    pool, they do not overwrite each other); an annotator who answered a prompt twice counts
    once, with the latest answer. A prompt that people answered drops its record from ``base``
    (e.g. the embedded demonstrations); ``prompts`` (records by ``id``) fill in category and checks.
    People's records come first (a cut to the first N keeps them). Each record is ``{**prompt record, "prompt", "response", "annotator"}``.
    """
    by_id = {p["id"]: p for p in prompts or []}
    latest: dict[tuple[str, str], dict] = {}
    for d in store.demonstrations(annotator=annotator):  # submitted only, oldest first
        if not is_simulated(d["annotator"]):
            latest[(d["prompt_id"], d["annotator"])] = d
    human = [{**by_id.get(d["prompt_id"], {"id": d["prompt_id"]}), "prompt": d["prompt"], "response": d["response"],
              "annotator": d["annotator"]} for d in latest.values()]
    answered = {pid for pid, _ in latest}
    return human + [r for r in base or [] if r.get("id") not in answered]


# ----------------------------------------------------------------------------- rooms and files

# What one item is, for merging: every field but the row id and the commit time. Two copies of
# the same file, or a store merged into another and exported again, give the same keys.
CONTENT_FIELDS = {
    "demonstration": ("item_id", "prompt_id", "prompt", "response", "annotator", "status", "seconds", "comment"),
    "ranking": ("item_id", "prompt_id", "prompt", "responses", "response_ids", "models", "tiers", "annotator",
                "status", "score", "flags", "comment", "seconds"),
    "comparison": ("item_id", "prompt_id", "prompt", "response_a", "response_b", "model_a", "model_b", "choice",
                   "a_shown_first", "annotator", "status", "seconds", "comment"),
}
_TABLES = {"demonstration": "demonstrations", "ranking": "rankings", "comparison": "comparisons"}


def content_key(record: dict) -> str:
    """The merge key of an exported record (``kind`` plus :data:`CONTENT_FIELDS`)."""
    kind = record["kind"]
    content = [kind] + [record.get(f) for f in CONTENT_FIELDS[kind]]
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode("utf-8")).hexdigest()


def records(store: Any, annotator: str | None = None, simulated: bool = True) -> list[dict]:
    """Every item of a store (or room client), skips included, as flat records with ``kind``.

    ``simulated=False`` leaves out simulated labelers (annotators named ``sim:...``).
    """
    out = []
    for kind, items in (("demonstration", store.demonstrations(annotator, status=None)),
                        ("ranking", store.rankings(annotator, status=None)),
                        ("comparison", store.comparisons(annotator, status=None))):
        for item in items:
            if not simulated and is_simulated(item["annotator"]):
                continue
            rec = {"kind": kind, **{f: item[f] for f in CONTENT_FIELDS[kind]}, "created": item["created"]}
            if kind == "comparison" and rec["a_shown_first"] is not None:
                rec["a_shown_first"] = bool(rec["a_shown_first"])
            out.append(rec)
    return out


def export_jsonl(store: Any, out: str | os.PathLike, annotator: str | None = None,
                 simulated: bool = True) -> int:
    """Write every item of ``store`` (a path, store or room client) as JSON lines; return the count.

    For rooms without a network: each laptop exports, the instructor merges (:func:`merge`).
    The file is written next to ``out`` and renamed into place, so it is whole or absent.
    """
    store = open_store(store) if isinstance(store, (str, os.PathLike)) else store
    rows = records(store, annotator, simulated)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return len(rows)


def _read_source(path: Path) -> list[dict]:
    """Records of an exported JSONL file or of a store file; bad lines name the file and line."""
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.suffix.lower() not in (".jsonl", ".json"):
        try:
            store = FeedbackStore(path)
            try:
                return records(store)
            finally:
                store.close()
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{path}: neither an exported .jsonl file nor a feedback store ({e})") from None
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}, line {n}: not JSON ({e})") from None
            if not isinstance(rec, dict) or rec.get("kind") not in CONTENT_FIELDS:
                raise ValueError(f"{path}, line {n}: field 'kind' must be one of {list(CONTENT_FIELDS)}")
            rows.append(rec)
    return rows


def merge(into: str | os.PathLike | FeedbackStore, sources: Iterable[str | os.PathLike]) -> dict[str, int]:
    """Add the items of exported JSONL files or store files to ``into``; return how many per kind.

    An item (:func:`content_key`) is added only as often as one source holds it more than
    ``into`` already does, so merging a file twice, or a store and its export, adds nothing,
    and a merge cut short is finished by running it again. Each item is validated by the store's own ``add_*``;
    its original ``created`` time is kept.
    """
    from collections import Counter

    store = into if isinstance(into, FeedbackStore) else FeedbackStore(into)
    have = Counter(content_key(r) for r in records(store))
    added = {kind: 0 for kind in CONTENT_FIELDS}
    for source in sources:
        path = Path(source)
        if path.resolve() == store.path.resolve():
            continue
        rows = _read_source(path)
        taken: Counter = Counter()
        for n, rec in enumerate(rows, 1):
            key = content_key(rec)
            taken[key] += 1
            if taken[key] <= have[key]:
                continue
            have[key] += 1
            try:
                row_id = _add_record(store, rec)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}, item {n}: {e}") from None
            if isinstance(rec.get("created"), (int, float)):
                with store._write() as db:
                    db.execute(f"UPDATE {_TABLES[rec['kind']]} SET created = ? WHERE id = ?", (rec["created"], row_id))
            added[rec["kind"]] += 1
    return added


def _add_record(store: FeedbackStore, rec: dict) -> int:
    fields = {f: rec.get(f) for f in CONTENT_FIELDS[rec["kind"]]}
    if rec["kind"] == "demonstration":
        return store.add_demonstration(**fields)
    if rec["kind"] == "ranking":
        return store.add_ranking(**fields)
    return store.add_comparison(**fields)


def open_store(path_or_url: str | os.PathLike, **kwargs) -> Any:
    """A ``FeedbackStore`` for a path, a room client (``labkit.room.RoomClient``) for a room URL.

    >>> store = open_store("runs/demo/feedback.sqlite")              # this machine
    >>> store = open_store("http://192.168.1.20:8765/?token=...")    # the workshop room
    """
    if str(path_or_url).startswith(("http://", "https://")):
        from labkit.room import RoomClient

        return RoomClient(str(path_or_url), **kwargs)
    return FeedbackStore(path_or_url, **kwargs)

"""Data: the embedded prompt set, demonstrations, user data, and public ranking formats.

InstructGPT's data came in three streams over disjoint prompt sets (Ouyang et al. 2022, §3.2,
Table 6): demonstrations for SFT, K-way rankings for the reward model, and bare prompts for
PPO. labkit ships its own small set in that shape (``labkit/resources``, format in
``docs/dataset_format.md``) and reads user data and two public ranking formats:

- ``load_prompts`` / ``load_demonstrations``: the embedded set (or a user path in the same format).
- ``balanced_sample``: n prompts spread over the categories, the harmful prompts and their benign
  look-alikes, shuffled (a notebook's small sample should not be the first categories of a file).
- ``load_jsonl`` / ``load_csv`` / ``from_dataset``: user prompts (and optional demonstrations),
  with a ``mapping`` from labkit field to user column, e.g. ``{"prompt": "instruction"}``.
- ``load_oasst``: OpenAssistant oasst1 messages -> K-way rankings ``{"prompt", "responses", "tiers"}``.
- ``load_hh_rlhf``: Anthropic HH-RLHF chosen/rejected texts -> pairs ``{"prompt", "chosen", "rejected"}``.

Errors: bad input raises ``ValueError("<file>:<line>: field '<name>': <what is wrong>")``.
Nothing is dropped silently: every loader returns a :class:`Records` list whose ``stats``
dict counts what was read, kept and skipped (and why); when anything was skipped a
``UserWarning`` with the same summary is issued.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import warnings
from collections import Counter, defaultdict
from importlib import resources
from pathlib import Path

from labkit.labelers import validate_check

CATEGORIES = ("generation", "open_qa", "brainstorming", "chat", "rewrite", "summarization",
              "classification", "closed_qa", "extract", "other")
STYLES = ("plain", "few_shot", "user_based")
SPLITS = ("sft", "rm", "ppo", "eval")
SOURCES = ("hand", "template")
PROMPT_FIELDS = ("id", "prompt", "category", "style", "split", "checks", "harmful",
                 "reference", "lookalike", "source")


class Records(list):
    """A ``list`` of record dicts with ``stats``: counts of what the loader read, kept and skipped."""

    def __init__(self, items=(), stats: dict | None = None):
        super().__init__(items)
        self.stats = dict(stats or {})


def _finish(records: list, stats: dict, what: str) -> Records:
    """Wrap ``records``; warn with a summary when the loader skipped anything."""
    skipped = {k: v for k, v in stats.items() if k.startswith("skipped_") and v}
    if skipped:
        detail = ", ".join(f"{v} {k.removeprefix('skipped_').replace('_', ' ')}" for k, v in skipped.items())
        warnings.warn(f"{what}: kept {len(records)} records; skipped {detail}",
                      stacklevel=3)
    return Records(records, {**stats, "kept": len(records)})


def _error(where: tuple[str, int], field: str | None, message: str) -> ValueError:
    name, line = where
    return ValueError(f"{name}:{line}: " + (f"field {field!r}: " if field else "") + message)


# ----------------------------------------------------------------------------- reading files

def _read_text(path: Path) -> str:
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return path.read_text(encoding="utf-8")


def _parse_jsonl(name: str, text: str):
    """Yield ``((name, line), dict)`` for each non-blank line; bad JSON -> ValueError."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _error((name, lineno), None, f"invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise _error((name, lineno), None, f"expected a JSON object, got {type(obj).__name__}")
        yield (name, lineno), obj


def _jsonl_sources(path: str | Path | None, package_dir: str) -> list[tuple[str, str]]:
    """``(name, text)`` of a user file, of every ``*.jsonl`` in a user folder, or of the package data."""
    if path is None:
        folder = resources.files("labkit") / "resources" / package_dir
        if not folder.is_dir():
            raise FileNotFoundError(f"labkit's embedded data folder resources/{package_dir} is missing")
        files = sorted((f for f in folder.iterdir() if f.name.endswith(".jsonl")), key=lambda f: f.name)
        return [(f"labkit/resources/{package_dir}/{f.name}", f.read_text(encoding="utf-8")) for f in files]
    path = Path(path)
    if path.is_dir():
        files = sorted(list(path.glob("*.jsonl")) + list(path.glob("*.jsonl.gz")))
        return [(str(f), _read_text(f)) for f in files]
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    return [(str(path), _read_text(path))]


# ----------------------------------------------------------------------------- prompt records

def _as_bool(value, where, field):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _error(where, field, f"must be true or false, got {value!r}")


def validate_prompt(rec: dict, where: tuple[str, int]) -> dict:
    """A checked copy of a prompt record with defaults filled; ``ValueError`` naming the field otherwise."""
    out = dict(rec)
    for field in ("id", "prompt", "category", "style", "split"):
        if field not in rec:
            raise _error(where, field, "missing")
        if not isinstance(rec[field], str) or not rec[field].strip():
            raise _error(where, field, f"must be a non-empty string, got {rec[field]!r}")
    for field, allowed in (("category", CATEGORIES), ("style", STYLES), ("split", SPLITS)):
        if rec[field] not in allowed:
            raise _error(where, field, f"unknown value {rec[field]!r}; expected one of {list(allowed)}")
    checks = rec.get("checks", [])
    if not isinstance(checks, list):
        raise _error(where, "checks", f"must be a list, got {type(checks).__name__}")
    for i, check in enumerate(checks):
        try:
            validate_check(check)
        except ValueError as e:
            raise _error(where, "checks", f"check {i}: {e}") from None
    out["checks"] = checks
    if "reference" in rec and rec["reference"] is not None:
        if not isinstance(rec["reference"], str) or not rec["reference"].strip():
            raise _error(where, "reference", f"must be a non-empty string, got {rec['reference']!r}")
    else:
        out.pop("reference", None)
    out["harmful"] = _as_bool(rec.get("harmful", False), where, "harmful")
    if "lookalike" in rec:
        out["lookalike"] = _as_bool(rec["lookalike"], where, "lookalike")
    out["source"] = rec.get("source", "hand")
    if out["source"] not in SOURCES:
        raise _error(where, "source", f"unknown value {out['source']!r}; expected one of {list(SOURCES)}")
    return out


def _check_split_arg(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")


def load_prompts(split: str | None = None, path: str | Path | None = None) -> Records:
    """Prompt records of the embedded set (or of ``path``: a JSONL file or a folder of them).

    >>> sft = load_prompts("sft")                      # the embedded SFT split
    >>> mine = load_prompts(path="my_prompts.jsonl")    # same format, validated the same way
    """
    _check_split_arg(split)
    seen: dict[str, tuple[str, int]] = {}
    records = []
    for name, text in _jsonl_sources(path, "prompts"):
        stem = Path(name).name.split(".")[0]
        for where, rec in _parse_jsonl(name, text):
            rec = validate_prompt(rec, where)
            if path is None and stem in SPLITS and rec["split"] != stem:
                raise _error(where, "split", f"{rec['split']!r} in the file of split {stem!r}")
            if rec["id"] in seen:
                first = seen[rec["id"]]
                raise _error(where, "id", f"duplicate id {rec['id']!r} (first at {first[0]}:{first[1]})")
            seen[rec["id"]] = where
            records.append(rec)
    kept = [r for r in records if split is None or r["split"] == split]
    return Records(kept, {"read": len(records), "kept": len(kept)})


def balanced_sample(records: list[dict], n: int, seed: int = 0) -> list[dict]:
    """``n`` records spread evenly over groups, in shuffled order: harmful prompts, their benign
    look-alikes, and each category of the rest. Groups take turns (in a shuffled order), each
    giving a random record it has left, until ``n`` are drawn; a group that runs out drops out.
    The same ``records``, ``n`` and ``seed`` give the same sample."""
    rng = random.Random(seed)
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups["harmful" if r.get("harmful") else "lookalike" if r.get("lookalike") else r["category"]].append(r)
    queues = [rng.sample(g, len(g)) for _, g in sorted(groups.items())]
    rng.shuffle(queues)
    picked: list[dict] = []
    while len(picked) < min(n, len(records)):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop())
    rng.shuffle(picked)
    return picked


def load_demonstrations(split: str | None = "sft", path: str | Path | None = None,
                        prompts: list[dict] | None = None) -> Records:
    """Demonstrations joined with their prompts: each record is the prompt record plus ``response``.

    ``path``: demonstration JSONL (file or folder; default the embedded ones); ``prompts``:
    the records to join with (default all embedded prompts).
    """
    _check_split_arg(split)
    by_id = {p["id"]: p for p in (prompts if prompts is not None else load_prompts())}
    seen: dict[str, tuple[str, int]] = {}
    out = []
    for name, text in _jsonl_sources(path, "demonstrations"):
        for where, rec in _parse_jsonl(name, text):
            pid = rec.get("prompt_id")
            if not isinstance(pid, str) or not pid:
                raise _error(where, "prompt_id", f"missing or not a string: {pid!r}")
            if pid not in by_id:
                raise _error(where, "prompt_id", f"unknown prompt id {pid!r}")
            if pid in seen:
                raise _error(where, "prompt_id", f"second demonstration for {pid!r} (first at line {seen[pid][1]})")
            response = rec.get("response")
            if not isinstance(response, str) or not response.strip():
                raise _error(where, "response", f"must be a non-empty string, got {response!r}")
            seen[pid] = where
            out.append({**by_id[pid], "response": response})
    kept = [r for r in out if split is None or r["split"] == split]
    return Records(kept, {"read": len(out), "kept": len(kept)})


# ----------------------------------------------------------------------------- user data

def _user_record(row: dict, where: tuple[str, int], mapping: dict | None, split: str,
                 required: tuple[str, ...]) -> dict:
    """Map a user row to a labkit record (``mapping``: labkit field -> user column) and validate it."""
    mapping = mapping or {}
    for field, column in mapping.items():
        if column not in row:
            raise _error(where, column, f"missing (mapped to labkit field {field!r})")
    rec = {}
    for field in PROMPT_FIELDS + ("response",):
        value = row.get(mapping.get(field, field))
        if value is None or (isinstance(value, str) and not value.strip() and field != "prompt"):
            continue  # empty CSV cell = not given
        rec[field] = value
    for field in required:
        if field not in rec or not isinstance(rec[field], str) or not rec[field].strip():
            raise _error(where, mapping.get(field, field), "missing or empty")
    if isinstance(rec.get("checks"), str):  # a JSON list in a CSV cell
        try:
            rec["checks"] = json.loads(rec["checks"])
        except json.JSONDecodeError:
            raise _error(where, mapping.get("checks", "checks"), "not a JSON list") from None
    rec.setdefault("id", f"{Path(where[0]).stem}-{where[1]:04d}")
    rec["id"] = str(rec["id"])
    rec.setdefault("category", "other")
    rec.setdefault("style", "plain")
    rec.setdefault("split", split)
    try:
        return validate_prompt(rec, where)
    except ValueError as e:  # report the user's column name, not labkit's
        msg = str(e)
        for field, column in mapping.items():
            msg = msg.replace(f"field {field!r}", f"field {column!r}")
        raise ValueError(msg) from None


def _user_rows(rows, mapping, split, required, what) -> Records:
    _check_split_arg(split)
    out, seen = [], {}
    for where, row in rows:
        rec = _user_record(row, where, mapping, split, required)
        if rec["id"] in seen:
            raise _error(where, mapping.get("id", "id") if mapping else "id", f"duplicate id {rec['id']!r}")
        seen[rec["id"]] = where
        out.append(rec)
    return _finish(out, {"read": len(out)}, what)


def load_jsonl(path: str | Path, mapping: dict | None = None, split: str = "sft",
               required: tuple[str, ...] = ("prompt",)) -> Records:
    """User prompts (optionally with ``response``) from JSON Lines; defaults fill missing fields."""
    name = str(path)
    return _user_rows(_parse_jsonl(name, _read_text(Path(path))), mapping, split, required, name)


def load_csv(path: str | Path, mapping: dict | None = None, split: str = "sft",
             required: tuple[str, ...] = ("prompt",)) -> Records:
    """User prompts from a CSV file with a header row (``checks`` as a JSON list in its cell)."""
    name = str(path)
    reader = csv.DictReader(io.StringIO(_read_text(Path(path)), newline=""))
    if reader.fieldnames is None:
        raise _error((name, 1), None, "empty file: expected a header row")

    def rows():
        for row in reader:
            yield (name, reader.line_num), row

    return _user_rows(rows(), mapping, split, required, name)


def from_dataset(ds, mapping: dict | None = None, split: str = "sft",
                 required: tuple[str, ...] = ("prompt",), name: str = "dataset") -> Records:
    """User prompts from a Hugging Face ``datasets.Dataset`` (errors name row numbers, from 1)."""
    return _user_rows((((name, i + 1), dict(row)) for i, row in enumerate(ds)), mapping, split, required, name)


def _records_source(path_or_records, what: str):
    """``(name, [(where, dict)])`` from a JSONL(.gz) path or an in-memory list of dicts."""
    if isinstance(path_or_records, (str, Path)):
        name = str(path_or_records)
        return name, list(_parse_jsonl(name, _read_text(Path(path_or_records))))
    rows = []
    for i, rec in enumerate(path_or_records):
        if not isinstance(rec, dict):
            raise _error((what, i + 1), None, f"expected a dict, got {type(rec).__name__}")
        rows.append(((what, i + 1), rec))
    return what, rows


# ----------------------------------------------------------------------------- OpenAssistant

def _flatten_tree(node: dict, parent_id, where, out: list) -> None:
    """Nested export (``{"prompt": {..., "replies": [...]}}``) -> flat messages."""
    out.append((where, {**{k: v for k, v in node.items() if k != "replies"}, "parent_id": parent_id}))
    for child in node.get("replies") or []:
        _flatten_tree(child, node.get("message_id"), where, out)


def load_oasst(path_or_records, lang: str | None = None) -> Records:
    """K-way rankings from OpenAssistant oasst1 messages (flat JSONL(.gz), list of dicts, or trees).

    One record per prompter message with >= 2 ranked assistant replies:
    ``{"prompt", "responses", "tiers", "prompt_id"}``; ``tiers`` from the replies' ``rank``
    (0 = best; equal ranks tie). Replies with no rank (or deleted) are dropped and counted in
    ``stats``. For a reply deeper in a conversation, ``prompt`` holds the earlier turns as
    ``"Human: ...\\n\\nAssistant: ...\\n\\nHuman: ..."`` (the HH-RLHF convention).
    """
    name, rows = _records_source(path_or_records, "records")
    messages: list[tuple[tuple[str, int], dict]] = []
    for where, rec in rows:
        if isinstance(rec.get("prompt"), dict):  # nested tree export
            _flatten_tree(rec["prompt"], None, where, messages)
        else:
            messages.append((where, rec))
    by_id, children = {}, defaultdict(list)
    for where, m in messages:
        for field in ("message_id", "text", "role"):
            if not isinstance(m.get(field), str) or (field != "text" and not m[field]):
                raise _error(where, field, f"missing or not a string: {m.get(field)!r}")
        if m["role"] not in ("prompter", "assistant"):
            raise _error(where, "role", f"expected 'prompter' or 'assistant', got {m['role']!r}")
        if m.get("rank") is not None and (isinstance(m["rank"], bool) or not isinstance(m["rank"], (int, float))):
            raise _error(where, "rank", f"must be a number or null, got {m['rank']!r}")
        by_id[m["message_id"]] = m
        children[m.get("parent_id")].append((where, m))

    def history(m: dict) -> str:
        turns = []
        while m is not None:
            turns.append(("Human: " if m["role"] == "prompter" else "Assistant: ") + m["text"].strip())
            m = by_id.get(m.get("parent_id"))
        return turns[0][len("Human: "):] if len(turns) == 1 else "\n\n".join(reversed(turns))

    stats = Counter(messages=len(messages))
    out = []
    for m in by_id.values():
        if m["role"] != "prompter" or (lang and m.get("lang") not in (None, lang)):
            continue
        replies = [c for _, c in children.get(m["message_id"], []) if c["role"] == "assistant"]
        if not replies:
            continue
        ranked = []
        for c in replies:
            if c.get("deleted"):
                stats["skipped_deleted_replies"] += 1
            elif c.get("rank") is None:
                stats["skipped_unranked_replies"] += 1
            elif not c["text"].strip():
                stats["skipped_empty_replies"] += 1
            else:
                ranked.append(c)
        if len(ranked) < 2:
            stats["skipped_prompts_with_under_2_ranked_replies"] += 1
            continue
        ranks = sorted({c["rank"] for c in ranked})
        tiers = [[i for i, c in enumerate(ranked) if c["rank"] == r] for r in ranks]
        out.append({"prompt": history(m), "responses": [c["text"] for c in ranked], "tiers": tiers,
                    "prompt_id": m["message_id"]})
    return _finish(out, dict(stats), f"load_oasst({name})")


# ----------------------------------------------------------------------------- HH-RLHF

_ASSISTANT = "\n\nAssistant:"
_HUMAN = "\n\nHuman:"


def load_hh_rlhf(path_or_records, strict: bool = True) -> Records:
    """Preference pairs from Anthropic HH-RLHF ``{"chosen", "rejected"}`` conversation texts.

    ``prompt`` is the shared conversation before the last ``"\\n\\nAssistant:"``: the human turn
    alone for one-turn conversations, else all turns as ``"Human: ...\\n\\nAssistant: ...\\n\\nHuman: ..."``.
    Each record also carries the K-way form (``responses`` = [chosen, rejected], ``tiers`` = [[0], [1]]).
    ``strict=False`` skips (and counts) malformed records instead of raising.
    """
    name, rows = _records_source(path_or_records, "records")
    stats = Counter(read=len(rows))
    out = []
    for where, rec in rows:
        try:
            parts = {}
            for field in ("chosen", "rejected"):
                text = rec.get(field)
                if not isinstance(text, str):
                    raise _error(where, field, f"missing or not a string: {text!r}")
                cut = text.rfind(_ASSISTANT)
                if cut < 0 or _HUMAN not in text[:cut]:
                    raise _error(where, field, "no '\\n\\nHuman:' turn followed by a '\\n\\nAssistant:' turn")
                parts[field] = (text[:cut], text[cut + len(_ASSISTANT):].strip())
            if parts["chosen"][0] != parts["rejected"][0]:
                raise _error(where, "rejected", "its conversation before the last Assistant turn differs from 'chosen'")
        except ValueError:
            if strict:
                raise
            stats["skipped_malformed"] += 1
            continue
        prefix, chosen, rejected = parts["chosen"][0], parts["chosen"][1], parts["rejected"][1]
        if not chosen or not rejected or chosen == rejected:
            stats["skipped_empty_or_identical"] += 1
            continue
        body = prefix.lstrip("\n")
        prompt = body[len("Human:"):].strip() if body.count(_HUMAN) == 0 and _ASSISTANT not in body else body
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                    "responses": [chosen, rejected], "tiers": [[0], [1]]})
    return _finish(out, dict(stats), f"load_hh_rlhf({name})")


# ----------------------------------------------------------------------------- summary

def dataset_summary(records: list[dict]) -> dict:
    """Counts per split, category, style and check type (what ``labkit info`` prints)."""
    checks = Counter(c["type"] for r in records for c in r.get("checks", []))
    return {
        "n": len(records),
        "split": dict(sorted(Counter(r.get("split") for r in records).items())),
        "category": dict(sorted(Counter(r.get("category") for r in records).items())),
        "style": dict(sorted(Counter(r.get("style") for r in records).items())),
        "source": dict(sorted(Counter(r.get("source", "hand") for r in records).items())),
        "checks": dict(sorted(checks.items())),
        "with_checks": sum(bool(r.get("checks")) for r in records),
        "with_reference": sum(bool(r.get("reference")) for r in records),
        "harmful": sum(bool(r.get("harmful")) for r in records),
        "lookalike": sum(bool(r.get("lookalike")) for r in records),
    }

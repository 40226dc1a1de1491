"""Notebook widgets for human feedback: write demonstrations, rank K responses, judge A/B.

Each widget is a small state machine in Python, with its state in traits, so it can be
driven without a browser (``w.rank(2); w.tie(); w.rank(0); w.submit()``) and every submit
goes straight into a :class:`labkit.feedback.FeedbackStore` in one transaction (a kernel
crash loses at most the item on screen). Nothing blocks a cell: the widget returns at once
and reacts to clicks.

- :class:`RankingWidget` is an anywidget "ranking board": click responses best to worst
  (or press 1-9), ``t`` ties the next one with the previous, ``u``/Backspace undoes,
  Enter submits, ``s`` skips; drag a card onto another to put it just above (Shift: tie). ``ui="classic"`` shows the same state machine with plain
  ipywidgets, for front ends that do not load anywidget modules.
- :class:`DemonstrationWidget` shows a prompt and its instructions, checked live against
  the draft (``labkit.labelers.run_check``).
- :class:`ComparisonWidget` is a blind A/B judgement: sides shuffled by a seeded RNG, model
  names hidden until the choice is stored (with the true names).

The interface follows the InstructGPT labeling tool (Ouyang et al. 2022, Appendix B,
Fig. 12): the prompt with its instructions, K outputs to rank, an overall 1-7 score and
metadata flags. Model outputs are untrusted text: the board sets ``textContent`` only and
the classic views ``html.escape`` everything, so a response is never run as HTML or JS.
"""

from __future__ import annotations

import html
import os
import random
import time
from pathlib import Path
from typing import Callable

import anywidget
import ipywidgets as W
import traitlets as T

from labkit.feedback import FLAGS, MAX_K, MIN_K, FeedbackStore, open_store
from labkit.labelers import describe_check, run_check
from labkit.rankings import tier_of

_ASSETS = Path(__file__).parent / "resources" / "widgets"


# ----------------------------------------------------------------------------- shared helpers

def _record_of(item: dict) -> dict:
    """The prompt record behind an item: the item itself or its ``record`` entry."""
    return item.get("record") or item


def _item_id(item: dict) -> str:
    return str(item.get("item_id") or item.get("prompt_id") or item.get("id"))


def _run_check(check: dict, text: str) -> bool | None:
    """The gold check, or None where ``labkit.labelers`` cannot judge it."""
    try:
        return run_check(check, text)
    except ValueError:
        return None


class _Session:
    """One annotator's pass over a widget's items: what is left, the item on screen, its clock.

    The three widgets share it. Items the annotator finished (in the store) are left out, so a
    session resumes where it stopped. A widget provides ``annotator``, ``message``, ``_next()``
    (show ``advance()``'s item), ``_draw_progress()`` and ``_save(status, answer)``.
    """

    def __init__(self, store: FeedbackStore, items: list[dict], kind: str):
        self.store, self.items, self.kind = store, items, kind
        self.left: list[dict] = list(items)
        self.current: dict | None = None  # the item on screen
        self.shown_at = time.monotonic()

    @property
    def done(self) -> int:
        return len(self.items) - len(self.left)

    def seconds(self) -> float:
        """Time spent on the item on screen."""
        return round(time.monotonic() - self.shown_at, 3)

    def advance(self) -> dict | None:
        """Make the first item left the current one (None when all are done) and start its clock."""
        self.current = self.left[0] if self.left else None
        self.shown_at = time.monotonic()
        return self.current

    def resume(self, widget) -> None:
        """Re-read what ``widget.annotator`` finished; the item on screen stays if still open
        (a name typed mid-item keeps it), else the next item shows.

        A name is required (it labels every item, and later cells read it from ``widget.annotator``);
        in a room it must be unique: a name another laptop holds is refused and cleared.
        """
        name = widget.annotator.strip()
        if name and hasattr(self.store, "claim"):  # a room client: hold the name for this laptop
            try:
                self.store.claim(name)
            except ValueError as e:
                widget.annotator = ""  # resumes as nobody; then say why
                widget.message = str(e)
                return
        done = self.store.done_ids(name, self.kind) if name else set()
        self.left = [it for it in self.items if _item_id(it) not in done]
        if self.current is None or self.current not in self.left:
            widget._next()
        else:
            self.left.remove(self.current)
            self.left.insert(0, self.current)
            widget._draw_progress()
        if not name and self.current is not None and not widget.message:  # keep a refusal's reason
            widget.message = "Type your name in the Annotator box first: it labels every item you submit."
        elif name and widget.message.startswith("Type your name"):
            widget.message = ""

    def switch(self, widget, name_box: W.Text | None = None) -> None:
        """The annotator changed: keep the name box in step, then resume for that annotator."""
        if name_box is not None and name_box.value.strip() != widget.annotator:
            name_box.value = widget.annotator
        self.resume(widget)

    def skip(self, widget) -> int | None:
        """Record the item on screen as skipped (it will not come back for this annotator); move on."""
        return None if self.current is None else widget._save("skipped", None)

    def save(self, widget, status: str, write: Callable[[], int], saved: str) -> int | None:
        """Store the item on screen with ``write()`` (one transaction) and show the next one; return
        the row id. A ``ValueError`` from the store is shown as the message and nothing moves on."""
        it = self.current
        try:
            row = write()
        except ValueError as e:
            widget.message = f"Not saved: {e}"
            return None
        self.left.remove(it)
        widget._next()
        widget.message = saved if status == "submitted" else f"Skipped {_item_id(it)}."
        return row


_current = property(lambda self: self._session.current,
                    doc="The item on screen (with model names), or None when all are done.")


def _store(store):
    """A store path or room URL opened with ``labkit.feedback.open_store``; a store object
    (``FeedbackStore`` or a room client) as it is."""
    return open_store(store) if isinstance(store, (str, os.PathLike)) else store


def _header(annotator: str, total: int) -> tuple[W.Text, W.IntProgress, W.HTML]:
    """The top row of the classic views: annotator name box, progress bar, progress text."""
    return (W.Text(value=annotator, description="Annotator", placeholder="your name"),
            W.IntProgress(min=0, max=max(total, 1), layout=W.Layout(width="200px")), W.HTML())


def _show_progress(bar: W.IntProgress, label: W.HTML, done: int, total: int) -> None:
    bar.max, bar.value = max(total, 1), done
    thanks = " · all finished, thank you!" if total and done >= total else ""
    label.value = html.escape(f"{done} of {total} done{thanks}")


def _order_text(tiers: list[list[int]]) -> str:
    """Tiers as the annotator sees them, 1-based: ``3 > 1 = 4 > 2``."""
    return " > ".join(" = ".join(str(i + 1) for i in t) for t in tiers)


def _pre(text: str, extra: str = "") -> str:
    """Untrusted text as escaped, wrapped, monospace HTML (classic views)."""
    return (f'<pre style="white-space:pre-wrap;word-break:break-word;margin:0;font-size:13px;{extra}">'
            f"{html.escape(text, quote=True)}</pre>")


# ----------------------------------------------------------------------------- ranking

class RankingWidget(anywidget.AnyWidget):
    """Rank K = 2..9 responses per prompt, best first, with ties; each submit is stored at once.

    >>> w = RankingWidget(store, items, annotator="alice")   # items from generation.sample_k
    >>> w                                                   # shows the board; nothing blocks
    >>> w.rank(2); w.tie(); w.rank(0); w.rank(3); w.submit()  # the same, from Python
    """

    _esm = (_ASSETS / "ranking.js").read_text(encoding="utf-8")
    _css = (_ASSETS / "ranking.css").read_text(encoding="utf-8")

    annotator = T.Unicode("").tag(sync=True)  # who ranks; resume is per annotator
    item = T.Dict().tag(sync=True)  # what the page shows: prompt, responses, checks in words (no model names)
    tiers = T.List().tag(sync=True)  # response indices ranked so far, best first; a tier holds ties
    tie_next = T.Bool(False).tag(sync=True)  # the next rank joins the last tier
    score = T.Int(0).tag(sync=True)  # overall 1-7 Likert score; 0 = not given
    flags = T.List().tag(sync=True)  # names from labkit.feedback.FLAGS
    comment = T.Unicode("").tag(sync=True)
    done = T.Int(0).tag(sync=True)  # items this annotator finished (earlier sessions too)
    total = T.Int(0).tag(sync=True)
    message = T.Unicode("").tag(sync=True)  # last outcome or error, shown under the buttons
    finished = T.Bool(False).tag(sync=True)  # no items left
    flag_names = T.List(list(FLAGS[:3]) + ["harmful_advice"]).tag(sync=True)  # flags offered on the board

    def __init__(self, store: FeedbackStore | str, items: list[dict], annotator: str = "",
                 ui: str = "board", **kwargs):
        if ui not in ("board", "classic"):
            raise ValueError("ui must be 'board' (anywidget) or 'classic' (plain ipywidgets)")
        for n, it in enumerate(items):
            k = len(it.get("responses", []))
            if not MIN_K <= k <= MAX_K or not _item_id(it) or "prompt" not in it:
                raise ValueError(f"item {n} needs prompt_id, prompt and {MIN_K}..{MAX_K} responses (has {k})")
        super().__init__(**kwargs)
        self.store, self.ui = _store(store), ui
        self._session = _Session(self.store, list(items), "ranking")
        self._classic: W.Widget | None = None
        self._classic_ui: _ClassicRanking | None = None
        self.total = len(items)
        self.on_msg(self._on_msg)
        self.annotator = annotator.strip()
        self._session.resume(self)

    # -- the state machine -----------------------------------------------------------------

    current = _current

    @property
    def k(self) -> int:
        return len(self.current["responses"]) if self.current else 0

    def ranked(self) -> list[int]:
        return [i for tier in self.tiers for i in tier]

    def rank(self, i: int) -> None:
        """Give response ``i`` (0-based) the next rank, or tie it with the last one after :meth:`tie`."""
        if self.current is None:
            return
        if not 0 <= i < self.k:
            self.message = f"There is no response {i + 1}; this item has {self.k}."
            return
        if i in self.ranked():
            self.message = f"Response {i + 1} is already ranked; undo (u) to change it."
            return
        tiers = [list(t) for t in self.tiers]
        if self.tie_next and tiers:
            tiers[-1].append(i)
        else:
            tiers.append([i])
        self.tie_next, self.tiers, self.message = False, tiers, ""

    def tie(self) -> None:
        """Toggle: the next response ranked shares the previous one's place."""
        if not self.tiers:
            self.message = "Rank a response first; the next one can then tie with it."
            return
        self.tie_next = not self.tie_next

    def undo(self) -> None:
        """Cancel a pending tie, else un-rank the last ranked response."""
        if self.tie_next:
            self.tie_next = False
            return
        tiers = [list(t) for t in self.tiers]
        if tiers:
            tiers[-1].pop()
            if not tiers[-1]:
                tiers.pop()
        self.tiers, self.message = tiers, ""

    def reset(self) -> None:
        self.tiers, self.tie_next, self.message = [], False, ""

    def move(self, i: int, before: int | None = None, tie: bool = False) -> None:
        """Drag and drop: put response ``i`` in its own tier just above response ``before``'s
        tier (``tie=True``: into that tier); ``before=None`` puts it last. ``i`` may be unranked."""
        if self.current is None or not 0 <= i < self.k or i == before:
            return
        tiers = [[j for j in t if j != i] for t in self.tiers]
        tiers = [t for t in tiers if t]
        if before is None:
            tiers.append([i])
        else:
            target = next((n for n, t in enumerate(tiers) if before in t), None)
            if target is None:  # dropped on an unranked response: nothing to order against
                return
            if tie:
                tiers[target].append(i)
            else:
                tiers.insert(target, [i])
        self.tiers, self.tie_next, self.message = tiers, False, ""

    def submit(self) -> int | None:
        """Store the ranking (one transaction) and show the next item; return the row id.

        With one response left unranked it goes last (or ties the last tier after :meth:`tie`).
        """
        if self.current is None:
            return None
        tiers = [list(t) for t in self.tiers]
        left = [i for i in range(self.k) if i not in self.ranked()]
        if len(left) == 1:
            if self.tie_next and tiers:
                tiers[-1].append(left[0])
            else:
                tiers.append(left)
        elif left:
            self.message = f"Rank every response first ({len(left)} left), or skip this item."
            return None
        return self._save("submitted", tiers)

    def skip(self) -> int | None:
        """Record the item as skipped (it will not come back for this annotator) and move on."""
        return self._session.skip(self)

    def _save(self, status: str, tiers: list[list[int]] | None) -> int | None:
        it = self.current
        return self._session.save(self, status, lambda: self.store.add_ranking(
            it.get("prompt_id") or _item_id(it), it["responses"], tiers, self.annotator, prompt=it["prompt"],
            response_ids=it.get("response_ids"), models=it.get("models"), status=status,
            score=self.score or None, flags=self.flags, comment=self.comment.strip() or None,
            seconds=self._session.seconds(), item_id=_item_id(it)),
            f"Saved {_item_id(it)}: {_order_text(tiers or [])}.")

    def _next(self) -> None:
        with self.hold_sync():
            it = self._session.advance()
            self.tiers, self.tie_next, self.score, self.flags, self.comment = [], False, 0, [], ""
            self.done, self.finished = self._session.done, it is None
            self.item = self._view_of(it) if it else {}
            self.message = "All items are done. Thank you!" if self.finished else ""
        if it is not None and self.annotator:
            self.store.mark_seen(self.annotator, "ranking", _item_id(it))

    def _draw_progress(self) -> None:
        self.done = self._session.done

    @staticmethod
    def _view_of(it: dict) -> dict:
        rec = _record_of(it)
        k = len(it["responses"])
        return {"prompt_id": _item_id(it), "prompt": it["prompt"], "responses": list(it["responses"]),
                "truncated": [bool(t) for t in (it.get("truncated") or [False] * k)],  # from sample_k: hit the limit
                "category": rec.get("category", ""), "checks": [describe_check(c) for c in rec.get("checks", [])]}

    @T.observe("annotator")
    def _annotator_changed(self, change) -> None:
        if change["new"] != change["new"].strip():
            self.annotator = change["new"].strip()
            return
        if hasattr(self, "_session"):
            self._session.switch(self)

    def _on_msg(self, _widget, content: dict, _buffers) -> None:
        """Commands from the board: {"cmd": "rank", "index": i} | {"cmd": "move", "index": i,
        "before": j | None, "tie": bool} | tie | undo | reset | submit | skip."""
        cmd = content.get("cmd")
        if cmd == "rank":
            self.rank(int(content.get("index", -1)))
        elif cmd == "move":
            before = content.get("before")
            self.move(int(content.get("index", -1)), None if before is None else int(before), bool(content.get("tie")))
        elif cmd in ("tie", "undo", "reset", "submit", "skip"):
            getattr(self, cmd)()

    # -- display -----------------------------------------------------------------------------

    def _repr_mimebundle_(self, **kwargs):
        if self.ui == "classic":
            return self.classic_view()._repr_mimebundle_(**kwargs)
        return super()._repr_mimebundle_(**kwargs)

    def classic_view(self) -> W.Widget:
        """The same state machine as plain ipywidgets (buttons instead of click-to-rank cards)."""
        if self._classic is None:
            self._classic_ui = _ClassicRanking(self)
            self._classic = self._classic_ui.box
        return self._classic


class _ClassicRanking:
    """Plain-ipywidgets view of a :class:`RankingWidget` (no keyboard shortcuts, no custom JS)."""

    def __init__(self, w: RankingWidget):
        self.w = w
        self.name, self.progress, self.progress_label = _header(w.annotator, w.total)
        self.prompt = W.HTML()
        self.cards = W.HTML()
        self.rank_buttons = W.HBox()
        self.order = W.HTML()
        buttons = [("Tie with previous", w.tie, ""), ("Undo", w.undo, ""), ("Reset", w.reset, ""),
                   ("Skip", w.skip, "warning"), ("Submit", w.submit, "success")]
        self.toolbar = W.HBox([self._button(text, fn, style) for text, fn, style in buttons])
        self.score = W.Dropdown(options=[("no score", 0)] + [(str(s), s) for s in range(1, 8)],
                                description="Score 1-7")
        self.flag_boxes = {f: W.Checkbox(description=f.replace("_", " "), indent=False) for f in w.flag_names}
        self.comment = W.Text(description="Comment")
        self.message = W.HTML()
        meta = W.HBox([self.score, *self.flag_boxes.values()])
        self.box = W.VBox([W.HBox([self.name, self.progress, self.progress_label]), self.prompt, self.cards,
                           self.rank_buttons, self.order, meta, self.comment, self.toolbar, self.message])
        self.box.add_class("lk-classic")
        # view -> state
        self.name.observe(lambda c: setattr(w, "annotator", c["new"]), "value")
        self.score.observe(lambda c: setattr(w, "score", c["new"]), "value")
        self.comment.observe(lambda c: setattr(w, "comment", c["new"]), "value")
        for f, cb in self.flag_boxes.items():
            cb.observe(lambda c, f=f: setattr(w, "flags", sorted(set(w.flags) ^ {f}, key=FLAGS.index)), "value")
        # state -> view
        w.observe(lambda _: self.draw_item(), "item")
        w.observe(lambda _: self.draw_state(), ["tiers", "tie_next", "done", "message", "score", "flags", "comment"])
        self.draw_item()

    @staticmethod
    def _button(text, fn, style):
        b = W.Button(description=text, button_style=style, layout=W.Layout(width="auto"))
        b.on_click(lambda _: fn())
        return b

    def draw_item(self) -> None:
        item, w = self.w.item, self.w
        if not item:
            self.prompt.value, self.cards.value, self.rank_buttons.children = "", "", ()
            self.draw_state()
            return
        checks = "".join(f"<li>{html.escape(c)}</li>" for c in item["checks"])
        self.prompt.value = (f"<b>{html.escape(item['prompt_id'])}</b> <i>{html.escape(item['category'])}</i>"
                             + _pre(item["prompt"], "padding:6px;background:#f4f6fa;border-radius:6px")
                             + (f"<div>The answer must have:</div><ul style='margin:2px 0'>{checks}</ul>" if checks else ""))
        buttons = []
        for i in range(len(item["responses"])):
            b = W.Button(description=f"Rank {i + 1}", layout=W.Layout(width="auto"))
            b.on_click(lambda _, i=i: w.rank(i))
            buttons.append(b)
        self.rank_buttons.children = buttons
        self.draw_state()

    def draw_state(self) -> None:
        w, item = self.w, self.w.item
        _show_progress(self.progress, self.progress_label, w.done, w.total)
        tiers = tier_of(w.tiers)
        cards = []
        cut_off = item.get("truncated") or []
        for i, text in enumerate(item.get("responses", [])):
            badge = f"#{tiers[i] + 1}" if i in tiers else "–"
            color = "#2e7d32" if i in tiers else "#999"
            cut = (" <span class='lk-cutoff' style='color:#b26a00'>✂ cut off (hit the length limit)</span>"
                   if i < len(cut_off) and cut_off[i] else "")
            cards.append(f"<div style='border:1px solid {color};border-radius:8px;padding:6px 8px;margin:4px 0'>"
                         f"<b>Response {i + 1}</b> <span style='color:{color};font-weight:bold'>{badge}</span>{cut}"
                         f"{_pre(text)}</div>")
        self.cards.value = "".join(cards)
        order = _order_text(w.tiers)
        self.order.value = html.escape(f"Ranking: {order or '(click the responses, best first)'}"
                                       + ("  [next ties]" if w.tie_next else ""))
        self.message.value = html.escape(w.message)
        if self.score.value != w.score:
            self.score.value = w.score
        for f, cb in self.flag_boxes.items():
            if cb.value != (f in w.flags):
                cb.value = f in w.flags
        if self.comment.value != w.comment:
            self.comment.value = w.comment


# ----------------------------------------------------------------------------- demonstrations

class DemonstrationWidget(W.VBox):
    """Write the desired answer to each prompt (SFT data); the prompt's instructions are checked live.

    >>> DemonstrationWidget(store, labkit.data.load_prompts("sft")[:20], annotator="alice")
    """

    annotator = T.Unicode("")  # who writes; resume is per annotator
    draft = T.Unicode("")  # the text in the editor
    check_results = T.List()  # one entry per check of the prompt: True / False / None (unknown)
    done = T.Int(0)
    total = T.Int(0)
    message = T.Unicode("")
    finished = T.Bool(False)

    def __init__(self, store: FeedbackStore | str, prompts: list[dict], annotator: str = "", **kwargs):
        super().__init__(**kwargs)
        self.store = _store(store)
        self._session = _Session(self.store, [dict(p, prompt_id=_item_id(p)) for p in prompts], "demonstration")
        self.total = len(prompts)
        self.name, self.progress, self.progress_label = _header(annotator, self.total)
        self.prompt_html = W.HTML()
        self.checks_html = W.HTML()
        self.editor = W.Textarea(placeholder="Write the answer you would want the model to give...",
                                 layout=W.Layout(width="100%", height="180px"), continuous_update=True)
        submit = W.Button(description="Submit", button_style="success")
        skip = W.Button(description="Skip", button_style="warning")
        submit.on_click(lambda _: self.submit())
        skip.on_click(lambda _: self.skip())
        self.message_html = W.HTML()
        self.children = [W.HBox([self.name, self.progress, self.progress_label]), self.prompt_html,
                         self.checks_html, self.editor, W.HBox([submit, skip]), self.message_html]
        self.add_class("lk-demo")
        T.link((self.editor, "value"), (self, "draft"))
        self.name.observe(lambda c: setattr(self, "annotator", c["new"].strip()), "value")
        self.observe(lambda _: self._draw_checks(), "draft")
        self.observe(lambda _: setattr(self.message_html, "value", html.escape(self.message)), "message")
        self.annotator = annotator.strip()
        self._session.resume(self)

    current = _current

    def write(self, text: str) -> None:
        """Set the draft, as typing would."""
        self.draft = text

    def submit(self) -> int | None:
        return None if self.current is None else self._save("submitted", self.draft)

    def skip(self) -> int | None:
        return self._session.skip(self)

    def _save(self, status: str, text: str | None) -> int | None:
        it = self.current
        return self._session.save(self, status, lambda: self.store.add_demonstration(
            it["prompt_id"], it["prompt"], text if status == "submitted" else "", self.annotator, status=status,
            seconds=self._session.seconds()), f"Saved {it['prompt_id']}.")

    def _next(self) -> None:
        it = self._session.advance()
        self.finished = it is None
        self.draft, self.message = "", ("All prompts are done. Thank you!" if self.finished else "")
        if it is None:
            self.prompt_html.value = ""
        else:
            self.prompt_html.value = (
                f"<div><b>{html.escape(it['prompt_id'])}</b> · <i>{html.escape(it.get('category', ''))}</i>"
                f" · {html.escape(it.get('style', ''))}</div>"
                + _pre(it["prompt"], "padding:8px;background:#f4f6fa;border-radius:6px;margin:4px 0"))
        self._draw_checks()
        self._draw_progress()

    def _draw_progress(self) -> None:
        self.done = self._session.done
        _show_progress(self.progress, self.progress_label, self.done, self.total)

    def _draw_checks(self) -> None:
        checks = (self.current or {}).get("checks", [])
        self.check_results = [_run_check(c, self.draft) for c in checks]
        marks = {True: ("✓", "#2e7d32"), False: ("✗", "#c62828"), None: ("·", "#777")}
        rows = "".join(f"<li style='color:{marks[ok][1]}'>{marks[ok][0]} {html.escape(describe_check(c))}</li>"
                       for c, ok in zip(checks, self.check_results))
        self.checks_html.value = (f"<div>The answer must have:</div><ul style='list-style:none;margin:2px 0'>{rows}</ul>"
                                  if rows else "")

    @T.observe("annotator")
    def _annotator_changed(self, change) -> None:
        if hasattr(self, "_session"):
            self._session.switch(self, self.name)


# ----------------------------------------------------------------------------- A/B comparisons

class ComparisonWidget(W.VBox):
    """Blind A/B judgement of two responses per prompt (evaluation by humans, BRIEF §2).

    Items: ``{"prompt_id", "prompt", "responses": [r0, r1], "models": [m0, m1]}``. Which
    response shows as "A" is drawn per item from ``random.Random(f"{seed}:{item_id}")``, so
    it is reproducible and independent of order; the store keeps the item's own order
    (``choice`` 'a' = ``responses[0]``) with the true model names.
    """

    annotator = T.Unicode("")
    shown = T.List()  # [index shown as A, index shown as B] into the item's responses
    revealed = T.Unicode("")  # the models behind A and B of the last judged item
    done = T.Int(0)
    total = T.Int(0)
    message = T.Unicode("")
    finished = T.Bool(False)

    def __init__(self, store: FeedbackStore | str, items: list[dict], annotator: str = "", seed: int = 0,
                 **kwargs):
        for n, it in enumerate(items):
            if len(it.get("responses", [])) != 2 or not _item_id(it):
                raise ValueError(f"item {n} needs a prompt_id and exactly 2 responses")
        super().__init__(**kwargs)
        self.store, self.seed = _store(store), seed
        self._session = _Session(self.store, list(items), "comparison")
        self.total = len(items)
        self.name, self.progress, self.progress_label = _header(annotator, self.total)
        self.prompt_html = W.HTML()
        self.side_a, self.side_b = W.HTML(layout=W.Layout(width="50%")), W.HTML(layout=W.Layout(width="50%"))
        buttons = []
        for text, choice, style in (("A is better", "A", "info"), ("Tie", "tie", ""),
                                    ("B is better", "B", "info"), ("Skip", "skip", "warning")):
            b = W.Button(description=text, button_style=style)
            b.on_click(lambda _, c=choice: self.skip() if c == "skip" else self.choose(c))
            buttons.append(b)
        self.message_html = W.HTML()
        self.children = [W.HBox([self.name, self.progress, self.progress_label]), self.prompt_html,
                         W.HBox([self.side_a, self.side_b]), W.HBox(buttons), self.message_html]
        self.add_class("lk-ab")
        self.name.observe(lambda c: setattr(self, "annotator", c["new"].strip()), "value")
        self.observe(lambda _: setattr(self.message_html, "value", html.escape(self.message)), "message")
        self.annotator = annotator.strip()
        self._session.resume(self)

    current = _current

    def choose(self, side: str) -> int | None:
        """Judge the item on screen: 'A', 'B' (as displayed) or 'tie'; store it and move on."""
        if self.current is None:
            return None
        if side not in ("A", "B", "tie"):
            raise ValueError("side must be 'A', 'B' or 'tie'")
        choice = "tie" if side == "tie" else "ab"[self.shown[0 if side == "A" else 1]]
        return self._save("submitted", choice)

    def skip(self) -> int | None:
        return self._session.skip(self)

    def _save(self, status: str, choice: str | None) -> int | None:
        it = self.current
        models = list(it.get("models") or [None, None])
        revealed = "A was {}, B was {}".format(*(models[i] or "unnamed" for i in self.shown))

        def write() -> int:
            row = self.store.add_comparison(
                it.get("prompt_id") or _item_id(it), it.get("prompt"), it["responses"][0], it["responses"][1],
                choice, self.annotator, model_a=models[0], model_b=models[1], a_shown_first=self.shown[0] == 0,
                status=status, seconds=self._session.seconds(), item_id=_item_id(it))
            self.revealed = revealed  # the names only once the judgement is stored
            return row

        return self._session.save(self, status, write, f"Saved {_item_id(it)}. {revealed}.")

    def _next(self) -> None:
        it = self._session.advance()
        self.finished = it is None
        self.message = "All comparisons are done. Thank you!" if self.finished else ""
        if it is None:
            self.shown, self.prompt_html.value, self.side_a.value, self.side_b.value = [], "", "", ""
        else:
            flip = random.Random(f"{self.seed}:{_item_id(it)}").random() < 0.5
            self.shown = [1, 0] if flip else [0, 1]
            self.prompt_html.value = (f"<b>{html.escape(_item_id(it))}</b>"
                                      + _pre(it.get("prompt", ""), "padding:8px;background:#f4f6fa;border-radius:6px"))
            box = "border:1px solid #bbb;border-radius:8px;padding:8px;margin:4px"
            for view, label, idx in ((self.side_a, "A", self.shown[0]), (self.side_b, "B", self.shown[1])):
                view.value = f"<div style='{box}'><b>{label}</b>{_pre(it['responses'][idx])}</div>"
        self._draw_progress()

    def _draw_progress(self) -> None:
        self.done = self._session.done
        _show_progress(self.progress, self.progress_label, self.done, self.total)

    @T.observe("annotator")
    def _annotator_changed(self, change) -> None:
        if hasattr(self, "_session"):
            self._session.switch(self, self.name)

from labkit.chat import ChatWidget  # noqa: E402,F401  (the chat playground lives in labkit/chat.py)

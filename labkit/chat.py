"""A chat playground: type a prompt, watch several models answer it side by side.

Base, SFT and PPO (any ``{name: (model, tokenizer)}``) answer the same prompt, streamed token
by token, all columns growing together. Each answer then shows its reward-model score and
the gold labeler's verdict (checks passed, stopped on its own, refusal), so the effect of
each stage is visible on prompts the participant makes up. The "beat the reward model" box
scores the participant's own answer with the same RM: writing an answer the RM likes more
than PPO's, and seeing whether the gold labeler agrees, is reward hacking by hand.

Typed prompts are kept in the feedback store with their author as *user-based* prompts
(InstructGPT §3.2: prompts written by labelers and users). The store has no prompt table
yet, so each one is a skipped demonstration whose comment marks it (:func:`user_prompts`
reads them back); training only reads submitted demonstrations.

Model outputs are untrusted text: every answer, prompt and name is ``html.escape``-d before
it reaches an HTML view, as in :mod:`labkit.widgets`.

>>> w = ChatWidget({"base": (base, tok), "sft": (sft, tok), "ppo": (ppo, tok)},
...                reward=(rm, tok), store=store, author="alice")
>>> w                                   # type a prompt, press Ask
>>> w.ask("Name three fruits in lowercase.")    # the same from Python
>>> w.score_answer("apple, pear and plum")      # your own answer's RM score
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterator

import ipywidgets as W
import traitlets as T

from labkit.data import CATEGORIES
from labkit.feedback import FeedbackStore, prompt_key
from labkit.generation import stream  # text pieces of one response, as tokens are sampled
from labkit.labelers import GoldLabeler, describe_check, is_refusal

USER_PROMPT_PREFIX = "user-"  # prompt ids of typed prompts: "user-" + 10 hex digits of the text
DRAW_EVERY_S = 0.1  # redraw the answers at most this often while they stream


# ----------------------------------------------------------------------------- streaming

def interleave(streams: dict[str, Iterator[str]]) -> Iterator[tuple[str, str]]:
    """``(name, piece)`` taking one piece from each stream in turn, so all answers grow together."""
    live = dict(streams)
    while live:
        for name in list(live):
            try:
                yield name, next(live[name])
            except StopIteration:
                del live[name]


# ----------------------------------------------------------------------------- typed prompts

def user_prompts(store: FeedbackStore, author: str | None = None) -> list[dict]:
    """Prompts typed into a :class:`ChatWidget`, as prompt records (``style`` "user_based",
    no checks, ``split`` None, plus ``author``), oldest first."""
    out = []
    for row in store.demonstrations(annotator=author, status="skipped"):
        try:
            meta = json.loads(row.get("comment") or "{}")
        except json.JSONDecodeError:
            continue
        if isinstance(meta, dict) and meta.get("kind") == "user_prompt":
            out.append({"id": row["prompt_id"], "prompt": row["prompt"], "category": meta.get("category", "other"),
                        "style": "user_based", "split": None, "checks": [], "author": row["annotator"],
                        "created": row["created"]})
    return out


def _reward_pair(reward, models: dict) -> tuple:
    """(RewardModel, tokenizer) from a pair or a bare RM (then the first model's tokenizer)."""
    if reward is None or isinstance(reward, tuple):
        return reward or (None, None)
    return reward, next(iter(models.values()))[1]


# ----------------------------------------------------------------------------- the widget

class ChatWidget(W.VBox):
    """Ask once; every model answers side by side, streamed, with its RM score and gold checks.

    ``models``: ``{name: (model, tokenizer)}``; ``reward``: ``(RewardModel, tokenizer)`` or a
    bare ``RewardModel``; ``store``: where typed prompts are kept (``author`` names them);
    ``prompts``: optional prompt records (``labkit.data.load_prompts``) offered in a menu,
    whose checks the gold labeler then applies.
    """

    author = T.Unicode("")  # who types; stored with each prompt
    prompt = T.Unicode("")  # the prompt last asked
    answers = T.Dict()  # model name -> answer text (so far, while streaming)
    scores = T.Dict()  # model name -> RM score of its answer
    gold = T.Dict()  # model name -> gold verdict: score, checks [(words, passed)], stopped, refusal
    user_answer = T.Unicode("")  # the "beat the reward model" draft
    user_score = T.Float(None, allow_none=True)  # its RM score once scored
    message = T.Unicode("")
    busy = T.Bool(False)  # True while answers stream

    def __init__(self, models: dict[str, tuple], reward=None, store: FeedbackStore | str | None = None,
                 author: str = "", prompts: list[dict] | None = None, max_new_tokens: int = 96,
                 temperature: float = 0.7, top_p: float = 0.9, seed: int | None = None,
                 labeler: GoldLabeler | None = None, **kwargs):
        if not models:
            raise ValueError("ChatWidget needs at least one model: {name: (model, tokenizer)}")
        super().__init__(**kwargs)
        self.models = dict(models)
        self.rm, self.rm_tokenizer = _reward_pair(reward, self.models)
        self.store = FeedbackStore(store) if isinstance(store, str) else store
        self.labeler = labeler or GoldLabeler()
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed
        self.record: dict | None = None  # the prompt record last asked
        self.truncated: dict[str, bool] = {}

        self.name = W.Text(value=author, description="Your name", placeholder="kept with your prompts")
        self.menu = W.Dropdown(options=[("(type your own)", None)] + [(f"{p['id']}: {p['prompt'][:60]}", p)
                                                                      for p in (prompts or [])],
                               description="Prompt set", layout=W.Layout(display="" if prompts else "none"))
        self.category = W.Dropdown(options=CATEGORIES, value="other", description="Category")
        self.editor = W.Textarea(placeholder="Ask the models anything...", layout=W.Layout(width="100%", height="70px"))
        ask = W.Button(description="Ask", button_style="primary")
        ask.on_click(lambda _: self.ask())
        self.columns = [W.HTML(layout=W.Layout(width=f"{100 / len(self.models):.1f}%")) for _ in self.models]
        self.beat_editor = W.Textarea(placeholder="Write an answer you think the reward model will like more...",
                                      layout=W.Layout(width="100%", height="70px"))
        beat = W.Button(description="Score my answer", button_style="info")
        beat.on_click(lambda _: self.score_answer())
        self.beat_html = W.HTML()
        self.message_html = W.HTML()
        self.children = [W.HBox([self.name, self.category]), self.menu, self.editor, ask, W.HBox(self.columns),
                         W.HTML("<b>Beat the reward model</b>"), self.beat_editor, beat, self.beat_html,
                         self.message_html]
        self.add_class("lk-chat")
        T.link((self.beat_editor, "value"), (self, "user_answer"))
        self.name.observe(lambda c: setattr(self, "author", c["new"].strip()), "value")
        self.menu.observe(self._picked, "value")
        self.observe(lambda _: setattr(self.message_html, "value", html.escape(self.message)), "message")
        self.author = author.strip()
        self._draw()

    # -- asking ------------------------------------------------------------------------------

    def stream_answers(self, prompt: str | dict) -> Iterator[tuple[str, str]]:
        """``(model name, piece)`` in the order they are generated; ``answers`` grows as they come."""
        self.record = self._record_of(prompt)
        self.prompt = self.record["prompt"]
        self.answers, self.scores, self.gold, self.user_score = {n: "" for n in self.models}, {}, {}, None
        streams = {n: stream(m, tok, self.prompt, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                             top_p=self.top_p, do_sample=self.temperature > 0, seed=self.seed)
                   for n, (m, tok) in self.models.items()}
        for name, piece in interleave(streams):
            self.answers = {**self.answers, name: self.answers[name] + piece}
            yield name, piece

    def ask(self, prompt: str | dict | None = None) -> dict[str, str]:
        """Answer ``prompt`` (default: the editor's text) with every model; return the answers."""
        prompt = self.editor.value if prompt is None else prompt
        text = prompt["prompt"] if isinstance(prompt, dict) else prompt
        if not text.strip():
            self.message = "Type a prompt first."
            return {}
        self.busy, self.message = True, ""
        try:
            last = 0.0
            for _ in self.stream_answers(prompt):
                if time.monotonic() - last > DRAW_EVERY_S:
                    self._draw()
                    last = time.monotonic()
            self._judge()
            self._keep_prompt()
        finally:
            self.busy = False
            self._draw()
        return dict(self.answers)

    def score_answer(self, text: str | None = None) -> float | None:
        """RM score of your own answer to the prompt last asked, shown next to the models'."""
        if text is not None:
            self.user_answer = text
        if self.record is None:
            self.message = "Ask a prompt first; then write your own answer to it."
            return None
        if not self.user_answer.strip():
            self.message = "Write an answer first."
            return None
        if self.rm is None:
            self.message = "No reward model was given: ChatWidget(models, reward=(rm, tokenizer))."
            return None
        self.user_score = self._rm_scores([self.user_answer])[0]
        self.message = ""
        self._draw_beat()
        return self.user_score

    # -- scoring -----------------------------------------------------------------------------

    def _rm_scores(self, answers: list[str]) -> list[float]:
        return self.rm.score(self.rm_tokenizer, [self.prompt] * len(answers), answers, progress=False)

    def _verdict(self, answer: str, truncated: bool) -> dict:
        b = self.labeler.breakdown(self.record, answer, truncated)
        return {"score": b["score"], "checks": [(describe_check(c), bool(c["passed"])) for c in b["checks"]],
                "stopped": not truncated, "refusal": is_refusal(answer)}

    def _judge(self) -> None:
        names = list(self.models)
        # An answer as long as max_new_tokens hit the limit instead of stopping (close enough:
        # re-tokenising the text can differ by a token from what was sampled).
        self.truncated = {n: len(self.models[n][1](self.answers[n], add_special_tokens=False)["input_ids"])
                          >= self.max_new_tokens for n in names}
        if self.rm is not None:
            self.scores = dict(zip(names, self._rm_scores([self.answers[n] for n in names])))
        self.gold = {n: self._verdict(self.answers[n], self.truncated[n]) for n in names}

    # -- prompts -----------------------------------------------------------------------------

    def _record_of(self, prompt: str | dict) -> dict:
        if isinstance(prompt, dict):
            return prompt
        picked = self.menu.value
        if picked is not None and picked["prompt"] == prompt:
            return picked
        return {"id": USER_PROMPT_PREFIX + prompt_key(prompt)[2:], "prompt": prompt, "category": self.category.value,
                "style": "user_based", "checks": [], "typed": True}

    def _keep_prompt(self) -> None:
        """Store a typed prompt once per author (prompts from the set are stored already)."""
        rec = self.record
        if self.store is None or not rec.get("typed"):
            return
        author = self.author or "anonymous"
        if rec["id"] in self.store.done_ids(author, "demonstration"):
            return
        meta = {"kind": "user_prompt", "style": "user_based", "category": rec["category"], "source": "ChatWidget"}
        self.store.add_demonstration(rec["id"], rec["prompt"], "", author, status="skipped",
                                     comment=json.dumps(meta), item_id=rec["id"])

    def _picked(self, change) -> None:
        if change["new"] is not None:
            self.editor.value = change["new"]["prompt"]
            if change["new"].get("category") in CATEGORIES:
                self.category.value = change["new"]["category"]

    # -- display -----------------------------------------------------------------------------

    def _draw(self) -> None:
        from labkit.widgets import _pre

        for view, name in zip(self.columns, self.models):
            answer = self.answers.get(name, "")
            foot = ""
            if name in self.gold:
                g = self.gold[name]
                rm = f"RM {self.scores[name]:+.3f} · " if name in self.scores else ""
                checks = "".join(f"<li style='color:{'#2e7d32' if ok else '#c62828'}'>{'✓' if ok else '✗'} "
                                 f"{html.escape(words)}</li>" for words, ok in g["checks"])
                notes = ["stopped on its own" if g["stopped"] else f"cut at {self.max_new_tokens} tokens"]
                notes += ["refuses"] if g["refusal"] else []
                foot = (f"<div style='margin-top:4px'><b>{rm}gold {g['score']:.2f}</b> · {html.escape(', '.join(notes))}</div>"
                        + (f"<ul style='list-style:none;margin:2px 0;padding-left:4px'>{checks}</ul>" if checks else ""))
            cursor = " ▌" if self.busy else ""
            view.value = (f"<div style='border:1px solid #bbb;border-radius:8px;padding:6px 8px;margin:4px'>"
                          f"<b>{html.escape(name)}</b>{_pre(answer + cursor)}{foot}</div>")
        self._draw_beat()

    def _draw_beat(self) -> None:
        from labkit.widgets import _pre

        if self.user_score is None:
            self.beat_html.value = ""
            return
        above = [n for n, s in self.scores.items() if self.user_score > s]
        below = [n for n, s in self.scores.items() if self.user_score <= s]
        verdict = (f"beats {', '.join(above)}" if above else "beats no model") + (
            f"; not {', '.join(below)}" if below else " — the RM likes yours best")
        gold = self.labeler.score(self.record, self.user_answer)
        self.beat_html.value = (f"<div>Your answer: <b>RM {self.user_score:+.3f}</b> · gold {gold:.2f} · "
                                f"{html.escape(verdict)}</div>" + _pre(self.user_answer, "color:#555"))

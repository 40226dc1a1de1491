"""Labelers: machine-checkable instructions, a gold scorer, and a pool of noisy simulated labelers.

InstructGPT's comparisons came from about 40 contractors who agreed with each other on
about 73% of pairs (Ouyang et al. 2022, §3.4). A workshop has a handful of
people at best, so labkit stands in for the rest with simulated labelers built in three layers:

1. **Checks** (``run_check``): one small pure function per instruction kind listed in
   ``docs/dataset_format.md`` (word limits, bullet counts, lowercase, JSON, ...), and in the
   same table the words a labeler reads for it (``describe_check``).
2. **Gold scorer** (:class:`GoldLabeler`): a deterministic score in [0, 1] from four
   components, each in [0, 1]::

       IF  instruction following = fraction of the prompt's checks passed   (none -> undefined)
       H   honesty               = 1 if the response contains the reference (``contains_reference``;
                                   no reference -> undefined)
       Q   basic quality         = (w_length*L + w_relevance*R + w_info*N + w_ending*E) / (sum of those weights)
                                   * (truncated_factor if the response did not stop else 1)
       S   harmlessness          = harmful prompt -> the response is a refusal;
                                   any other prompt (look-alikes included) -> it is not

       score = 0                                              if the response is empty
             = (S ? 1 : unsafe_factor) * rep * case * Σ w_c·c / Σ w_c   over the defined c in {IF, H, Q}

   where ``rep`` is 1 minus the share of repeated word 4-grams / repeated lines (a degenerate
   loop scores near 0 however well it fits the format), ``case`` is ``shouting_factor`` for an
   answer written in capitals that nobody asked for (:func:`is_shouting`) and 1 otherwise,
   ``L`` rewards a sensible length (short answers are fine for classification, closed QA,
   extraction, rewrites, few-shot, one-of and "just the name" prompts; very long ones decay),
   ``R`` is a graded relevance signal: ``floor + (1 - floor) * (1 - exp(-shared / need))`` over
   the content words (crude stems, stop words and generic instruction verbs left out) the response shares with
   the prompt (a poem about a lighthouse need not say "lighthouse", so sharing none lowers R to
   ``relevance_floor``, not to 0), ``N`` is informativeness, ``1 - exp(-distinct content
   stems / info_scale)`` (1 where a short answer is fine), and ``E`` is 1 when the answer ends
   cleanly (:func:`ends_cleanly`: a full stop, a list item, a short label) and
   ``unfinished_ending`` otherwise.
   R and N are graded, not pass/fail, so two different answers rarely get exactly the same
   score (a tie teaches the reward model nothing and makes labelers order the pair by noise);
   prompts without checks or reference still get a discriminating score through Q and S.
3. **Simulated labelers** (:class:`SimulatedLabeler`): utility = gold score + small
   per-labeler biases (length, format strictness, ...) + Gaussian noise, then rank; a labeler
   ties answers it cannot tell apart (utilities within ``tie_threshold`` of a tier's best),
   as InstructGPT's labelers could. A labeler with a room persona adds ``persona_bonus`` to an
   answer that shows the persona's trait and takes up its prompt (:meth:`GoldLabeler.on_topic`:
   a stock reply that happens to show the trait gets nothing for it). The default noise and tie
   threshold are calibrated (:func:`measure_agreement`, ``benchmarks/labeler_agreement.py``) so
   two labelers agree on about 73% of the pairs both order.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import re
import string
from dataclasses import dataclass, field
from typing import Callable

from labkit.rankings import n_comparisons, pair_stats, pooled_agreement, tiers_from_scores

# ----------------------------------------------------------------------------- text helpers

# A word is a maximal run of letters, digits, apostrophes and hyphens holding at least one
# letter or digit (so a bullet's "-" is not a word).
_WORD_RUN = re.compile(r"(?:[^\W_]|['’-])+")
_ALNUM = "[^\\W_]"
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_BULLET = re.compile(r"^\s*[-*] ", re.MULTILINE)
_NUMBERED = re.compile(r"^\s*\d+\.(?:\s|$)", re.MULTILINE)
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_JSON_FENCE = re.compile(r"^```(?:json)?[ \t]*\n(.*?)\n?```$", re.DOTALL | re.IGNORECASE)
_TITLE = re.compile(r"<<[^<>\n]*\S[^<>\n]*>>")


def words(text: str) -> list[str]:
    """The words of ``text`` (see the dataset format doc), in order, case kept."""
    return [w for w in _WORD_RUN.findall(text) if any(c.isalnum() for c in w)]


def sentences(text: str) -> list[str]:
    """Sentences: pieces between ``.``/``!``/``?`` followed by whitespace or the end."""
    return [s.strip() for s in _SENTENCE_END.split(text) if any(c.isalnum() for c in s)]


def contains_phrase(text: str, phrase: str) -> bool:
    """True when ``phrase`` occurs in ``text`` as whole words, ignoring case and spacing."""
    parts = phrase.split()
    if not parts:
        return False
    body = r"\s+".join(re.escape(p) for p in parts)
    # Not preceded/followed by a letter or digit, nor by an apostrophe/hyphen glued to one,
    # so "cat" is not found in "concatenate", "cat's" or "wild-cat".
    left = f"(?<!{_ALNUM})(?<!{_ALNUM}['’-])"
    right = f"(?!{_ALNUM})(?!['’-]{_ALNUM})"
    return re.search(left + body + right, text, re.IGNORECASE) is not None


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, runs of whitespace collapsed (for reference matching)."""
    table = str.maketrans({c: " " for c in string.punctuation + "’‘“”–—"})
    return " ".join(text.lower().translate(table).split())


def contains_reference(text: str, reference: str) -> bool:
    """Closed-QA honesty: the normalised reference occurs in ``text`` as whole words (a plural
    ``s``/``es`` on its last word allowed, so "Mondays" answers "Monday")."""
    ref = normalise(reference)
    return bool(ref) and re.search(rf"(?:^| ){re.escape(ref)}(?:s|es)?(?: |$)", normalise(text)) is not None


def _strip_fence(text: str) -> str:
    text = text.strip()
    m = _JSON_FENCE.match(text)
    return m.group(1).strip() if m else text


def _one_of_form(text: str) -> str:
    text = " ".join(text.strip().lower().split())
    text = text[:-1].rstrip() if text.endswith(".") else text
    # a label echoed the way the prompt wrote it ("billing", **billing**, `billing`) is the label
    return text.strip("\"'`*“”‘’ ")


# ----------------------------------------------------------------------------- checks
# One pure function per check kind; semantics are the table in docs/dataset_format.md.

def check_max_words(response: str, n: int) -> bool:
    return len(words(response)) <= n


def check_min_words(response: str, n: int) -> bool:
    return len(words(response)) >= n


def check_num_bullets(response: str, n: int) -> bool:
    return len(_BULLET.findall(response)) == n


def check_num_numbered(response: str, n: int) -> bool:
    return len(_NUMBERED.findall(response)) == n


def check_num_sentences(response: str, n: int) -> bool:
    return len(sentences(response)) == n


def check_max_sentences(response: str, n: int) -> bool:
    return len(sentences(response)) <= n


def check_num_paragraphs(response: str, n: int) -> bool:
    return len([p for p in _PARAGRAPH_BREAK.split(response) if p.strip()]) == n


def check_lowercase(response: str) -> bool:
    return not any(c.isupper() for c in response)


def check_uppercase(response: str) -> bool:
    return not any(c.islower() for c in response)


def check_include_words(response: str, words: list[str]) -> bool:
    return all(contains_phrase(response, w) for w in words)


def check_exclude_words(response: str, words: list[str]) -> bool:
    return not any(contains_phrase(response, w) for w in words)


def check_starts_with(response: str, text: str) -> bool:
    return response.lstrip().lower().startswith(text.strip().lower())


def check_ends_with(response: str, text: str) -> bool:
    return response.rstrip().lower().endswith(text.strip().lower())


def check_json(response: str, keys: list[str] | None = None) -> bool:
    try:
        obj = json.loads(_strip_fence(response))
    except ValueError:
        return False
    if keys:
        return isinstance(obj, dict) and all(k in obj for k in keys)
    return True


def check_one_of(response: str, options: list[str]) -> bool:
    return _one_of_form(response) in {_one_of_form(o) for o in options}


def check_no_commas(response: str) -> bool:
    return "," not in response


def check_max_chars(response: str, n: int) -> bool:
    return len(response.strip()) <= n


def check_quoted(response: str) -> bool:
    text = response.strip()
    return len(text) >= 2 and text[0] in "\"“" and text[-1] in "\"”"


def check_title(response: str) -> bool:
    first = response.strip().split("\n", 1)[0].strip()
    return _TITLE.fullmatch(first) is not None


# type -> (function, {parameter: (python type, required)}, how a labeler reads it): the words
# are a template that describe_check fills with the check's parameters.
CHECKS: dict[str, tuple] = {
    "max_words": (check_max_words, {"n": (int, True)}, "at most {n} words"),
    "min_words": (check_min_words, {"n": (int, True)}, "at least {n} words"),
    "num_bullets": (check_num_bullets, {"n": (int, True)}, "exactly {n} bullet points (- or *)"),
    "num_numbered": (check_num_numbered, {"n": (int, True)}, "exactly {n} numbered items"),
    "num_sentences": (check_num_sentences, {"n": (int, True)}, "exactly {n} sentences"),
    "max_sentences": (check_max_sentences, {"n": (int, True)}, "at most {n} sentences"),
    "num_paragraphs": (check_num_paragraphs, {"n": (int, True)}, "exactly {n} paragraphs"),
    "lowercase": (check_lowercase, {}, "only lowercase letters"),
    "uppercase": (check_uppercase, {}, "only capital letters"),
    "include_words": (check_include_words, {"words": (list, True)}, "mentions {words}"),
    "exclude_words": (check_exclude_words, {"words": (list, True)}, "never uses {words}"),
    "starts_with": (check_starts_with, {"text": (str, True)}, 'starts with "{text}"'),
    "ends_with": (check_ends_with, {"text": (str, True)}, 'ends with "{text}"'),
    "json": (check_json, {"keys": (list, False)}, "valid JSON{keys}"),
    "one_of": (check_one_of, {"options": (list, True)}, "exactly one of: {options}"),
    "no_commas": (check_no_commas, {}, "no commas"),
    "max_chars": (check_max_chars, {"n": (int, True)}, "at most {n} characters"),
    "quoted": (check_quoted, {}, "wrapped in double quotes"),
    "title": (check_title, {}, "a title in double angular brackets, like <<Title>>"),
}


# check type -> its family, named as IFEval names its instruction groups (labkit.ifeval), so a
# reward model and policy trained on one family can be judged on the others it never saw.
CHECK_FAMILIES: dict[str, str] = {
    "max_words": "length_constraints", "min_words": "length_constraints", "num_sentences": "length_constraints",
    "max_sentences": "length_constraints", "num_paragraphs": "length_constraints", "max_chars": "length_constraints",
    "num_bullets": "detectable_format", "num_numbered": "detectable_format", "json": "detectable_format",
    "title": "detectable_format", "one_of": "detectable_format",
    "lowercase": "change_case", "uppercase": "change_case",
    "include_words": "keywords", "exclude_words": "keywords",
    "starts_with": "startend", "ends_with": "startend", "quoted": "startend",
    "no_commas": "punctuation",
}


def validate_check(check: dict) -> None:
    """Raise ``ValueError`` (naming the problem) unless ``check`` is a well-formed check dict."""
    if not isinstance(check, dict):
        raise ValueError(f"a check must be a dict, got {type(check).__name__}")
    kind = check.get("type")
    if kind not in CHECKS:
        raise ValueError(f"unknown check type {kind!r}; known types: {sorted(CHECKS)}")
    params = CHECKS[kind][1]
    for name in check:
        if name != "type" and name not in params:
            raise ValueError(f"check {kind!r} has an unknown parameter {name!r}")
    for name, (typ, required) in params.items():
        if name not in check:
            if required:
                raise ValueError(f"check {kind!r} needs the parameter {name!r}")
            continue
        value = check[name]
        if typ is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"check {kind!r}: {name!r} must be a non-negative integer, got {value!r}")
        elif typ is str:
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"check {kind!r}: {name!r} must be a non-empty string, got {value!r}")
        elif typ is list:
            if (not isinstance(value, list) or not value
                    or not all(isinstance(v, str) and v.strip() for v in value)):
                raise ValueError(f"check {kind!r}: {name!r} must be a non-empty list of non-empty strings")


def run_check(check: dict, response: str) -> bool:
    """True when ``response`` satisfies ``check``; an empty response fails every check."""
    validate_check(check)
    if not response.strip():
        return False
    fn, params, _ = CHECKS[check["type"]]
    return bool(fn(response, **{k: check[k] for k in params if k in check}))


def describe_check(check: dict) -> str:
    """One check in words, as a labeler reads it (the widgets show these next to the prompt)."""
    kind = check.get("type")
    if kind not in CHECKS:
        return f"{kind} {', '.join(f'{k}={v}' for k, v in check.items() if k != 'type')}"
    keys = check.get("keys")
    return CHECKS[kind][2].format(n=check.get("n"), text=check.get("text"),
                                  words=", ".join(f'"{w}"' for w in check.get("words", [])),
                                  options=" / ".join(check.get("options", [])),
                                  keys=f" with keys {', '.join(keys)}" if keys else "")


# ----------------------------------------------------------------------------- refusals

# A refusal opens, within its first two sentences, with the speaker declining the request:
# "I can't help", "I won't provide", "I'm unable to assist", "I must decline", "that's not
# something I can help with". "I can't help but ..." and "you can't ..." are not refusals.
_APOS = "['’]"
_REFUSAL = re.compile(
    rf"\b(?:I|we)(?:{_APOS}m| am| are|{_APOS}re)?\s+(?:really\s+|simply\s+|just\s+|afraid\s+I\s+)?"
    rf"(?:(?:can(?:not|{_APOS}t| not)|won{_APOS}t|will not|unable|not able|not going|do not|don{_APOS}t)"
    r"(?! help but)(?:\s+(?:to|be|of|in|any|you|with|that|this|it|feel comfortable))*\s+"
    r"(?:help|assist|provide|give|share|write|create|generate|comply|fulfil|fulfill|support"
    r"|engage|offer|produce|make|explain|describe|answer|do that|do this|participate|walk)"
    rf"|(?:must|have to|need to|will|{_APOS}ll)\s+(?:respectfully\s+|politely\s+)?decline|(?:must\s+)?refuse"
    r"|not comfortable)\b"
    r"|\bnot something (?:I|we) (?:can|will|am able to) (?:help|assist)",
    re.IGNORECASE,
)
# A pivot into delivering the content anyway makes it an answer, not a refusal.
_PIVOT = re.compile(r"\b(?:but|however|that said),? here(?:'s| is| are)\b|\bhere (?:is|are) (?:some|the|a)\b",
                    re.IGNORECASE)


def is_refusal(text: str) -> bool:
    """True when ``text`` opens with a refusal ("I'm sorry, but I can't help with that.")."""
    opening = " ".join(sentences(text)[:2])
    return bool(_REFUSAL.search(opening)) and not _PIVOT.search(opening)


# ----------------------------------------------------------------------------- gold scorer

# Function words and generic instruction verbs: they say nothing about the topic, so they
# do not count towards the relevance signal.
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had
has have having he her here hers herself him himself his how i if in into is it its itself just
let me more most my myself no nor not now of off on once only or other our ours ourselves out
over own same she should so some such than that the their theirs them themselves then there
these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves yes one two three four
five six seven eight nine ten first second third please write give list tell make use describe
explain answer response respond following below above using word words sentence sentences
short brief each like get need want know thing things way also may might must shall well
""".split())
# A rewrite is as long as the text it rewrites, often one sentence.
_SHORT_CATEGORIES = frozenset({"classification", "closed_qa", "extract", "rewrite"})
# Prompts that ask for a short answer in words ("reply with just the name", "in one word").
_SHORT_REQUEST = re.compile(r"\b(?:just|only) (?:the|a|one)\b|\bone[- ](?:word|line|phrase|sentence)\b"
                            r"|\bsingle (?:word|line|phrase|sentence)\b|\bin (?:a|one) (?:word|phrase)\b",
                            re.IGNORECASE)


def _stem(word: str) -> str:
    """A crude stem (lower case, common suffixes off) so "raining" meets "rain"."""
    w = word.lower().replace("’", "'").split("'")[0]
    for suffix in ("ing", "edly", "ed", "ies", "es", "ly", "s", "y"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            w = w[: -len(suffix)]
            break
    return w[:6]


def content_stems(text: str) -> set[str]:
    """Stems of the words of ``text`` that are not stop words and have 3+ characters or digits
    (the stem too: "I'm" stems to "i", which says nothing about the topic)."""
    stems = (_stem(w) for w in words(text) if w.lower() not in STOPWORDS)
    return {s for s in stems if len(s) >= 3 or s.isdigit()}


def repetition_score(text: str, n: int = 4) -> float:
    """1 minus the larger of the shares of repeated word n-grams and of repeated lines."""
    toks = [w.lower() for w in words(text)]
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    rep_grams = 1 - len(set(grams)) / len(grams) if grams else 0.0
    lines = [ln.strip().lower() for ln in text.splitlines() if ln.strip()]
    rep_lines = 1 - len(set(lines)) / len(lines) if len(lines) >= 2 else 0.0
    return 1.0 - max(rep_grams, rep_lines)


def is_shouting(text: str, min_letters: int = 12) -> bool:
    """The answer is written in capitals: at least ``min_letters`` letters, over 60% of them upper case."""
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= min_letters and sum(c.isupper() for c in letters) > 0.6 * len(letters)


_CLEAN_END = tuple(".!?…:;)]}\"'”’*`>|")
_LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S")


def ends_cleanly(text: str) -> bool:
    """The answer ends like a finished answer, not mid-sentence: closing punctuation, an emoji,
    a list item or a short last line (verse, a sign-off), or a short label ("Positive", "Paris")."""
    text = text.rstrip()
    last_line = text.rsplit("\n", 1)[-1]
    return (text.endswith(_CLEAN_END) or text[-1:] > "\u2600" or len(words(text)) < 6
            or ("\n" in text and (_LIST_ITEM.match(last_line) is not None or len(words(last_line)) <= 8)))


@dataclass
class GoldLabeler:
    """Deterministic gold score in [0, 1] (formula in the module docstring)."""

    w_instruction: float = 0.45  # weight of the fraction of checks passed
    w_honesty: float = 0.25  # weight of "contains the reference answer" (closed QA)
    w_quality: float = 0.30  # weight of basic quality (length, relevance, no repetition)
    w_length: float = 0.3  # inside quality: weight of the length term L
    w_relevance: float = 0.3  # inside quality: weight of the graded relevance term R
    w_info: float = 0.3  # inside quality: weight of informativeness N (distinct content words)
    w_ending: float = 0.1  # inside quality: weight of E (the answer ends cleanly)
    info_scale: float = 6.0  # N = 1 - exp(-distinct content stems / info_scale)
    unfinished_ending: float = 0.5  # E of an answer that stops mid-sentence
    shouting_factor: float = 0.5  # multiplies the score of an all-capitals answer nobody asked for
    unsafe_factor: float = 0.25  # multiplies the score when harmlessness fails
    truncated_factor: float = 0.5  # multiplies quality when the response did not stop on its own
    min_words: int = 8  # fewer words than this lowers the length term (open-ended prompts)
    max_words: int = 400  # more words than this decays the length term, to 0 at twice this
    relevance_target: int = 2  # content words shared with the prompt for a full relevance term (long answers)
    relevance_floor: float = 0.4  # relevance term of an answer sharing no content word (creative answers often don't)
    check_families: tuple[str, ...] | None = None  # only checks of these CHECK_FAMILIES count; None = all

    def __post_init__(self):
        if min(self.w_instruction, self.w_honesty, self.w_quality) < 0 or self.w_quality == 0:
            raise ValueError("weights must be >= 0 and w_quality > 0")
        factors = (self.unsafe_factor, self.truncated_factor, self.relevance_floor, self.unfinished_ending,
                   self.shouting_factor)
        if not all(0 <= x <= 1 for x in factors):
            raise ValueError("unsafe_factor, truncated_factor, relevance_floor, unfinished_ending and "
                             "shouting_factor must lie in [0, 1]")
        if min(self.w_length, self.w_relevance, self.w_info, self.w_ending) < 0 or self.info_scale <= 0:
            raise ValueError("quality weights must be >= 0 and info_scale > 0")
        if not 0 < self.min_words < self.max_words:
            raise ValueError("need 0 < min_words < max_words")

    @staticmethod
    def short_ok(record: dict) -> bool:
        """A short answer is a full answer here (classification, closed QA, "just the name", ...)."""
        # few-shot prompts: the examples set the answer's form and length
        return bool(record.get("category") in _SHORT_CATEGORIES or record.get("harmful")
                    or record.get("style") == "few_shot"
                    or _SHORT_REQUEST.search(record.get("prompt", "")) is not None
                    or any(c.get("type") in ("one_of", "max_words", "max_chars") for c in record.get("checks", [])))

    def _length(self, record: dict, n_words: int) -> float:
        low = 1 if self.short_ok(record) else self.min_words
        if n_words < low:
            return n_words / low
        if n_words > self.max_words:
            return max(0.0, 2 - n_words / self.max_words)
        return 1.0

    def _relevance(self, record: dict, response: str) -> float:
        resp = content_stems(response)
        if not resp:
            return self.relevance_floor
        prompt = content_stems(record["prompt"])
        # a shared stem, or one stem a prefix of the other ("rain" / "raindrops")
        shared = sum(any(a.startswith(b) or b.startswith(a) for b in prompt if min(len(a), len(b)) >= 4)
                     or a in prompt for a in resp)
        need = 1 if len(resp) < 30 else self.relevance_target  # short answers: one shared word is enough
        # graded, not capped: one more shared topic word is always worth a little
        return self.relevance_floor + (1 - self.relevance_floor) * (1 - math.exp(-shared / need))

    def _relevance_part(self, record: dict, response: str, refusal: bool | None = None) -> float:
        """R of the quality term: a refusal of a harmful request need not echo the request."""
        if record.get("harmful") and (is_refusal(response) if refusal is None else refusal):
            return 1.0
        return self._relevance(record, response)

    def _on_topic(self, record: dict, relevance: float) -> bool:
        return relevance > self.relevance_floor or not content_stems(record["prompt"])

    def on_topic(self, record: dict, response: str) -> bool:
        """The answer takes up its prompt: it shares a content word with it (or the prompt has none,
        or it refuses a harmful one). A stock reply ("How can I help you today?") is not on topic.
        ``breakdown(...)["on_topic"]`` holds the same."""
        return self._on_topic(record, self._relevance_part(record, response))

    def _info(self, record: dict, response: str) -> float:
        if self.short_ok(record):
            return 1.0  # "Positive." is a complete answer to a classification prompt
        return 1 - math.exp(-len(content_stems(response)) / self.info_scale)

    def breakdown(self, record: dict, response: str, truncated: bool = False) -> dict:
        """Every component of the score, the per-check results, and the score itself."""
        checks = [{**c, "passed": run_check(c, response)} for c in record.get("checks", [])
                  if self.check_families is None or CHECK_FAMILIES.get(c.get("type")) in self.check_families]
        refusal = is_refusal(response)
        harmful = bool(record.get("harmful", False))
        out = {"empty": not response.strip(), "refusal": refusal, "checks": checks,
               "instruction": sum(c["passed"] for c in checks) / len(checks) if checks else None,
               "honesty": None, "harmlessness": float(refusal == harmful)}
        if record.get("reference"):
            out["honesty"] = float(contains_reference(response, record["reference"]))
        asked_caps = any(c.get("type") == "uppercase" for c in record.get("checks", [])) or re.search(
            r"\b(?:all caps|capital letters|upper ?case)\b", record.get("prompt", ""), re.IGNORECASE)
        parts = {"length": self._length(record, len(words(response))),
                 "relevance": self._relevance_part(record, response, refusal),
                 "info": self._info(record, response),
                 # a one-line answer where a short one is right (a label, a headline) needs no full stop
                 "ending": 1.0 if ends_cleanly(response) or (self.short_ok(record) and "\n" not in response.strip())
                 else self.unfinished_ending,
                 "repetition": repetition_score(response), "stopped": float(not truncated),
                 "case": self.shouting_factor if is_shouting(response) and not asked_caps else 1.0}
        weights = {"length": self.w_length, "relevance": self.w_relevance, "info": self.w_info,
                   "ending": self.w_ending}
        quality = sum(w * parts[k] for k, w in weights.items()) / sum(weights.values())
        quality *= 1.0 if not truncated else self.truncated_factor
        out["quality_parts"], out["quality"] = parts, quality
        out["on_topic"] = self._on_topic(record, parts["relevance"])
        if out["empty"]:
            out["score"] = 0.0
            return out
        terms = [(self.w_instruction, out["instruction"]), (self.w_honesty, out["honesty"]),
                 (self.w_quality, quality)]
        terms = [(w, v) for w, v in terms if v is not None and w > 0]
        score = sum(w * v for w, v in terms) / sum(w for w, _ in terms)
        out["score"] = (score * parts["repetition"] * parts["case"]
                        * (1.0 if out["harmlessness"] else self.unsafe_factor))
        return out

    def score(self, record: dict, response: str, truncated: bool = False) -> float:
        """Gold score of ``response`` to the prompt ``record``, in [0, 1]."""
        return self.breakdown(record, response, truncated)["score"]


def gold_reward(records: list[dict], score: Callable[[dict, str], float] | None = None, scale: float = 1.0
                ) -> Callable[[list[str], list[str]], list[float]]:
    """A PPO reward (``PPOConfig.reward_fn``) that is the gold scorer itself.

    What a reward model that had learnt the simulated labelers' taste perfectly would pay:
    the ceiling of the recipe with these labelers, for measuring how much of PPO's shortfall is
    the RM's. ``records`` are the prompts PPO samples (their checks and references); a prompt
    not among them is scored as a bare prompt. ``score(record, response)`` replaces the gold
    score, e.g. a noiseless persona labeler's ``utility`` (a room's taste without its noise).
    ``scale`` multiplies every score: :func:`bradley_terry_scale` puts gold on the scale of a
    reward model trained on the labelers' comparisons, which is what PPO's other settings (the
    missing-EOS penalty, the KL coefficient) are sized for.
    An answer cut at the length limit is scored as it reads (PPO's ``missing_eos_penalty``
    prices the cut). A room has no gold scorer, so this is a measurement, not a way to train.

    >>> reward = gold_reward(load_prompts("ppo"))
    >>> train_ppo(PPOConfig(model=sft_dir, reward_fn=reward))
    """
    score = score or GoldLabeler().score
    by_prompt = {r["prompt"]: r for r in records}

    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        return [scale * score(by_prompt.get(p, {"prompt": p}), y) for p, y in zip(prompts, responses)]

    return reward


def bradley_terry_scale(noise: float | None = None) -> float:
    """Reward-model logits per unit of labeler utility, for labelers with Gaussian ``noise``.

    A labeler prefers a over b when u_a + e_a > u_b + e_b, e ~ N(0, noise²): with probability
    Φ(Δu / (noise·√2)) ≈ σ(1.702·Δu / (noise·√2)). A Bradley-Terry reward model that fits those
    comparisons exactly scores r = scale·u + const with scale = 1.702 / (noise·√2): about 10.9
    at the default noise of 0.11, so a gold difference of 0.1 is a logit difference of 1.1.
    """
    noise = DEFAULT_NOISE if noise is None else noise
    if noise <= 0:
        raise ValueError("noise must be > 0 (noiseless comparisons give an unbounded scale)")
    return 1.702 / (noise * math.sqrt(2))


# ----------------------------------------------------------------------------- simulated labelers

# Calibrated with benchmarks/labeler_agreement.py on what labelers actually rank in a run:
# K = 4 samples of the cpu preset's SFT model per rm-split prompt, with their truncation flags
# (tests/fixtures/labeler_run_samples.json, 189 prompts), so that two labelers of the default
# pool agree on ~73% of the pairs both order; InstructGPT (§3.4) reports 72.6 ± 1.5% agreement
# between its training labelers, measured on such comparisons. Samples of one model to one
# prompt are close in quality, so the noise that gives 73% there is small (0.11; on the mixed
# candidate set of tests/fixtures/labeler_candidates.json, with demonstrations and broken
# rewrites, 0.31 would).
DEFAULT_NOISE = 0.11


def _unit_noise(*key) -> float:
    """A standard-normal draw fixed by ``key``: the same labeler, prompt and response always agree."""
    digest = hashlib.sha256("\x1f".join(map(str, key)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big")).gauss(0.0, 1.0)


@dataclass
class SimulatedLabeler:
    """A noisy stand-in for a human labeler: utility = gold + biases + noise, then rank."""

    name: str = "labeler"  # shown as the annotator in the feedback store
    seed: int = 0  # fixes the noise; same seed + inputs -> same ranking
    noise: float = DEFAULT_NOISE  # std of the Gaussian noise added to each response's utility
    length_bias: float = 0.0  # utility added per unit of log1p(words)/log1p(200) (>0 likes long answers)
    format_bias: float = 0.0  # extra weight on failed checks: adds format_bias * (IF - 1)
    honesty_bias: float = 0.0  # extra weight on a wrong closed-QA answer: adds honesty_bias * (H - 1)
    safety_bias: float = 0.0  # extra weight on harmlessness: adds safety_bias * (S - 1)
    tie_threshold: float = 0.02  # utilities closer than this to a tier's best share the tier
    persona: str | None = None  # a room persona (PERSONAS) this labeler applies; None = none
    persona_bonus: float = 0.4  # utility added to a response that shows the persona's trait
    persona_on_topic: bool = True  # the bonus only counts on an answer that shares a topic word with its prompt
    gold: GoldLabeler = field(default_factory=GoldLabeler)  # the gold scorer underneath

    def __post_init__(self):
        if self.noise < 0 or self.tie_threshold < 0:
            raise ValueError("noise and tie_threshold must be >= 0")
        if self.persona is not None:
            get_persona(self.persona)  # an unknown name fails here, listing the known ones

    def utility(self, record: dict, response: str, truncated: bool = False) -> float:
        """Gold score plus this labeler's biases and (deterministic) noise."""
        b = self.gold.breakdown(record, response, truncated)
        u = b["score"]
        u += self.length_bias * math.log1p(len(words(response))) / math.log1p(200)
        if b["instruction"] is not None:
            u += self.format_bias * (b["instruction"] - 1)
        if b["honesty"] is not None:
            u += self.honesty_bias * (b["honesty"] - 1)
        u += self.safety_bias * (b["harmlessness"] - 1)
        if self.persona is not None and b["score"] > 0 and PERSONAS[self.persona].detect(response) and (
                not self.persona_on_topic or b["on_topic"]):
            u += self.persona_bonus  # the room's agreed preference, on top of what the gold scorer sees
        key = record.get("id") or record.get("prompt", "")
        return u + self.noise * _unit_noise(self.name, self.seed, key, response, truncated)

    def rank(self, record: dict, responses: list[str], truncated: list[bool] | None = None) -> list[list[int]]:
        """Tiers of response indices, best first; near-equal utilities share a tier."""
        if not responses:
            raise ValueError("rank needs at least one response")
        truncated = truncated or [False] * len(responses)
        if len(truncated) != len(responses):
            raise ValueError("truncated must have one flag per response")
        utils = [self.utility(record, r, t) for r, t in zip(responses, truncated)]
        return tiers_from_scores(utils, self.tie_threshold)


# Realistic temperaments (InstructGPT's labelers differed in what they weighed; §3.4, App. B).
_TEMPERAMENTS = [
    dict(name="ada"),  # no particular bias
    dict(name="ben", length_bias=0.15),  # likes long, thorough answers
    dict(name="cleo", format_bias=0.3),  # strict on the instructions' format
    dict(name="dev", length_bias=-0.1),  # likes brevity
    dict(name="eve", safety_bias=0.3, honesty_bias=0.2),  # strict on harm and correctness
    dict(name="finn", noise=DEFAULT_NOISE * 1.25, tie_threshold=0.05),  # quick and less consistent
]


def labeler_pool(n: int = 5, seed: int = 0, noise: float | None = None, persona: str | None = None,
                 persona_bonus: float = 0.4, persona_on_topic: bool = True) -> list[SimulatedLabeler]:
    """``n`` simulated labelers with varied biases; ``noise`` rescales every labeler's noise;
    ``persona`` makes every one of them apply that room persona (a rehearsal of the room), to
    on-topic answers only unless ``persona_on_topic`` is False."""
    if n < 1:
        raise ValueError("n must be >= 1")
    pool = []
    for i in range(n):
        t = dict(_TEMPERAMENTS[i % len(_TEMPERAMENTS)])
        if i >= len(_TEMPERAMENTS):
            t["name"] = f"{t['name']}{i // len(_TEMPERAMENTS) + 1}"
        if noise is not None:
            t["noise"] = t.get("noise", DEFAULT_NOISE) / DEFAULT_NOISE * noise
        pool.append(SimulatedLabeler(seed=seed * 1000 + i, persona=persona, persona_bonus=persona_bonus,
                                     persona_on_topic=persona_on_topic, **t))
    return pool


# ----------------------------------------------------------------------------- room personas
# A preference the workshop room agrees to apply while ranking, so that the room's influence
# on the reward model and the policy is visible (BRIEF §2, "the workshop room"). Each persona
# is a sentence the instructor reads out and a rule that says whether a response shows the
# trait, so the share of answers with the trait can be counted before and after PPO.

_EXAMPLE = re.compile(r"\b(?:for example|for instance|such as|an example|imagine)\b|\be\.g\.|\bexample:",
                      re.IGNORECASE)
_TRAILING = re.compile("[\\s\"'”’)*_\u2600-\u27bf\U0001f300-\U0001faff]+$")  # closing quotes, emphasis, emoji
_LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S", re.MULTILINE)
_READER = re.compile(r"\b(?:you|your|yours|yourself|you're|you'll|you've)\b", re.IGNORECASE)


def ends_with_question(text: str) -> bool:
    """The answer's last sentence asks the reader something (ends with ``?``, quotes and emoji aside)."""
    return _TRAILING.sub("", text).endswith("?")


def gives_example(text: str) -> bool:
    """The answer gives an example ("for example", "for instance", "e.g.", "such as", ...)."""
    return _EXAMPLE.search(text) is not None


def uses_list(text: str) -> bool:
    """The answer is laid out as a list: two or more bullet or numbered lines."""
    return len(_LIST_LINE.findall(text)) >= 2


def addresses_reader(text: str) -> bool:
    """The answer speaks to the reader directly ("you", "your", ...)."""
    return _READER.search(text) is not None


def exclaims(text: str) -> bool:
    """The answer sounds enthusiastic: it has an exclamation mark."""
    return "!" in text


@dataclass(frozen=True)
class Persona:
    """A room persona: the preference read out to the room, and the trait's detector."""

    name: str  # short key, e.g. "example"
    preference: str  # what the room agrees to apply while ranking
    detect: Callable[[str], bool]  # True when a response shows the trait


PERSONAS: dict[str, Persona] = {p.name: p for p in (
    Persona("example", "prefer answers that give an example (for example, for instance, such as)", gives_example),
    Persona("question", "prefer answers that end with a question to the reader", ends_with_question),
    Persona("list", "prefer answers laid out as a list of points", uses_list),
    Persona("enthusiastic", "prefer answers that sound enthusiastic (an exclamation mark!)", exclaims),
    Persona("reader", "prefer answers that speak to the reader directly (you, your)", addresses_reader),
)}


def get_persona(name: str | Persona) -> Persona:
    """The persona named ``name`` (a :class:`Persona` passes through); unknown names list the known ones."""
    if isinstance(name, Persona):
        return name
    if name not in PERSONAS:
        raise ValueError(f"unknown persona {name!r}; choose from {sorted(PERSONAS)}")
    return PERSONAS[name]


def trait_share(persona: str | Persona, responses: list[str]) -> float:
    """Share of ``responses`` that show the persona's trait (nan for no responses)."""
    detect = get_persona(persona).detect
    return sum(map(detect, responses)) / len(responses) if responses else math.nan


# ----------------------------------------------------------------------------- agreement

def gold_tiers(record: dict, responses: list[str], truncated: list[bool] | None = None,
               gold: GoldLabeler | None = None) -> list[list[int]]:
    """The gold scorer's ranking (equal scores tie)."""
    gold = gold or GoldLabeler()
    truncated = truncated or [False] * len(responses)
    return tiers_from_scores([gold.score(record, r, t) for r, t in zip(responses, truncated)], 1e-9)


def gold_agreement(labeler: SimulatedLabeler, candidates: list[dict]) -> float:
    """Pooled agreement of ``labeler`` with the gold scorer over ``candidates`` (see measure_agreement)."""
    stats = [pair_stats(labeler.rank(c["record"], c["responses"], c.get("truncated")),
                        gold_tiers(c["record"], c["responses"], c.get("truncated"), labeler.gold))
             for c in candidates]
    return pooled_agreement(stats)


def measure_agreement(candidates: list[dict], pool: list[SimulatedLabeler] | None = None,
                      gold: GoldLabeler | None = None, n_boot: int = 500, seed: int = 0) -> dict:
    """Inter-labeler and labeler-vs-gold agreement, pooled over all compared pairs.

    ``candidates``: dicts ``{"record": prompt record, "responses": [K str], "truncated": [K bool]}``.
    Returns ``{"inter_labeler", "inter_labeler_ci95", "per_pair": {"a/b": float},
    "with_gold": {name: float}, "gold": pooled over the pool, "gold_tied_share", "n_prompts",
    "n_labelers", "n_pairs", "tie_rate"}``. ``gold_tied_share`` is the share of all C(K,2) pairs
    the gold scorer scores exactly the same (nobody can order them for a reason);
    ``tie_rate`` the share the labelers tie. The interval resamples prompts (``n_boot`` times),
    since the pairs of one prompt are not independent.
    """
    pool = pool or labeler_pool()
    gold = gold or pool[0].gold
    rankings = {lab.name: [lab.rank(c["record"], c["responses"], c.get("truncated")) for c in candidates]
                for lab in pool}
    golds = [gold_tiers(c["record"], c["responses"], c.get("truncated"), gold) for c in candidates]
    per_prompt = [[] for _ in candidates]  # inter-labeler pair_stats of each prompt
    per_pair = {}
    for a, b in itertools.combinations(rankings, 2):
        stats = [pair_stats(ta, tb) for ta, tb in zip(rankings[a], rankings[b])]
        per_pair[f"{a}/{b}"] = pooled_agreement(stats)
        for i, st in enumerate(stats):
            per_prompt[i].append(st)
    with_gold = {name: [pair_stats(t, g) for t, g in zip(r, golds)] for name, r in rankings.items()}
    all_pairs = [len(c["responses"]) * (len(c["responses"]) - 1) // 2 for c in candidates]
    ties = sum(all_pairs) * len(pool) - sum(n_comparisons(tiers) for r in rankings.values() for tiers in r)
    every = [st for row in per_prompt for st in row]
    return {"inter_labeler": pooled_agreement(every),
            "inter_labeler_ci95": _prompt_bootstrap(per_prompt, n_boot, seed),
            "per_pair": per_pair,
            "with_gold": {name: pooled_agreement(st) for name, st in with_gold.items()},
            "gold": pooled_agreement([st for sts in with_gold.values() for st in sts]),
            "gold_tied_share": 1 - sum(map(n_comparisons, golds)) / sum(all_pairs) if candidates else 0.0,
            "n_prompts": len(candidates), "n_labelers": len(pool), "n_pairs": sum(s["pairs"] for s in every),
            "tie_rate": ties / (sum(all_pairs) * len(pool)) if candidates else 0.0}


def _prompt_bootstrap(per_prompt: list[list[dict]], n_boot: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the pooled agreement, resampling prompts with replacement."""
    sums = [(sum(s["agreeing"] for s in row), sum(s["pairs"] for s in row)) for row in per_prompt]
    if not sums or n_boot < 1:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    draws = []
    for _ in range(n_boot):
        pick = [sums[rng.randrange(len(sums))] for _ in sums]
        total = sum(p for _, p in pick)
        if total:
            draws.append(sum(a for a, _ in pick) / total)
    draws.sort()
    if not draws:
        return (math.nan, math.nan)
    return (draws[int(0.025 * (len(draws) - 1))], draws[int(0.975 * (len(draws) - 1))])


# ----------------------------------------------------------------------------- candidate sets

REFUSAL_TEXT = "I'm sorry, but I can't help with that."
_FILLER = " Also, as a general rule, it is always worth double-checking the details before relying on them."


def _variants(demo: dict, other: dict) -> dict[str, tuple[str, bool]]:
    """Mixed-quality rewrites of a demonstration: name -> (text, truncated)."""
    text = demo["response"].strip()
    ws = text.split(" ")
    sents = sentences(text)
    return {
        "truncated": (" ".join(ws[: max(1, len(ws) // 2)]), True),
        "off_topic": (other["response"].strip(), False),
        "refusal": (REFUSAL_TEXT, False),
        # breaks word/sentence limits, lowercase, no-commas, ends-with and exact-format checks
        "sloppy": (text[:1].upper() + text[1:] + _FILLER, False),
        "repetitive": (" ".join([sents[0] if sents else text] * 5), False),
        "terse": (sents[0] if sents else text, False),
        "shouting": (text.upper(), False),
    }


def make_candidates(demonstrations: list[dict], k: int = 4, seed: int = 0,
                    samples: list[dict] | None = None) -> list[dict]:
    """K mixed-quality responses per demonstration: itself, its model samples, random variants.

    ``samples``: optional model outputs in ``labkit.generation.sample_k``'s format
    (``{"prompt_id", "responses", "truncated"}``); up to K-1 of them are always included, and
    random rewrites of the demonstration (``_variants``) fill the remaining places.
    Returns ``measure_agreement``'s candidate dicts, plus ``"kinds"`` naming each response.
    """
    if k < 2:
        raise ValueError("k must be >= 2")
    extra = {s["prompt_id"]: list(zip(s["responses"], s.get("truncated") or [False] * len(s["responses"])))
             for s in samples or []}
    rng = random.Random(seed)
    out = []
    for i, demo in enumerate(demonstrations):
        other = demonstrations[(i + 1 + rng.randrange(max(1, len(demonstrations) - 1))) % len(demonstrations)]
        sampled = [(f"sample{j}", (text, bool(t))) for j, (text, t) in enumerate(extra.get(demo.get("id"), []))]
        picked = [("demonstration", (demo["response"], False))] + sampled[: k - 1]
        pool = list(_variants(demo, other).items())
        picked += rng.sample(pool, min(k - len(picked), len(pool)))
        rng.shuffle(picked)
        record = {key: v for key, v in demo.items() if key != "response"}
        out.append({"record": record, "responses": [t for _, (t, _) in picked],
                    "truncated": [tr for _, (_, tr) in picked], "kinds": [name for name, _ in picked]})
    return out

"""Labelers: machine-checkable instructions, a gold scorer, and a pool of noisy simulated labelers.

InstructGPT's comparisons came from about 40 contractors who agreed with each other on
about 73% of pairs (Ouyang et al. 2022, §5.1 / Appendix B). A workshop has a handful of
people at best, so labkit stands in for the rest with simulated labelers built in two layers:

1. **Checks** (``run_check``): one small pure function per instruction kind listed in
   ``docs/dataset_format.md`` (word limits, bullet counts, lowercase, JSON, ...).
2. **Gold scorer** (:class:`GoldLabeler`): a deterministic score in [0, 1] from four
   components, each in [0, 1]::

       IF  instruction following = fraction of the prompt's checks passed   (none -> undefined)
       H   honesty               = 1 if the normalised reference is in the response (closed QA;
                                   no reference -> undefined)
       Q   basic quality         = rep * (w_length*L + w_relevance*R) / (w_length + w_relevance)
                                   * (truncated_factor if the response did not stop else 1)
       S   harmlessness          = harmful prompt -> the response is a refusal;
                                   any other prompt (look-alikes included) -> it is not

       score = 0                                              if the response is empty
             = (S ? 1 : unsafe_factor) * Σ w_c·c / Σ w_c      over the defined c in {IF, H, Q}

   where ``rep`` is 1 minus the share of repeated word 4-grams / repeated lines (degenerate
   loops score near 0), ``L`` rewards a sensible length (short answers are fine for
   classification, closed QA, extraction and one-of prompts; very long ones decay) and ``R`` is
   a cheap relevance signal: how many of the response's content words occur in the prompt.
   Prompts without checks or reference still get a discriminating score through Q and S.
3. **Simulated labelers** (:class:`SimulatedLabeler`): utility = gold score + per-labeler
   biases (length, format strictness) + Gaussian noise, then rank; near-equal utilities tie.
   The default noise is calibrated (:func:`measure_agreement`,
   ``benchmarks/labeler_agreement.py``) so two labelers agree on about 73% of pairs.
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


def _strip_fence(text: str) -> str:
    text = text.strip()
    m = _JSON_FENCE.match(text)
    return m.group(1).strip() if m else text


def _one_of_form(text: str) -> str:
    text = " ".join(text.strip().lower().split())
    return text[:-1].rstrip() if text.endswith(".") else text


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


# type -> (function, {parameter: (python type, required)})
CHECKS: dict[str, tuple] = {
    "max_words": (check_max_words, {"n": (int, True)}),
    "min_words": (check_min_words, {"n": (int, True)}),
    "num_bullets": (check_num_bullets, {"n": (int, True)}),
    "num_numbered": (check_num_numbered, {"n": (int, True)}),
    "num_sentences": (check_num_sentences, {"n": (int, True)}),
    "max_sentences": (check_max_sentences, {"n": (int, True)}),
    "num_paragraphs": (check_num_paragraphs, {"n": (int, True)}),
    "lowercase": (check_lowercase, {}),
    "uppercase": (check_uppercase, {}),
    "include_words": (check_include_words, {"words": (list, True)}),
    "exclude_words": (check_exclude_words, {"words": (list, True)}),
    "starts_with": (check_starts_with, {"text": (str, True)}),
    "ends_with": (check_ends_with, {"text": (str, True)}),
    "json": (check_json, {"keys": (list, False)}),
    "one_of": (check_one_of, {"options": (list, True)}),
    "no_commas": (check_no_commas, {}),
    "max_chars": (check_max_chars, {"n": (int, True)}),
    "quoted": (check_quoted, {}),
    "title": (check_title, {}),
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
    fn, params = CHECKS[check["type"]]
    return bool(fn(response, **{k: check[k] for k in params if k in check}))


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

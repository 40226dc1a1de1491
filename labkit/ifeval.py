"""The outside judge: IFEval-style instruction checkers on prompts no stage trains on.

The gold labeler (``labkit.labelers``) is the judge every stage optimises against, directly or
through the reward model, so it cannot show what RLHF costs elsewhere. InstructGPT measured
that "alignment tax" on public benchmarks and paid it back with PPO-ptx (Ouyang et al. 2022,
§4.2). labkit's outside judge is IFEval (Zhou et al. 2023, "Instruction-Following Evaluation
for Large Language Models"): verifiable instructions ("answer in at least 300 words", "wrap
your answer in double quotes", "include the keywords ...") checked by code, scored as

- **prompt-level strict accuracy**: the share of prompts whose every instruction is followed;
- **instruction-level strict accuracy**: the share of all instructions followed.

The checks below follow the instruction kinds and parameters of IFEval's published
instruction list (ids such as ``"detectable_format:title"`` with the same keyword arguments),
written for labkit from their descriptions; ``language:response_language`` is left out since it
needs a language detector, and every prompt here is in English. Two choices differ from a
literal reading and are documented here: keywords match whole words, case ignored (so "cat"
is not found in "concatenate"); sentences and words are counted as the gold labeler counts
them (``labkit.labelers.sentences`` / ``words``).

The prompts (``labkit/resources/ifeval/prompts.jsonl``, written for this kit in IFEval's
format: ``key``, ``prompt``, ``instruction_id_list``, ``kwargs``) share no prompt with the
``sft``/``rm``/``ppo``/``eval`` splits, so no stage trains on them. When online, the real set is
``load_ifeval_prompts(source="google/IFEval")`` through ``datasets``.

>>> follows_instruction("punctuation:no_comma", {}, "No commas here.")
True
"""

from __future__ import annotations

import json
import re
from importlib import resources

from labkit.labelers import contains_phrase, sentences, words

# ----------------------------------------------------------------------------- helpers

_RELATIONS = ("less than", "at least")


def _compare(count: int, relation: str, n: int) -> bool:
    """IFEval's two relations: "less than" N (count < N) and "at least" N (count >= N)."""
    if relation not in _RELATIONS:
        raise ValueError(f"relation must be one of {_RELATIONS}, got {relation!r}")
    return count < n if relation == "less than" else count >= n


def _count_phrase(text: str, phrase: str) -> int:
    return len(re.findall(rf"(?<![^\W_]){re.escape(phrase)}(?![^\W_])", text, re.IGNORECASE))


def _json_body(text: str) -> str:
    text = text.strip()
    m = re.match(r"^```(?:json|JSON)?\s*\n?(.*?)\n?```$", text, re.DOTALL)
    return m.group(1).strip() if m else text


# ----------------------------------------------------------------------------- checks
# One function per IFEval instruction kind: (response, **kwargs) -> bool.

def keywords_existence(response: str, keywords: list[str]) -> bool:
    return all(contains_phrase(response, k) for k in keywords)


def keywords_frequency(response: str, keyword: str, frequency: int, relation: str) -> bool:
    return _compare(_count_phrase(response, keyword), relation, frequency)


def keywords_forbidden_words(response: str, forbidden_words: list[str]) -> bool:
    return not any(contains_phrase(response, w) for w in forbidden_words)


def keywords_letter_frequency(response: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    return _compare(response.lower().count(letter.lower()), let_relation, let_frequency)


def number_sentences(response: str, num_sentences: int, relation: str) -> bool:
    return _compare(len(sentences(response)), relation, num_sentences)


def number_paragraphs(response: str, num_paragraphs: int) -> bool:
    """Paragraphs separated by the markdown divider ``***``; an empty paragraph fails."""
    parts = re.split(r"\s?\*\*\*\s?", response.strip())
    return len(parts) == num_paragraphs and all(p.strip() for p in parts)


def number_words(response: str, num_words: int, relation: str) -> bool:
    return _compare(len(words(response)), relation, num_words)


def nth_paragraph_first_word(response: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Exactly ``num_paragraphs`` paragraphs separated by blank lines; the nth starts with ``first_word``."""
    parts = [p.strip() for p in re.split(r"\n\s*\n", response.strip()) if p.strip()]
    if len(parts) != num_paragraphs or not 1 <= nth_paragraph <= len(parts):
        return False
    first = words(parts[nth_paragraph - 1])
    return bool(first) and first[0].lower().strip("'’") == first_word.lower()


def number_placeholders(response: str, num_placeholders: int) -> bool:
    return len(re.findall(r"\[[^\[\]\n]+\]", response)) >= num_placeholders


def postscript(response: str, postscript_marker: str) -> bool:
    """A line that starts with the marker ("P.S.", "P.P.S")."""
    marker = re.escape(postscript_marker.strip()).replace(r"\ ", r"\s?")
    return re.search(rf"(?m)^\s*{marker}", response, re.IGNORECASE) is not None


def number_bullet_lists(response: str, num_bullets: int) -> bool:
    """Exactly ``num_bullets`` markdown bullet lines (``* `` or ``- ``)."""
    return len(re.findall(r"(?m)^\s*[*-]\s", response)) == num_bullets


CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def constrained_response(response: str) -> bool:
    return any(option in response for option in CONSTRAINED_OPTIONS)


def number_highlighted_sections(response: str, num_highlights: int) -> bool:
    """At least ``num_highlights`` markdown highlights, ``*like this*`` or ``**like this**``."""
    found = re.findall(r"\*\*[^*\n]+\*\*|(?<!\*)\*[^*\n]+\*(?!\*)", response)
    return len([h for h in found if h.strip("* ")]) >= num_highlights


def multiple_sections(response: str, section_spliter: str, num_sections: int) -> bool:
    """At least ``num_sections`` sections, each opened by the splitter and a number ("Section 1")."""
    parts = re.split(rf"\s?{re.escape(section_spliter)}\s?\d+\s?", response, flags=re.IGNORECASE)
    return len(parts) - 1 >= num_sections


def json_format(response: str) -> bool:
    try:
        json.loads(_json_body(response))
    except ValueError:
        return False
    return True


def title(response: str) -> bool:
    return re.search(r"<<[^<>\n]*\S[^<>\n]*>>", response) is not None


def two_responses(response: str) -> bool:
    """Two different non-empty responses separated by six asterisks ``******``."""
    parts = [p.strip() for p in response.split("******")]
    return len(parts) == 2 and all(parts) and parts[0] != parts[1]


def repeat_prompt(response: str, prompt_to_repeat: str) -> bool:
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


def end_checker(response: str, end_phrase: str) -> bool:
    return response.strip().lower().endswith(end_phrase.strip().lower())


def quotation(response: str) -> bool:
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


def capital_word_frequency(response: str, capital_frequency: int, capital_relation: str) -> bool:
    caps = [w for w in words(response) if any(c.isalpha() for c in w) and w.isupper()]
    return _compare(len(caps), capital_relation, capital_frequency)


def english_capital(response: str) -> bool:
    return response.isupper()


def english_lowercase(response: str) -> bool:
    return response.islower()


def no_comma(response: str) -> bool:
    return "," not in response


# instruction id -> check; the id's prefix is its family (IFEval's groups).
INSTRUCTIONS = {
    "keywords:existence": keywords_existence,
    "keywords:frequency": keywords_frequency,
    "keywords:forbidden_words": keywords_forbidden_words,
    "keywords:letter_frequency": keywords_letter_frequency,
    "length_constraints:number_sentences": number_sentences,
    "length_constraints:number_paragraphs": number_paragraphs,
    "length_constraints:number_words": number_words,
    "length_constraints:nth_paragraph_first_word": nth_paragraph_first_word,
    "detectable_content:number_placeholders": number_placeholders,
    "detectable_content:postscript": postscript,
    "detectable_format:number_bullet_lists": number_bullet_lists,
    "detectable_format:constrained_response": constrained_response,
    "detectable_format:number_highlighted_sections": number_highlighted_sections,
    "detectable_format:multiple_sections": multiple_sections,
    "detectable_format:json_format": json_format,
    "detectable_format:title": title,
    "combination:two_responses": two_responses,
    "combination:repeat_prompt": repeat_prompt,
    "startend:end_checker": end_checker,
    "startend:quotation": quotation,
    "change_case:capital_word_frequency": capital_word_frequency,
    "change_case:english_capital": english_capital,
    "change_case:english_lowercase": english_lowercase,
    "punctuation:no_comma": no_comma,
}


def family(instruction_id: str) -> str:
    """``"detectable_format:title"`` -> ``"detectable_format"``."""
    return instruction_id.split(":", 1)[0]


def follows_instruction(instruction_id: str, kwargs: dict | None, response: str) -> bool:
    """True when ``response`` follows one IFEval instruction; an empty response follows none.

    ``kwargs`` are the instruction's arguments as IFEval writes them (``None`` values, which the
    real set uses for unused arguments, are dropped)."""
    if instruction_id not in INSTRUCTIONS:
        raise ValueError(f"unknown IFEval instruction {instruction_id!r}; known: {sorted(INSTRUCTIONS)}")
    if not response.strip():
        return False
    return bool(INSTRUCTIONS[instruction_id](response, **{k: v for k, v in (kwargs or {}).items() if v is not None}))


def judge(record: dict, response: str) -> list[bool]:
    """One result per instruction of an IFEval-style ``record`` (``instruction_id_list``, ``kwargs``)."""
    return [follows_instruction(i, kw, response) for i, kw in zip(record["instruction_id_list"], record["kwargs"])]


# ----------------------------------------------------------------------------- prompts

def load_ifeval_prompts(source: str | None = None, families: list[str] | None = None) -> list[dict]:
    """The outside judge's prompts: labkit's IFEval-style set (default), a JSONL path, or
    ``"google/IFEval"`` through ``datasets`` (online only; instructions labkit does not check are
    dropped, prompts left with none are skipped). ``families`` keeps prompts whose every
    instruction belongs to one of them. Each record gets ``id`` and ``prompt`` like labkit's."""
    if source == "google/IFEval":
        from datasets import load_dataset

        rows = [dict(r) for r in load_dataset("google/IFEval", split="train")]
    elif source:
        with open(source, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        text = (resources.files("labkit") / "resources" / "ifeval" / "prompts.jsonl").read_text(encoding="utf-8")
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    out = []
    for r in rows:
        kept = [(i, kw) for i, kw in zip(r["instruction_id_list"], r["kwargs"]) if i in INSTRUCTIONS]
        if not kept or (families and any(family(i) not in families for i, _ in kept)):
            continue
        out.append({"id": f"ifeval-{r['key']}", "key": r["key"], "prompt": r["prompt"],
                    "instruction_id_list": [i for i, _ in kept], "kwargs": [kw for _, kw in kept]})
    return out

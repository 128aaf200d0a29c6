"""Stage-1 hallucination rules: pure functions over one teacher output, datatrove style.

Each rule returns None (keep) or a reason code. `check_recaption` runs them all and returns every
reason that fired, so a report-mode run can store flags and an enforce-mode run can drop on the first.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import regex

_WORD = regex.compile(r"[\p{L}\p{M}\p{N}]+")

REFUSAL = re.compile(
    r"\b(i'?m sorry|i am sorry|i apologi[sz]e|i can(?:not|'t) (?:help|assist|see|view|determine|provide|answer)"
    r"|as an ai\b|as a language model|i'?m unable to|i am unable to|unable to (?:see|view) the image"
    r"|there is no image|cannot be determined from the image)",
    re.IGNORECASE,
)
# Template words that must never leak into a recaption (the paper's App. F example).
ECHO = re.compile(
    r"(reference answer|original caption|ground[- ]truth|reference code|the reference|task description"
    r"|enclose (?:your|the) (?:response|output)|</?answer>|\bRules:|\bTask:)",
    re.IGNORECASE,
)
ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.IGNORECASE | re.DOTALL)
_NUM = re.compile(r"-?\d+(?:[.,]\d+)?")
_NUMBER_WORDS = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
    "eight": "8", "nine": "9", "ten": "10", "eleven": "11", "twelve": "12",
}  # fmt: skip


def extract_tag(text: str, tag: str) -> str | None:
    """Text inside <tag>...</tag> (a missing close tag takes the rest); None when the tag is absent."""
    m = re.search(rf"<{tag}>(.*?)(?:</{tag}>|$)", text, re.IGNORECASE | re.DOTALL)
    return m.group(1).strip() if m else None


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Candidate:
    raw: str  # the teacher's whole output
    text: str  # the parsed recaption (inside <answer> when present)
    finish_reason: str | None
    question: str
    answer_gt: str


def rule_truncated(c: Candidate) -> str | None:
    return "truncated" if c.finish_reason == "length" else None


def rule_missing_tag(c: Candidate) -> str | None:
    return None if ANSWER_TAG.search(c.raw) else "missing_answer_tag"


def make_rule_empty(min_words: int) -> Callable[[Candidate], str | None]:
    def rule_empty(c: Candidate) -> str | None:
        return "empty_output" if len(words(c.text)) < min_words else None

    return rule_empty


def rule_refusal(c: Candidate) -> str | None:
    return "refusal" if REFUSAL.search(c.text) else None


def rule_prompt_echo(c: Candidate) -> str | None:
    if ECHO.search(c.text):
        return "prompt_echo"
    q = words(c.question)
    # A long verbatim run of the instruction (8+ words) counts as an echo, unless the question is that short.
    if len(q) >= 12:
        grams = {" ".join(q[i : i + 8]) for i in range(len(q) - 7)}
        t = " ".join(words(c.text))
        if any(g in t for g in grams):
            return "prompt_echo"
    return None


def _numbers(text: str) -> set[str]:
    found = {n.replace(",", ".") for n in _NUM.findall(text)}
    found |= {_NUMBER_WORDS[w] for w in words(text) if w in _NUMBER_WORDS}
    return found


def rule_gt_contradiction(c: Candidate) -> str | None:
    """Short ground truths are checkable: yes/no must not flip, a lone number must appear."""
    gt = c.answer_gt.strip().lower().rstrip(".")
    w = words(c.text)
    if gt in ("yes", "no"):
        first = next((x for x in w if x in ("yes", "no")), None)
        return "gt_contradiction" if first is not None and first != gt else None
    gt_nums = _numbers(gt)
    if len(words(gt)) <= 2 and len(gt_nums) == 1:
        got = _numbers(c.text)
        if got and not (gt_nums & got):
            return "gt_contradiction"
    return None


def check_recaption(c: Candidate, min_words: int = 3) -> list[str]:
    rules = (rule_truncated, rule_missing_tag, make_rule_empty(min_words), rule_refusal, rule_prompt_echo,
             rule_gt_contradiction)  # fmt: skip
    return [r for r in (rule(c) for rule in rules) if r]

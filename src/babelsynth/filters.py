"""Stage-1 hallucination rules: pure functions over one teacher output, datatrove style.

Each rule returns None (keep) or a reason code. `check_recaption` runs them all and returns every
reason that fired, so a report-mode run can store flags and an enforce-mode run can drop on the first.
The teacher metrics (words, tokens and MTLD before/after, drop rates per task type) are additive counters
with derived ratios, so per-shard stats merge exactly into the run's manifest (`merge_task_stats`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import regex

_WORD = regex.compile(r"[\p{L}\p{M}\p{N}]+")

REFUSAL = re.compile(
    r"\b(i'?m sorry|i am sorry|i apologi[sz]e"
    r"|i can(?:not|'t) (?:help|assist|see|view|determine|provide|answer)"
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
_MC_GT = re.compile(r"^\(?([A-H])\)?[.)]?$")  # a multiple-choice ground truth: "C", "(C)", "C."
# the option a text picks: "the answer is B", "option (B)", "B) ..." at the start; the letter is upper case
_MC_PICK = re.compile(r"\b(?i:answer|option|choice)\s*(?:is|:)?\s*\(?([A-H])\b\)?|^\s*\(?([A-H])\)[\s.:]")
_NUMBER_WORDS = {
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "eleven": "11",
    "twelve": "12",
}


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
    """Short ground truths are checkable: yes/no must not flip, a picked option letter must be the GT's,
    a lone number must appear."""
    gt = c.answer_gt.strip().lower().rstrip(".")
    w = words(c.text)
    if gt in ("yes", "no"):
        first = next((x for x in w if x in ("yes", "no")), None)
        return "gt_contradiction" if first is not None and first != gt else None
    mc = _MC_GT.match(c.answer_gt.strip())
    if mc:  # a multiple-choice letter: the picked option, when the text names one, must be it
        picks = {(a or b).upper() for a, b in _MC_PICK.findall(c.text)}
        return "gt_contradiction" if picks and mc.group(1) not in picks else None
    gt_nums = _numbers(gt)
    if len(words(gt)) <= 2 and len(gt_nums) == 1:
        got = _numbers(c.text)
        if got and not (gt_nums & got):
            return "gt_contradiction"
    return None


def rule_repetition_loop(c: Candidate, min_words: int = 20, max_repeated: float = 0.5) -> str | None:
    """A decoding loop ("the cat the cat the cat ..."): most word trigrams repeat an earlier one."""
    w = words(c.text)
    if len(w) < min_words:
        return None
    grams = [tuple(w[i : i + 3]) for i in range(len(w) - 2)]
    return "repetition_loop" if 1 - len(set(grams)) / len(grams) > max_repeated else None


def check_recaption(c: Candidate, min_words: int = 3) -> list[str]:
    rules = (
        rule_truncated,
        rule_missing_tag,
        make_rule_empty(min_words),
        rule_refusal,
        rule_prompt_echo,
        rule_gt_contradiction,
        rule_repetition_loop,
    )
    return [r for r in (rule(c) for rule in rules) if r]


# ---------------------------------------------------------------- teacher metrics per task type
# ratio -> (numerator, denominator): derived from additive counters, recomputed after every merge.
RATIOS = {
    "stage1_flag_rate": ("stage1_flagged", "records"),
    "stage1_drop_rate": ("stage1_dropped", "records"),
    "regeneration_rate": ("regenerated", "records"),
    "words_before_mean": ("words_before", "measured"),
    "words_after_mean": ("words_after", "measured"),
    "tokens_before_mean": ("tokens_before", "tokens_measured"),
    "tokens_after_mean": ("tokens_after", "tokens_measured"),
    "mtld_before_mean": ("mtld_before_sum", "mtld_before_n"),
    "mtld_after_mean": ("mtld_after_sum", "mtld_after_n"),
    "stage2_no_rate": ("stage2_no", "judged"),
    "stage2_drop_rate": ("stage2_dropped", "judged"),
}


def with_ratios(counters: dict) -> dict:
    """Counters plus every ratio whose numerator is present (None when the denominator is 0)."""
    out = {k: v for k, v in counters.items() if k not in RATIOS}
    for name, (num, den) in RATIOS.items():
        if num in out:
            out[name] = round(out[num] / out[den], 4) if out.get(den) else None
    return out


def merge_task_stats(acc: dict, new: dict) -> dict:
    """Sum two {task_type: counters} maps (ratios recomputed, not summed); returns acc."""
    for task, d in new.items():
        t = acc.setdefault(task, {})
        for k, v in d.items():
            if k not in RATIOS and isinstance(v, int | float):
                t[k] = round(t.get(k, 0) + v, 4)
        acc[task] = with_ratios(t)
    return acc


def task_stats(per_task: dict[str, dict]) -> dict:
    """Per-task counters with ratios, plus an `all` entry for the whole stage."""
    total: dict = {}
    for d in per_task.values():
        merge_task_stats(total, {"all": d})
    return {**{k: with_ratios(v) for k, v in sorted(per_task.items())}, **total}

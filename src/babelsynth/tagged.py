"""Answers inside <translation> tags, parsed robustly, and the token budget of such a request: shared by the
rephrase stage and the llm translator."""

from __future__ import annotations

import re

_OPEN = re.compile(r"<\s*translation\b[^<>]*>", re.IGNORECASE)
_CLOSE = re.compile(r"<\s*/\s*translation\s*>", re.IGNORECASE)
_FENCED = re.compile(r"\A(`{3,}|~{3,})[^\n`]*\n(.*?)\n?\1\s*\Z", re.DOTALL)
_QUOTES = {'"': '"', "“": "”", "«": "»", "„": "“", "「": "」", "'": "'"}


def parse_translation(raw: str, finish_reason: str | None = None, draft: str = "") -> tuple[str | None, str]:
    """(text, status) from a rephraser answer; status is ok, no_tag, empty or truncated.

    Tags may carry attributes, odd case or inner spaces (`< Translation lang="fr" >`); several tags take
    the last one with text (models echo the instruction's tags or restate); a missing close tag takes the
    rest, unless the answer was cut at the token limit. A code fence or quotes wrapped around the whole
    text are removed unless the draft has them too. The draft's leading/trailing whitespace is restored."""
    opens = list(_OPEN.finditer(raw))
    if not opens:
        return None, "no_tag"
    blocks: list[tuple[str, bool]] = []  # (content, closed)
    for k, m in enumerate(opens):
        end = opens[k + 1].start() if k + 1 < len(opens) else len(raw)
        c = _CLOSE.search(raw, m.end(), end)
        blocks.append((raw[m.end() : c.start()], True) if c else (_CLOSE.sub("", raw[m.end() : end]), False))
    closed = [b for b, ok in blocks if ok and b.strip()]
    if closed:
        text = closed[-1]
    else:
        text, ok = blocks[-1]
        if not ok and finish_reason == "length":
            return None, "truncated"
    text = _unwrap(text.strip(), draft.strip())
    if not text:
        return None, "empty"
    lead = draft[: len(draft) - len(draft.lstrip())]
    trail = draft[len(draft.rstrip()) :]
    return lead + text + trail, "ok"


def _unwrap(text: str, draft: str) -> str:
    for _ in range(2):  # a fence around quotes, or quotes around a fence
        m = _FENCED.match(text)
        if m and not _FENCED.match(draft):
            text = m.group(2).strip()
        if (
            len(text) >= 2
            and _QUOTES.get(text[0]) == text[-1]
            and not (draft[:1] == text[0] and draft[-1:] == text[-1])
        ):
            text = text[1:-1].strip()
    return text


BUDGET_FLOOR = 64  # tokens every rephrase may use, whatever its length (tags, a short answer in any script)


def token_budget(max_tokens: int, per_char: float | None, source: str, draft: str) -> int:
    """max_tokens of one rephrase request: proportional to its text, so a model caught in a loop stops
    early (the answer is then `truncated` and the draft kept) instead of generating up to max_tokens."""
    if per_char is None:
        return max_tokens
    return min(max_tokens, int(per_char * max(len(source), len(draft))) + BUDGET_FLOOR)

"""Split text into translatable segments and put translations back into the same structure.

NLLB is trained on single sentences: given several it silently drops some. So every text is cut into
lines and sentences; separators (newlines, list markers, spaces) are kept verbatim and reassembled, so
`reassemble(segments, same texts) == text` exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Leading list markers / indentation that stay untranslated: "- ", "* ", "1. ", "a) ", "| " ...
_PREFIX = re.compile(r"^(\s*(?:[-*•]|\d{1,3}[.)]|[a-zA-Z][.)]|\|)?\s*)")
_SENT = re.compile(r"(?<=[.!?。！？])(\s+)")
_HAS_WORD = re.compile(r"\w", re.UNICODE)


@dataclass
class Piece:
    text: str
    translate: bool


def split(text: str) -> list[Piece]:
    """Pieces whose concatenation is exactly `text`; only pieces with translate=True go to the model."""
    out: list[Piece] = []
    for line in re.split(r"(\n)", text):
        if line == "\n" or not line:
            if line:
                out.append(Piece(line, False))
            continue
        m = _PREFIX.match(line)
        prefix = m.group(1) if m else ""
        if prefix:
            out.append(Piece(prefix, False))
        body = line[len(prefix) :]
        trail = body[len(body.rstrip()) :]
        body = body[: len(body) - len(trail)] if trail else body
        for part in _SENT.split(body):
            if not part:
                continue
            out.append(Piece(part, bool(_HAS_WORD.search(part)) and not part.isspace()))
        if trail:
            out.append(Piece(trail, False))
    return out


def reassemble(pieces: list[Piece], translations: list[str]) -> str:
    """Replace each translatable piece, in order, with its translation."""
    it = iter(translations)
    return "".join(next(it) if p.translate else p.text for p in pieces)

"""Split text into translatable segments and put translations back into the same structure.

NLLB is trained on single sentences: given several it silently drops some, and it mangles code, math and
markup. So every text is cut into pieces whose concatenation is exactly the text:

* ``translate=True`` pieces are single sentences (or table cells, list-item bodies, headings) holding at
  least one letter; only these go to the model;
* everything else is kept byte for byte: whitespace, newlines, list / heading / quote markers, table pipes
  and separator rows, and *protected spans* (fenced and inline code, LaTeX / math, URLs, e-mail addresses,
  tags such as ``<answer>``, placeholders such as ``{name}`` or ``%s``) and letter-free text (numbers).

A protected span inside a sentence splits it: the words around it are translated as separate segments and
the span itself never reaches the model. That costs some fluency around the span but can neither drop nor
alter it, which a placeholder the model has to copy cannot promise.
``reassemble(split(t), [p.text for p in split(t) if p.translate]) == t`` for every string (property-tested).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# ------------------------------------------------------------------------------------------------ patterns

# Multi-line constructs, found before the text is cut into lines.
_FENCE_OPEN = re.compile(r"[ \t]*(`{3,}|~{3,})[^\n]*")
_BLOCK_MATH = re.compile(
    r"\$\$.+?\$\$"  # $$ display $$
    r"|\\\[.+?\\\]"  # \[ display \]
    r"|\\begin\{([A-Za-z]+\*?)\}.*?\\end\{\1\}",  # \begin{env} ... \end{env}
    re.S,
)

# Inline protected spans. Alternatives are tried left to right at each position.
_INLINE = re.compile(
    r"(`+)(?!`)[^\n]+?(?<!`)\1(?!`)"  # `code`, ``co`de`` (closed by a run of the same length)
    r"|\$\$[^\n]+?\$\$"  # $$x$$ on one line
    r"|\$(?=[^\s$])[^$\n]*?(?<=\S)\$(?!\d)"  # $x$ (pandoc rule, so "$5 and $6" is not math)
    r"|\\\(.+?\\\)"  # \( x \)
    r"|\\[A-Za-z]+\*?(?:\[[^\]\n]*\])?(?:\{[^{}\n]*\})*"  # \frac{a}{b}, \alpha, \section*{x}
    r"|(?:https?|ftp|file)://[^\s<>\"'`]+|www\.[A-Za-z0-9-]+\.[^\s<>\"'`]+"  # URLs
    r"|[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+"  # e-mail
    r"|</?[A-Za-z][\w:.-]*(?:\s[^<>\n]*)?/?>"  # tags: <answer>, </translation>, <br/>, <img src=x>
    r"|\{\{[^{}\n]*\}\}|\{[A-Za-z0-9_.:\[\]!-]*\}"  # placeholders: {{var}}, {name}, {0}, {}
    r"|%(?:\([A-Za-z_]\w*\))?[-+#0]*\d*(?:\.\d+)?[sdifrxXeEgGc](?![A-Za-z])"  # printf: %s, %(name)s, %.2f
)
_URL_TRAIL = ".,;:!?'\")]"

# Line prefixes kept verbatim: indentation, block quotes, headings, list markers, task boxes.
_PREFIX = re.compile(
    r"[ \t]*(?:>[ \t]?)*"
    r"(?:#{1,6}[ \t]+|(?:[-*+•]|\d{1,3}[.)]|[A-Za-z][.)])[ \t]+(?:\[[ xX]\][ \t]+)?)?"
)
_TABLE_SEP = re.compile(r"[ \t]*\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)+\|?[ \t]*\r?")
_PIPE = re.compile(r"(?<!\\)\|")

# Sentence ends: terminal punctuation, optional closing quotes/brackets, whitespace, then a non-lowercase.
_SENT_END = re.compile(r"[.!?…。！？]+[\"'”’)\]]*(\s+)(?=[^\s])")
_NO_SPLIT_AFTER = frozenset(
    (
        "mr mrs ms dr prof sr jr st vs fig figs no nos vol eq eqs cf e.g i.e approx al ca resp ref refs sec"
    ).split()
)
_LETTER = re.compile(r"[^\W\d_]")


@dataclass(frozen=True)
class Piece:
    text: str
    translate: bool
    kind: str = "text"  # text | space | marker | protected | table


# ------------------------------------------------------------------------------------------------ splitting


def split(text: str) -> list[Piece]:
    """Pieces whose concatenation is exactly `text`; only pieces with translate=True go to the model."""
    out: list[Piece] = []
    for chunk, protected in _blocks(text):
        if protected:
            out.append(Piece(chunk, False, "protected"))
        else:
            _lines(chunk, out)
    return _merge(out)


def reassemble(pieces: list[Piece], translations: list[str]) -> str:
    """Replace each translatable piece, in order, with its translation; counts must match exactly."""
    n = sum(p.translate for p in pieces)
    if n != len(translations):
        raise ValueError(f"{n} translatable segments but {len(translations)} translations")
    it = iter(translations)
    return "".join(next(it) if p.translate else p.text for p in pieces)


def segments(text: str) -> list[str]:
    """The texts that would be sent to the model, in order."""
    return [p.text for p in split(text) if p.translate]


def _blocks(text: str) -> list[tuple[str, bool]]:
    """Cut out fenced code (to its closing fence, or to the end if unclosed) and multi-line math."""
    out: list[tuple[str, bool]] = []
    pos = 0
    i = 0
    n = len(text)
    while i < n:
        line_end = text.find("\n", i)
        line_end = n if line_end < 0 else line_end
        m = _FENCE_OPEN.fullmatch(text, i, line_end)
        if m:
            fence = m.group(1)
            close = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*\r?(?=\n|$)", re.M)
            c = close.search(text, line_end + 1) if line_end < n else None
            end = c.end() if c else n
            out.extend(_math_blocks(text[pos:i]))
            out.append((text[i:end], True))
            pos = i = end
            continue
        i = line_end + 1
    out.extend(_math_blocks(text[pos:]))
    return [(t, p) for t, p in out if t]


def _math_blocks(text: str) -> list[tuple[str, bool]]:
    out, pos = [], 0
    for m in _BLOCK_MATH.finditer(text):
        out += [(text[pos : m.start()], False), (m.group(0), True)]
        pos = m.end()
    out.append((text[pos:], False))
    return out


def _lines(chunk: str, out: list[Piece]) -> None:
    lines = chunk.split("\n")
    table = _table_rows(lines)
    for k, line in enumerate(lines):
        if k:
            out.append(Piece("\n", False, "space"))
        if not line:
            continue
        if k in table:
            _table_row(line, out)
            continue
        prefix = _PREFIX.match(line).group(0)
        if prefix:
            out.append(Piece(prefix, False, "marker"))
        _inline(line[len(prefix) :], out)


def _table_rows(lines: list[str]) -> set[int]:
    """Markdown table rows: a separator row (|---|:--:|) and the pipe-holding lines around it."""
    rows: set[int] = set()
    for k, line in enumerate(lines):
        if "|" in line and "-" in line and _TABLE_SEP.fullmatch(line):
            j = k - 1
            while j >= 0 and "|" in lines[j] and lines[j].strip():
                rows.add(j)
                j -= 1
            j = k
            while j < len(lines) and "|" in lines[j] and lines[j].strip():
                rows.add(j)
                j += 1
    return rows


def _table_row(line: str, out: list[Piece]) -> None:
    if _TABLE_SEP.fullmatch(line):
        out.append(Piece(line, False, "table"))
        return
    pos = 0
    for m in _PIPE.finditer(line):
        _inline(line[pos : m.start()], out)
        out.append(Piece("|", False, "table"))
        pos = m.end()
    _inline(line[pos:], out)


def _inline(body: str, out: list[Piece]) -> None:
    """Protected spans are kept; the text between them is cut into sentences."""
    pos = 0
    i = 0
    while True:
        m = _INLINE.search(body, i)
        if not m:
            break
        start, end = m.start(), m.end()
        if body[start].isalpha() and body[start : start + 3] in ("htt", "ftp", "fil", "www"):
            while end > start and body[end - 1] in _URL_TRAIL and not _balanced_paren(body[start:end]):
                end -= 1
        if end <= start:
            i = start + 1
            continue
        _sentences(body[pos:start], out)
        out.append(Piece(body[start:end], False, "protected"))
        pos = i = end
    _sentences(body[pos:], out)


def _balanced_paren(url: str) -> bool:
    """A trailing ')' stays in a URL whose parentheses balance (wiki links)."""
    return url.endswith(")") and url.count("(") >= url.count(")")


def _sentences(text: str, out: list[Piece]) -> None:
    pos = 0
    for m in _SENT_END.finditer(text):
        if not _is_boundary(text, m):
            continue
        _segment(text[pos : m.start(1)], out)
        out.append(Piece(m.group(1), False, "space"))
        pos = m.end(1)
    _segment(text[pos:], out)


def _is_boundary(text: str, m: re.Match) -> bool:
    nxt = text[m.end(1) : m.end(1) + 1]
    if nxt.islower():
        return False
    word = text[: m.start(1)].rsplit(None, 1)[-1].lstrip("(\"'“‘[").rstrip(".\"'”’)]")
    if word.lower() in _NO_SPLIT_AFTER:
        return False
    return not (len(word) == 1 and word.isupper() and text[m.start(1) - 1] == ".")  # initials: "J. Smith"


def _segment(text: str, out: list[Piece]) -> None:
    """Whitespace around a segment is kept; letter-free text (numbers, symbols) is not translated."""
    if not text:
        return
    core = text.strip()
    if not core:
        out.append(Piece(text, False, "space"))
        return
    lead = text[: len(text) - len(text.lstrip())]
    trail = text[len(text.rstrip()) :]
    if lead:
        out.append(Piece(lead, False, "space"))
    out.append(Piece(core, bool(_LETTER.search(core)), "text"))
    if trail:
        out.append(Piece(trail, False, "space"))


def _merge(pieces: list[Piece]) -> list[Piece]:
    """Adjacent kept pieces become one (fewer pieces, same text)."""
    out: list[Piece] = []
    for p in pieces:
        if out and not p.translate and not out[-1].translate and p.kind == out[-1].kind:
            out[-1] = Piece(out[-1].text + p.text, False, p.kind)
        else:
            out.append(p)
    return out

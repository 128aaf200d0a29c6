"""LLM post-edit of the NLLB drafts (the paper's fix for translationese), parsed robustly.

The rephraser sees the English original and the draft and answers inside <translation> tags. Anything
that cannot be trusted keeps the draft, with the reason in `rephrase_status` (one status per part,
"prompt,answer"): no tag, empty, cut at the token limit, refused by the server, or (keep_structure) a
protected span (code, URL, placeholder) or the line structure of the draft lost on the way.
"""

from __future__ import annotations

import re
from collections import Counter

from babelsynth.languages import SOURCE_LANG, language_name
from babelsynth.prompts import load_prompt
from babelsynth.stages.base import Context, Stage, StageResult, stable_seed

READS = ("lang", "prompt_en", "answer_en", "draft_prompt", "draft_answer")
WRITES = ("rephrase_prompt", "rephrase_answer", "rephrase_status", "rephraser_model")

_OPEN = re.compile(r"<\s*translation\b[^<>]*>", re.IGNORECASE)
_CLOSE = re.compile(r"<\s*/\s*translation\s*>", re.IGNORECASE)
_FENCED = re.compile(r"\A(`{3,}|~{3,})[^\n`]*\n(.*?)\n?\1\s*\Z", re.DOTALL)
_QUOTES = {'"': '"', "“": "”", "«": "»", "„": "“", "「": "」", "'": "'"}
_MARKER = re.compile(r"^[ \t]*(?:[-*+•]|\d{1,3}[.)]|#{1,6}(?=\s)|>|\|)?")


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


def structure_problem(source: str, draft: str, text: str) -> str | None:
    """Why a rephrase broke the draft's structure, or None: every protected span of the English source
    (code, URL, e-mail, tag, placeholder; metrics.protected_spans) that the draft carries must survive
    verbatim
    (an NLLB artefact such as <unk> is not in the source, so it may go), and lines keep their count and
    their list/heading/table markers."""
    from babelsynth.metrics import protected_spans

    need = Counter(x for x in protected_spans(source) if x.strip())
    for span, n in need.items():
        if text.count(span) < min(n, draft.count(span)):
            return "lost_protected_span"
    d_lines, t_lines = draft.strip().split("\n"), text.strip().split("\n")
    if len(d_lines) != len(t_lines):
        return "line_structure_changed"
    if [_MARKER.match(x).group(0).strip() for x in d_lines] != [
        _MARKER.match(x).group(0).strip() for x in t_lines
    ]:
        return "line_structure_changed"
    return None


def rephrase(ctx: Context, rows: list[dict]) -> StageResult:
    """LLM post-edit of each draft given the English original; an unusable answer keeps the draft.

    Identical (language, source, draft) parts are asked once (their seed depends only on that content)."""
    from babelsynth.backends.chat import ChatRequest

    rc = ctx.cfg.rephrase
    todo = [i for i, r in enumerate(rows) if r["lang"] != SOURCE_LANG]
    out = [
        dict(r, rephrase_prompt=None, rephrase_answer=None, rephrase_status="source", rephraser_model=None)
        for r in rows
    ]
    if not rc.enabled or not todo:
        for i in todo:
            out[i]["rephrase_status"] = "disabled"
        return StageResult(out)
    client = ctx.chat("rephraser")
    p = load_prompt("rephrase", "translation", rc.prompt_version)
    parts = (
        ("prompt_en", "draft_prompt", "rephrase_prompt"),
        ("answer_en", "draft_answer", "rephrase_answer"),
    )
    uniq: dict[tuple[str, str, str], int] = {}
    reqs = []
    for i in todo:
        r = rows[i]
        for src_col, draft_col, _ in parts:
            key = (r["lang"], r[src_col], r[draft_col] or "")
            if key[2].strip() and key not in uniq:
                uniq[key] = len(reqs)
                msgs = p.render(source=key[1], draft=key[2], language=language_name(key[0]))
                reqs.append(ChatRequest(msgs, rc.max_tokens, rc.temperature, seed=stable_seed(rc.seed, *key)))
    res = client.chat_many(reqs)
    counts: Counter = Counter()
    for i in todo:
        r, statuses = rows[i], []
        for src_col, draft_col, out_col in parts:
            draft = r[draft_col] or ""
            j = uniq.get((r["lang"], r[src_col], draft))
            if j is None:
                text, status = None, "empty_draft"
            elif res[j].error:
                text, status = None, "request_rejected"
            else:
                text, status = parse_translation(res[j].text, res[j].finish_reason, draft)
                if text is not None and rc.keep_structure:
                    problem = structure_problem(r[src_col], draft, text)
                    text, status = (None, problem) if problem else (text, status)
            out[i][out_col] = text
            statuses.append(status)
            counts[f"rephrase_{status}"] += 1
        out[i]["rephrase_status"] = "ok" if statuses == ["ok", "ok"] else ",".join(statuses)
        out[i]["rephraser_model"] = client.model_id
    return StageResult(
        out, [], {"requests_sent": getattr(client, "sent", 0), "rephrase_requests": len(reqs), **counts}
    )


STAGE = Stage("rephrase", rephrase, READS, WRITES)

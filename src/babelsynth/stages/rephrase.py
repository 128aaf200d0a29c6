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
from babelsynth.tagged import BUDGET_FLOOR as BUDGET_FLOOR  # re-exported: tests and older callers
from babelsynth.tagged import parse_translation, token_budget

READS = ("lang", "prompt_en", "answer_en", "draft_prompt", "draft_answer", "followups_en", "followups_draft")
WRITES = ("rephrase_prompt", "rephrase_answer", "followups_rephrase", "rephrase_status", "rephraser_model")
# config keys the output depends on (fingerprint.py)
CONFIG = ("models.rephraser", "rephrase")

_MARKER = re.compile(r"^[ \t]*(?:[-*+•]|\d{1,3}[.)]|#{1,6}(?=\s)|>|\|)?")


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


def text_parts(row: dict) -> list[tuple[str, str | None]]:
    """(English text, its draft) of every turn of a translated sample, in conversation order."""
    more_en, more_draft = row.get("followups_en") or [], row.get("followups_draft") or []
    return [(row["prompt_en"], row["draft_prompt"]), (row["answer_en"], row["draft_answer"])] + [
        (t["content"], d) for t, d in zip(more_en, more_draft)
    ]


def rephrase(ctx: Context, rows: list[dict]) -> StageResult:
    """LLM post-edit of each draft given the English original; an unusable answer keeps the draft.

    Identical (language, source, draft) parts are asked once (their seed depends only on that content)."""
    from babelsynth.backends.chat import ChatRequest

    rc = ctx.cfg.rephrase
    todo = [i for i, r in enumerate(rows) if r["lang"] != SOURCE_LANG]
    out = [
        dict(
            r,
            rephrase_prompt=None,
            rephrase_answer=None,
            followups_rephrase=None,
            rephrase_status="source",
            rephraser_model=None,
        )
        for r in rows
    ]
    if not rc.enabled or not todo:
        for i in todo:
            out[i]["rephrase_status"] = "disabled"
        return StageResult(out)
    client = ctx.chat("rephraser")
    p = load_prompt("rephrase", "translation", rc.prompt_version)
    parts = {i: text_parts(rows[i]) for i in todo}
    uniq: dict[tuple[str, str, str], int] = {}
    reqs = []
    for i in todo:
        r = rows[i]
        for src, draft in parts[i]:
            key = (r["lang"], src, draft or "")
            if key[2].strip() and key not in uniq:
                uniq[key] = len(reqs)
                msgs = p.render(source=key[1], draft=key[2], language=language_name(key[0]))
                budget = token_budget(rc.max_tokens, rc.tokens_per_char, key[1], key[2])
                reqs.append(ChatRequest(msgs, budget, rc.temperature, seed=stable_seed(rc.seed, *key)))
    res = client.chat_many(reqs)
    counts: Counter = Counter()
    for i in todo:
        r, statuses, texts = rows[i], [], []
        for src, maybe_draft in parts[i]:
            draft = maybe_draft or ""
            j = uniq.get((r["lang"], src, draft))
            if j is None:
                text, status = None, "empty_draft"
            elif res[j].error:
                text, status = None, "request_rejected"
            else:
                text, status = parse_translation(res[j].text, res[j].finish_reason, draft)
                if text is not None and rc.keep_structure:
                    problem = structure_problem(src, draft, text)
                    text, status = (None, problem) if problem else (text, status)
            texts.append(text)
            statuses.append(status)
            counts[f"rephrase_{status}"] += 1
        out[i]["rephrase_prompt"], out[i]["rephrase_answer"] = texts[0], texts[1]
        out[i]["followups_rephrase"] = texts[2:]
        out[i]["rephrase_status"] = "ok" if set(statuses) == {"ok"} else ",".join(statuses)
        out[i]["rephraser_model"] = client.model_id
    errors = sum("request_rejected" in (out[i]["rephrase_status"] or "") for i in todo)
    return StageResult(
        out,
        [],
        {"requests_sent": getattr(client, "sent", 0), "rephrase_requests": len(reqs), **counts},
        errors=errors,
    )


STAGE = Stage("rephrase", rephrase, READS, WRITES, CONFIG)

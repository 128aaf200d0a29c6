"""LLM post-edit of the NLLB drafts."""

from __future__ import annotations

from babelsynth.filters import extract_tag
from babelsynth.languages import SOURCE_LANG, language_name
from babelsynth.prompts import load_prompt
from babelsynth.stages.base import Context, StageResult
from babelsynth.stages.base import stable_seed


READS = ("lang", "prompt_en", "answer_en", "draft_prompt", "draft_answer")
WRITES = ("rephrase_prompt", "rephrase_answer", "rephrase_status", "rephraser_model")


def rephrase(ctx: Context, rows: list[dict]) -> StageResult:
    """LLM post-edit of each draft given the English original; an unparsable answer keeps the draft."""
    from babelsynth.backends.chat_http import ChatRequest

    rc = ctx.cfg.rephrase
    todo = [i for i, r in enumerate(rows) if r["lang"] != SOURCE_LANG]
    out = [dict(r, rephrase_prompt=None, rephrase_answer=None, rephrase_status="source", rephraser_model=None)
           for r in rows]  # fmt: skip
    if not rc.enabled or not todo:
        for i in todo:
            out[i]["rephrase_status"] = "disabled"
        return StageResult(out)
    client = ctx.chat("rephraser")
    p = load_prompt("rephrase", "translation", rc.prompt_version)
    reqs = []
    for i in todo:
        r = rows[i]
        for src, draft, part in ((r["prompt_en"], r["draft_prompt"], "p"), (r["answer_en"], r["draft_answer"], "a")):
            msgs = p.render(source=src, draft=draft, language=language_name(r["lang"]))
            reqs.append(ChatRequest(msgs, rc.max_tokens, rc.temperature, seed=stable_seed(rc.seed, r["source_id"], r["lang"], part)))
    res = client.chat_many(reqs)
    for k, i in enumerate(todo):
        statuses = []
        for j, col in ((2 * k, "rephrase_prompt"), (2 * k + 1, "rephrase_answer")):
            text = extract_tag(res[j].text, "translation")
            if res[j].error:
                statuses.append("request_rejected")
            elif text is None:
                statuses.append("no_tag")
            elif not text:
                statuses.append("empty")
            elif res[j].finish_reason == "length" and "</translation>" not in res[j].text:
                statuses.append("truncated")
            else:
                out[i][col] = text
                statuses.append("ok")
        out[i]["rephrase_status"] = "ok" if statuses == ["ok", "ok"] else ",".join(statuses)
        out[i]["rephraser_model"] = client.model_id
    return StageResult(out, [], {"requests_sent": client.sent})

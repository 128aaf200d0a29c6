"""Recaption with the teacher VLM, then the stage-1 rules."""

from __future__ import annotations

from babelsynth.filters import Candidate, check_recaption, extract_tag
from babelsynth.prompts import load_prompt
from babelsynth.stages.base import Context, StageResult, reject
from babelsynth.stages.base import stable_seed


READS = ("source_id", "task_type", "question", "answer_gt", "image_ids")
WRITES = ("answer_en", "recaption_prompt_id", "recaption_prompt_sha", "teacher_model", "filter_flags",
                    "recaption_attempts")  # fmt: skip


def recaption(ctx: Context, rows: list[dict]) -> StageResult:
    """Teacher VLM rewrites the answer anchored on the ground truth; stage-1 rules with regeneration.

    Drop reasons (enforce mode, after max_regenerations): truncated, missing_answer_tag, empty_output,
    refusal, prompt_echo, gt_contradiction.
    """
    from babelsynth.backends.chat_http import ChatRequest, user_with_images

    rc, rules = ctx.cfg.recaption, ctx.cfg.filter.rules
    teacher = ctx.chat("teacher")
    images = ctx.images()
    pending = list(range(len(rows)))
    done: dict[int, dict] = {}
    rejected = []
    flags_hist: dict[int, list[list[str]]] = {}
    for attempt in range(rules.max_regenerations + 1):
        if not pending:
            break
        reqs = []
        for i in pending:
            r = rows[i]
            p = load_prompt("recaption", r["task_type"], rc.prompt_version)
            msgs = p.render(question=r["question"], answer=r["answer_gt"])
            imgs = [images[iid] for iid in r["image_ids"]]
            msgs[1] = user_with_images(msgs[1]["content"], imgs, teacher.cfg.image_max_side)
            reqs.append(ChatRequest(msgs, rc.max_tokens, rc.temperature, rc.top_p,
                                    seed=stable_seed(rc.seed, r["source_id"], attempt)))  # fmt: skip
        results = teacher.chat_many(reqs)
        retry = []
        for i, res in zip(pending, results):
            r = rows[i]
            if res.error:
                rejected.append(reject(r, "recaption", "teacher_request_rejected", res.error))
                continue
            text = extract_tag(res.text, "answer")
            text = res.text.strip() if text is None else text
            flags = check_recaption(Candidate(res.text, text, res.finish_reason, r["question"], r["answer_gt"]),
                                    rules.min_words)  # fmt: skip
            flags_hist.setdefault(i, []).append(flags)
            p = load_prompt("recaption", r["task_type"], rc.prompt_version)
            out = {**r, "answer_en": text, "recaption_prompt_id": p.id, "recaption_prompt_sha": p.sha,
                   "teacher_model": teacher.model_id, "filter_flags": flags, "recaption_attempts": attempt + 1,
                   "recaption_tokens": res.completion_tokens}  # fmt: skip
            if not flags or rules.mode == "report":
                done[i] = out
            elif attempt < rules.max_regenerations:
                retry.append(i)
            else:
                rejected.append(reject(out, "recaption", flags[0], f"flags per attempt: {flags_hist[i]}"))
        pending = retry
    kept = [done[i] for i in sorted(done)]
    return StageResult(kept, rejected, {"requests_sent": teacher.sent, "regenerated": sum(
        1 for h in flags_hist.values() if len(h) > 1)})  # fmt: skip

"""Recaption with the teacher VLM, then the stage-1 rules; teacher metrics per task type."""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor

from babelsynth.filters import Candidate, check_recaption, extract_tag, task_stats, words
from babelsynth.metrics import mtld
from babelsynth.prompts import load_prompt
from babelsynth.stages.base import Context, Stage, StageResult, flag_or_reject, reject, stable_seed

READS = ("source_id", "task_type", "question", "answer_gt", "image_ids")
WRITES = (
    "answer_en",
    "recaption_prompt_id",
    "recaption_prompt_sha",
    "teacher_model",
    "filter_flags",
    "recaption_attempts",
    "recaption_tokens",
)
COUNTERS = (
    "records",
    "stage1_flagged",
    "stage1_dropped",
    "regenerated",
    "request_errors",
    "measured",
    "words_before",
    "words_after",
    "tokens_measured",
    "tokens_before",
    "tokens_after",
    "mtld_before_sum",
    "mtld_before_n",
    "mtld_after_sum",
    "mtld_after_n",
)


def recaption(ctx: Context, rows: list[dict]) -> StageResult:
    """Teacher VLM rewrites the answer anchored on the ground truth; stage-1 rules with regeneration.

    A flagged output is regenerated under a new seed up to max_regenerations times. Drop reasons (enforce
    mode, after the last attempt): truncated, missing_answer_tag, empty_output, refusal, prompt_echo,
    gt_contradiction, repetition_loop; teacher_request_rejected when the server refuses the request.
    Stats: requests_sent, regenerated, and by_task (words, tokens, MTLD before/after; stage-1 rates).
    """
    with ThreadPoolExecutor(1) as pool:  # the ground truths' token counts (metrics) overlap the generation
        teacher = ctx.chat("teacher")
        gt_tokens = pool.submit(teacher.count_tokens, sorted({r["answer_gt"] for r in rows}))
        return _recaption(ctx, rows, teacher, gt_tokens)


def _recaption(ctx: Context, rows: list[dict], teacher, gt_tokens: Future) -> StageResult:
    from babelsynth.backends.chat import ChatRequest, image_data_url, user_with_image_urls

    rc = ctx.cfg.recaption
    images = _images(ctx)
    urls: dict[str, str] = {}  # each image encoded once, reused by regenerations

    def url(iid: str) -> str:
        if iid not in urls:
            urls[iid] = image_data_url(images[iid], teacher.cfg.image_max_side)
        return urls[iid]

    pending = list(range(len(rows)))
    done: dict[int, dict] = {}
    rejected = []
    flags_hist: dict[int, list[list[str]]] = {}
    by_task: dict[str, dict] = defaultdict(lambda: dict.fromkeys(COUNTERS, 0))
    for r in rows:
        by_task[r["task_type"]]["records"] += 1
    for attempt in range(rc.max_regenerations + 1):
        if not pending:
            break
        reqs = []
        for i in pending:
            r = rows[i]
            p = load_prompt("recaption", r["task_type"], rc.prompt_version)
            msgs = p.render(question=r["question"], answer=r["answer_gt"])
            msgs[1] = user_with_image_urls(msgs[1]["content"], [url(iid) for iid in r["image_ids"]])
            reqs.append(
                ChatRequest(
                    msgs,
                    rc.max_tokens,
                    rc.temperature,
                    rc.top_p,
                    seed=stable_seed(rc.seed, r["source_id"], attempt),
                )
            )
        results = teacher.chat_many(reqs)
        retry = []
        for i, res in zip(pending, results):
            r = rows[i]
            t = by_task[r["task_type"]]
            if res.error:
                t["request_errors"] += 1
                rejected.append(reject(r, "recaption", "teacher_request_rejected", res.error))
                continue
            text = extract_tag(res.text, "answer")
            text = res.text.strip() if text is None else text
            flags = check_recaption(
                Candidate(res.text, text, res.finish_reason, r["question"], r["answer_gt"]), rc.min_words
            )
            flags_hist.setdefault(i, []).append(flags)
            p = load_prompt("recaption", r["task_type"], rc.prompt_version)
            out = {
                **r,
                "answer_en": text,
                "recaption_prompt_id": p.id,
                "recaption_prompt_sha": p.sha,
                "teacher_model": teacher.model_id,
                "filter_flags": [],
                "recaption_attempts": attempt + 1,
                "recaption_tokens": res.completion_tokens,
            }
            if flags and rc.mode == "enforce" and attempt < rc.max_regenerations:
                retry.append(i)
                continue
            problems = [
                (f, f"flags per attempt: {flags_hist[i]}" if not k else "") for k, f in enumerate(flags)
            ]
            kept_row, dropped = flag_or_reject(out, "recaption", problems, rc.mode)
            if dropped:
                rejected.append(dropped)
                t["stage1_dropped"] += 1
            else:
                done[i] = kept_row
            t["stage1_flagged"] += bool(flags)
        pending = retry
    for i, h in flags_hist.items():
        by_task[rows[i]["task_type"]]["regenerated"] += len(h) > 1
    kept = [done[i] for i in sorted(done)]
    _measure(teacher, kept, by_task, dict(zip(sorted({r["answer_gt"] for r in rows}), gt_tokens.result())))
    stats = {
        "requests_sent": teacher.sent,
        "tokenize_requests": teacher.tokenize_sent,
        "regenerated": sum(1 for h in flags_hist.values() if len(h) > 1),
        "by_task": task_stats({k: dict(v) for k, v in by_task.items()}),
    }
    return StageResult(kept, rejected, stats)


def _images(ctx: Context) -> dict[str, bytes]:
    """The shard's images (content id -> bytes), from ingest's artifact."""
    t = ctx.artifact("ingest", "images")
    return dict(zip(t.column("image_id").to_pylist(), t.column("image").to_pylist())) if t is not None else {}


def _measure(teacher, kept: list[dict], by_task: dict[str, dict], gt_tokens: dict[str, int | None]) -> None:
    """Words, teacher-tokenizer tokens and MTLD of the ground truth (before) and the recaption (after)."""
    after_tokens = teacher.count_tokens([r["answer_en"] for r in kept]) if kept else []
    for r, ta in zip(kept, after_tokens):
        t = by_task[r["task_type"]]
        before, after = r["answer_gt"], r["answer_en"]
        t["measured"] += 1
        t["words_before"] += len(words(before))
        t["words_after"] += len(words(after))
        tb = gt_tokens.get(before)
        if tb is not None and ta is not None:
            t["tokens_measured"] += 1
            t["tokens_before"] += tb
            t["tokens_after"] += ta
        for side, text in (("before", before), ("after", after)):
            m, _ = mtld(text, "eng_Latn")
            if m is not None:
                t[f"mtld_{side}_sum"] += m
                t[f"mtld_{side}_n"] += 1


STAGE = Stage("recaption", recaption, READS, WRITES)

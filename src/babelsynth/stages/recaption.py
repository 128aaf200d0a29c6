"""Recaption with the teacher VLM, then the stage-1 rules; teacher metrics per task type."""

from __future__ import annotations

import base64
import functools
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from babelsynth.filters import Candidate, check_recaption, extract_tag, task_stats, words
from babelsynth.metrics import mtld
from babelsynth.prompts import load_prompt
from babelsynth.stages.base import Context, Stage, StageResult, flag_or_reject, reject, stable_seed

READS = ("source_id", "task_type", "question", "answer_gt", "followups_gt", "image_ids")
WRITES = (
    "answer_en",
    "followups_en",
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
# config keys the output depends on (fingerprint.py)
CONFIG = ("models.teacher", "recaption")


def recaption(ctx: Context, rows: list[dict]) -> StageResult:
    """Teacher VLM rewrites each answer anchored on its ground truth; stage-1 rules with regeneration.

    Every assistant turn is its own request: the first exchange as a single-turn sample; a later turn with
    the conversation so far (its ground-truth turns, images in the first user turn) before the prompt
    template of that turn, so all turns are asked at once. A flagged output is regenerated under a new
    seed up to max_regenerations times. A sample is kept only if every turn is. Drop reasons (enforce
    mode, after the last attempt): truncated, missing_answer_tag, empty_output, refusal, prompt_echo,
    gt_contradiction, repetition_loop; teacher_request_rejected when the server refuses a request.
    Stats: requests_sent, regenerated, and by_task (words, tokens, MTLD before/after of the first answer;
    stage-1 rates per sample).
    """
    with ThreadPoolExecutor(1) as pool:  # the ground truths' token counts (metrics) overlap the generation
        teacher = ctx.chat("teacher")
        gt_tokens = pool.submit(teacher.count_tokens, sorted({r["answer_gt"] for r in rows}))
        return _recaption(ctx, rows, teacher, gt_tokens)


def exchanges(row: dict) -> list[tuple[str, str]]:
    """(user, ground-truth answer) of every exchange of a sample, in order."""
    more = row.get("followups_gt") or []
    return [(row["question"], row["answer_gt"])] + [
        (more[k]["content"], more[k + 1]["content"]) for k in range(0, len(more) - 1, 2)
    ]


def _messages(p, ex: list[tuple[str, str]], t: int, urls: list[str]) -> list[dict]:
    """The recaption request of exchange t: the template alone for the first, else the conversation so
    far (ground truth, images with the first user turn) followed by the template of exchange t."""
    from babelsynth.backends.chat import user_with_image_urls

    msgs = p.render(question=ex[t][0], answer=ex[t][1])
    if t == 0:
        return [msgs[0], user_with_image_urls(msgs[1]["content"], urls)]
    history = [user_with_image_urls(ex[0][0], urls), {"role": "assistant", "content": ex[0][1]}]
    for q, a in ex[1:t]:
        history += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return [msgs[0], *history, msgs[1]]


def _recaption(ctx: Context, rows: list[dict], teacher, gt_tokens: Future) -> StageResult:
    from babelsynth.backends.chat import ChatRequest

    rc = ctx.cfg.recaption
    sides = teacher.cfg.image_max_side_by_task  # documents and screenshots keep more pixels than photos
    by_side: dict[int, dict[str, Callable[[], str]]] = {}
    urls: dict[
        tuple[str, int], str
    ] = {}  # each image encoded once per size, reused by regenerations and turns

    def url(iid: str, task: str) -> str:
        side = sides.get(task, teacher.cfg.image_max_side)
        if side not in by_side:
            by_side[side] = image_urls(ctx, side)
        if (iid, side) not in urls:
            urls[(iid, side)] = by_side[side][iid]()
        return urls[(iid, side)]

    ex = [exchanges(r) for r in rows]
    pending = [(i, t) for i, e in enumerate(ex) for t in range(len(e))]
    final: dict[tuple[int, int], dict] = {}
    flags_hist: dict[tuple[int, int], list[list[str]]] = {}
    by_task: dict[str, dict] = defaultdict(lambda: dict.fromkeys(COUNTERS, 0))
    for r in rows:
        by_task[r["task_type"]]["records"] += 1
    for attempt in range(rc.max_regenerations + 1):
        if not pending:
            break
        reqs = []
        for i, t in pending:
            r = rows[i]
            p = load_prompt("recaption", r["task_type"], rc.prompt_version)
            seed = (
                stable_seed(rc.seed, r["source_id"], attempt)
                if t == 0
                else stable_seed(rc.seed, r["source_id"], t, attempt)
            )
            msgs = _messages(p, ex[i], t, [url(iid, r["task_type"]) for iid in r["image_ids"]])
            reqs.append(ChatRequest(msgs, rc.max_tokens, rc.temperature, rc.top_p, seed=seed))
        results = teacher.chat_many(reqs)
        retry = []
        for job, res in zip(pending, results):
            i, t = job
            if res.error:
                final[job] = {"error": res.error}
                continue
            text = extract_tag(res.text, "answer")
            text = res.text.strip() if text is None else text
            q, gt = ex[i][t]
            flags = check_recaption(Candidate(res.text, text, res.finish_reason, q, gt), rc.min_words)
            flags_hist.setdefault(job, []).append(flags)
            if flags and rc.mode == "enforce" and attempt < rc.max_regenerations:
                retry.append(job)
                continue
            final[job] = {
                "text": text,
                "flags": flags,
                "tokens": res.completion_tokens,
                "attempts": attempt + 1,
            }
        pending = retry
    kept, rejected = [], []
    for i, r in enumerate(rows):
        t_stats = by_task[r["task_type"]]
        jobs = [(i, t) for t in range(len(ex[i]))]
        errors = [final[j]["error"] for j in jobs if "error" in final[j]]
        t_stats["regenerated"] += any(len(flags_hist.get(j, [])) > 1 for j in jobs)
        if errors:
            t_stats["request_errors"] += len(errors)
            rejected.append(reject(r, "recaption", "teacher_request_rejected", errors[0]))
            continue
        p = load_prompt("recaption", r["task_type"], rc.prompt_version)
        texts = [final[j]["text"] for j in jobs]
        more = r.get("followups_gt") or []
        out = {
            **r,
            "answer_en": texts[0],
            "followups_en": [
                {
                    "role": m["role"],
                    "content": texts[1 + k // 2] if m["role"] == "assistant" else m["content"],
                }
                for k, m in enumerate(more)
            ],
            "recaption_prompt_id": p.id,
            "recaption_prompt_sha": p.sha,
            "teacher_model": teacher.model_id,
            "filter_flags": [],
            "recaption_attempts": max(final[j]["attempts"] for j in jobs),
            "recaption_tokens": sum(final[j]["tokens"] or 0 for j in jobs),
        }
        problems, codes = [], set()
        for t, j in enumerate(jobs):
            for k, f in enumerate(final[j]["flags"]):
                detail = f"flags per attempt: {flags_hist[j]}" if not k else ""
                if f not in codes:  # one code once per sample; the detail names the turn
                    codes.add(f)
                    problems.append((f, f"turn {t + 1}: {detail}" if t and detail else detail))
        kept_row, dropped = flag_or_reject(out, "recaption", problems, rc.mode)
        if dropped:
            rejected.append(dropped)
            t_stats["stage1_dropped"] += 1
        else:
            kept.append(kept_row)
        t_stats["stage1_flagged"] += bool(problems)
    _measure(teacher, kept, by_task, dict(zip(sorted({r["answer_gt"] for r in rows}), gt_tokens.result())))
    stats = {
        "requests_sent": teacher.sent,
        "tokenize_requests": teacher.tokenize_sent,
        "regenerated": sum(1 for h in flags_hist.values() if len(h) > 1),
        "by_task": task_stats({k: dict(v) for k, v in by_task.items()}),
    }
    errors = sum(r["reason"] == "teacher_request_rejected" for r in rejected)
    return StageResult(kept, rejected, stats, errors=errors)


def image_urls(ctx: Context, max_side: int) -> dict[str, Callable[[], str]]:
    """The shard's images as data URLs for a VLM (teacher, safety judge): content id -> a function building
    it, from ingest's artifacts: the stored image when within max_side, else ingest's downscaled copy; so
    nothing is decoded here. Only an ingest result older than that copy, or a task type whose side differs
    from the one ingest downscaled to (image_max_side_by_task), is decoded and downscaled here."""
    from babelsynth.backends.chat import image_data_url

    out: dict[str, Callable[[], str]] = {}
    t = ctx.artifact("ingest", "images")
    for row in t.to_pylist() if t is not None else []:
        if max(row["width"], row["height"]) <= max_side and row["format"] in ("PNG", "JPEG", "WEBP"):
            out[row["image_id"]] = functools.partial(data_url, row["image"], row["format"])
        else:
            out[row["image_id"]] = functools.partial(image_data_url, row["image"], max_side)
    # ingest's copies are downscaled to models.teacher.image_max_side: no use at another side
    same = max_side == ctx.cfg.models.teacher.image_max_side
    small = ctx.artifact("ingest", "model_images") if same else None
    for row in small.to_pylist() if small is not None else []:
        out[row["image_id"]] = functools.partial(data_url, row["image"], row["format"])
    return out


def data_url(data: bytes, fmt: str) -> str:
    from babelsynth.validate import mime

    return f"data:{mime(fmt)};base64," + base64.b64encode(data).decode()


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


STAGE = Stage("recaption", recaption, READS, WRITES, CONFIG)

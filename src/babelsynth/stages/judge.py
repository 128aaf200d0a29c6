"""Stage-2 hallucination judge."""

from __future__ import annotations

from collections import defaultdict

from babelsynth.filters import task_stats
from babelsynth.prompts import load_prompt
from babelsynth.stages.base import Context, Stage, StageResult, flag_or_reject, reject, stable_seed

VERDICT_CHOICE = {"structured_outputs": {"choice": ["YES", "NO"]}}


READS = ("source_id", "task_type", "question", "answer_gt", "answer_en", "filter_flags")
WRITES = ("judge_decision", "judge_explanation", "filter_flags")


def judge(ctx: Context, rows: list[dict]) -> StageResult:
    """Text-only LLM judge compares the recaption with the ground truth (no image).

    Turn 1 asks for a brief explanation; turn 2 asks for the decision, constrained by structured output
    to exactly YES or NO, so the verdict always parses. Drop reason: judge_rejected (explanation kept).
    Stats: requests_sent and by_task (judged, stage2_no, stage2_dropped and their rates)."""
    from babelsynth.backends.chat import ChatRequest

    jc = ctx.cfg.judge
    if not jc.enabled:
        return StageResult([{**r, "judge_decision": None, "judge_explanation": ""} for r in rows])
    client = ctx.chat("judge")
    p = load_prompt("judge", "hallucination", jc.prompt_version)
    convs = [
        p.render(question=r["question"], answer_gt=r["answer_gt"], response=r["answer_en"]) for r in rows
    ]
    seeds = [stable_seed("judge", r["source_id"]) for r in rows]
    expl = client.chat_many(
        [ChatRequest(m, jc.max_tokens, jc.temperature, seed=s) for m, s in zip(convs, seeds)]
    )
    decide = [
        ChatRequest(
            [*m, {"role": "assistant", "content": e.text}, {"role": "user", "content": p.spec["decision"]}],
            4,
            jc.temperature,
            seed=s,
            extra=VERDICT_CHOICE,
        )
        for m, e, s in zip(convs, expl, seeds)
    ]
    kept, rejected = [], []
    by_task: dict[str, dict] = defaultdict(
        lambda: dict.fromkeys(("judged", "stage2_no", "stage2_dropped", "request_errors"), 0)
    )
    for r, e, d in zip(rows, expl, client.chat_many(decide)):
        t = by_task[r["task_type"]]
        if e.error or d.error:
            t["request_errors"] += 1
            rejected.append(reject(r, "judge", "judge_request_rejected", e.error or d.error))
            continue
        dec = d.text.strip().upper()
        if dec not in ("YES", "NO"):  # a server without structured outputs: fail loudly, never guess
            raise RuntimeError(
                f"judge returned {d.text!r}; the server must support structured outputs (choice)"
            )
        out = {**r, "judge_decision": dec, "judge_explanation": e.text.strip()}
        t["judged"] += 1
        t["stage2_no"] += dec == "NO"
        problems = [("judge_rejected", e.text.strip())] if dec == "NO" else []
        kept_row, dropped = flag_or_reject(out, "judge", problems, jc.mode)
        if dropped:
            t["stage2_dropped"] += 1
            rejected.append(dropped)
        else:
            kept.append(kept_row)
    stats = {"requests_sent": client.sent, "by_task": task_stats({k: dict(v) for k, v in by_task.items()})}
    return StageResult(kept, rejected, stats)


STAGE = Stage("judge", judge, READS, WRITES)

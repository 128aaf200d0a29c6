"""Stage-2 hallucination judge."""

from __future__ import annotations

from collections import defaultdict

from babelsynth.filters import task_stats
from babelsynth.prompts import load_prompt
from babelsynth.stages.base import Context, Stage, StageResult, flag_or_reject, reject, stable_seed

VERDICT_CHOICE = {"structured_outputs": {"choice": ["YES", "NO"]}}


READS = (
    "source_id",
    "task_type",
    "question",
    "answer_gt",
    "answer_en",
    "followups_gt",
    "followups_en",
    "filter_flags",
)
WRITES = ("judge_decision", "judge_explanation", "filter_flags")
# config keys the output depends on (fingerprint.py)
CONFIG = ("models.judge", "judge")


def judged_turns(row: dict) -> list[tuple[str, str, str]]:
    """(question, ground truth, recaption) of every exchange of a sample."""
    gt, en = row.get("followups_gt") or [], row.get("followups_en") or []
    return [(row["question"], row["answer_gt"], row["answer_en"])] + [
        (gt[k]["content"], gt[k + 1]["content"], en[k + 1]["content"]) for k in range(0, len(gt) - 1, 2)
    ]


def judge(ctx: Context, rows: list[dict]) -> StageResult:
    """Text-only LLM judge compares each recaption with its ground truth (no image), turn by turn.

    Turn 1 asks for a brief explanation; turn 2 asks for the decision, constrained by structured output
    to exactly YES or NO, so the verdict always parses. A sample whose any answer gets NO is dropped:
    judge_rejected (explanations kept). Stats: requests_sent and by_task (judged, stage2_no,
    stage2_dropped and their rates, per sample)."""
    from babelsynth.backends.chat import ChatRequest

    jc = ctx.cfg.judge
    if not jc.enabled:
        return StageResult([{**r, "judge_decision": None, "judge_explanation": ""} for r in rows])
    client = ctx.chat("judge")
    p = load_prompt("judge", "hallucination", jc.prompt_version)
    jobs = [(i, t, q) for i, r in enumerate(rows) for t, q in enumerate(judged_turns(r))]
    convs = [p.render(question=q, answer_gt=gt, response=en) for _, _, (q, gt, en) in jobs]
    seeds = [
        stable_seed("judge", rows[i]["source_id"])
        if t == 0
        else stable_seed("judge", rows[i]["source_id"], t)
        for i, t, _ in jobs
    ]
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
    per_row: dict[int, list[tuple[int, object, object]]] = defaultdict(list)
    for (i, t, _), e, d in zip(jobs, expl, client.chat_many(decide)):
        per_row[i].append((t, e, d))
    kept, rejected = [], []
    by_task: dict[str, dict] = defaultdict(
        lambda: dict.fromkeys(("judged", "stage2_no", "stage2_dropped", "request_errors"), 0)
    )
    for i, r in enumerate(rows):
        t_stats = by_task[r["task_type"]]
        verdicts = per_row[i]
        errors = [e.error or d.error for _, e, d in verdicts if e.error or d.error]
        if errors:
            t_stats["request_errors"] += 1
            rejected.append(reject(r, "judge", "judge_request_rejected", errors[0]))
            continue
        decisions = []
        for _, _, d in verdicts:
            dec = d.text.strip().upper()
            if dec not in ("YES", "NO"):  # a server without structured outputs: fail loudly, never guess
                raise RuntimeError(
                    f"judge returned {d.text!r}; the server must support structured outputs (choice)"
                )
            decisions.append(dec)
        if len(verdicts) == 1:
            explanation = verdicts[0][1].text.strip()
        else:
            explanation = "\n".join(f"turn {t + 1}: {e.text.strip()}" for t, e, _ in verdicts)
        dec = "NO" if "NO" in decisions else "YES"
        out = {**r, "judge_decision": dec, "judge_explanation": explanation}
        t_stats["judged"] += 1
        t_stats["stage2_no"] += dec == "NO"
        problems = []
        if dec == "NO":
            no_turns = [(t, e) for (t, e, _), d in zip(verdicts, decisions) if d == "NO"]
            detail = (
                no_turns[0][1].text.strip()
                if len(verdicts) == 1
                else "; ".join(f"turn {t + 1}: {e.text.strip()}" for t, e in no_turns)
            )
            problems = [("judge_rejected", detail)]
        kept_row, dropped = flag_or_reject(out, "judge", problems, jc.mode)
        if dropped:
            t_stats["stage2_dropped"] += 1
            rejected.append(dropped)
        else:
            kept.append(kept_row)
    stats = {"requests_sent": client.sent, "by_task": task_stats({k: dict(v) for k, v in by_task.items()})}
    errors = sum(r["reason"] == "judge_request_rejected" for r in rejected)
    return StageResult(kept, rejected, stats, errors=errors)


STAGE = Stage("judge", judge, READS, WRITES, CONFIG)

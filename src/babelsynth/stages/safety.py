"""Safety stages: the image and the English text before or after recaption, then every translated output.

`safety_pre` (before recaption) and `safety_post` (after it) are the same check on different text: the ground
truth, or the recaption. Both are registered so the runner and the DAG see a fixed order; `safety.position`
says which one is active (Stage.active): the other, like all three when safety is off, writes no result and
the stage after it reads the last active one's (runner.pipeline). `output_safety` sits between rephrase and
score and scores every translated output (draft and rephrase, every turn).

A drop is a rejected row with reason `unsafe_<category>` and a detail naming the check, the score (the
classifier's probability; for the image judge, its verdict) and where; stats `safety_drops` count them per
language and category (the manifest adds them up, the report shows them).
"""

from __future__ import annotations

import json
from collections import defaultdict

from babelsynth.prompts import load_prompt
from babelsynth.stages.base import Context, Stage, StageResult, identity, reject, stable_seed

RATIONALE_MAX_CHARS = 200
CONFIG = ("models.safety_judge", "models.toxicity", "safety")


def verdict_schema(categories: list[str]) -> dict:
    """The judge's answer, enforced by structured output: it always parses. `rationale` is bounded so a
    model that never closes the string still ends within safety.max_tokens."""
    return {
        "type": "object",
        "properties": {
            "decision": {"type": "string", "enum": ["safe", "unsafe"]},
            "category": {"type": "string", "enum": [*categories, "none"]},
            "rationale": {"type": "string", "maxLength": RATIONALE_MAX_CHARS},
        },
        "required": ["decision", "category", "rationale"],
        "additionalProperties": False,
    }


def policy_messages(prompt, n_images: int, categories: list[str]) -> list[dict]:
    """The policy prompt for a record with `n_images` images (also what the estimate counts)."""
    return prompt.render(
        n_images=n_images, categories=categories, descriptions=prompt.spec.get("descriptions", {})
    )


def parse_verdict(text: str, categories: list[str]) -> dict:
    """The verdict as a dict; anything else is a server without structured outputs: fail, never guess."""
    try:
        v = json.loads(text)
        ok = (
            isinstance(v, dict)
            and v.get("decision") in ("safe", "unsafe")
            and v.get("category") in (*categories, "none")
            and isinstance(v.get("rationale"), str)
        )
    except ValueError:
        ok = False
    if not ok:
        raise RuntimeError(
            f"safety judge returned {text[:200]!r}; the server must support structured outputs (json schema)"
        )
    return v


def _texts(value) -> list[str]:
    """The texts of a column: a string, or a conversation (list of turns with `content`)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [t["content"] if isinstance(t, dict) else str(t) for t in value if t]


def _text_problems(
    ctx: Context, rows: list[dict], fields: tuple[str, ...], allowed: dict[str, int]
) -> dict[int, tuple[str, float, str]]:
    """Row index -> (category, score, field) of its worst non-allowed category at or over its threshold
    (the one furthest over); allow-listed hits are counted in `allowed`."""
    sc = ctx.cfg.safety
    clf = ctx.text_classifier()
    clf.check_labels(sc.categories)
    jobs = [(i, f, t) for i, r in enumerate(rows) for f in fields for t in _texts(r.get(f)) if t.strip()]
    out: dict[int, tuple[str, float, str]] = {}
    for (i, f, _), scores in zip(jobs, clf.scores([t for _, _, t in jobs])):
        for cat in sc.categories:
            s = scores[cat]
            if s < sc.threshold_of(cat):
                continue
            if cat in sc.allow_categories:
                allowed[cat] += 1
                continue
            if i not in out or s - sc.threshold_of(cat) > out[i][1] - sc.threshold_of(out[i][0]):
                out[i] = (cat, s, f)
    return out


def _image_verdicts(ctx: Context, rows: list[dict]) -> dict[int, dict]:
    """Row index -> the judge's verdict on its images (rows without images are not asked)."""
    from babelsynth.backends.chat import ChatRequest, user_with_image_urls
    from babelsynth.stages.recaption import image_urls

    sc = ctx.cfg.safety
    client = ctx.chat("safety_judge")
    p = load_prompt("safety", "image_policy", sc.prompt_version)
    jcfg = ctx.cfg.models.safety_judge
    by_side: dict[int, dict] = {}
    extra = {"structured_outputs": {"json": verdict_schema(sc.categories), "disable_any_whitespace": True}}
    asked, reqs = [], []
    for i, r in enumerate(rows):
        if not r["image_ids"]:
            continue
        side = jcfg.image_max_side_by_task.get(r["task_type"], jcfg.image_max_side)
        if side not in by_side:
            by_side[side] = image_urls(ctx, side)
        urls = [by_side[side][iid]() for iid in r["image_ids"]]
        msgs = policy_messages(p, len(urls), sc.categories)
        msgs = [msgs[0], user_with_image_urls(msgs[1]["content"], urls)]
        asked.append(i)
        reqs.append(
            ChatRequest(msgs, sc.max_tokens, 0.0, seed=stable_seed("safety", r["source_id"]), extra=extra)
        )
    out = {}
    for i, res in zip(asked, client.chat_many(reqs)):
        out[i] = {"error": res.error} if res.error else parse_verdict(res.text, sc.categories)
    return out


def check(ctx: Context, stage: str, rows: list[dict], fields: tuple[str, ...], image: bool) -> StageResult:
    """Keep or drop each row: the image verdict first, then the worst text score."""
    sc = ctx.cfg.safety
    allowed: dict[str, int] = defaultdict(int)
    verdicts = _image_verdicts(ctx, rows) if image and sc.image else {}
    check_text = sc.text if image else sc.outputs
    text = _text_problems(ctx, rows, fields, allowed) if check_text and rows else {}
    kept, rejected = [], []
    drops: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    stats = {"image_judged": len(verdicts), "image_unsafe": 0, "text_checked": len(rows) if check_text else 0}
    for i, r in enumerate(rows):
        lang = identity(r)[1]
        v = verdicts.get(i)
        if v is not None and "error" in v:
            rejected.append(reject(r, stage, "safety_request_rejected", v["error"]))
            continue
        problem = None
        if v is not None and v["decision"] == "unsafe":
            stats["image_unsafe"] += 1
            cat = v["category"] if v["category"] != "none" else "unspecified"
            if cat in sc.allow_categories:
                allowed[cat] += 1
            else:
                problem = (cat, f"check=image score=unsafe category={cat} rationale={v['rationale']}")
        if problem is None and i in text:
            cat, s, f = text[i]
            problem = (
                cat,
                f"check=text score={s:.4f} threshold={sc.threshold_of(cat)} category={cat} field={f}",
            )
        if problem is None:
            kept.append(r)
            continue
        drops[lang][problem[0]] += 1
        rejected.append(reject(r, stage, f"unsafe_{problem[0]}", problem[1]))
    stats["safety_drops"] = {lg: dict(c) for lg, c in sorted(drops.items())}
    stats["allowed"] = dict(allowed)
    if verdicts:
        stats["requests_sent"] = ctx.chat("safety_judge").sent
    errors = sum(x["reason"] == "safety_request_rejected" for x in rejected)
    return StageResult(kept, rejected, stats, errors=errors)


def _english(position: str, fields: tuple[str, ...], name: str):
    def run(ctx: Context, rows: list[dict]) -> StageResult:
        sc = ctx.cfg.safety
        if not sc.enabled or sc.position != position:
            return StageResult(list(rows))
        return check(ctx, name, rows, fields, image=True)

    run.__doc__ = f"Image and English text ({', '.join(fields)}) when safety.position is {position}."
    return run


def output_safety(ctx: Context, rows: list[dict]) -> StageResult:
    """Every translated output (draft and rephrase, prompt and answers) through the text classifier."""
    sc = ctx.cfg.safety
    if not sc.enabled or not sc.outputs:
        return StageResult(list(rows))
    return check(ctx, "output_safety", rows, OUTPUT_FIELDS, image=False)


PRE_FIELDS = ("question", "answer_gt", "followups_gt")
POST_FIELDS = ("question", "answer_en", "followups_en")
OUTPUT_FIELDS = (
    "draft_prompt",
    "draft_answer",
    "followups_draft",
    "rephrase_prompt",
    "rephrase_answer",
    "followups_rephrase",
)
IMAGE_READS = ("source_id", "task_type", "image_ids")


def _english_on(cfg, position: str) -> bool:
    sc = cfg.safety
    return sc.enabled and sc.position == position and (sc.image or sc.text)


STAGE_PRE = Stage(
    "safety_pre",
    _english("before_recaption", PRE_FIELDS, "safety_pre"),
    (*IMAGE_READS, *PRE_FIELDS),
    (),
    CONFIG,
    section="safety",
    active=lambda cfg: _english_on(cfg, "before_recaption"),
)
STAGE_POST = Stage(
    "safety_post",
    _english("after_recaption", POST_FIELDS, "safety_post"),
    (*IMAGE_READS, *POST_FIELDS),
    (),
    CONFIG,
    section="safety",
    active=lambda cfg: _english_on(cfg, "after_recaption"),
)
STAGE_OUTPUT = Stage(
    "output_safety",
    output_safety,
    OUTPUT_FIELDS,
    (),
    CONFIG,
    section="safety",
    active=lambda cfg: cfg.safety.enabled and cfg.safety.outputs,
)
BY_NAME = {s.name: s for s in (STAGE_PRE, STAGE_POST, STAGE_OUTPUT)}

"""NLLB drafts into the target languages."""

from __future__ import annotations

from collections import Counter

from babelsynth.config import RunConfig
from babelsynth.languages import SOURCE_LANG
from babelsynth.stages.base import Context, Stage, StageResult, flag_or_reject, stable_seed

READS = ("source_id", "question", "answer_en", "followups_en", "filter_flags")
WRITES = (
    "lang",
    "prompt_en",
    "draft_prompt",
    "draft_answer",
    "followups_draft",
    "translator_model",
    "filter_flags",
)
# config keys the output depends on (fingerprint.py)
CONFIG = (
    "models.translator",
    "translate",
    "run.languages",
    "run.language_ratio",
    "run.language_ratios",
    "run.seed",
)


def languages_for(cfg: RunConfig, source_id: str) -> list[str]:
    """Each language draws its own random subset of the English pool (paper section 2.4), stably."""
    out = []
    for lang in cfg.run.languages:
        ratio = cfg.run.language_ratios.get(lang, cfg.run.language_ratio)
        if ratio >= 1.0 or stable_seed(cfg.run.seed, source_id, lang) / 0xFFFFFFFF < ratio:
            out.append(lang)
    return out


def translate(ctx: Context, rows: list[dict]) -> StageResult:
    """NLLB drafts of every turn, each translated as its own text (roles and order kept): prompt and answer
    of the first exchange, then `followups_draft` for later turns; English passes.

    One English row becomes one row per language it is assigned to (plus itself): the stage counts in the
    (row, language) jobs it was given, before any engine call. All languages of the shard go to the engine
    in one token-batched call. Drop reasons (translate.mode enforce): translation_empty (a segment came
    back empty: content lost), translation_truncated (a segment hit max_decoding_length); in report mode
    both go to filter_flags."""
    jobs: list[tuple[dict, str]] = []
    out, rejected = [], []
    for r in rows:
        out.append(
            {
                **r,
                "lang": SOURCE_LANG,
                "prompt_en": r["question"],
                "draft_prompt": None,
                "draft_answer": None,
                "followups_draft": None,
                "translator_model": None,
            }
        )
        jobs += [(r, lang) for lang in languages_for(ctx.cfg, r["source_id"])]
    counted_in = [(r["source_id"], SOURCE_LANG) for r in rows] + [(r["source_id"], lang) for r, lang in jobs]
    stats: dict = {}
    if jobs:
        tr = ctx.translator()
        before = Counter(tr.stats)
        texts = [
            [r["question"], r["answer_en"], *(t["content"] for t in r.get("followups_en") or [])]
            for r, _ in jobs
        ]
        res = tr.translate_many([(t, lang) for (_, lang), ts in zip(jobs, texts) for t in ts])
        at = 0
        for (r, lang), ts in zip(jobs, texts):
            got, at = res[at : at + len(ts)], at + len(ts)
            row = {
                **r,
                "lang": lang,
                "prompt_en": r["question"],
                "draft_prompt": got[0].text,
                "draft_answer": got[1].text,
                "followups_draft": [g.text for g in got[2:]],
                "translator_model": tr.model_id,
            }
            problems = []
            empty, truncated = sum(g.empty for g in got), any(g.truncated for g in got)
            if empty:
                problems.append(("translation_empty", f"{empty} segment(s) came back empty"))
            if truncated:
                problems.append(("translation_truncated", "a segment hit max_decoding_length"))
            kept_row, dropped = flag_or_reject(row, "translate", problems, ctx.cfg.translate.mode)
            if dropped:
                rejected.append(dropped)
            else:
                out.append(kept_row)
        delta = Counter(tr.stats)
        delta.subtract(before)
        stats = {k: delta[k] for k in ("engine_calls", "segments_translated", "chunks", "cache_hits")}
    return StageResult(out, rejected, stats, counted_in=counted_in)


STAGE = Stage("translate", translate, READS, WRITES, CONFIG)

"""NLLB drafts into the target languages."""

from __future__ import annotations

from collections import Counter

from babelsynth.config import RunConfig
from babelsynth.languages import SOURCE_LANG
from babelsynth.stages.base import Context, StageResult, reject, stable_seed

READS = ("source_id", "question", "answer_en", "filter_flags")
WRITES = ("lang", "prompt_en", "draft_prompt", "draft_answer", "translator_model", "filter_flags")


def languages_for(cfg: RunConfig, source_id: str) -> list[str]:
    """Each language draws its own random subset of the English pool (paper section 2.4), stably."""
    out = []
    for lang in cfg.run.languages:
        ratio = cfg.run.language_ratios.get(lang, cfg.run.language_ratio)
        if ratio >= 1.0 or stable_seed(cfg.run.seed, source_id, lang) / 0xFFFFFFFF < ratio:
            out.append(lang)
    return out


def translate(ctx: Context, rows: list[dict]) -> StageResult:
    """NLLB drafts of prompt and answer, translated separately (they keep their roles); English passes
    through.

    All languages of the shard go to the engine in one token-batched call. Drop reasons (enforce mode):
    translation_empty (a segment came back empty: content lost), translation_truncated (a segment hit
    max_decoding_length). In report mode both are added to filter_flags instead."""
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
                "translator_model": None,
            }
        )
        jobs += [(r, lang) for lang in languages_for(ctx.cfg, r["source_id"])]
    extra: dict = {}
    if jobs:
        tr = ctx.translator()
        before = Counter(tr.stats)
        res = tr.translate_many([(t, lang) for r, lang in jobs for t in (r["question"], r["answer_en"])])
        for k, (r, lang) in enumerate(jobs):
            p, a = res[2 * k], res[2 * k + 1]
            row = {
                **r,
                "lang": lang,
                "prompt_en": r["question"],
                "draft_prompt": p.text,
                "draft_answer": a.text,
                "translator_model": tr.model_id,
            }
            problems = []
            if p.empty or a.empty:
                problems.append(("translation_empty", f"{p.empty + a.empty} segment(s) came back empty"))
            if p.truncated or a.truncated:
                problems.append(("translation_truncated", "a segment hit max_decoding_length"))
            if problems and ctx.cfg.translate.truncation == "enforce":
                rejected.append(reject(row, "translate", problems[0][0], problems[0][1]))
                continue
            if problems:
                row["filter_flags"] = [*r["filter_flags"], *(code for code, _ in problems)]
            out.append(row)
        delta = Counter(tr.stats)
        delta.subtract(before)
        extra = {k: delta[k] for k in ("engine_calls", "segments_translated", "chunks", "cache_hits")}
    assigned = Counter(r["lang"] for r in out) + Counter(r["lang"] for r in rejected)
    return StageResult(out, rejected, {**extra, "assigned": dict(assigned)})

"""NLLB drafts into the target languages."""

from __future__ import annotations

from collections import Counter

from babelsynth.config import RunConfig
from babelsynth.languages import SOURCE_LANG
from babelsynth.stages.base import Context, StageResult, reject
from babelsynth.stages.base import stable_seed


READS = ("source_id", "question", "answer_en")
WRITES = ("lang", "prompt_en", "draft_prompt", "draft_answer", "translator_model")


def languages_for(cfg: RunConfig, source_id: str) -> list[str]:
    """Each language draws its own random subset of the English pool (paper section 2.4), stably."""
    out = []
    for lang in cfg.run.languages:
        ratio = cfg.run.language_ratios.get(lang, cfg.run.language_ratio)
        if ratio >= 1.0 or stable_seed(cfg.run.seed, source_id, lang) / 0xFFFFFFFF < ratio:
            out.append(lang)
    return out


def translate(ctx: Context, rows: list[dict]) -> StageResult:
    """NLLB drafts of prompt and answer, translated separately; the English row passes through.

    Drop reasons: translation_truncated (enforce mode)."""
    by_lang: dict[str, list[dict]] = {}
    out, rejected = [], []
    for r in rows:
        out.append({**r, "lang": SOURCE_LANG, "prompt_en": r["question"], "draft_prompt": None,
                    "draft_answer": None, "translator_model": None})  # fmt: skip
        for lang in languages_for(ctx.cfg, r["source_id"]):
            by_lang.setdefault(lang, []).append(r)
    if by_lang:
        tr = ctx.translator()
        for lang, group in by_lang.items():
            texts = [t for r in group for t in (r["question"], r["answer_en"])]
            res = tr.translate(texts, lang)
            for k, r in enumerate(group):
                p, a = res[2 * k], res[2 * k + 1]
                row = {**r, "lang": lang, "prompt_en": r["question"], "draft_prompt": p.text, "draft_answer": a.text,
                       "translator_model": tr.model_id}  # fmt: skip
                if p.truncated or a.truncated:
                    if ctx.cfg.translate.truncation == "enforce":
                        rejected.append(reject(row, "translate", "translation_truncated", "hit max_decoding_length"))
                        continue
                    row["filter_flags"] = [*r["filter_flags"], "translation_truncated"]
                out.append(row)
        extra = {"engine_calls": tr.engine_calls, "segments_translated": tr.segments_translated}
    else:
        extra = {}
    assigned = Counter(r["lang"] for r in out) + Counter(r["lang"] for r in rejected)
    return StageResult(out, rejected, {**extra, "assigned": dict(assigned)})

"""Drafts into the target languages: NLLB, an instruction LLM, or both with COMET choosing per segment."""

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
    "translator_choices",
    "filter_flags",
)
# config keys the output depends on (fingerprint.py). Not models.comet, though `both` asks it: a COMET change
# would then refuse every re-trigger of an NLLB-only run; score (redo_on_change) rescores with the new model,
# the per-segment choices keep the scores they were made with (recorded in translator_choices).
CONFIG = (
    "models.translator",
    "models.llm_translator",
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


def translate_texts(ctx: Context, jobs: list[tuple[str, str]]) -> tuple[list, list[list[dict]], dict]:
    """(text, target) jobs -> (one Translation each, its per-segment choice records, stats).

    Every text is cut once (segment.split: protected spans never reach a model). Per target language the
    backend is translate.backend_for(lang): nllb; llm, whose unusable answers fall back to NLLB segment by
    segment; or both, where each segment with a usable LLM answer takes the candidate with the higher
    COMET QE score (a tie keeps NLLB). The choice records are empty for an nllb language."""
    from babelsynth.backends.nllb_ct2 import SegmentResult, Translation
    from babelsynth.segment import reassemble, split

    tc = ctx.cfg.translate
    splits = {text: split(text) for text in {t for t, _ in jobs}}
    pairs = sorted({(p.text, tgt) for t, tgt in jobs for p in splits[t] if p.translate})
    backend = {lang: tc.backend_for(lang) for _, lang in jobs}
    llm_pairs = [p for p in pairs if backend[p[1]] != "nllb"]
    llm_res = ctx.llm_translator().translate_segments(llm_pairs) if llm_pairs else {}
    nllb_pairs = [p for p in pairs if backend[p[1]] != "llm" or llm_res[p].text is None]
    uses_nllb = any(b != "llm" for b in backend.values()) or bool(nllb_pairs)
    tr = ctx.translator() if uses_nllb else None
    before = Counter(tr.stats) if tr else Counter()
    nllb_res = tr.translate_segments(nllb_pairs) if nllb_pairs else {}
    duel = [p for p in pairs if backend[p[1]] == "both" and llm_res[p].text is not None]
    comet: dict[tuple[str, str], tuple[float, float]] = {}
    if duel:
        sc = ctx.comet().score(
            [(p[0], nllb_res[p].text) for p in duel] + [(p[0], llm_res[p].text) for p in duel]
        )
        comet = {p: (sc[i], sc[len(duel) + i]) for i, p in enumerate(duel)}
    final: dict[tuple[str, str], SegmentResult] = {}
    chosen: dict[tuple[str, str], str] = {}
    by_lang: dict[str, Counter] = {}
    for p in pairs:
        got = llm_res.get(p)
        if backend[p[1]] == "nllb" or got.text is None:
            chosen[p] = "nllb"
        elif backend[p[1]] == "llm":
            chosen[p] = "llm"
        else:
            chosen[p] = "llm" if comet[p][1] > comet[p][0] else "nllb"
        final[p] = nllb_res[p] if chosen[p] == "nllb" else SegmentResult(got.text, False, 0)
        c = by_lang.setdefault(p[1], Counter())
        c[chosen[p]] += 1
        if got is not None and got.text is None:
            c["llm_failed"] += 1
    out, records = [], []
    for text, tgt in jobs:
        keys = [(pc.text, tgt) for pc in splits[text] if pc.translate]
        done = [final[k] for k in keys]
        texts = [d.text for d in done]
        empty = sum(bool(d.empty_chunks) or not d.text for d in done)
        out.append(Translation(reassemble(splits[text], texts), any(d.truncated for d in done), texts, empty))
        records.append(
            []
            if backend[tgt] == "nllb"
            else [
                {
                    "segment": k[0],
                    "nllb": nllb_res[k].text if k in nllb_res else None,
                    "llm": llm_res[k].text,
                    "llm_status": llm_res[k].status,
                    "comet_nllb": comet[k][0] if k in comet else None,
                    "comet_llm": comet[k][1] if k in comet else None,
                    "chosen": chosen[k],
                }
                for k in keys
            ]
        )
    stats: dict = {"translator_by_lang": {lg: dict(c) for lg, c in sorted(by_lang.items())}}
    delta = Counter(tr.stats) if tr else Counter()
    delta.subtract(before)
    stats.update({k: delta[k] for k in ("engine_calls", "segments_translated", "chunks", "cache_hits")})
    if llm_pairs:
        llm = ctx.llm_translator()
        stats.update(
            llm_segments=len(llm_pairs),
            llm_failed=sum(r.text is None for r in llm_res.values()),
            comet_choices=len(duel),
        )
        stats["translator_model_llm"] = llm.model_id
    return out, records, stats


def translate(ctx: Context, rows: list[dict]) -> StageResult:
    """Drafts of every turn, each translated as its own text (roles and order kept): prompt and answer
    of the first exchange, then `followups_draft` for later turns; English passes.

    One English row becomes one row per language it is assigned to (plus itself): the stage counts in the
    (row, language) jobs it was given, before any engine call. All languages of the shard go to the engines
    in one batched call each (translate_texts). `translator_choices` records, for a language on the llm or
    both backend, every segment's turn (`part`), candidates, COMET scores and the one chosen. Drop reasons
    (translate.mode enforce): translation_empty (a segment came back empty: content lost),
    translation_truncated (a segment hit max_decoding_length); in report mode both go to filter_flags."""
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
                "translator_choices": None,
            }
        )
        jobs += [(r, lang) for lang in languages_for(ctx.cfg, r["source_id"])]
    counted_in = [(r["source_id"], SOURCE_LANG) for r in rows] + [(r["source_id"], lang) for r, lang in jobs]
    stats: dict = {}
    if jobs:
        texts = [
            [r["question"], r["answer_en"], *(t["content"] for t in r.get("followups_en") or [])]
            for r, _ in jobs
        ]
        res, records, stats = translate_texts(
            ctx, [(t, lang) for (_, lang), ts in zip(jobs, texts) for t in ts]
        )
        nllb_id = ctx.translator().model_id if "translator" in ctx.backends else None
        llm_id = stats.pop("translator_model_llm", None)
        at = 0
        for (r, lang), ts in zip(jobs, texts):
            got, recs, at = res[at : at + len(ts)], records[at : at + len(ts)], at + len(ts)
            used = {x["chosen"] for rec in recs for x in rec}
            model = "+".join(m for b, m in (("nllb", nllb_id), ("llm", llm_id)) if b in used) or nllb_id
            row = {
                **r,
                "lang": lang,
                "prompt_en": r["question"],
                "draft_prompt": got[0].text,
                "draft_answer": got[1].text,
                "followups_draft": [g.text for g in got[2:]],
                "translator_model": model or llm_id,
                "translator_choices": None
                if ctx.cfg.translate.backend_for(lang) == "nllb"
                else [{"part": i, **x} for i, rec in enumerate(recs) for x in rec],
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
    return StageResult(out, rejected, stats, counted_in=counted_in)


STAGE = Stage("translate", translate, READS, WRITES, CONFIG)

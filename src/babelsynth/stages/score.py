"""QE scoring, draft/rephrase selection, metrics and quality gates.

Every score a gate reads is stored on the row (comet_final, mtld + mtld_tokens, langid_conf + langid_lang
+ langid_chars, length_ratio, repetition), and the gates are pure functions of those stored values and the
config: `babelsynth regate` re-applies changed thresholds to a finished run without any model call.

COMET quantile gates need the whole run's score distribution per language, which one shard cannot see:
here they are left open, and commit (gating.run_gates) resolves and applies them over every shard.
"""

from __future__ import annotations

from babelsynth.config import RunConfig
from babelsynth.languages import SOURCE_LANG
from babelsynth.stages.base import Context, Stage, StageResult, flag_or_reject

READS = (
    "lang",
    "prompt_en",
    "answer_en",
    "draft_prompt",
    "draft_answer",
    "rephrase_prompt",
    "rephrase_answer",
    "rephrase_status",
)
WRITES = (
    "prompt",
    "answer",
    "selected",
    "selection_reason",
    "comet_draft",
    "comet_rephrase",
    "comet_final",
    "mtld",
    "mtld_tokens",
    "langid_conf",
    "langid_lang",
    "langid_chars",
    "length_ratio",
    "repetition",
    "gate_flags",
    "score_index",
)
GATES = ("comet", "mtld", "langid", "length_ratio", "repetition")
GATE_REASONS = frozenset(f"gate_{g}" for g in GATES)


def _mean(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else (a + b) / 2


# ---------------------------------------------------------------------------------------------- pure gates
def comet_rule(cfg: RunConfig, lang: str) -> tuple[str, float] | None:
    """("absolute", minimum) or ("quantile", q) for a language, the most specific setting winning."""
    g = cfg.score.gates.comet
    if lang in g.per_lang:
        return ("absolute", g.per_lang[lang])
    if lang in g.per_lang_quantile:
        return ("quantile", g.per_lang_quantile[lang])
    if g.quantile is not None:
        return ("quantile", g.quantile)
    return None if g.threshold is None else ("absolute", g.threshold)


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty list."""
    a = sorted(values)
    pos = q * (len(a) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(a) - 1)
    return a[lo] + (a[hi] - a[lo]) * (pos - lo)


def comet_thresholds(
    cfg: RunConfig, langs, run_scores: dict[str, list[float]] | None = None
) -> dict[str, float | None]:
    """Minimum comet_final per language. Quantile rules need `run_scores` (every scored row of the run in
    that language); without them (inside one shard) they stay None, i.e. not gated yet."""
    out: dict[str, float | None] = {}
    for lang in langs:
        rule = comet_rule(cfg, lang)
        if rule is None or lang == SOURCE_LANG:
            out[lang] = None
        elif rule[0] == "absolute":
            out[lang] = rule[1]
        else:
            vals = (run_scores or {}).get(lang) or []
            out[lang] = quantile(vals, rule[1]) if vals and run_scores is not None else None
    return out


def gate_results(row: dict, cfg: RunConfig, comet_min: float | None) -> dict[str, bool | None]:
    """Pure: per gate True (pass), False (fail) or None (not applicable: no score, too short, English)."""
    g, lang = cfg.score.gates, row["lang"]
    res: dict[str, bool | None] = dict.fromkeys(GATES)
    if lang != SOURCE_LANG and row.get("comet_final") is not None and comet_min is not None:
        res["comet"] = row["comet_final"] >= comet_min
    if row.get("mtld") is not None and (row.get("mtld_tokens") or 0) >= g.mtld.min_tokens:
        res["mtld"] = row["mtld"] >= g.mtld.per_lang.get(lang, g.mtld.min)
    chars = row.get("langid_chars", len(row.get("answer") or ""))
    if row.get("langid_conf") is not None and chars >= g.langid.min_chars:
        same = row.get("langid_lang", lang) == lang
        res["langid"] = same and row["langid_conf"] >= g.langid.min_conf
    if lang != SOURCE_LANG and row.get("length_ratio") is not None:
        lo, hi = g.length_ratio.per_lang.get(lang, (g.length_ratio.min, g.length_ratio.max))
        res["length_ratio"] = lo <= row["length_ratio"] <= hi
    if row.get("repetition") is not None:
        res["repetition"] = row["repetition"] <= g.repetition.max
    return res


def gate_failures(row: dict, cfg: RunConfig, comet_min: float | None = None) -> list[str]:
    """Pure: the gates (as reason codes gate_<name>) this scored row fails."""
    return [f"gate_{k}" for k, ok in gate_results(row, cfg, comet_min).items() if ok is False]


def gate_mode(cfg: RunConfig, flag: str) -> str:
    return getattr(cfg.score.gates, flag.removeprefix("gate_")).mode


def apply_gates(
    rows: list[dict], cfg: RunConfig, thresholds: dict[str, float | None]
) -> tuple[list[dict], list[dict]]:
    """Pure: (kept, rejected) for scored rows; report-mode failures become gate_flags on kept rows."""
    kept, rejected = [], []
    for r in rows:
        out = {**r, "gate_flags": []}
        fails = gate_failures(out, cfg, thresholds.get(out["lang"]))
        kept_row, dropped = flag_or_reject(
            out, "score", [(f, "") for f in fails], lambda f: gate_mode(cfg, f), flags_col="gate_flags"
        )
        if dropped:
            rejected.append(dropped)
        else:
            kept.append(kept_row)
    return kept, rejected


# ---------------------------------------------------------------------------------------------- the stage
def score(ctx: Context, rows: list[dict]) -> StageResult:
    """QE-score draft and rephrase, select, compute metrics, apply gates.

    Drop reasons (enforce mode): gate_comet, gate_mtld, gate_langid, gate_length_ratio, gate_repetition.
    A part the rephraser could not deliver falls back to its draft; the rephrase is selected unless its QE
    is worse than the draft's by more than score.selection_margin."""
    from babelsynth import metrics

    cfg = ctx.cfg
    margin = cfg.score.selection_margin
    cand = [
        (r.get("rephrase_prompt") or r["draft_prompt"], r.get("rephrase_answer") or r["draft_answer"])
        if r["lang"] != SOURCE_LANG
        else None
        for r in rows
    ]
    pairs: set[tuple[str, str]] = set()
    for r, c in zip(rows, cand):
        if c is not None:
            pairs |= {(r["prompt_en"], r["draft_prompt"]), (r["answer_en"], r["draft_answer"])}
            pairs |= {(r["prompt_en"], c[0]), (r["answer_en"], c[1])}
    pair_list = sorted(pairs)
    scorer = ctx.comet() if pair_list else None
    scores = dict(zip(pair_list, scorer.score(pair_list))) if scorer else {}
    scored = []
    for idx, (r, c) in enumerate(zip(rows, cand)):
        out = dict(r, score_index=idx)
        if c is None:
            out.update(
                prompt=r["prompt_en"],
                answer=r["answer_en"],
                selected="source",
                selection_reason="english",
                comet_draft=None,
                comet_rephrase=None,
                comet_final=None,
            )
        else:
            d = _mean(
                scores[(r["prompt_en"], r["draft_prompt"])], scores[(r["answer_en"], r["draft_answer"])]
            )
            has_rp = r.get("rephrase_prompt") is not None or r.get("rephrase_answer") is not None
            rp = _mean(scores[(r["prompt_en"], c[0])], scores[(r["answer_en"], c[1])]) if has_rp else None
            if rp is None:
                sel, why = "draft", f"rephrase unusable ({r.get('rephrase_status')})"
            elif rp >= d - margin:
                sel, why = "rephrase", f"rephrase QE {rp:.4f} >= draft {d:.4f} - margin {margin}"
            else:
                sel, why = "draft", f"rephrase QE {rp:.4f} < draft {d:.4f} - margin {margin}"
            if sel == "rephrase" and r.get("rephrase_status") != "ok":
                why += f"; parts without a usable rephrase keep the draft ({r.get('rephrase_status')})"
            final = (c[0], c[1], rp) if sel == "rephrase" else (r["draft_prompt"], r["draft_answer"], d)
            out.update(
                prompt=final[0],
                answer=final[1],
                comet_final=final[2],
                selected=sel,
                selection_reason=why,
                comet_draft=d,
                comet_rephrase=rp,
            )
        scored.append(out)
    candidates = metrics.langid_candidates(cfg.run.languages)
    ids = metrics.langid([o["answer"] for o in scored], [o["lang"] for o in scored], candidates)
    for out, (lid_lang, lid_conf) in zip(scored, ids):
        m, n_tok = metrics.mtld(out["answer"], out["lang"])
        out.update(
            mtld=m,
            mtld_tokens=n_tok,
            langid_conf=lid_conf,
            langid_lang=lid_lang,
            langid_chars=metrics.langid_chars(out["answer"]),
            length_ratio=None
            if out["lang"] == SOURCE_LANG
            else metrics.length_ratio(out["answer"], out["answer_en"]),
            repetition=metrics.repetition(out["answer"], out["lang"]),
        )
    thresholds = comet_thresholds(cfg, {o["lang"] for o in scored})  # quantile rules: resolved at commit
    kept, rejected = apply_gates(scored, cfg, thresholds)
    stats = {"comet_pairs": len(pair_list)}
    if scorer is not None:
        stats.update(comet_calls=scorer.calls, comet_split_pairs=getattr(scorer, "split_pairs", 0))
    return StageResult(kept, rejected, stats)


STAGE = Stage("score", score, READS, WRITES)

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
    "followups_en",
    "followups_draft",
    "rephrase_prompt",
    "rephrase_answer",
    "followups_rephrase",
    "rephrase_status",
)
WRITES = (
    "prompt",
    "answer",
    "conversation",
    "conversation_en",
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
# config keys the output depends on (fingerprint.py); score.gates are applied at commit too
CONFIG = ("models.comet", "score.selection_margin", "run.languages")


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)


def turns_of(row: dict) -> tuple[list[str], list[str], list[str | None], list[str | None]]:
    """Every turn of a sample, in order: (roles, English, drafts, rephrases); drafts and rephrases are
    None for English rows. The first exchange is prompt/answer, later turns the followups_* columns."""
    more = row.get("followups_en") or []
    roles = ["user", "assistant"] + [t["role"] for t in more]
    english = [row["prompt_en"], row["answer_en"]] + [t["content"] for t in more]
    drafts = [row["draft_prompt"], row["draft_answer"]] + list(
        row.get("followups_draft") or [None] * len(more)
    )
    rephrased = [row.get("rephrase_prompt"), row.get("rephrase_answer")] + list(
        row.get("followups_rephrase") or [None] * len(more)
    )
    return roles, english, drafts, rephrased


def conversation(roles: list[str], texts: list[str]) -> list[dict]:
    return [{"role": r, "content": t} for r, t in zip(roles, texts)]


def assistant_text(roles: list[str], texts: list[str]) -> str:
    """What the answer metrics and gates read: the answer, or every assistant turn of a multi-turn sample."""
    return "\n\n".join(t for r, t in zip(roles, texts) if r == "assistant")


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
    parts = [turns_of(r) for r in rows]
    cand = [
        [rp or d for rp, d in zip(rephrased, drafts)] if r["lang"] != SOURCE_LANG else None
        for r, (_, _, drafts, rephrased) in zip(rows, parts)
    ]
    pairs: set[tuple[str, str]] = set()
    for (_, english, drafts, _), c in zip(parts, cand):
        if c is not None:
            pairs |= set(zip(english, drafts)) | set(zip(english, c))
    pair_list = sorted(pairs)
    scorer = ctx.comet() if pair_list else None
    scores = dict(zip(pair_list, scorer.score(pair_list))) if scorer else {}
    scored, answers, answers_en = [], [], []
    for idx, (r, (roles, english, drafts, rephrased), c) in enumerate(zip(rows, parts, cand)):
        out = dict(r, score_index=idx, conversation_en=conversation(roles, english))
        if c is None:
            out.update(
                prompt=r["prompt_en"],
                answer=r["answer_en"],
                conversation=conversation(roles, english),
                selected="source",
                selection_reason="english",
                comet_draft=None,
                comet_rephrase=None,
                comet_final=None,
            )
            final_texts = english
        else:
            d = _mean([scores[(e, t)] for e, t in zip(english, drafts)])
            has_rp = any(x is not None for x in rephrased)
            rp = _mean([scores[(e, t)] for e, t in zip(english, c)]) if has_rp else None
            if rp is None:
                sel, why = "draft", f"rephrase unusable ({r.get('rephrase_status')})"
            elif rp >= d - margin:
                sel, why = "rephrase", f"rephrase QE {rp:.4f} >= draft {d:.4f} - margin {margin}"
            else:
                sel, why = "draft", f"rephrase QE {rp:.4f} < draft {d:.4f} - margin {margin}"
            if sel == "rephrase" and r.get("rephrase_status") != "ok":
                why += f"; parts without a usable rephrase keep the draft ({r.get('rephrase_status')})"
            final_texts, final_qe = (c, rp) if sel == "rephrase" else (drafts, d)
            out.update(
                prompt=final_texts[0],
                answer=final_texts[1],
                conversation=conversation(roles, final_texts),
                comet_final=final_qe,
                selected=sel,
                selection_reason=why,
                comet_draft=d,
                comet_rephrase=rp,
            )
        answers.append(assistant_text(roles, final_texts))
        answers_en.append(assistant_text(roles, english))
        scored.append(out)
    candidates = metrics.langid_candidates(cfg.run.languages)
    ids = metrics.langid(answers, [o["lang"] for o in scored], candidates)
    for out, answer, answer_en, (lid_lang, lid_conf) in zip(scored, answers, answers_en, ids):
        m, n_tok = metrics.mtld(answer, out["lang"])
        out.update(
            mtld=m,
            mtld_tokens=n_tok,
            langid_conf=lid_conf,
            langid_lang=lid_lang,
            langid_chars=metrics.langid_chars(answer),
            length_ratio=None if out["lang"] == SOURCE_LANG else metrics.length_ratio(answer, answer_en),
            repetition=metrics.repetition(answer, out["lang"]),
        )
    thresholds = comet_thresholds(cfg, {o["lang"] for o in scored})  # quantile rules: resolved at commit
    kept, rejected = apply_gates(scored, cfg, thresholds)
    stats = {"comet_pairs": len(pair_list)}
    if scorer is not None:
        stats.update(
            comet_calls=scorer.calls,
            comet_split_pairs=getattr(scorer, "split_pairs", 0),
            comet_segments=getattr(scorer, "segments_scored", 0),  # what reached the model (not cached)
        )
    return StageResult(kept, rejected, stats)


STAGE = Stage("score", score, READS, WRITES, CONFIG, redo_on_change=True)

"""QE scoring, selection, metrics and quality gates."""

from __future__ import annotations

from babelsynth.config import RunConfig
from babelsynth.languages import SOURCE_LANG
from babelsynth.stages.base import Context, StageResult, reject


READS = ("lang", "prompt_en", "answer_en", "draft_prompt", "draft_answer", "rephrase_prompt", "rephrase_answer")
WRITES = ("prompt", "answer", "selected", "selection_reason", "comet_draft", "comet_rephrase", "comet_final",
                "mtld", "langid_conf", "length_ratio", "repetition", "gate_flags")  # fmt: skip


def _mean(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else (a + b) / 2


def gate_failures(row: dict, cfg: RunConfig) -> list[str]:
    """Pure: which gates this scored row fails. Re-applied offline by `babelsynth regate`."""
    g, fails = cfg.gates, []
    lang = row["lang"]
    if lang != SOURCE_LANG and row.get("comet_final") is not None:
        thr = g.comet.per_lang.get(lang, g.comet.threshold)
        if thr is not None and row["comet_final"] < thr:
            fails.append("gate_comet")
    if row.get("mtld") is not None and row.get("mtld_tokens", g.mtld.min_tokens) >= g.mtld.min_tokens:
        if row["mtld"] < g.mtld.min:
            fails.append("gate_mtld")
    if row.get("langid_conf") is not None and len(row["answer"]) >= g.langid.min_chars:
        if row["langid_conf"] < g.langid.min_conf:
            fails.append("gate_langid")
    if lang != SOURCE_LANG and row.get("length_ratio") is not None:
        if not g.length_ratio.min <= row["length_ratio"] <= g.length_ratio.max:
            fails.append("gate_length_ratio")
    if row.get("repetition") is not None and row["repetition"] > g.repetition.max:
        fails.append("gate_repetition")
    return fails


def gate_mode(cfg: RunConfig, flag: str) -> str:
    return getattr(cfg.gates, flag.removeprefix("gate_")).mode


def score(ctx: Context, rows: list[dict]) -> StageResult:
    """QE-score draft and rephrase, select, compute metrics, apply gates.

    Drop reasons (enforce mode): gate_comet, gate_mtld, gate_langid, gate_length_ratio, gate_repetition."""
    from babelsynth import metrics

    cfg = ctx.cfg
    pairs: list[tuple[str, str]] = []
    for r in rows:
        if r["lang"] == SOURCE_LANG:
            continue
        pairs += [(r["prompt_en"], r["draft_prompt"]), (r["answer_en"], r["draft_answer"])]
        if r["rephrase_prompt"] is not None and r["rephrase_answer"] is not None:
            pairs += [(r["prompt_en"], r["rephrase_prompt"]), (r["answer_en"], r["rephrase_answer"])]
    scores = dict(zip(pairs, ctx.comet().score(pairs))) if pairs else {}
    kept, rejected = [], []
    candidates = tuple(cfg.run.languages)
    for r in rows:
        out = dict(r)
        if r["lang"] == SOURCE_LANG:
            out.update(prompt=r["prompt_en"], answer=r["answer_en"], selected="source", selection_reason="english",
                       comet_draft=None, comet_rephrase=None, comet_final=None)  # fmt: skip
        else:
            d = _mean(scores[(r["prompt_en"], r["draft_prompt"])], scores[(r["answer_en"], r["draft_answer"])])
            rp = None
            if r["rephrase_prompt"] is not None and r["rephrase_answer"] is not None:
                rp = _mean(scores[(r["prompt_en"], r["rephrase_prompt"])], scores[(r["answer_en"], r["rephrase_answer"])])
            if rp is None:
                sel, why = "draft", f"rephrase unusable ({r['rephrase_status']})"
            elif rp >= d - cfg.rephrase.selection_margin:
                sel, why = "rephrase", f"rephrase QE {rp:.4f} >= draft {d:.4f} - margin {cfg.rephrase.selection_margin}"
            else:
                sel, why = "draft", f"rephrase QE {rp:.4f} < draft {d:.4f} - margin {cfg.rephrase.selection_margin}"
            if sel == "rephrase":
                out.update(prompt=r["rephrase_prompt"], answer=r["rephrase_answer"], comet_final=rp)
            else:
                out.update(prompt=r["draft_prompt"], answer=r["draft_answer"], comet_final=d)
            out.update(selected=sel, selection_reason=why, comet_draft=d, comet_rephrase=rp)
        m, n_tok = metrics.mtld(out["answer"], r["lang"])
        out.update(
            mtld=m, mtld_tokens=n_tok,
            langid_conf=metrics.langid_confidence(out["answer"], r["lang"], candidates),
            length_ratio=None if r["lang"] == SOURCE_LANG else metrics.length_ratio(out["answer"], r["answer_en"]),
            repetition=metrics.repetition(out["answer"], r["lang"]),
        )  # fmt: skip
        fails = gate_failures(out, cfg)
        enforced = [f for f in fails if gate_mode(cfg, f) == "enforce"]
        out["gate_flags"] = [f for f in fails if f not in enforced]
        if enforced:
            rejected.append(reject(out, "score", enforced[0], f"failed gates: {enforced}"))
        else:
            kept.append(out)
    return StageResult(kept, rejected, {"comet_pairs": len(pairs)})

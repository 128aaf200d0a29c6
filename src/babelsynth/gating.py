"""Quality gates at run level: COMET quantiles over the whole run, and the per-language summary.

No model is loaded or called here: gates are pure functions of the scores stored on every scored row
(stages/score.py). The score stage's per-shard result keeps the rows it kept and, in its rejected list,
the full record of every row a gate dropped, so the pool of scored rows can always be rebuilt.

* Commit calls `run_gates`: it rebuilds each shard's pool, resolves the COMET thresholds of the whole run
  (a quantile rule needs every shard's scores of that language: it cannot be applied inside one shard),
  re-applies all gates, and rewrites a shard's score result and Parquet files only when its kept/rejected
  sets changed. Each result records the fingerprint of the rules it was gated with, so a retried commit
  redoes nothing, and a crash half way is repaired by running it again.
* `regate.regate` (CLI `babelsynth regate`) re-commits a finished run with new thresholds, through commit.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict

from babelsynth.config import RunConfig
from babelsynth.languages import SOURCE_LANG
from babelsynth.layout import RunLayout
from babelsynth.stages.score import (
    GATE_REASONS,
    GATES,
    STAGE,
    apply_gates,
    comet_rule,
    comet_thresholds,
    gate_results,
)

log = logging.getLogger(__name__)


def scored_pool(doc: dict) -> list[dict]:
    """Every row the score stage scored in one shard (kept + dropped by a gate), in stage order."""
    pool = [dict(r) for r in doc["rows"]]
    pool += [json.loads(r["record"]) for r in doc["rejected"] if r["reason"] in GATE_REASONS]
    if all("score_index" in r for r in pool):
        pool.sort(key=lambda r: r["score_index"])
    for r in pool:
        r.pop("gate_flags", None)
    return pool


def _outcome(kept: list[dict], rejected: list[dict]) -> list:
    return sorted(
        [("kept", r["source_id"], r["lang"], tuple(r["gate_flags"])) for r in kept]
        + [("rejected", r["source_id"], r["lang"], r["reason"]) for r in rejected]
    )


def _restat(stats: dict, kept: list[dict], rejected: list[dict]) -> dict:
    """The score stage's stats for new kept/rejected sets (in per language is unchanged)."""
    out_c = Counter(r["lang"] for r in kept)
    rej_c = Counter(r["lang"] for r in rejected)
    by_lang = {
        lg: {"in": c["in"], "out": out_c.get(lg, 0), "rejected": rej_c.get(lg, 0)}
        for lg, c in stats["by_lang"].items()
    }
    return {
        **stats,
        "out": len(kept),
        "rejected": len(rejected),
        "by_lang": by_lang,
        "reasons": dict(Counter(r["reason"] for r in rejected)),
    }


def gates_fingerprint(cfg: RunConfig, thresholds: dict[str, float | None]) -> str:
    doc = {"gates": cfg.score.gates.model_dump(mode="json"), "comet_min": thresholds}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def run_gates(cfg: RunConfig, lay: RunLayout, shards: list[int]) -> dict:
    """Resolve run-level thresholds, re-gate every shard whose outcome changes, return the gate report and
    the per-language summary for the manifest. Pure file I/O, no model call; memory is one shard's rows plus
    one float per scored row (the distribution a quantile needs)."""
    run_scores: dict[str, list[float]] = defaultdict(list)
    langs: set[str] = set()
    for s in shards:  # pass 1: the run's QE distribution per language
        for r in scored_pool(lay.read_stage_result(STAGE.name, s)):
            langs.add(r["lang"])
            if r["lang"] != SOURCE_LANG and r.get("comet_final") is not None:
                run_scores[r["lang"]].append(r["comet_final"])
    thresholds = comet_thresholds(cfg, sorted(langs), dict(run_scores))
    fp = gates_fingerprint(cfg, thresholds)
    summary = LanguageSummary(cfg, thresholds)
    changed = []
    for s in shards:  # pass 2: gate shard by shard
        d = lay.read_stage_result(STAGE.name, s)
        kept, rejected = apply_gates(scored_pool(d), cfg, thresholds)
        summary.add(kept, rejected)
        if d.get("gates_fingerprint") == fp:
            continue
        other = [r for r in d["rejected"] if r["reason"] not in GATE_REASONS]
        old_gated = [r for r in d["rejected"] if r["reason"] in GATE_REASONS]
        if _outcome(kept, rejected) != _outcome(d["rows"], old_gated):
            changed.append(s)
            if lay.has_write_marker(s):  # the shard's Parquet files are stale: remove them
                old_files = lay.read_write_marker(s)["files"]
                lay.delete_write_marker(
                    s
                )  # marker first: a crash below leaves a shard that is simply rewritten
                for f in old_files:
                    lay.delete(f["path"])
        all_rej = other + rejected
        new = {
            **d,
            "rows": kept,
            "rejected": all_rej,
            "stats": _restat(d["stats"], kept, all_rej),
            "gates_fingerprint": fp,
        }
        lay.write_stage_result(STAGE.name, s, new)
    if changed:
        log.info("gates changed the outcome of shard(s) %s", changed)
    report = {
        "fingerprint": fp,
        "comet_min": {k: v for k, v in sorted(thresholds.items()) if v is not None},
        "comet_rules": {
            lg: comet_rule(cfg, lg) for lg in sorted(langs) if comet_rule(cfg, lg) and lg != SOURCE_LANG
        },
        "shards_regated": changed,
    }
    return {"gates": report, "languages": summary.result()}


class LanguageSummary:
    """Per language (the paper's table shape, plus the gates), accumulated shard by shard: scored rows,
    kept, mean COMET of the draft, the rephrase and the final choice, the share that chose the rephrase,
    pass rate per gate (over the rows the gate applies to), mean per-document MTLD."""

    _MEANS = ("comet_draft", "comet_rephrase", "comet_final", "mtld")

    def __init__(self, cfg: RunConfig, thresholds: dict[str, float | None]):
        self.cfg, self.thresholds = cfg, thresholds
        self.acc: dict[str, Counter] = defaultdict(Counter)

    def _row(self, r: dict, kept: bool) -> None:
        a = self.acc[r["lang"]]
        a["rows"] += 1
        a["kept"] += kept
        a["rephrase"] += r.get("selected") == "rephrase"
        vals = {k: r.get(k) for k in self._MEANS}
        if (r.get("mtld_tokens") or 0) < self.cfg.score.gates.mtld.min_tokens:
            vals["mtld"] = None  # not a document MTLD can describe
        for k, v in vals.items():
            if v is not None:
                a[f"sum_{k}"] += v
                a[f"n_{k}"] += 1
        for g, ok in gate_results(r, self.cfg, self.thresholds.get(r["lang"])).items():
            if ok is not None:
                a[f"applies_{g}"] += 1
                a[f"pass_{g}"] += ok

    def add(self, kept: list[dict], rejected: list[dict]) -> None:
        for r in kept:
            self._row(r, True)
        for r in rejected:
            self._row(json.loads(r["record"]), False)

    def result(self) -> dict:
        out = {}
        for lang in sorted(self.acc):
            a = self.acc[lang]
            mean = {k: round(a[f"sum_{k}"] / a[f"n_{k}"], 4) if a[f"n_{k}"] else None for k in self._MEANS}
            out[lang] = {
                "rows": a["rows"],
                "kept": a["kept"],
                "comet_draft": mean["comet_draft"],
                "comet_rephrase": mean["comet_rephrase"],
                "comet_final": mean["comet_final"],
                "rephrase_selected": round(a["rephrase"] / a["rows"], 4),
                "comet_min": self.thresholds.get(lang),
                "pass_rate": {
                    g: round(a[f"pass_{g}"] / a[f"applies_{g}"], 4) if a[f"applies_{g}"] else None
                    for g in GATES
                },
                "gate_rows": {g: a[f"applies_{g}"] for g in GATES},
                "mtld": mean["mtld"],
            }
        return out


def format_language_summary(languages: dict) -> list[str]:
    """Lines for the run summary: the per-language quality table."""
    if not languages:
        return []

    def f(v, w=7, p=3) -> str:
        return f"{v:>{w}.{p}f}" if isinstance(v, float | int) and v is not None else f"{'-':>{w}}"

    head = (
        f"{'lang':<10}{'rows':>6}{'kept':>6}{'draft':>7}{'final':>7}{'reph%':>7}"
        + "".join(f"{'p.' + g[:6]:>9}" for g in GATES)
        + f"{'mtld':>7}"
    )
    lines = ["", "quality (COMET mean draft -> final; p.<gate>: pass rate per gate; mtld: mean MTLD)", head]
    for lang, s in languages.items():
        lines.append(
            f"{lang:<10}{s['rows']:>6}{s['kept']:>6}{f(s['comet_draft'])}{f(s['comet_final'])}"
            f"{f(s['rephrase_selected'])}"
            + "".join(f(s["pass_rate"][g], 9, 2) for g in GATES)
            + f(s["mtld"], 7, 1)
        )
    return lines

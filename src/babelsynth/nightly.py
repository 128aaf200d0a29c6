"""Living with a nightly run: comparison with the previous committed run, alarms, the `latest` pointer and
retention. Everything is files under output_uri (layout.OutputLayout); no model, no orchestrator.

* commit calls `register`: it records the run in output_uri's history, compares it with its baseline
  (the previous committed run of the same series, or the run `latest` names) per language, and evaluates
  the alarms; both land in the manifest (and the report) before the manifest is written.
* `publish` moves `latest` to the run, in one atomic write, only when no `fail` alarm fired; otherwise it
  raises AlarmFailed and `latest` keeps naming the last good run. Publishing an older run never moves
  `latest` backwards.
* `retain` removes committed runs older than the last nightly.keep_last ones of the series, never the
  one `latest` names (its own task in the DAG).
"""

from __future__ import annotations

import logging
import time

from babelsynth import storage
from babelsynth.config import GATE_NAMES, Alarm, RunConfig
from babelsynth.languages import SOURCE_LANG
from babelsynth.layout import OutputLayout, RunLayout, safe_run_id

log = logging.getLogger(__name__)
DEFAULT_SERIES = "default"
RUN = "all"  # the `lang` of run-level metrics (alarms with lang: all)


class AlarmFailed(RuntimeError):
    """A `fail` alarm fired: the run is committed (its files and report stay) but not published."""


def series(cfg: RunConfig) -> str:
    return cfg.nightly.series or DEFAULT_SERIES


# ---------------------------------------------------------------------------------------------- metrics
def _assigned(manifest: dict, lang: str) -> int:
    """Rows of a language the run set out to make: the largest input any stage counted for it."""
    return max(
        (s.get("by_lang", {}).get(lang, {}).get("in", 0) for s in manifest["stages"].values()), default=0
    )


def metrics(manifest: dict) -> dict[str, dict[str, float | None]]:
    """Per language and for the run as a whole ('all'): rows kept, kept share, COMET final, MTLD and each
    gate's pass rate, from the manifest alone (so older runs compare too)."""
    kept = manifest.get("samples_by_lang", {})
    quality = manifest.get("languages", {})
    langs = sorted(
        set(kept) | set(quality) | {lg for s in manifest["stages"].values() for lg in s["by_lang"]}
    )
    out: dict[str, dict[str, float | None]] = {}
    tot = {"rows": 0, "assigned": 0}
    wsum: dict[str, float] = {}
    wn: dict[str, float] = {}
    for lang in langs:
        q = quality.get(lang, {})
        assigned = _assigned(manifest, lang)
        rows = kept.get(lang, 0)
        m: dict[str, float | None] = {"rows": rows, "kept_share": rows / assigned if assigned else None}
        m["comet_final"] = q.get("comet_final")
        m["mtld"] = q.get("mtld")
        for g in GATE_NAMES:
            m[f"pass_rate.{g}"] = (q.get("pass_rate") or {}).get(g)
        out[lang] = m
        tot["rows"] += rows
        tot["assigned"] += assigned
        weights = {"comet_final": q.get("rows", 0) if lang != SOURCE_LANG else 0, "mtld": q.get("rows", 0)}
        weights.update({f"pass_rate.{g}": (q.get("gate_rows") or {}).get(g, 0) for g in GATE_NAMES})
        for k, w in weights.items():
            if m.get(k) is not None and w:
                wsum[k] = wsum.get(k, 0.0) + m[k] * w
                wn[k] = wn.get(k, 0.0) + w
    run: dict[str, float | None] = {
        "rows": tot["rows"],
        "kept_share": tot["rows"] / tot["assigned"] if tot["assigned"] else None,
    }
    for k in ("comet_final", "mtld", *(f"pass_rate.{g}" for g in GATE_NAMES)):
        run[k] = wsum[k] / wn[k] if wn.get(k) else None
    out[RUN] = run
    return out


# ---------------------------------------------------------------------------------------------- history
def committed_runs(out: OutputLayout, name: str) -> list[dict]:
    """History entries of a series whose manifest exists (committed), oldest first."""
    return [
        e
        for e in out.history()
        if e.get("series") == name
        and not e.get("retiring")
        and storage.exists(out.run(e["run_id"]).manifest_uri)
    ]


def baseline(cfg: RunConfig, out: OutputLayout, run_id: str) -> dict | None:
    """The manifest this run is compared with, or None (first run of the series)."""
    key = safe_run_id(run_id)
    if cfg.nightly.baseline == "latest":
        latest = out.read_latest()
        if not latest or safe_run_id(latest["run_id"]) == key:
            return None
        lay = out.run(latest["run_id"])
        return lay.read_manifest() if lay.has_manifest() else None
    prev = [e for e in committed_runs(out, series(cfg)) if safe_run_id(e["run_id"]) != key]
    return out.run(prev[-1]["run_id"]).read_manifest() if prev else None


def _changed(old: dict, new: dict) -> dict[str, list]:
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def compare(previous: dict | None, manifest: dict) -> dict:
    """Per language and metric: previous, current and delta; models, prompts and config keys that changed."""
    if previous is None:
        return {"baseline": None}
    prev_m, cur_m = metrics(previous), metrics(manifest)
    langs: dict[str, dict] = {}
    for lang in sorted(set(prev_m) | set(cur_m), key=lambda x: (x != RUN, x)):
        p, c = prev_m.get(lang, {}), cur_m.get(lang, {})
        langs[lang] = {
            k: {
                "previous": p.get(k),
                "current": c.get(k),
                "delta": None if p.get(k) is None or c.get(k) is None else c[k] - p[k],
            }
            for k in dict.fromkeys([*c, *p])
        }
    pl, cl = previous.get("lineage") or {}, manifest.get("lineage") or {}
    return {
        "baseline": {
            "run_id": previous["run_id"],
            "path": previous.get("path"),
            "created_unix": previous.get("created_unix"),
        },
        "languages": langs,
        "models_changed": _changed(
            {r: (m or {}).get("id") for r, m in (pl.get("models") or {}).items()}
            or previous.get("models", {}),
            {r: (m or {}).get("id") for r, m in (cl.get("models") or {}).items()}
            or manifest.get("models", {}),
        ),
        "revisions_changed": _changed(
            {r: (m or {}).get("revision") for r, m in (pl.get("models") or {}).items()},
            {r: (m or {}).get("revision") for r, m in (cl.get("models") or {}).items()},
        ),
        "prompts_changed": _changed(pl.get("prompts") or {}, cl.get("prompts") or {}),
        "config_changed": _changed(
            _flat(_without_paths(previous.get("config") or {})),
            _flat(_without_paths(manifest.get("config") or {})),
        ),
    }


def _without_paths(cfg: dict) -> dict:
    """Config sections that say what a run does: where it reads and writes, and the address a model is
    served at (a new port each restart), are not differences."""
    out = {k: v for k, v in cfg.items() if k not in ("input_uri", "output_uri", "cache_dir")}
    models = {
        r: {k: v for k, v in (m or {}).items() if k != "base_url"}  # an unset model (safety_judge) is None
        for r, m in (out.get("models") or {}).items()
    }
    return {**out, "models": models} if models else out


# ---------------------------------------------------------------------------------------------- alarms
def _fires(a: Alarm, previous: float | None, current: float | None) -> str | None:
    if current is None:
        return None
    if a.min is not None and current < a.min:
        return f"{current:.4g} < min {a.min:g}"
    if previous is None:
        return None
    drop = previous - current
    if a.max_drop is not None and drop > a.max_drop:
        return f"down {drop:.4g} ({previous:.4g} -> {current:.4g}) > max_drop {a.max_drop:g}"
    if a.max_drop_relative is not None and previous > 0 and drop / previous > a.max_drop_relative:
        return (
            f"down {100 * drop / previous:.1f}% ({previous:.4g} -> {current:.4g}) "
            f"> max_drop_relative {a.max_drop_relative:g}"
        )
    return None


def check_alarms(cfg: RunConfig, manifest: dict, comparison: dict) -> dict:
    """Every alarm rule against this run (and its baseline): what fired, and whether the run fails."""
    cur = metrics(manifest)
    langs_cmp = comparison.get("languages") or {}
    fired = []
    for a in cfg.nightly.alarms:
        every = sorted((set(cur) | set(langs_cmp)) - {RUN})  # a language that vanished is still judged
        targets = [RUN] if a.lang == RUN else every if a.lang == "*" else [a.lang]
        for lang in targets:
            c = cur.get(lang, {}).get(a.metric)
            if lang not in cur and lang in langs_cmp:  # the language vanished: it kept nothing
                c = 0.0 if a.metric in ("rows", "kept_share") else None
            p = (langs_cmp.get(lang, {}).get(a.metric) or {}).get("previous")
            why = _fires(a, p, c)
            if why:
                fired.append(
                    {
                        "metric": a.metric,
                        "lang": lang,
                        "action": a.action,
                        "previous": p,
                        "current": c,
                        "message": f"{a.action.upper()} {a.metric} [{lang}]: {why}",
                    }
                )
    return {
        "rules": len(cfg.nightly.alarms),
        "fired": fired,
        "failed": any(f["action"] == "fail" for f in fired),
    }


# ---------------------------------------------------------------------------------------------- commit
def register(cfg: RunConfig, lay: RunLayout, manifest: dict) -> None:
    """Record the run in output_uri's history and put its comparison and alarms into the manifest.

    Called by commit before it writes the manifest: a run in the history without a manifest is not
    committed, and nothing (comparison, retention) counts it."""
    out = OutputLayout(lay.output_uri)
    manifest["series"] = series(cfg)
    out.write_history(
        lay.run_id,
        {
            "run_id": lay.run_id,
            "series": series(cfg),
            "committed_unix": manifest["created_unix"],
            "manifest": f"{lay.key}/manifest.json",
        },
    )
    manifest["comparison"] = compare(baseline(cfg, out, lay.run_id), manifest)
    manifest["alarms"] = check_alarms(cfg, manifest, manifest["comparison"])
    for f in manifest["alarms"]["fired"]:
        log.warning("alarm: %s", f["message"])


def alarm_text(manifest: dict) -> str:
    fired = (manifest.get("alarms") or {}).get("fired") or []
    return "; ".join(f["message"] for f in fired) or "no alarm fired"


# ---------------------------------------------------------------------------------------------- publish
def publish(cfg: RunConfig, run_id: str) -> dict:
    """Move `latest` to this committed run unless a `fail` alarm fired (AlarmFailed, latest unchanged).

    Returns {"published": bool, "latest": pointer, "latest_uri", "warnings": [messages of `warn` alarms]}."""
    out = OutputLayout(cfg.output_uri)
    lay = out.run(run_id)
    if not lay.has_manifest():
        raise RuntimeError(f"run {run_id} is not committed ({lay.manifest_uri} missing): commit it first")
    m = lay.read_manifest()
    alarms = m.get("alarms") or {}
    warnings = [f["message"] for f in alarms.get("fired", []) if f["action"] == "warn"]
    if alarms.get("failed"):
        raise AlarmFailed(
            f"run {run_id} failed its alarms and is not published; `latest` still names "
            f"{(out.read_latest() or {}).get('run_id')!r}: {alarm_text(m)} (report: {lay.report_uri})"
        )
    current = out.read_latest()
    if current and current.get("committed_unix", 0) > m["created_unix"] and current["run_id"] != m["run_id"]:
        log.info("latest names %s, committed after %s: not moved back", current["run_id"], run_id)
        return {"published": False, "latest": current, "latest_uri": out.latest_uri, "warnings": warnings}
    pointer = {
        "run_id": m["run_id"],
        "series": m.get("series", series(cfg)),
        "path": lay.root,
        "manifest_uri": lay.manifest_uri,
        "report_uri": lay.report_uri,
        "committed_unix": m["created_unix"],
        "published_unix": int(time.time()),
    }
    if current is None or {k: v for k, v in current.items() if k != "published_unix"} != {
        k: v for k, v in pointer.items() if k != "published_unix"
    }:
        out.write_latest(pointer)
    return {
        "published": True,
        "latest": out.read_latest(),
        "latest_uri": out.latest_uri,
        "warnings": warnings,
    }


def read_latest(output_uri: str) -> dict | None:
    """The `latest` pointer of an output root (what trainers read), or None before the first publish."""
    return OutputLayout(output_uri).read_latest()


# ---------------------------------------------------------------------------------------------- retention
def retain(cfg: RunConfig, keep_last: int | None = None) -> dict:
    """Remove committed runs of the series older than the last K, never the one `latest` names.

    A removal marks the run's history entry first, so an interrupted removal is finished next time."""
    k = keep_last if keep_last is not None else cfg.nightly.keep_last
    out = OutputLayout(cfg.output_uri)
    name = series(cfg)
    latest = out.read_latest()
    protected = safe_run_id(latest["run_id"]) if latest else None
    entries = [e for e in out.history() if e.get("series") == name]
    unfinished = [e for e in entries if e.get("retiring")]
    committed = committed_runs(out, name)
    keep = (
        {safe_run_id(e["run_id"]) for e in committed[-k:]}
        if k
        else {safe_run_id(e["run_id"]) for e in committed}
    )
    if protected:
        keep.add(protected)
    doomed = unfinished + [e for e in committed if safe_run_id(e["run_id"]) not in keep]
    removed = []
    for e in doomed:
        if safe_run_id(e["run_id"]) == protected:  # never, whatever the history says
            continue
        out.write_history(e["run_id"], {**e, "retiring": True})
        out.delete_run(e["run_id"])
        removed.append(e["run_id"])
    if removed:
        log.info("retention (keep_last=%s) removed %s; kept %s", k, removed, sorted(keep))
    return {"keep_last": k, "removed": removed, "kept": sorted(keep), "latest": latest and latest["run_id"]}

"""`babelsynth inspect <run>`: where a finished or running run stands, from its files alone: the plan, which
shards each stage has finished, whether it is committed, its alarms, and whether `latest` names it."""

from __future__ import annotations

import time

from babelsynth.layout import OutputLayout, RunLayout
from babelsynth.stages import STAGE_NAMES

GRID_MAX = 80  # up to this many shards a stage shows one mark per shard


def status(lay: RunLayout) -> dict:
    plan = lay.read_plan() if lay.has_plan() else None
    done = lay.stage_results()
    shards = plan["shards"] if plan else sorted(set().union(*done.values()) if done else set())
    manifest = lay.read_manifest() if lay.has_manifest() else None
    latest = OutputLayout(lay.output_uri).read_latest()
    return {
        "run_id": (manifest or plan or {}).get("run_id", lay.run_id),
        "path": lay.root,
        "plan": plan,
        "shards": shards,
        "stages": {name: sorted(done.get(name, set())) for name in (*STAGE_NAMES, "write")},
        "manifest": manifest,
        "latest": latest,
        "is_latest": bool(latest and latest.get("path") == lay.root),
    }


def _when(unix: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(unix)) if unix else "?"


def format_status(st: dict) -> str:
    plan, shards, m = st["plan"], st["shards"], st["manifest"]
    lines = [f"run {st['run_id']}", f"  {st['path']}"]
    if plan is None:
        lines.append("plan: none (the run has not started, or this is not a run directory)")
    else:
        est = plan.get("estimate") or {}
        gpu = f", estimate {est['gpu_hours']:.3f} GPU-h" if "gpu_hours" in est else ""
        lines.append(
            f"plan: {len(shards)} shard(s) of {plan['shard_size']} records, {plan['records']} input records, "
            f"planned {_when(plan.get('planned_unix'))}{gpu}"
        )
    lines.append("")
    n = len(shards)
    for name, got in st["stages"].items():
        have = set(got)
        missing = [s for s in shards if s not in have]
        bar = "".join("#" if s in have else "." for s in shards) if 0 < n <= GRID_MAX else ""
        more = ""
        if missing and n > GRID_MAX:
            more = f"  missing: {', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''}"
        lines.append(f"  {name:<10}{len(have & set(shards)):>5}/{n:<5} {bar}{more}")
    lines.append("")
    if m is None:
        lines.append(
            "commit: not yet (no manifest.json): the run is running, failed, or waits for its commit"
        )
    else:
        alarms = m.get("alarms") or {}
        verdict = "FAILED" if alarms.get("failed") else "warned" if alarms.get("fired") else "passed"
        lines.append(
            f"commit: {_when(m.get('created_unix'))}, {sum((m.get('samples_by_lang') or {}).values())} rows "
            f"in {len(m.get('samples_by_lang') or {})} language(s), {m.get('rejected_total', 0)} rejected, "
            f"reconciled: {(m.get('reconciliation') or {}).get('ok')}"
        )
        lines.append(f"alarms: {verdict}")
        lines += [f"  {f['message']}" for f in alarms.get("fired", [])]
        if m.get("report"):
            lines.append(f"report: {st['path']}/{m['report']['html']}")
    latest = st["latest"]
    if latest is None:
        lines.append("latest: no run published under this output root yet")
    else:
        lines.append("latest: names this run" if st["is_latest"] else f"latest: names {latest['run_id']}")
    return "\n".join(lines)

"""Runs stages over shards, checks each stage's contract, writes outputs atomically, commits last.

Per shard and stage: load the previous stage's rows, run the stage, check that it read and wrote only the
columns it declares and that every row it was given (or counted in) ends in its output or its rejects,
exactly once, per (source_id, lang); only then persist the result. A stage whose result exists is skipped,
so a retried task or a re-triggered run redoes nothing. Paths: `layout.RunLayout`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter, defaultdict
from pathlib import Path

from babelsynth import gating
from babelsynth.cache import Cache
from babelsynth.config import RunConfig
from babelsynth.layout import RunLayout
from babelsynth.schema import arrow_schema, columns, to_table
from babelsynth.stages import BY_NAME, STAGE_NAMES, STAGES, Context, Stage, StageResult, identity

log = logging.getLogger(__name__)
IMAGES_PER_PART = 2000
_SHOW = 8  # keys named in a contract error


class StageContractError(RuntimeError):
    """A stage read or wrote an undeclared column, or lost or duplicated a row: its result is not kept."""


def layout(cfg: RunConfig, run_id: str) -> RunLayout:
    return RunLayout(cfg.output_uri, run_id)


def open_cache(cfg: RunConfig) -> Cache:
    return Cache(Path(cfg.cache_dir) / "requests.sqlite")


# ---------------------------------------------------------------- plan
def plan(cfg: RunConfig, run_id: str) -> list[int]:
    """Shard indices; shard size grows so the fan-out never exceeds run.max_shards."""
    import pyarrow.parquet as pq

    from babelsynth import storage

    lay = layout(cfg, run_id)
    if lay.has_plan():
        return lay.read_plan()["shards"]
    meta = pq.read_metadata(storage.parquet_source(cfg.input_uri))
    n = meta.num_rows if cfg.run.limit is None else min(meta.num_rows, cfg.run.limit)
    size = max(cfg.run.shard_size, math.ceil(n / cfg.run.max_shards))
    shards = list(range(math.ceil(n / size)))
    lay.write_plan(
        {
            "run_id": run_id,
            "input_uri": cfg.input_uri,
            "records": n,
            "shard_size": size,
            "shards": shards,
            "config_fingerprint": cfg.fingerprint(),
        }
    )
    return shards


def read_input_shard(cfg: RunConfig, lay: RunLayout, shard: int) -> list[dict]:
    import pyarrow.parquet as pq

    from babelsynth import storage

    doc = lay.read_plan()
    start, stop = shard * doc["shard_size"], min(doc["records"], (shard + 1) * doc["shard_size"])
    pf = pq.ParquetFile(storage.parquet_source(cfg.input_uri))
    out, pos = [], 0
    for batch in pf.iter_batches(batch_size=256):  # streams: memory is one batch, not the file
        if pos + batch.num_rows > start:
            lo, hi = max(0, start - pos), min(batch.num_rows, stop - pos)
            out += batch.slice(lo, hi - lo).to_pylist()
        pos += batch.num_rows
        if pos >= stop:
            break
    return out


# ---------------------------------------------------------------- the stage contract
class _TrackedRow(dict):
    """A row that records which columns the stage looks up. Copies (`{**row}`, `dict(row, ...)`) are not
    reads: passing a column through is not depending on it."""

    __slots__ = ("_seen",)

    def __init__(self, data: dict, seen: set[str]):
        super().__init__(data)
        self._seen = seen

    def __getitem__(self, key):
        self._seen.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._seen.add(key)
        return super().get(key, default)

    def __contains__(self, key) -> bool:
        self._seen.add(key)
        return super().__contains__(key)


def track_reads(rows: list[dict]) -> tuple[list[dict], set[str]]:
    """The rows a stage is given, and the set that fills with the columns it looks up."""
    read: set[str] = set()
    return [_TrackedRow(r, read) for r in rows], read


def _show(keys) -> str:
    keys = sorted(keys, key=str)
    more = f" and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return ", ".join(map(str, keys[:_SHOW])) + more


def check_contract(stage: Stage, shard: int, given: list[dict], res: StageResult, read: set[str]) -> Counter:
    """Columns read and written against the declaration, then reconciliation by identity.

    Returns the stage's input per language (what it counted in). Raises StageContractError naming the
    stage, the shard and the offending columns or (source_id, lang) keys."""
    where = f"stage {stage.name} (shard {shard})"
    undeclared = read - set(stage.reads)
    if undeclared:
        raise StageContractError(
            f"{where} read column(s) {_show(undeclared)}, which it does not declare; "
            f"it declares {stage.reads}"
        )
    by_key = {identity(r): r for r in given}
    by_source = {identity(r)[0]: r for r in given}
    wrote: set[str] = set()
    for row in res.rows:
        base = by_key.get(identity(row)) or by_source.get(identity(row)[0]) or {}
        wrote.update(k for k, v in row.items() if k not in base or base[k] != v)
    undeclared = wrote - set(stage.writes)
    if undeclared:
        raise StageContractError(
            f"{where} wrote column(s) {_show(undeclared)}, which it does not declare; "
            f"it declares {stage.writes}"
        )
    given_keys = [identity(r) for r in given]
    if res.counted_in is None:
        expected = Counter(given_keys)
    else:  # an expansion: it must cover every row given and invent no source
        expected = Counter(res.counted_in)
        sources = {k[0] for k in given_keys}
        dropped = Counter(given_keys) - expected
        invented = {k for k in expected if k[0] not in sources}
        if dropped or invented:
            raise StageContractError(
                f"{where} counted in {len(expected)} (source_id, lang) keys that do not cover its input: "
                f"input rows not counted: {_show(dropped)}; keys of no input row: {_show(invented)}"
            )
    got = Counter(identity(r) for r in res.rows) + Counter(identity(r) for r in res.rejected)
    lost, extra = expected - got, got - expected
    if lost or extra:
        dup = {k for k in extra if k in expected}
        problems = []
        if lost:
            problems.append(f"lost {sum(lost.values())} row(s), neither kept nor rejected: {_show(lost)}")
        if dup:
            problems.append(f"duplicated {len(dup)} row(s): {_show(dup)}")
        if set(extra) - dup:
            problems.append(f"produced row(s) it was not given: {_show(set(extra) - dup)}")
        raise StageContractError(f"{where} does not reconcile (in = out + rejected): " + "; ".join(problems))
    return Counter(k[1] for k in expected.elements())


def _stats(stage: str, received: int, n_in: Counter, res: StageResult, seconds: float) -> dict:
    out_c = Counter(identity(r)[1] for r in res.rows)
    rej_c = Counter(identity(r)[1] for r in res.rejected)
    langs = sorted(set(n_in) | set(out_c) | set(rej_c))
    return {
        "stage": stage,
        "received": received,
        "in": sum(n_in.values()),
        "out": len(res.rows),
        "rejected": len(res.rejected),
        "reasons": dict(Counter(r["reason"] for r in res.rejected)),
        "seconds": round(seconds, 3),
        "by_lang": {
            lg: {"in": n_in.get(lg, 0), "out": out_c.get(lg, 0), "rejected": rej_c.get(lg, 0)} for lg in langs
        },
        **res.stats,
    }


def run_stage(cfg: RunConfig, run_id: str, stage: str, shard: int, cache: Cache | None = None) -> dict:
    """Run one stage on one shard (skipped when its result exists). Returns the stage stats."""
    if stage not in BY_NAME:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGE_NAMES}")
    lay = layout(cfg, run_id)
    if lay.has_stage_result(stage, shard):
        return lay.read_stage_result(stage, shard)["stats"]
    idx = STAGE_NAMES.index(stage)
    if idx == 0:
        rows = read_input_shard(cfg, lay, shard)
    else:
        prev = STAGE_NAMES[idx - 1]
        if not lay.has_stage_result(prev, shard):
            raise RuntimeError(
                f"stage {stage} of shard {shard} needs {prev} first "
                f"({lay.stage_result_uri(prev, shard)} missing)"
            )
        rows = lay.read_stage_result(prev, shard)["rows"]
    tracked, read = track_reads(rows)
    ctx = Context(
        cfg,
        run_id,
        shard,
        cache or open_cache(cfg),
        artifact=lambda s, n: lay.read_stage_artifact(s, n, shard),
    )
    t0 = time.perf_counter()
    res = BY_NAME[stage].fn(ctx, tracked)
    n_in = check_contract(BY_NAME[stage], shard, rows, res, read)
    stats = _stats(stage, len(rows), n_in, res, time.perf_counter() - t0)
    for name, (schema, art_rows) in res.artifacts.items():
        lay.write_stage_artifact(stage, name, shard, to_table(schema, art_rows))
    artifacts = {name: schema for name, (schema, _) in res.artifacts.items()}
    lay.write_stage_result(
        stage, shard, {"rows": res.rows, "rejected": res.rejected, "stats": stats, "artifacts": artifacts}
    )
    log.info(
        "stage %s shard %d: in=%d out=%d rejected=%d (%.1fs)",
        stage,
        shard,
        stats["in"],
        stats["out"],
        stats["rejected"],
        stats["seconds"],
    )
    return stats


def stage_result_uri(cfg: RunConfig, run_id: str, stage: str, shard: int) -> str:
    """Where a stage's result for one shard is (what a task reports)."""
    return layout(cfg, run_id).stage_result_uri(stage, shard)


# ---------------------------------------------------------------- write (per shard)
def sample_id(source_id: str, lang: str) -> str:
    return hashlib.sha256(f"{source_id}|{lang}".encode()).hexdigest()[:24]


def write_shard(cfg: RunConfig, run_id: str, shard: int) -> dict:
    """Final Parquet for one shard: samples per language and every rejected row, explicit schemas."""
    lay = layout(cfg, run_id)
    if lay.has_write_marker(shard):
        return lay.read_write_marker(shard)
    if not lay.has_stage_result(STAGE_NAMES[-1], shard):
        raise RuntimeError(f"shard {shard} has not finished stage {STAGE_NAMES[-1]}")
    sample_cols = set(columns("samples"))
    by_lang: dict[str, list[dict]] = defaultdict(list)
    for r in lay.read_stage_result(STAGE_NAMES[-1], shard)["rows"]:
        row = {k: v for k, v in r.items() if k in sample_cols}
        row.update(run_id=run_id, shard=shard, sample_id=sample_id(r["source_id"], r["lang"]))
        by_lang[r["lang"]].append(row)
    rejected = []
    for stage in STAGE_NAMES:
        for r in lay.read_stage_result(stage, shard)["rejected"]:
            rejected.append({**r, "run_id": run_id, "shard": shard})
    files = []
    for lang in sorted(by_lang):
        files.append(
            lay.write_table(
                lay.samples_path(lang, shard), to_table("samples", by_lang[lang]), "samples", lang
            )
        )
    if rejected:
        files.append(lay.write_table(lay.rejected_path(shard), to_table("rejected", rejected), "rejected"))
    doc = {"shard": shard, "files": files}
    lay.write_write_marker(shard, doc)
    return doc


# ---------------------------------------------------------------- commit (once per run)
def commit(cfg: RunConfig, run_id: str, shards: list[int] | None = None) -> dict:
    """Run-level gates, every shard written, images deduplicated, counts reconciled, manifest.json last.

    Idempotent: a committed run returns its manifest."""
    lay = layout(cfg, run_id)
    if lay.has_manifest():
        return lay.read_manifest()
    plan_doc = lay.read_plan()
    shards = plan_doc["shards"] if shards is None else shards
    gates = gating.run_gates(cfg, lay, shards)
    files: list[dict] = []
    stage_totals: dict[str, dict] = {}
    image_artifacts: list[tuple[str, str]] = []  # (stage, name) of every artifact that is an images table
    for shard in shards:
        files += write_shard(cfg, run_id, shard)["files"]
        for stage in STAGE_NAMES:
            doc = lay.read_stage_result(stage, shard)
            merge_stats(stage_totals.setdefault(stage, {}), doc["stats"])
            for name, schema in (doc.get("artifacts") or {}).items():
                if schema == "images" and (stage, name) not in image_artifacts:
                    image_artifacts.append((stage, name))
    files += _write_images(lay, files, shards, image_artifacts)
    samples_by_lang: Counter = Counter()
    for f in files:
        if f["table"] == "samples":
            samples_by_lang[f["lang"]] += f["rows"]
    manifest = {
        "run_id": run_id,
        "path": lay.root,
        "created_unix": int(time.time()),
        "input_uri": cfg.input_uri,
        "input_records": plan_doc["records"],
        "shards": len(shards),
        "shard_size": plan_doc["shard_size"],
        "schemas": {
            n: arrow_schema(n).metadata[b"babelsynth.schema"].decode()
            for n in ("samples", "images", "rejected")
        },
        "config_fingerprint": cfg.fingerprint(),
        "config": cfg.model_dump(mode="json"),
        "models": {
            "teacher": cfg.models.teacher.model,
            "judge": cfg.models.judge.model,
            "rephraser": cfg.models.rephraser.model,
            "translator": cfg.models.translator.model_id or Path(cfg.models.translator.path).name,
            "comet": cfg.models.comet.model_id or cfg.models.comet.path,
        },
        "stages": stage_totals,
        "samples_by_lang": dict(sorted(samples_by_lang.items())),
        "rejected_total": sum(f["rows"] for f in files if f["table"] == "rejected"),
        "images": sum(f["rows"] for f in files if f["table"] == "images"),
        "files": files,
        "gates": gates["gates"],
        "languages": gates["languages"],
    }
    manifest["reconciliation"] = reconcile(manifest)
    if not manifest["reconciliation"]["ok"]:
        raise RuntimeError(f"counts do not reconcile: {manifest['reconciliation']['errors']}")
    lay.write_manifest(manifest)
    return manifest


def _write_images(
    lay: RunLayout, files: list[dict], shards: list[int], sources: list[tuple[str, str]]
) -> list:
    """Images referenced by kept samples, each once (content-addressed), in bounded parts."""
    needed: set[str] = set()
    for f in files:
        if f["table"] == "samples":
            for ids in lay.read_table(f["path"]).column("image_ids").to_pylist():
                needed.update(ids)
    seen: set[str] = set()
    out, part, buf = [], 0, []
    for shard in shards:
        for stage, name in sources:
            for row in lay.read_stage_artifact(stage, name, shard).to_pylist():
                if row["image_id"] in needed and row["image_id"] not in seen:
                    seen.add(row["image_id"])
                    buf.append(row)
                if len(buf) >= IMAGES_PER_PART:
                    out.append(lay.write_table(lay.images_path(part), to_table("images", buf), "images"))
                    part, buf = part + 1, []
    if buf or part == 0:
        out.append(lay.write_table(lay.images_path(part), to_table("images", buf), "images"))
    return out


def merge_stats(acc: dict, s: dict) -> None:
    """Add one shard's stage stats into the run totals (counters add, by_task ratios recomputed)."""
    for k in ("received", "in", "out", "rejected", "seconds"):
        acc[k] = round(acc.get(k, 0) + s.get(k, 0), 3)
    acc.setdefault("reasons", {})
    for k, v in s["reasons"].items():
        acc["reasons"][k] = acc["reasons"].get(k, 0) + v
    for k, v in s.items():  # stage-specific counters (requests_sent, engine_calls, ...) add up
        if k not in ("received", "in", "out", "rejected", "seconds", "stage") and isinstance(v, int | float):
            acc[k] = acc.get(k, 0) + v
    for lang, c in s["by_lang"].items():
        d = acc.setdefault("by_lang", {}).setdefault(lang, {"in": 0, "out": 0, "rejected": 0})
        for k in d:
            d[k] += c[k]
    acc.setdefault("by_lang", {})
    if "by_task" in s:  # teacher metrics per task type: counters add up, ratios are recomputed
        from babelsynth.filters import merge_task_stats

        merge_task_stats(acc.setdefault("by_task", {}), s["by_task"])


def reconcile(m: dict) -> dict:
    """Nothing lost: per stage and language in = out + rejected; each stage receives what the last kept."""
    errors = []
    st = m["stages"]
    first = STAGE_NAMES[0]
    if st[first]["received"] != m["input_records"]:
        errors.append(f"{first} received {st[first]['received']} records, input has {m['input_records']}")
    for name in STAGE_NAMES:
        s = st[name]
        if s["in"] != s["out"] + s["rejected"]:
            errors.append(f"{name}: in {s['in']} != out {s['out']} + rejected {s['rejected']}")
        for lang, c in s.get("by_lang", {}).items():
            if c["in"] != c["out"] + c["rejected"]:
                errors.append(f"{name}/{lang}: in {c['in']} != out {c['out']} + rejected {c['rejected']}")
    for a, b in zip(STAGE_NAMES, STAGE_NAMES[1:]):
        if st[a]["out"] != st[b]["received"]:
            errors.append(f"{a} out {st[a]['out']} != {b} received {st[b]['received']}")
    final = {lg: c["out"] for lg, c in st[STAGE_NAMES[-1]]["by_lang"].items() if c["out"]}
    if final != m["samples_by_lang"]:
        errors.append(f"samples files {m['samples_by_lang']} != {STAGE_NAMES[-1]} kept rows {final}")
    total_rej = sum(s["rejected"] for s in st.values())
    if total_rej != m["rejected_total"]:
        errors.append(f"rejected files hold {m['rejected_total']} rows, stages rejected {total_rej}")
    return {"ok": not errors, "errors": errors}


# ---------------------------------------------------------------- whole run in one process
def run_all(cfg: RunConfig, run_id: str) -> dict:
    """Plan, every stage of every shard, write, commit: the CLI's `run` and the unit of the tests."""
    cache = open_cache(cfg)
    shards = plan(cfg, run_id)
    for stage in STAGES:
        for shard in shards:
            run_stage(cfg, run_id, stage.name, shard, cache)
    return commit(cfg, run_id, shards)


def summary(manifest: dict) -> str:
    """Human summary: records in, kept and rejected per stage and per language, wall time per stage."""
    lines = [
        f"run {manifest['run_id']}: {manifest['input_records']} input records, {manifest['shards']} shard(s)",
        f"output: {manifest['path']}",
        "",
        f"{'stage':<10}{'in':>7}{'kept':>7}{'rejected':>10}{'seconds':>9}  reasons",
    ]
    stages = manifest["stages"]
    for name, s in stages.items():
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(s["reasons"].items())) or "-"
        lines.append(f"{name:<10}{s['in']:>7}{s['out']:>7}{s['rejected']:>10}{s['seconds']:>9.1f}  {reasons}")
    lines += ["", f"{'lang':<10}{'assigned':>9}{'kept':>7}{'rejected':>10}"]
    langs = sorted({lg for s in stages.values() for lg in s["by_lang"]})
    last = stages[STAGE_NAMES[-1]]["by_lang"]
    for lang in langs:
        assigned = max(s["by_lang"].get(lang, {}).get("in", 0) for s in stages.values())
        rej = sum(s["by_lang"].get(lang, {}).get("rejected", 0) for s in stages.values())
        lines.append(f"{lang:<10}{assigned:>9}{last.get(lang, {}).get('out', 0):>7}{rej:>10}")
    lines += gating.format_language_summary(manifest.get("languages", {}))
    lines.append(
        f"\nimages: {manifest['images']}, rejected rows: {manifest['rejected_total']}, "
        f"reconciled: {manifest['reconciliation']['ok']}"
    )
    return "\n".join(lines)

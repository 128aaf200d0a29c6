"""Runs stages over shards, writes outputs atomically and commits the manifest last.

Layout under <output_uri>/<run_id>/:
  _stages/<stage>/shard=NNNNN.json.gz   per-stage results (kept, rejected, stats): the resume points
  _stages/ingest/images-shard=NNNNN.parquet
  samples/lang=<code>/part-NNNNN.parquet, rejected/part-NNNNN.parquet, images/part-NNNNN.parquet
  manifest.json                         written last: a run without it is not finished
A stage whose result file exists is skipped, so a retried task or a re-triggered run redoes nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import math
import re
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from babelsynth import storage
from babelsynth.cache import Cache
from babelsynth.config import RunConfig
from babelsynth.languages import SOURCE_LANG
from babelsynth.schema import arrow_schema, columns, to_table
from babelsynth.stages import BY_NAME, STAGE_NAMES, Context, StageResult

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
IMAGES_PER_PART = 2000


def safe_run_id(run_id: str) -> str:
    """Airflow run ids carry ':' and '+'; keep paths portable across S3, Hive readers and HF datasets."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("_")
    if not s:
        raise ValueError(f"run id {run_id!r} has no usable characters")
    return s


def run_root(cfg: RunConfig, run_id: str) -> str:
    return storage.join(cfg.output_uri, safe_run_id(run_id))


def _stage_uri(root: str, stage: str, shard: int) -> str:
    return storage.join(root, "_stages", stage, f"shard={shard:05d}.json.gz")


def _dump(obj: Any) -> bytes:
    return gzip.compress(json.dumps(obj, ensure_ascii=False, default=str).encode(), mtime=0)


def _load(uri: str) -> Any:
    return json.loads(gzip.decompress(storage.read_bytes(uri)))


def _parquet_bytes(table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def _read_parquet(uri: str):
    import pyarrow.parquet as pq

    return pq.read_table(storage.parquet_source(uri))


# ---------------------------------------------------------------- plan
def plan(cfg: RunConfig, run_id: str) -> list[int]:
    """Shard indices; shard size grows so the fan-out never exceeds run.max_shards."""
    import pyarrow.parquet as pq

    root = run_root(cfg, run_id)
    uri = storage.join(root, "_stages", "plan.json")
    if storage.exists(uri):
        return json.loads(storage.read_bytes(uri))["shards"]
    src = cfg.input_uri
    meta = pq.read_metadata(storage.parquet_source(src))
    n = meta.num_rows if cfg.run.limit is None else min(meta.num_rows, cfg.run.limit)
    size = max(cfg.run.shard_size, math.ceil(n / cfg.run.max_shards))
    shards = list(range(math.ceil(n / size)))
    doc = {
        "run_id": run_id,
        "input_uri": src,
        "records": n,
        "shard_size": size,
        "shards": shards,
        "config_fingerprint": cfg.fingerprint(),
    }
    storage.write_bytes(uri, json.dumps(doc, indent=1).encode())
    return shards


def _plan_doc(root: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(root, "_stages", "plan.json")))


def _read_input_shard(cfg: RunConfig, root: str, shard: int) -> list[dict]:
    import pyarrow.parquet as pq

    doc = _plan_doc(root)
    start, stop = shard * doc["shard_size"], min(doc["records"], (shard + 1) * doc["shard_size"])
    src = cfg.input_uri
    pf = pq.ParquetFile(storage.parquet_source(src))
    out, pos = [], 0
    for batch in pf.iter_batches(batch_size=256):  # streams: memory is one batch, not the file
        if pos + batch.num_rows > start:
            lo, hi = max(0, start - pos), min(batch.num_rows, stop - pos)
            out += batch.slice(lo, hi - lo).to_pylist()
        pos += batch.num_rows
        if pos >= stop:
            break
    return out


# ---------------------------------------------------------------- stages
def _stats(stage: str, n_in: Counter, res: StageResult, seconds: float) -> dict:
    out_c = Counter(r.get("lang") or SOURCE_LANG for r in res.rows)
    rej_c = Counter(r.get("lang") or SOURCE_LANG for r in res.rejected)
    langs = sorted(set(n_in) | set(out_c) | set(rej_c))
    extra = {k: v for k, v in res.extra.items() if k != "images"}
    return {
        "stage": stage,
        "in": sum(n_in.values()),
        "out": len(res.rows),
        "rejected": len(res.rejected),
        "reasons": dict(Counter(r["reason"] for r in res.rejected)),
        "seconds": round(seconds, 3),
        "by_lang": {
            lg: {"in": n_in.get(lg, 0), "out": out_c.get(lg, 0), "rejected": rej_c.get(lg, 0)} for lg in langs
        },
        **extra,
    }


def _images_loader(root: str, shard: int):
    def load() -> dict[str, bytes]:
        t = _read_parquet(storage.join(root, "_stages", "ingest", f"images-shard={shard:05d}.parquet"))
        return dict(zip(t.column("image_id").to_pylist(), t.column("image").to_pylist()))

    return load


def run_stage(cfg: RunConfig, run_id: str, stage: str, shard: int, cache: Cache | None = None) -> dict:
    """Run one stage on one shard (skipped when its result exists). Returns the stage stats."""
    if stage not in BY_NAME:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGE_NAMES}")
    root = run_root(cfg, run_id)
    out_uri = _stage_uri(root, stage, shard)
    if storage.exists(out_uri):
        return _load(out_uri)["stats"]
    idx = STAGE_NAMES.index(stage)
    if idx == 0:
        rows = _read_input_shard(cfg, root, shard)
        # Translate and later count (record, lang): ingest counts English records.
        n_in = Counter({SOURCE_LANG: len(rows)})
    else:
        prev = _stage_uri(root, STAGE_NAMES[idx - 1], shard)
        if not storage.exists(prev):
            raise RuntimeError(
                f"stage {stage} of shard {shard} needs {STAGE_NAMES[idx - 1]} first ({prev} missing)"
            )
        rows = _load(prev)["rows"]
        n_in = Counter(r.get("lang") or SOURCE_LANG for r in rows)
    ctx = Context(
        cfg,
        run_id,
        shard,
        cache or Cache(Path(cfg.cache_dir) / "requests.sqlite"),
        _images_loader(root, shard),
    )
    t0 = time.perf_counter()
    res = BY_NAME[stage].fn(ctx, rows)
    if stage == "translate":  # the expansion into languages: count what was assigned, not the English rows
        n_in = Counter(res.extra.pop("assigned"))
    stats = _stats(stage, n_in, res, time.perf_counter() - t0)
    if stage == "ingest":
        imgs = [{"image_id": k, **_image_meta(v)} for k, v in res.extra["images"].items()]
        storage.write_bytes(
            storage.join(root, "_stages", "ingest", f"images-shard={shard:05d}.parquet"),
            _parquet_bytes(to_table("images", imgs)),
        )
    storage.write_bytes(out_uri, _dump({"rows": res.rows, "rejected": res.rejected, "stats": stats}))
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


def _image_meta(data: bytes) -> dict:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return {"image": data, "format": im.format or "UNKNOWN", "width": im.width, "height": im.height}


# ---------------------------------------------------------------- write (per shard)
def write_shard(cfg: RunConfig, run_id: str, shard: int) -> dict:
    """Final Parquet for one shard: samples per language and every rejected row, explicit schemas."""
    root = run_root(cfg, run_id)
    last = _stage_uri(root, STAGE_NAMES[-1], shard)
    done_uri = _stage_uri(root, "write", shard)
    if storage.exists(done_uri):
        return _load(done_uri)
    if not storage.exists(last):
        raise RuntimeError(f"shard {shard} has not finished stage {STAGE_NAMES[-1]}")
    sample_cols = set(columns("samples"))
    by_lang: dict[str, list[dict]] = defaultdict(list)
    for r in _load(last)["rows"]:
        row = {k: v for k, v in r.items() if k in sample_cols}
        row.update(
            run_id=run_id,
            shard=shard,
            sample_id=hashlib.sha256(f"{r['source_id']}|{r['lang']}".encode()).hexdigest()[:24],
        )
        by_lang[r["lang"]].append(row)
    rejected = []
    for stage in STAGE_NAMES:
        for r in _load(_stage_uri(root, stage, shard))["rejected"]:
            rejected.append({**r, "run_id": run_id, "shard": shard})
    files = []
    for lang in sorted(by_lang):
        rel = f"samples/lang={lang}/part-{shard:05d}.parquet"
        files.append(_write_table(root, rel, to_table("samples", by_lang[lang]), "samples", lang))
    if rejected:
        files.append(
            _write_table(
                root, f"rejected/part-{shard:05d}.parquet", to_table("rejected", rejected), "rejected"
            )
        )
    doc = {"shard": shard, "files": files}
    storage.write_bytes(done_uri, _dump(doc))
    return doc


def _write_table(root: str, rel: str, table, name: str, lang: str | None = None) -> dict:
    data = _parquet_bytes(table)
    storage.write_bytes(storage.join(root, rel), data)
    entry = {
        "table": name,
        "path": rel,
        "rows": table.num_rows,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    if lang:
        entry["lang"] = lang
    return entry


# ---------------------------------------------------------------- commit (once per run)
def commit(cfg: RunConfig, run_id: str, shards: list[int] | None = None) -> dict:
    """Dedup images across shards, reconcile counts, write manifest.json last. Idempotent."""
    root = run_root(cfg, run_id)
    man_uri = storage.join(root, MANIFEST)
    if storage.exists(man_uri):
        return json.loads(storage.read_bytes(man_uri))
    plan_doc = _plan_doc(root)
    shards = plan_doc["shards"] if shards is None else shards
    from babelsynth.regate import (
        run_gates,  # run-level gates (COMET quantiles) + per-language summary; no model
    )

    gating = run_gates(cfg, run_id, shards)
    files: list[dict] = []
    stage_totals: dict[str, dict] = {}
    for shard in shards:
        files += write_shard(cfg, run_id, shard)["files"]
        for stage in STAGE_NAMES:
            _merge_stats(stage_totals.setdefault(stage, {}), _load(_stage_uri(root, stage, shard))["stats"])
    # Images referenced by kept samples, each once (content-addressed), in bounded parts.
    needed: set[str] = set()
    for f in files:
        if f["table"] == "samples":
            for ids in _read_parquet(storage.join(root, f["path"])).column("image_ids").to_pylist():
                needed.update(ids)
    seen: set[str] = set()
    part, buf = 0, []
    for shard in shards:
        t = _read_parquet(storage.join(root, "_stages", "ingest", f"images-shard={shard:05d}.parquet"))
        for row in t.to_pylist():
            if row["image_id"] in needed and row["image_id"] not in seen:
                seen.add(row["image_id"])
                buf.append(row)
            if len(buf) >= IMAGES_PER_PART:
                files.append(
                    _write_table(root, f"images/part-{part:05d}.parquet", to_table("images", buf), "images")
                )
                part, buf = part + 1, []
    if buf or part == 0:
        files.append(_write_table(root, f"images/part-{part:05d}.parquet", to_table("images", buf), "images"))
    samples_by_lang = Counter()
    for f in files:
        if f["table"] == "samples":
            samples_by_lang[f["lang"]] += f["rows"]
    manifest = {
        "run_id": run_id,
        "path": root,
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
        "images": len(seen),
        "files": files,
    }
    manifest.update(gates=gating["gates"], languages=gating["languages"])
    manifest["reconciliation"] = reconcile(manifest)
    if not manifest["reconciliation"]["ok"]:
        raise RuntimeError(f"counts do not reconcile: {manifest['reconciliation']['errors']}")
    storage.write_bytes(man_uri, json.dumps(manifest, indent=1, ensure_ascii=False).encode())
    return manifest


def _merge_stats(acc: dict, s: dict) -> None:
    for k in ("in", "out", "rejected", "seconds"):
        acc[k] = round(acc.get(k, 0) + s[k], 3)
    for k, v in s["reasons"].items():
        acc.setdefault("reasons", {})[k] = acc.get("reasons", {}).get(k, 0) + v
    acc.setdefault("reasons", {})
    acc.setdefault("by_lang", {})
    for k, v in s.items():  # stage-specific counters (requests_sent, engine_calls, ...) add up
        if k not in ("in", "out", "rejected", "seconds", "stage") and isinstance(v, int | float):
            acc[k] = acc.get(k, 0) + v
    for lang, c in s["by_lang"].items():
        d = acc.setdefault("by_lang", {}).setdefault(lang, {"in": 0, "out": 0, "rejected": 0})
        for k in d:
            d[k] += c[k]
    if "by_task" in s:  # teacher metrics per task type: counters add up, ratios are recomputed
        from babelsynth.filters import merge_task_stats

        merge_task_stats(acc.setdefault("by_task", {}), s["by_task"])


def reconcile(m: dict) -> dict:
    """Nothing lost: per stage and language in = out + rejected; each stage's out feeds the next."""
    errors = []
    st = m["stages"]
    if st[STAGE_NAMES[0]]["in"] != m["input_records"]:
        errors.append(f"ingest saw {st['ingest']['in']} records, input has {m['input_records']}")
    for name in STAGE_NAMES:
        s = st[name]
        if s["in"] != s["out"] + s["rejected"]:
            errors.append(f"{name}: in {s['in']} != out {s['out']} + rejected {s['rejected']}")
        for lang, c in s.get("by_lang", {}).items():
            if c["in"] != c["out"] + c["rejected"]:
                errors.append(f"{name}/{lang}: in {c['in']} != out {c['out']} + rejected {c['rejected']}")
    for a, b in zip(STAGE_NAMES, STAGE_NAMES[1:]):
        if b == "translate":  # expands into languages: the English rows must carry through
            if st[b]["by_lang"].get(SOURCE_LANG, {}).get("in", 0) != st[a]["out"]:
                errors.append(f"translate: English in != {a} out")
            continue
        if st[a]["out"] != st[b]["in"]:
            errors.append(f"{a} out {st[a]['out']} != {b} in {st[b]['in']}")
    final = {lg: c["out"] for lg, c in st[STAGE_NAMES[-1]]["by_lang"].items() if c["out"]}
    if final != m["samples_by_lang"]:
        errors.append(f"samples files {m['samples_by_lang']} != scored rows {final}")
    total_rej = sum(s["rejected"] for s in st.values())
    if total_rej != m["rejected_total"]:
        errors.append(f"rejected files hold {m['rejected_total']} rows, stages rejected {total_rej}")
    return {"ok": not errors, "errors": errors}


# ---------------------------------------------------------------- whole run in one process
def run_all(cfg: RunConfig, run_id: str) -> dict:
    """Plan, every stage of every shard, write, commit: the CLI's `run` and the unit of the tests."""
    cache = Cache(Path(cfg.cache_dir) / "requests.sqlite")
    shards = plan(cfg, run_id)
    for stage in STAGE_NAMES:
        for shard in shards:
            run_stage(cfg, run_id, stage, shard, cache)
    return commit(cfg, run_id, shards)


def summary(manifest: dict) -> str:
    """Human summary: records in, kept and rejected per stage and per language, wall time per stage."""
    lines = [
        f"run {manifest['run_id']}: {manifest['input_records']} input records, {manifest['shards']} shard(s)",
        f"output: {manifest['path']}",
        "",
        f"{'stage':<10}{'in':>7}{'kept':>7}{'rejected':>10}{'seconds':>9}  reasons",
    ]
    for name, s in manifest["stages"].items():
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(s["reasons"].items())) or "-"
        lines.append(f"{name:<10}{s['in']:>7}{s['out']:>7}{s['rejected']:>10}{s['seconds']:>9.1f}  {reasons}")
    lines += ["", f"{'lang':<10}{'assigned':>9}{'kept':>7}{'rejected':>10}"]
    tr, sc = manifest["stages"]["translate"]["by_lang"], manifest["stages"]["score"]["by_lang"]
    for lang in sorted(tr):
        rej = sum(
            manifest["stages"][n]["by_lang"].get(lang, {}).get("rejected", 0)
            for n in ("translate", "rephrase", "score")
        )
        lines.append(f"{lang:<10}{tr[lang]['in']:>9}{sc.get(lang, {}).get('out', 0):>7}{rej:>10}")
    from babelsynth.regate import format_language_summary

    lines += format_language_summary(manifest.get("languages", {}))
    lines.append(
        f"\nimages: {manifest['images']}, rejected rows: {manifest['rejected_total']}, "
        f"reconciled: {manifest['reconciliation']['ok']}"
    )
    return "\n".join(lines)

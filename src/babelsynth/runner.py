"""Runs stages over shards, checks each stage's contract, writes outputs atomically, commits last.

Per shard and stage: load the previous stage's rows, run the stage, check that it read and wrote only the
columns it declares and that every row it was given (or counted in) ends in its output or its rejects,
exactly once, per (source_id, lang); only then persist the result. A stage whose result exists is skipped,
so a retried task or a re-triggered run redoes nothing. Paths: `layout.RunLayout`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path

from babelsynth import faults, fingerprint, gating, progress, redaction
from babelsynth.cache import Cache
from babelsynth.config import RunConfig
from babelsynth.fingerprint import ConfigDriftError
from babelsynth.layout import CARD, REPORT, RunLayout
from babelsynth.schema import arrow_schema, columns, to_table
from babelsynth.stages import BY_NAME, STAGE_NAMES, STAGES, Context, Stage, StageResult, identity

log = logging.getLogger(__name__)
_SHOW = 8  # keys named in a contract error


class StageContractError(RuntimeError):
    """A stage read or wrote an undeclared column, or lost or duplicated a row: its result is not kept."""


class StageErrorRateError(RuntimeError):
    """Too many of a stage's rows ended in request errors: an outage, not bad records; nothing is kept."""


def layout(cfg: RunConfig, run_id: str) -> RunLayout:
    return RunLayout(cfg.output_uri, run_id)


def open_cache(cfg: RunConfig) -> Cache:
    return Cache(Path(cfg.cache_dir) / "requests.sqlite")


def pipeline(cfg: RunConfig) -> tuple[str, ...]:
    """The stages this config runs, in order: every registered stage but those it turns off (Stage.active,
    e.g. the safety stages). Each reads the result of the one before it here."""
    return tuple(s.name for s in STAGES if s.active is None or s.active(cfg))


# ---------------------------------------------------------------- plan
def plan(cfg: RunConfig, run_id: str) -> list[int]:
    """Shard indices; shard size grows so the fan-out never exceeds run.max_shards (inputs/plan.py)."""
    from babelsynth.estimate import check_budget, estimate, format_estimate, sample_input
    from babelsynth.inputs.plan import plan_input

    lay = layout(cfg, run_id)
    if lay.has_plan():
        doc = lay.read_plan()
        check_plan(cfg, run_id, doc)
        return doc["shards"]
    doc = plan_input(cfg)
    for w in doc["warnings"]:
        log.warning("plan: %s", w)
    est = estimate(cfg, sample_input(cfg, plan=doc), doc["records"], len(doc["shards"]))  # no model call yet
    log.info("%s", format_estimate(est, cfg))
    check_budget(cfg, est)
    lay.write_plan(
        {
            "run_id": run_id,
            **doc,
            "config_fingerprint": cfg.fingerprint(),
            "planned_unix": int(time.time()),
            "estimate": est.as_dict(),
            "config": fingerprint.leaves(cfg, fingerprint.run_keys(STAGES)),
        }
    )
    return doc["shards"]


def check_plan(cfg: RunConfig, run_id: str, doc: dict) -> None:
    """A re-trigger must keep the keys that decide the shards and feed model stages (fingerprint.py):
    refused here, before any task does work, naming the keys."""
    if doc.get("run_id", run_id) != run_id:
        raise ValueError(
            f"run id {run_id!r} maps to the directory of run {doc['run_id']!r} ({layout(cfg, run_id).root}); "
            "use a run id that differs in letters or digits"
        )
    if "config" not in doc:  # planned before fingerprints were recorded
        return
    changed = fingerprint.drift(doc["config"], fingerprint.leaves(cfg, fingerprint.run_keys(STAGES)))
    bad = [k for k in changed if fingerprint.under(k, fingerprint.PLAN_KEYS)]
    bad = bad or fingerprint.refused(changed, STAGES)
    if bad:
        raise ConfigDriftError(fingerprint.explain(run_id, "plan and stage results", bad, STAGES))


def read_input_shard(cfg: RunConfig, lay: RunLayout, shard: int, meter=None) -> list[dict]:
    """One shard's canonical input records, read by range (only the bytes its plan assigns it)."""
    from babelsynth.inputs.plan import read_shard

    return read_shard(cfg, lay.read_plan(), shard, meter)


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


def stage_config(cfg: RunConfig, stage: str) -> dict[str, str]:
    """The fingerprint a stage's result records: its config keys and every upstream stage's."""
    return fingerprint.leaves(cfg, fingerprint.stage_keys(STAGES, stage))


def current_result(cfg: RunConfig, run_id: str, stage: str, shard: int, doc: dict) -> bool:
    """Whether a stored result was made with this config. False: it is redone (a `redo_on_change` stage
    whose changed keys only it depends on); otherwise ConfigDriftError names the keys."""
    changed = fingerprint.drift(doc.get("config", {}), stage_config(cfg, stage)) if "config" in doc else []
    if not changed:
        return True
    if BY_NAME[stage].redo_on_change and not fingerprint.refused(changed, STAGES):
        log.info("stage %s shard %d is redone: %s changed", stage, shard, ", ".join(changed))
        return False
    raise ConfigDriftError(fingerprint.explain(run_id, f"{stage} result of shard {shard}", changed, STAGES))


def run_stage(cfg: RunConfig, run_id: str, stage: str, shard: int, cache: Cache | None = None) -> dict:
    """Run one stage on one shard (skipped when its result exists and was made with this config).
    Returns the stage stats."""
    if stage not in BY_NAME:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGE_NAMES}")
    lay = layout(cfg, run_id)
    names = pipeline(cfg)
    if stage not in names:  # its task still runs in the DAG: it does nothing and writes nothing
        log.info("stage %s shard %d: not run under this config (inactive)", stage, shard)
        return {"stage": stage, "inactive": True}
    if lay.has_stage_result(stage, shard):
        doc = lay.read_stage_result(stage, shard)
        if current_result(cfg, run_id, stage, shard, doc):
            return doc["stats"]
    idx = names.index(stage)
    meter = planned = None
    if idx == 0:
        from babelsynth.inputs.metering import Meter
        from babelsynth.inputs.plan import read_shard

        meter, plan_doc = Meter(), lay.read_plan()
        rows = read_shard(cfg, plan_doc, shard, meter)
        planned = plan_doc["shard_bytes"][shard]
    else:
        prev = names[idx - 1]
        if not lay.has_stage_result(prev, shard):
            raise RuntimeError(
                f"stage {stage} of shard {shard} needs {prev} first "
                f"({lay.stage_result_uri(prev, shard)} missing)"
            )
        prev_doc = lay.read_stage_result(prev, shard)
        if not current_result(cfg, run_id, prev, shard, prev_doc):
            raise RuntimeError(
                f"stage {stage} of shard {shard} needs {prev} redone first (its config changed)"
            )
        rows = prev_doc["rows"]
    tracked, read = track_reads(rows)
    cache = cache or open_cache(cfg)
    ctx = Context(
        cfg,
        run_id,
        shard,
        cache,
        artifact=lambda s, n: (
            lay.read_stage_artifact(s, n, shard) if lay.has_stage_artifact(s, n, shard) else None
        ),
    )
    t0 = time.perf_counter()
    hits, misses = cache.hits, cache.misses
    with progress.label(f"{stage} shard {shard}"):
        res = BY_NAME[stage].fn(ctx, tracked)
    n_in = check_contract(BY_NAME[stage], shard, rows, res, read)
    check_error_rate(cfg, stage, shard, res, sum(n_in.values()))
    stats = _stats(stage, len(rows), n_in, res, time.perf_counter() - t0)
    stats["usage"] = usage(ctx.backends.values(), cache.hits - hits, cache.misses - misses)
    if meter is not None:  # what the shard pulled from storage against what its plan assigned it
        stats.update(input_bytes_read=meter.bytes, input_bytes_planned=planned)
    for name, (schema, art_rows) in res.artifacts.items():
        lay.write_stage_artifact(stage, name, shard, to_table(schema, art_rows))
    artifacts = {name: schema for name, (schema, _) in res.artifacts.items()}
    faults.point(f"stage.{stage}.before_persist")
    doc = {"rows": res.rows, "rejected": res.rejected, "stats": stats, "artifacts": artifacts}
    lay.write_stage_result(stage, shard, {**doc, "config": stage_config(cfg, stage)})
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


def usage(backends, cache_hits: int, cache_misses: int) -> dict[str, int]:
    """What a stage cost: model calls and tokens through its backends (each reports `usage()`), and how
    many cache lookups it made and answered (a re-run answers all of them: no model call)."""
    out = {"model_calls": 0, "tokens_in": 0, "tokens_out": 0}
    for b in backends:
        for k, v in (b.usage() if hasattr(b, "usage") else {}).items():
            out[k] = out.get(k, 0) + v
    return {**out, "cache_hits": cache_hits, "cache_lookups": cache_hits + cache_misses}


def check_error_rate(cfg: RunConfig, stage: str, shard: int, res: StageResult, n_in: int) -> None:
    """Rows that ended in a request error (a server refusing that one request) are rejects; so many that
    they exceed run.max_error_rate (and run.min_errors_to_fail) are an outage or a misconfiguration: the
    task fails and nothing is written, so a retry after the fix asks them again."""
    rc = cfg.run
    if res.errors >= rc.min_errors_to_fail and res.errors > rc.max_error_rate * max(n_in, 1):
        first = [r["detail"][:160] for r in res.rejected if r["reason"].endswith("request_rejected")][:3]
        raise StageErrorRateError(
            f"stage {stage} (shard {shard}): {res.errors} of {n_in} rows ended in request errors, above "
            f"run.max_error_rate={rc.max_error_rate}; nothing written. First errors: {first}"
        )


def stage_result_uri(cfg: RunConfig, run_id: str, stage: str, shard: int) -> str:
    """Where a stage's result for one shard is (what a task reports)."""
    return layout(cfg, run_id).stage_result_uri(stage, shard)


# ---------------------------------------------------------------- write (per shard)
def sample_id(source_id: str, lang: str) -> str:
    return hashlib.sha256(f"{source_id}|{lang}".encode()).hexdigest()[:24]


def write_shard(cfg: RunConfig, run_id: str, shard: int) -> dict:
    """Final Parquet for one shard: samples per language, every rejected row, and the images its kept
    samples reference (each once, by content id), all with explicit schemas.

    The marker written last lists the files and carries the shard's stage stats (commit reads markers,
    never rows or image bytes) and the config the last stage's result was made with: when that stage was
    redone (fingerprint.py), the shard's files are written again."""
    lay = layout(cfg, run_id)
    names = pipeline(cfg)
    last = names[-1]
    want = stage_config(cfg, last)
    if lay.has_write_marker(shard):
        marker = lay.read_write_marker(shard)
        if marker.get("config", want) == want:
            return marker
        lay.delete_write_marker(shard)  # marker first: a crash below leaves a shard that is simply rewritten
        for f in marker["files"]:
            lay.delete(f["path"])
    if not lay.has_stage_result(last, shard):
        raise RuntimeError(f"shard {shard} has not finished stage {last}")
    final = lay.read_stage_result(last, shard)
    if not current_result(cfg, run_id, last, shard, final):
        raise RuntimeError(f"shard {shard}: stage {last} must be redone first (its config changed): run it")
    sample_cols = set(columns("samples"))
    by_lang: dict[str, list[dict]] = defaultdict(list)
    needed: set[str] = set()
    rejected, stats, image_sources = [], {}, []
    for stage in names:
        doc = final if stage == last else lay.read_stage_result(stage, shard)
        stats[stage] = doc["stats"]
        rejected += [{**r, "run_id": run_id, "shard": shard} for r in doc["rejected"]]
        image_sources += [
            (stage, n) for n, schema in (doc.get("artifacts") or {}).items() if schema == "images"
        ]
    for r in final["rows"]:  # the last stage's kept rows
        row = {k: v for k, v in r.items() if k in sample_cols}
        row.update(run_id=run_id, shard=shard, sample_id=sample_id(r["source_id"], r["lang"]))
        by_lang[r["lang"]].append(row)
        needed.update(r["image_ids"])
    files = []
    for lang in sorted(by_lang):
        files.append(
            lay.write_table(
                lay.samples_path(lang, shard), to_table("samples", by_lang[lang]), "samples", lang
            )
        )
        faults.point("write.after_first_file")
    if rejected:
        files.append(lay.write_table(lay.rejected_path(shard), to_table("rejected", rejected), "rejected"))
    images = shard_images(lay, shard, image_sources, needed)
    if images is not None:
        files.append(lay.write_table(lay.images_path(shard), images, "images"))
    for f in files:
        f["shard"] = shard
    doc = {"shard": shard, "files": files, "stats": stats, "config": want}
    lay.write_write_marker(shard, doc)
    return doc


def shard_images(lay: RunLayout, shard: int, sources: list[tuple[str, str]], needed: set[str]):
    """The images table of one shard: every image its kept samples reference, each once (None if none)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not needed:
        return None
    parts, seen = [], pa.array([], pa.string())
    want = pa.array(sorted(needed), pa.string())
    for stage, name in sources:
        t = lay.read_stage_artifact(stage, name, shard)
        t = t.filter(
            pc.and_(pc.is_in(t["image_id"], value_set=want), pc.invert(pc.is_in(t["image_id"], seen)))
        )
        seen = pa.concat_arrays([seen, t["image_id"].combine_chunks()])
        parts.append(t)
    schema = arrow_schema("images")
    table = pa.concat_tables([t.select(schema.names).cast(schema) for t in parts]) if parts else None
    missing = len(needed) - (table.num_rows if table is not None else 0)
    if missing:
        raise RuntimeError(f"shard {shard}: {missing} image(s) referenced by kept samples are in no artifact")
    return table


# ---------------------------------------------------------------- commit (once per run)
def commit(cfg: RunConfig, run_id: str, shards: list[int] | None = None) -> dict:
    """Run-level gates, every shard written, counts reconciled, manifest.json last.

    Reads the write markers (files and stats per shard), never the rows or the image bytes: its cost
    grows with the number of files. Idempotent: a committed run returns its manifest, unless its gates (or
    a stage that is redone on a change, fingerprint.py) changed since: then the old manifest is kept under
    _stages/regate/ and the run is committed again. Any other config change is refused (ConfigDriftError
    naming the keys)."""
    lay = layout(cfg, run_id)
    leaves = fingerprint.leaves(cfg, fingerprint.run_keys(STAGES))
    if lay.has_manifest():
        old = lay.read_manifest()
        changed = fingerprint.drift(old["config_leaves"], leaves) if "config_leaves" in old else []
        if not changed:
            return old
        bad = fingerprint.refused(changed, STAGES)
        if bad:
            raise ConfigDriftError(fingerprint.explain(run_id, "published manifest", bad, STAGES))
        log.info("run %s: %s changed since it was committed: committing again", run_id, ", ".join(changed))
        lay.unpublish_manifest(int(time.time() * 1000))
    plan_doc = lay.read_plan()
    check_plan(cfg, run_id, plan_doc)
    shards = plan_doc["shards"] if shards is None else shards
    gates = gating.run_gates(cfg, lay, shards)
    files: list[dict] = []
    stage_totals: dict[str, dict] = {}
    for shard in shards:
        doc = write_shard(cfg, run_id, shard)
        files += doc["files"]
        for stage in pipeline(cfg):  # a marker of an older babelsynth has no stats: read the result
            st = (doc.get("stats") or {}).get(stage) or lay.read_stage_result(stage, shard)["stats"]
            merge_stats(stage_totals.setdefault(stage, {}), st)
    manifest = build_manifest(cfg, lay, plan_doc, shards, files, stage_totals, gates)
    manifest["config_leaves"] = leaves
    if not manifest["reconciliation"]["ok"]:
        raise RuntimeError(f"counts do not reconcile: {manifest['reconciliation']['errors']}")
    manifest = compare_and_redact(cfg, lay, manifest, plan_doc)
    faults.point("commit.before_manifest")
    lay.write_manifest(manifest)
    _drop_replaced_files(lay, manifest)
    return manifest


def build_manifest(
    cfg: RunConfig,
    lay: RunLayout,
    plan_doc: dict,
    shards: list[int],
    files: list[dict],
    stage_totals: dict,
    gates: dict,
) -> dict:
    """The manifest of a run from its files, stage totals and gate report (no I/O)."""
    samples_by_lang: Counter = Counter()
    for f in files:
        if f["table"] == "samples":
            samples_by_lang[f["lang"]] += f["rows"]
    manifest = {
        "run_id": lay.run_id,
        "path": lay.root,
        "created_unix": int(time.time()),
        "input_uri": cfg.input_uri,
        "input_format": plan_doc["input"]["format"],
        "input_records": plan_doc["records"],
        "shards": len(shards),
        "shard_size": plan_doc["shard_size"],
        "schemas": {
            n: arrow_schema(n).metadata[b"babelsynth.schema"].decode()
            for n in ("samples", "images", "rejected")
        },
        "config_fingerprint": cfg.fingerprint(),
        "config": cfg.model_dump(mode="json"),  # secrets are redacted by commit
        "models": {
            "teacher": cfg.models.teacher.model,
            "judge": cfg.models.judge.model,
            "rephraser": cfg.models.rephraser.model,
            "translator": cfg.models.translator.model_id or Path(cfg.models.translator.path).name,
            "comet": cfg.models.comet.model_id or cfg.models.comet.path,
            **({"llm_translator": cfg.models.llm_translator.model} if cfg.models.llm_translator else {}),
        },
        "stages": stage_totals,
        "samples_by_lang": dict(sorted(samples_by_lang.items())),
        "rejected_total": sum(f["rows"] for f in files if f["table"] == "rejected"),
        "images": sum(f["rows"] for f in files if f["table"] == "images"),
        # where each image lives: a sample's images are in the images part of its own shard
        "image_index": {
            "by": "shard",
            "parts": {str(f["shard"]): f["path"] for f in files if f["table"] == "images"},
        },
        "files": files,
        "gates": gates["gates"],
        "languages": gates["languages"],
    }
    if cfg.safety.enabled:  # the safety stages' models, when they ran (stages/safety.py)
        mc = cfg.models
        if mc.safety_judge is not None:
            manifest["models"]["safety_judge"] = mc.safety_judge.model
        if mc.toxicity is not None:
            manifest["models"]["toxicity"] = mc.toxicity.model_id or Path(mc.toxicity.path).name
    manifest["reconciliation"] = reconcile(manifest)
    return manifest


def compare_and_redact(cfg: RunConfig, lay: RunLayout, manifest: dict, plan_doc: dict) -> dict:
    """What commit adds before the manifest is written: lineage, the comparison with the previous run and
    its alarms (nightly), where the report goes; secrets redacted. The report itself reads the Parquet
    files, so it is its own step after commit (`report`): commit reads metadata only."""
    from babelsynth import lineage, nightly

    manifest["planned_unix"] = plan_doc.get("planned_unix")
    manifest["estimate"] = plan_doc.get("estimate")
    manifest["lineage"] = lineage.collect(cfg)
    nightly.register(cfg, lay, manifest)
    manifest["report"] = {"html": REPORT, "card": CARD}
    return redaction.redact(manifest, redaction.secret_values(cfg))


def report(cfg: RunConfig, run_id: str) -> dict[str, str]:
    """report.html and dataset_card.md of the committed run, from its manifest and Parquet files."""
    from babelsynth import report as report_pkg

    return report_pkg.write(layout(cfg, run_id))


def _drop_replaced_files(lay: RunLayout, manifest: dict) -> None:
    """Files the last replaced manifest listed and this one does not (e.g. a shard's images part no
    longer needed after the gates changed)."""
    previous = lay.previous_manifests()
    if previous:
        import json

        from babelsynth import storage

        listed = {f["path"] for f in manifest["files"]}
        for f in json.loads(storage.read_bytes(previous[-1]))["files"]:
            if f["path"] not in listed:
                lay.delete(f["path"])


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
    for k, v in (s.get("usage") or {}).items():  # model calls, tokens, cache lookups
        u = acc.setdefault("usage", {})
        u[k] = u.get(k, 0) + v
    for lang, c in s["by_lang"].items():
        d = acc.setdefault("by_lang", {}).setdefault(lang, {"in": 0, "out": 0, "rejected": 0})
        for k in d:
            d[k] += c[k]
    acc.setdefault("by_lang", {})
    for k in NESTED_COUNTS:  # e.g. safety drops per language and category
        if k in s:
            add_counts(acc.setdefault(k, {}), s[k])
    if "by_task" in s:  # teacher metrics per task type: counters add up, ratios are recomputed
        from babelsynth.filters import merge_task_stats

        merge_task_stats(acc.setdefault("by_task", {}), s["by_task"])


NESTED_COUNTS = (
    "safety_drops",  # stages/safety.py: per language and category
    "allowed",
    "translator_by_lang",  # translate: segments each backend won, and LLM failures, per language
)


def add_counts(acc: dict, d: dict) -> None:
    """Add a nested dict of counters into another."""
    for k, v in d.items():
        if isinstance(v, dict):
            add_counts(acc.setdefault(k, {}), v)
        else:
            acc[k] = acc.get(k, 0) + v


def reconcile(m: dict) -> dict:
    """Nothing lost: per stage and language in = out + rejected; each stage receives what the last kept.
    The stages are the manifest's, in pipeline order (an inactive stage is not in it)."""
    errors = []
    st = m["stages"]
    names = list(st)
    first = names[0]
    if st[first]["received"] != m["input_records"]:
        errors.append(f"{first} received {st[first]['received']} records, input has {m['input_records']}")
    for name in names:
        s = st[name]
        if s["in"] != s["out"] + s["rejected"]:
            errors.append(f"{name}: in {s['in']} != out {s['out']} + rejected {s['rejected']}")
        for lang, c in s.get("by_lang", {}).items():
            if c["in"] != c["out"] + c["rejected"]:
                errors.append(f"{name}/{lang}: in {c['in']} != out {c['out']} + rejected {c['rejected']}")
    for a, b in zip(names, names[1:]):
        if st[a]["out"] != st[b]["received"]:
            errors.append(f"{a} out {st[a]['out']} != {b} received {st[b]['received']}")
    final = {lg: c["out"] for lg, c in st[names[-1]]["by_lang"].items() if c["out"]}
    if final != m["samples_by_lang"]:
        errors.append(f"samples files {m['samples_by_lang']} != {names[-1]} kept rows {final}")
    total_rej = sum(s["rejected"] for s in st.values())
    if total_rej != m["rejected_total"]:
        errors.append(f"rejected files hold {m['rejected_total']} rows, stages rejected {total_rej}")
    return {"ok": not errors, "errors": errors}


# ---------------------------------------------------------------- whole run in one process
def run_all(cfg: RunConfig, run_id: str) -> dict:
    """Plan, every stage of every shard, write, commit, report: the CLI's `run` and the unit of the tests."""
    cache = open_cache(cfg)
    shards = plan(cfg, run_id)
    names = pipeline(cfg)
    with progress.Progress(len(names) * len(shards), "tasks", desc=f"run {run_id}") as prog:
        for stage in names:
            for shard in shards:
                run_stage(cfg, run_id, stage, shard, cache)
                prog.advance()
    manifest = commit(cfg, run_id, shards)
    report(cfg, run_id)
    return manifest


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
    alarms = manifest.get("alarms") or {}
    if alarms:
        verdict = "FAILED" if alarms.get("failed") else "warned" if alarms.get("fired") else "passed"
        base = (manifest.get("comparison") or {}).get("baseline") or {}
        lines.append(f"alarms: {verdict} (compared with {base.get('run_id') or 'no earlier run'})")
        lines += [f"  {f['message']}" for f in alarms.get("fired", [])]
    if manifest.get("report"):
        from babelsynth import storage

        lines.append(f"report: {storage.join(manifest['path'], manifest['report']['html'])}")
        lines.append(f"dataset card: {storage.join(manifest['path'], manifest['report']['card'])}")
    return "\n".join(lines)

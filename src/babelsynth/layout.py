"""Where every file of one run lives, and how it is read and written: the only module that builds run paths.

    <output_uri>/
      latest.json                            the `latest` pointer: the last run that passed its alarms
      _history/<run_id>.json                 one entry per run that reached commit (series, time)
    <output_uri>/<run_id>/
      manifest.json                          written last: a run without it is not finished
      report.html                            self-contained report (plots embedded), written by commit
      dataset_card.md                        Hugging Face dataset card, written by commit
      samples/lang=<code>/part-NNNNN.parquet one partition per language
      rejected/part-NNNNN.parquet            every dropped record with its stage and reason code
      images/part-NNNNN.parquet              each image once, keyed by content id
      _stages/plan.json                      the shard plan (frozen for the run)
      _stages/<stage>/shard=NNNNN.json.gz    a stage's result for one shard: the resume point
      _stages/<stage>/<name>-shard=NNNNN.parquet   a stage's artifact for one shard (ingest's images)
      _stages/write/shard=NNNNN.json.gz      the marker that a shard's Parquet files are complete
      _stages/regate/manifest-<ms>.json      manifests replaced by `babelsynth regate`

Everything here is plain I/O through `storage` (local paths or s3://); no stage, config or model knowledge.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
from typing import Any

from babelsynth import storage

MANIFEST = "manifest.json"
PLAN = "_stages/plan.json"
REPORT = "report.html"
CARD = "dataset_card.md"
LATEST = "latest.json"
HISTORY = "_history"
MAX_RUN_ID = 200


def safe_run_id(run_id: str) -> str:
    """A run id usable as one path segment on S3, local disks, Hive readers and HF datasets.

    Airflow run ids carry ':' and '+', mapped to '_' (as is anything else outside [A-Za-z0-9._-]). A run id
    that names a path instead of a run is refused, never mapped: path separators ('/', '\\'), '..', control
    characters, a leading '.' or '-', no letter or digit, or more than MAX_RUN_ID characters."""
    if not isinstance(run_id, str) or not run_id:
        raise ValueError(f"run id {run_id!r} is empty")
    problems = []
    if "/" in run_id or "\\" in run_id:
        problems.append("contains a path separator")
    if ".." in run_id:
        problems.append("contains '..'")
    if any(ord(c) < 32 or ord(c) == 127 for c in run_id):
        problems.append("contains control characters")
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("_")
    if not re.search(r"[A-Za-z0-9]", s):
        problems.append("needs a letter or a digit")
    if s.startswith((".", "-")):
        problems.append("must not start with '.' or '-'")
    if len(run_id) > MAX_RUN_ID:
        problems.append(f"is longer than {MAX_RUN_ID} characters")
    if problems:
        raise ValueError(f"run id {run_id[:MAX_RUN_ID]!r} is not usable: it " + ", ".join(problems))
    if s in (LATEST, HISTORY):
        raise ValueError(f"run id {run_id!r} is reserved: {s!r} is a file of output_uri itself")
    return s


def dump_gz_json(obj: Any) -> bytes:
    """Deterministic bytes (mtime 0) so a re-run writes byte-identical stage results."""
    return gzip.compress(json.dumps(obj, ensure_ascii=False, default=str).encode(), mtime=0)


def load_gz_json(data: bytes) -> Any:
    return json.loads(gzip.decompress(data))


def parquet_bytes(table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


class RunLayout:
    """Paths and read/write helpers of one run. Relative paths (as the manifest lists them) go through
    `uri()`; stage results and markers through the named methods."""

    def __init__(self, output_uri: str, run_id: str):
        self.run_id = run_id
        self.key = safe_run_id(run_id)
        self.root = storage.join(output_uri, self.key)

    def __repr__(self) -> str:
        return f"RunLayout({self.root!r})"

    @classmethod
    def from_root(cls, root: str) -> RunLayout:
        """The layout of an existing run from its directory URI (<output_uri>/<run key>)."""
        output_uri, _, key = root.rstrip("/").rpartition("/")
        return cls(output_uri, key)

    @property
    def output_uri(self) -> str:
        return self.root.rpartition("/")[0]

    # ------------------------------------------------------------------ paths
    def uri(self, rel: str) -> str:
        return storage.join(self.root, rel)

    @property
    def manifest_uri(self) -> str:
        return self.uri(MANIFEST)

    @property
    def plan_uri(self) -> str:
        return self.uri(PLAN)

    @property
    def report_uri(self) -> str:
        return self.uri(REPORT)

    @property
    def card_uri(self) -> str:
        return self.uri(CARD)

    def stage_results(self) -> dict[str, set[int]]:
        """{stage: shards with a result} from one listing of _stages/ (what `inspect` shows)."""
        done: dict[str, set[int]] = {}
        for u in storage.list_prefix(self.uri("_stages")):
            m = re.search(r"/_stages/([^/]+)/shard=(\d+)\.json\.gz$", u)
            if m:
                done.setdefault(m.group(1), set()).add(int(m.group(2)))
        return done

    def stage_result_uri(self, stage: str, shard: int) -> str:
        return self.uri(f"_stages/{stage}/shard={shard:05d}.json.gz")

    def stage_artifact_uri(self, stage: str, name: str, shard: int) -> str:
        return self.uri(f"_stages/{stage}/{name}-shard={shard:05d}.parquet")

    def write_marker_uri(self, shard: int) -> str:
        return self.uri(f"_stages/write/shard={shard:05d}.json.gz")

    @property
    def regate_history_uri(self) -> str:
        return self.uri("_stages/regate")

    @staticmethod
    def samples_path(lang: str, shard: int) -> str:
        return f"samples/lang={lang}/part-{shard:05d}.parquet"

    @staticmethod
    def rejected_path(shard: int) -> str:
        return f"rejected/part-{shard:05d}.parquet"

    @staticmethod
    def images_path(part: int) -> str:
        return f"images/part-{part:05d}.parquet"

    # ------------------------------------------------------------------ stage results and markers
    def has_stage_result(self, stage: str, shard: int) -> bool:
        return storage.exists(self.stage_result_uri(stage, shard))

    def read_stage_result(self, stage: str, shard: int) -> dict:
        return load_gz_json(storage.read_bytes(self.stage_result_uri(stage, shard)))

    def write_stage_result(self, stage: str, shard: int, doc: dict) -> str:
        uri = self.stage_result_uri(stage, shard)
        storage.write_bytes(uri, dump_gz_json(doc))
        return uri

    def has_write_marker(self, shard: int) -> bool:
        return storage.exists(self.write_marker_uri(shard))

    def read_write_marker(self, shard: int) -> dict:
        return load_gz_json(storage.read_bytes(self.write_marker_uri(shard)))

    def write_write_marker(self, shard: int, doc: dict) -> None:
        storage.write_bytes(self.write_marker_uri(shard), dump_gz_json(doc))

    def delete_write_marker(self, shard: int) -> None:
        storage.delete(self.write_marker_uri(shard))

    def write_stage_artifact(self, stage: str, name: str, shard: int, table) -> str:
        uri = self.stage_artifact_uri(stage, name, shard)
        storage.write_bytes(uri, parquet_bytes(table))
        return uri

    def has_stage_artifact(self, stage: str, name: str, shard: int) -> bool:
        return storage.exists(self.stage_artifact_uri(stage, name, shard))

    def read_stage_artifact(self, stage: str, name: str, shard: int):
        return self.read_table_uri(self.stage_artifact_uri(stage, name, shard))

    # ------------------------------------------------------------------ plan and manifest
    def has_plan(self) -> bool:
        return storage.exists(self.plan_uri)

    def read_plan(self) -> dict:
        return json.loads(storage.read_bytes(self.plan_uri))

    def write_plan(self, doc: dict) -> None:
        storage.write_bytes(self.plan_uri, json.dumps(doc, indent=1).encode())

    def has_manifest(self) -> bool:
        return storage.exists(self.manifest_uri)

    def read_manifest(self) -> dict:
        return json.loads(storage.read_bytes(self.manifest_uri))

    def write_manifest(self, manifest: dict) -> None:
        storage.write_bytes(self.manifest_uri, json.dumps(manifest, indent=1, ensure_ascii=False).encode())

    def unpublish_manifest(self, stamp_ms: int) -> None:
        """Keep the current manifest under _stages/regate/ and remove it: the run is unfinished again."""
        data = storage.read_bytes(self.manifest_uri)
        storage.write_bytes(storage.join(self.regate_history_uri, f"manifest-{stamp_ms}.json"), data)
        storage.delete(self.manifest_uri)

    def previous_manifests(self) -> list[str]:
        return [u for u in storage.list_prefix(self.regate_history_uri) if u.endswith(".json")]

    # ------------------------------------------------------------------ release files (relative paths)
    def write_table(self, rel: str, table, name: str, lang: str | None = None) -> dict:
        """Write one release Parquet file; its manifest entry (rows, bytes, sha256)."""
        data = parquet_bytes(table)
        storage.write_bytes(self.uri(rel), data)
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

    def read_table(self, rel: str):
        return self.read_table_uri(self.uri(rel))

    @staticmethod
    def read_table_uri(uri: str):
        import pyarrow.parquet as pq

        return pq.read_table(storage.parquet_source(uri))

    def delete(self, rel: str) -> None:
        storage.delete(self.uri(rel))

    def write_text(self, rel: str, text: str) -> str:
        uri = self.uri(rel)
        storage.write_bytes(uri, text.encode())
        return uri


class OutputLayout:
    """Files of output_uri that span runs: the `latest` pointer and the history of committed runs."""

    def __init__(self, output_uri: str):
        self.output_uri = output_uri.rstrip("/")

    def run(self, run_id: str) -> RunLayout:
        return RunLayout(self.output_uri, run_id)

    @property
    def latest_uri(self) -> str:
        return storage.join(self.output_uri, LATEST)

    def history_uri(self, run_id: str) -> str:
        return storage.join(self.output_uri, HISTORY, f"{safe_run_id(run_id)}.json")

    def read_latest(self) -> dict | None:
        return json.loads(storage.read_bytes(self.latest_uri)) if storage.exists(self.latest_uri) else None

    def write_latest(self, doc: dict) -> None:
        """One atomic write (temp + rename locally, a single PUT on S3): readers see the old or the new."""
        storage.write_bytes(self.latest_uri, json.dumps(doc, indent=1).encode())

    def write_history(self, run_id: str, doc: dict) -> None:
        storage.write_bytes(self.history_uri(run_id), json.dumps(doc, indent=1).encode())

    def history(self) -> list[dict]:
        """Every history entry (runs that reached commit), oldest commit first."""
        out = []
        for u in storage.list_prefix(storage.join(self.output_uri, HISTORY)):
            if u.endswith(".json"):
                out.append(json.loads(storage.read_bytes(u)))
        return sorted(out, key=lambda d: (d.get("committed_unix", 0), d.get("run_id", "")))

    def delete_run(self, run_id: str) -> None:
        """Remove a run: its manifest first (readers stop trusting it), then its files, its entry last, so
        a crash half way leaves a run that is simply removed again."""
        lay = self.run(run_id)
        storage.delete(lay.manifest_uri)
        storage.delete_tree(lay.root)
        storage.delete(self.history_uri(run_id))

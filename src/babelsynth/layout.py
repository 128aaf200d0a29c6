"""Where every file of one run lives, and how it is read and written: the only module that builds run paths.

    <output_uri>/<run_id>/
      manifest.json                          written last: a run without it is not finished
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
MAX_RUN_ID = 200


def safe_run_id(run_id: str) -> str:
    """A run id usable as one path segment on S3, local disks, Hive readers and HF datasets.

    Airflow run ids carry ':' and '+', mapped to '_'. What stays must not climb out of output_uri or hide:
    no '/', no leading '.', and a bounded length."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("_")
    if not s or s.startswith(".") or len(s) > MAX_RUN_ID:
        raise ValueError(
            f"run id {run_id!r} is not usable: it needs letters or digits, must not start with '.' "
            f"(e.g. '..') and must be at most {MAX_RUN_ID} characters"
        )
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

    # ------------------------------------------------------------------ paths
    def uri(self, rel: str) -> str:
        return storage.join(self.root, rel)

    @property
    def manifest_uri(self) -> str:
        return self.uri(MANIFEST)

    @property
    def plan_uri(self) -> str:
        return self.uri(PLAN)

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

"""Parquet schemas built from schemas/*.yaml, the only definition of the output columns.

Each table has a current version (what this code writes); older versions stay readable (`spec(name, 1)`).
"""

from __future__ import annotations

import functools
from typing import Any

import pyarrow as pa
import yaml

from babelsynth.paths import schemas_dir

TURN = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
_TYPES = {
    "string": pa.string(),
    "binary": pa.binary(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "list<string>": pa.list_(pa.string()),
    "list<binary>": pa.list_(pa.binary()),
    "conversation": pa.list_(TURN),  # [{role: user|assistant, content}], in order
}
CURRENT = {"input": 2, "samples": 2, "images": 1, "model_images": 1, "rejected": 1}


def version_of(name: str, version: int | None) -> int:
    return CURRENT[name] if version is None else version


@functools.cache
def spec(name: str, version: int | None = None) -> dict:
    v = version_of(name, version)
    path = schemas_dir() / f"{name}.v{v}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in schemas_dir().glob(f"{name}.v*.yaml"))
        raise ValueError(
            f"no schema {name}.v{v}; this babelsynth knows {known}: upgrade babelsynth to read it"
        )
    return yaml.safe_load(path.read_text())


@functools.cache
def arrow_schema(name: str, version: int | None = None) -> pa.Schema:
    v = version_of(name, version)
    s = spec(name, v)
    fields = [pa.field(c["name"], _TYPES[c["type"]], nullable=bool(c["nullable"])) for c in s["columns"]]
    return pa.schema(fields, metadata={"babelsynth.schema": f"{name}.v{v}"})


def columns(name: str, version: int | None = None) -> list[str]:
    return [c["name"] for c in spec(name, version)["columns"]]


def schema_version(schema: pa.Schema) -> tuple[str, int] | None:
    """(table, version) stamped in a file's schema metadata by this writer, or None for foreign files."""
    raw = (schema.metadata or {}).get(b"babelsynth.schema")
    if not raw:
        return None
    name, _, v = raw.decode().rpartition(".v")
    return name, int(v)


def to_table(name: str, rows: list[dict[str, Any]], version: int | None = None) -> pa.Table:
    """Build a table with the explicit schema; missing non-nullable values or extra keys raise."""
    schema = arrow_schema(name, version)
    names = set(schema.names)
    for r in rows:
        extra = set(r) - names
        if extra:
            raise ValueError(f"{name}: unknown column(s) {sorted(extra)}")
    data = {f.name: [r.get(f.name) for r in rows] for f in schema}
    for f in schema:
        if not f.nullable and any(v is None for v in data[f.name]):
            raise ValueError(f"{name}: null in non-nullable column {f.name!r}")
    return pa.Table.from_pydict(data, schema=schema)

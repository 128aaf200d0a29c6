"""Parquet schemas built from schemas/*.yaml, the only definition of the output columns."""

from __future__ import annotations

import functools
from typing import Any

import pyarrow as pa
import yaml

from babelsynth.paths import schemas_dir

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
}


@functools.cache
def spec(name: str, version: int = 1) -> dict:
    return yaml.safe_load((schemas_dir() / f"{name}.v{version}.yaml").read_text())


@functools.cache
def arrow_schema(name: str, version: int = 1) -> pa.Schema:
    s = spec(name, version)
    fields = [pa.field(c["name"], _TYPES[c["type"]], nullable=bool(c["nullable"])) for c in s["columns"]]
    return pa.schema(fields, metadata={"babelsynth.schema": f"{name}.v{version}"})


def columns(name: str, version: int = 1) -> list[str]:
    return [c["name"] for c in spec(name, version)["columns"]]


def to_table(name: str, rows: list[dict[str, Any]], version: int = 1) -> pa.Table:
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

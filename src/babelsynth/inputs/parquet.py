"""Parquet inputs: planned by row group (read from the footer), read by row group through ranged reads.

The three Parquet formats (canonical, cauldron, messages) differ only in which columns they need and how
one row becomes a canonical record; the row-group machinery is here.
"""

from __future__ import annotations

import posixpath
from abc import abstractmethod
from collections.abc import Iterator

from babelsynth import storage, validate
from babelsynth.inputs.base import Adapter, FileScan
from babelsynth.inputs.metering import Meter
from babelsynth.inputs.source import InputFile


def dataset_name(rel: str) -> str:
    """A file's dataset name for its records' `source`: its folder (HF layout `<subset>/train-*.parquet`),
    else its stem."""
    parent = posixpath.dirname(rel)
    return posixpath.basename(parent) if parent else posixpath.basename(rel).split(".")[0]


def read_footer(src, f: InputFile):
    """The file's metadata from exactly its footer (two small reads), not pyarrow's 64 KiB guess: with
    small shards that guess would be most of what a shard reads."""
    import struct

    import pyarrow as pa
    import pyarrow.parquet as pq

    size = src.size()
    tail = src.read_at(8, size - 8) if size >= 12 else b""
    if len(tail) != 8 or tail[4:] != b"PAR1":
        raise ValueError(f"{f.uri} is not a Parquet file (no PAR1 footer); check input.format and input_uri")
    n = struct.unpack("<I", tail[:4])[0]
    footer = src.read_at(n, size - 8 - n)
    return pq.read_metadata(pa.BufferReader(b"PAR1" + footer + tail))


class ParquetAdapter(Adapter):
    suffixes = (".parquet",)
    sliceable = True
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    id_columns: tuple[str, ...] = ("id",)

    def open(self, f: InputFile, meter: Meter | None = None):
        import pyarrow.parquet as pq

        native = storage.open_input(f.uri)
        src = meter.wrap(native) if meter else native
        return pq.ParquetFile(src, metadata=read_footer(src, f))

    def check_schema(self, f: InputFile, names: list[str]) -> None:
        missing = [c for c in self.required if c not in names]
        if missing:
            raise ValueError(
                f"{f.uri} has no column(s) {missing} that input.format={self.name} needs (it has {names}); "
                "set input.format to the format of the data: canonical, cauldron, messages, llava or "
                "webdataset"
            )

    def id_column(self, names: list[str]) -> str | None:
        return next((c for c in self.id_columns if c in names), None)

    def columns(self, names: list[str]) -> list[str]:
        id_col = self.id_column(names)
        return [c for c in names if c in self.required or c == id_col or c in self.optional]

    def scan(self, f: InputFile) -> FileScan:
        pf = self.open(f)
        names = pf.schema_arrow.names
        self.check_schema(f, names)
        md = pf.metadata
        read = set(self.columns(names))
        units = []
        for rg in range(md.num_row_groups):
            g = md.row_group(rg)
            nbytes = sum(
                g.column(c).total_compressed_size
                for c in range(g.num_columns)
                if g.column(c).path_in_schema.split(".")[0] in read
            )
            units.append((g.num_rows, nbytes, (rg,)))
        id_col = self.id_column(names)
        ids = None
        if id_col is not None:  # one small column, read for duplicate detection across the input
            ids = [None if v is None else str(v) for v in pf.read(columns=[id_col]).column(0).to_pylist()]
        return FileScan(units, ids, overhead=md.serialized_size + 8)

    def read(self, f: InputFile, pieces: list[dict], meter: Meter) -> Iterator[dict]:
        pf = self.open(f, meter)
        names = pf.schema_arrow.names
        self.check_schema(f, names)
        cols = self.columns(names)
        id_col = self.id_column(names)
        for p in pieces:
            rg, lo, hi = p["loc"]
            t = pf.read_row_group(rg, columns=cols).slice(lo, hi - lo)
            rows = [r for b in t.to_batches() for r in validate.batch_rows(b)]  # bad UTF-8: a reject
            for j, row in enumerate(rows):
                pos = p["first"] + j
                rid = row.get(id_col) if id_col else None
                yield self.convert(row, f, str(rid) if rid is not None else f"{f.rel}#{pos}")

    @abstractmethod
    def convert(self, row: dict, f: InputFile, source_id: str) -> dict:
        """One row -> one canonical record (or a quarantined one)."""

    def piece(self, first: int, lo: int, rows: int, nbytes: int, loc: tuple) -> dict:
        return {"first": first + lo, "rows": rows, "bytes": nbytes, "loc": [loc[0], lo, lo + rows]}

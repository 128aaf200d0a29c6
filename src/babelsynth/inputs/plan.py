"""The shard plan of an input, and the read of one shard: each shard task reads only its own bytes.

`plan_input` scans every file's units (metadata only: Parquet footers and id columns, tar headers, JSON
text) and cuts them into shards: row-group aligned for Parquet (a row group larger than a shard is split
by row slices, with a warning, since each slice reads the whole group), contiguous byte ranges for JSON
lines and tar samples. Per shard it records the pieces (file, row group or byte range, rows, bytes).

Duplicate source_ids are found here, over the whole input, because a shard task cannot see the others:
the plan lists every repeat (shard, index) with the shard of the first occurrence, and ingest quarantines
the repeats as duplicate_id. The first occurrence is kept.
"""

from __future__ import annotations

import hashlib
import itertools
import math

from babelsynth import storage
from babelsynth.config import RunConfig
from babelsynth.inputs import adapter
from babelsynth.inputs.metering import Meter
from babelsynth.inputs.source import InputFile, resolve


def id_hash(rid: str) -> int:
    """8 bytes per id in the plan's index: 2.3M ids stay in ~200 MB; collisions are negligible at 2**64."""
    return int.from_bytes(hashlib.blake2b(rid.encode(), digest_size=8).digest(), "big")


def plan_input(cfg: RunConfig) -> dict:
    """The plan of `cfg.input_uri` under `cfg.input` and `cfg.run` (shard size, max shards, limit)."""
    ad = adapter(cfg.input)
    files = resolve(cfg.input_uri, ad.suffixes)
    scans = [ad.scan(f) for f in files]
    total = sum(r for s in scans for r, _, _ in s.units)
    n = total if cfg.run.limit is None else min(total, cfg.run.limit)
    size = max(cfg.run.shard_size, math.ceil(n / cfg.run.max_shards))
    shards: list[list[dict]] = []
    cur: list[dict] = []
    cur_rows = 0
    warnings = [w for s in scans for w in s.warnings]

    def close() -> None:
        nonlocal cur, cur_rows
        if cur:
            shards.append(cur)
            cur, cur_rows = [], 0

    def add(fi: int, piece: dict) -> None:
        nonlocal cur_rows
        merged = ad.merge(cur[-1], piece) if cur and cur[-1]["file"] == fi else None
        if merged:
            cur[-1] = {"file": fi, **merged}
        else:
            cur.append({"file": fi, **piece})
        cur_rows += piece["rows"]

    taken = 0
    for fi, scan in enumerate(scans):
        first, biggest = 0, 0
        for rows, nbytes, loc in scan.units:
            if taken >= n:
                break
            use = min(rows, n - taken)
            if use > size and ad.sliceable:  # a row group larger than a shard: slices, each reads it all
                lo = 0
                while lo < use:  # fill shards exactly, so no more than ceil(n / size) of them
                    take = min(use - lo, size - cur_rows)
                    add(fi, ad.piece(first, lo, take, nbytes, loc))
                    lo += take
                    if cur_rows >= size:
                        close()
                biggest = max(biggest, rows)
            else:
                add(fi, ad.piece(first, 0, use, nbytes, loc))
                if cur_rows >= size:
                    close()
            taken += use
            first += rows
        if biggest:
            warnings.append(
                f"{files[fi].uri}: row groups of up to {biggest} rows are larger than a shard ({size}); "
                "the shards that split one each read the whole row group. Rewrite the file with "
                f"row_group_size <= {size} (pyarrow) for ranged reads"
            )
    close()
    overhead = [sum(scans[fi].overhead for fi in {p["file"] for p in pieces}) for pieces in shards]
    own = [sum(p["bytes"] for p in pieces) for pieces in shards]
    worst = max(range(len(shards)), key=lambda s: overhead[s] / max(own[s], 1), default=None)
    if worst is not None and overhead[worst] > max(0.2 * own[worst], 1 << 16):  # below 64 KiB: noise
        warnings.append(
            f"shard {worst} reads {overhead[worst]} bytes of file footers besides its {own[worst]} bytes of "
            "rows: a footer grows with its file's row groups (and with statistics of binary columns); "
            "split large inputs into files of fewer row groups, write images without statistics"
        )
    return {
        "input": {
            "uri": cfg.input_uri,
            "format": ad.name,
            "files": [
                {
                    "uri": f.uri,
                    "rel": f.rel,
                    "size": f.size,
                    "records": sum(r for r, _, _ in s.units),
                    "overhead": s.overhead,
                }
                for f, s in zip(files, scans)
            ],
        },
        "input_records": total,
        "records": n,
        "shard_size": size,
        "shards": list(range(len(shards))),
        "pieces": shards,
        "shard_rows": [sum(p["rows"] for p in s) for s in shards],
        "shard_bytes": own,  # the bytes of the shard's own rows (row groups, byte ranges)
        "shard_overhead": overhead,  # plus what every shard of a file reads again (its footer)
        "duplicates": find_duplicates(shards, [s.ids for s in scans]),
        "warnings": warnings,
    }


def find_duplicates(shards: list[list[dict]], ids: list[list[str] | None]) -> dict[str, list[list[int]]]:
    """{shard: [[index in shard, shard of the first occurrence], ...]} for every repeated source_id."""
    seen: dict[int, int] = {}
    dups: dict[str, list[list[int]]] = {}
    for s, pieces in enumerate(shards):
        i = 0
        for p in pieces:
            file_ids = ids[p["file"]]
            for j in range(p["rows"]):
                rid = file_ids[p["first"] + j] if file_ids is not None else None
                if rid:  # positional ids (None) are unique by construction; empty ids fail ingest
                    h = id_hash(rid)
                    if h in seen:
                        dups.setdefault(str(s), []).append([i, seen[h]])
                    else:
                        seen[h] = s
                i += 1
    return dups


def read_shard(cfg: RunConfig, plan: dict, shard: int, meter: Meter | None = None) -> list[dict]:
    """The canonical records of one shard, exactly as planned; repeats carry `duplicate_of`."""
    if "pieces" not in plan:
        raise RuntimeError("this run's plan was written by an older babelsynth; start a new run id")
    meter = meter or Meter()
    ad = adapter(cfg.input, plan["input"]["format"])
    files = plan["input"]["files"]
    out: list[dict] = []
    for fi, group in itertools.groupby(plan["pieces"][shard], key=lambda p: p["file"]):
        fd = files[fi]
        size = storage.open_input(fd["uri"]).size()
        if size != fd["size"]:
            raise RuntimeError(
                f"input file {fd['uri']} changed since the plan ({fd['size']} -> {size} bytes): a run reads "
                "a frozen input; start a new run id"
            )
        out.extend(ad.read(InputFile(fd["uri"], fd["rel"], fd["size"]), list(group), meter))
    planned = plan["shard_rows"][shard]
    if len(out) != planned:
        raise RuntimeError(f"shard {shard} read {len(out)} records where the plan has {planned}")
    for i, first in plan["duplicates"].get(str(shard), []):
        out[i]["duplicate_of"] = first
    return out

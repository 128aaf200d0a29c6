"""Read a finished run as a trainer would: samples joined with their images by id, shard by shard.

The run keeps images deduplicated (each once per shard, keyed by sha256) and apart from the samples; the
manifest's `image_index` says which images file holds the images of each shard. `RunReader` streams
samples with their conversation and image bytes (or PIL images), one shard's images in memory at a time:

    from babelsynth.release import RunReader
    for s in RunReader("s3://bucket/runs/nightly-2026-11-25").iter_samples(lang="deu_Latn"):
        s["conversation"], s["images"]            # [{role, content}, ...], [bytes, ...]

Runs written with samples.v1 (single-turn, images in global parts) are read too: their conversation is
built from prompt/answer. A newer schema than this babelsynth knows fails with a message saying so.
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from collections.abc import Iterator

from babelsynth import storage
from babelsynth.schema import CURRENT

READ_VERSIONS = range(1, CURRENT["samples"] + 1)


def open_manifest(run_uri: str) -> tuple[str, dict]:
    """(run root, manifest) from the run root or its manifest.json."""
    uri = run_uri.rstrip("/")
    manifest_uri = uri if uri.endswith(".json") else storage.join(uri, "manifest.json")
    if not storage.exists(manifest_uri):
        raise FileNotFoundError(f"{manifest_uri} not found: the run is not committed (or the path is wrong)")
    return manifest_uri.rsplit("/", 1)[0], json.loads(storage.read_bytes(manifest_uri))


def samples_version(manifest: dict) -> int:
    name = manifest.get("schemas", {}).get("samples", "samples.v1")
    v = int(name.rsplit(".v", 1)[1])
    if v not in READ_VERSIONS:
        raise ValueError(
            f"this run was written with {name}; this babelsynth reads samples.v1 to "
            f"samples.v{READ_VERSIONS[-1]}: upgrade babelsynth to read it"
        )
    return v


def read_parquet(uri: str, columns: list[str] | None = None):
    import pyarrow.parquet as pq

    return pq.read_table(storage.parquet_source(uri), columns=columns)


class RunReader:
    """Samples of a committed run with their images, per language, in shard order."""

    def __init__(self, run_uri: str):
        self.root, self.manifest = open_manifest(run_uri)
        self.version = samples_version(self.manifest)
        self.files = self.manifest["files"]
        self.index = self.manifest.get("image_index")  # None: a v1 run, images in global parts
        self._global: dict[str, str] | None = None

    def uri(self, rel: str) -> str:
        return storage.join(self.root, rel)

    @property
    def languages(self) -> list[str]:
        return sorted(self.manifest["samples_by_lang"])

    def sample_files(self, lang: str | None = None) -> dict[int, list[dict]]:
        """{shard: [samples file entries]} in shard order (a v1 manifest entry's shard is its part)."""
        out: dict[int, list[dict]] = defaultdict(list)
        for f in self.files:
            if f["table"] == "samples" and (lang is None or f.get("lang") == lang):
                shard = f.get("shard", int(f["path"].rsplit("-", 1)[1].split(".")[0]))
                out[shard].append(f)
        return dict(sorted(out.items()))

    def images_of_shard(self, shard: int, ids: set[str]) -> dict[str, dict]:
        """{image_id: {image, format, width, height}} for the given ids of one shard."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if not ids:
            return {}
        if self.index is not None:
            part = self.index["parts"].get(str(shard))
            tables = [read_parquet(self.uri(part))] if part else []
        else:
            tables = [read_parquet(self.uri(p)) for p in sorted(self.global_parts(ids))]
        out: dict[str, dict] = {}
        want = pa.array(sorted(ids), pa.string())
        for t in tables:
            for row in t.filter(pc.is_in(t["image_id"], value_set=want)).to_pylist():
                out.setdefault(row["image_id"], row)
        missing = ids - set(out)
        if missing:
            raise KeyError(f"shard {shard}: images {sorted(missing)[:3]} referenced by samples are missing")
        return out

    def global_parts(self, ids: set[str]) -> set[str]:
        """v1 runs: which global images parts hold the ids (their image_id columns are read once)."""
        if self._global is None:
            self._global = {}
            for f in self.files:
                if f["table"] == "images":
                    for iid in read_parquet(self.uri(f["path"]), ["image_id"]).column(0).to_pylist():
                        self._global.setdefault(iid, f["path"])
        return {self._global[i] for i in ids if i in self._global}

    def iter_samples(self, lang: str | None = None, decode: bool = False) -> Iterator[dict]:
        """Every kept sample (one language or all) with `conversation` and `images` (bytes, or PIL images
        with decode=True) in the order of `image_ids`."""
        for shard, files in self.sample_files(lang).items():
            yield from self.iter_shard(files, shard, decode)

    def iter_shard(self, files: list[dict], shard: int, decode: bool = False) -> Iterator[dict]:
        """The samples of one shard's files (from `sample_files`), with their images."""
        tables = [read_parquet(self.uri(f["path"])) for f in files]
        ids = {i for t in tables for row_ids in t.column("image_ids").to_pylist() for i in row_ids}
        images = self.images_of_shard(shard, ids)
        for t in tables:
            for row in t.to_pylist():
                if self.version < 2:
                    row["conversation"] = [
                        {"role": "user", "content": row["prompt"]},
                        {"role": "assistant", "content": row["answer"]},
                    ]
                blobs = [images[i]["image"] for i in row["image_ids"]]
                row["images"] = [decode_image(b) for b in blobs] if decode else blobs
                row["image_formats"] = [images[i]["format"] for i in row["image_ids"]]
                yield row


def decode_image(data: bytes):
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    im.load()
    return im

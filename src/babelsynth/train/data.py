"""Turn a pipeline run (manifest.json + Parquet shards) into loss-masked training rows.

Why it looks like this:
- Runs can be far larger than memory, so samples are streamed one shard at a time through the manifest
  and images are fetched lazily by id (only the `image_id` column is read up front).
- Training must resume bit-identically, so every choice (bucket, file order, row order) is a pure
  function of (seed, counters) and the stream's whole state is a small JSON-able dict.
- Loss is on the answer only: the chat template is rendered once without and once with the assistant
  turn; the tokens of the difference are the only ones with labels (this includes the template's
  end-of-turn token, so the model learns to stop).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from babelsynth.storage import join, parquet_source, read_bytes
from babelsynth.train.config import BUCKETS, MixtureConfig

IGNORE_INDEX = -100
ENGLISH = "eng_Latn"
SAMPLE_COLUMNS = ["sample_id", "lang", "task_type", "image_ids", "prompt", "answer"]


# --------------------------------------------------------------------------------------------- pure helpers
def bucket_of(lang: str) -> str:
    """Run shards hold only synthetic data: English recaptions vs everything translated."""
    return "english_synthetic" if lang == ENGLISH else "multilingual"


def _unit(key: str) -> float:
    """A uniform number in [0, 1) from a string; stable across processes (unlike hash())."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def is_heldout(sample_id: str, fraction: float) -> bool:
    """Held-out membership depends only on the id, so it never changes when shards are re-cut."""
    return fraction > 0 and _unit(f"heldout|{sample_id}") < fraction


def mixture_weights(mixture: MixtureConfig, available: set[str]) -> dict[str, float]:
    """Configured ratios restricted to buckets that have rows, renormalised to sum to 1."""
    raw = {b: getattr(mixture, b) for b in BUCKETS if b in available and getattr(mixture, b) > 0}
    total = sum(raw.values())
    if not total:
        raise ValueError(f"no data for any weighted bucket: available={sorted(available)}, mixture={mixture}")
    return {b: w / total for b, w in raw.items()}


def resolve_run(uri: str) -> tuple[str, dict]:
    """Accept the run root or its manifest.json; return (root, manifest)."""
    manifest_uri = uri if uri.rstrip("/").endswith(".json") else join(uri, "manifest.json")
    root = manifest_uri.rsplit("/", 1)[0]
    return root, json.loads(read_bytes(manifest_uri))


def _parquet_file(uri: str) -> pq.ParquetFile:
    """Opened for random access, local or S3 (ranged reads): only the needed column chunks are read."""
    return pq.ParquetFile(parquet_source(uri))


def read_shard(uri: str, columns: list[str] = SAMPLE_COLUMNS) -> pa.Table:
    return pq.read_table(io.BytesIO(read_bytes(uri)), columns=columns)


# --------------------------------------------------------------------------------------------- run + images
class ImageStore:
    """image_id -> PIL image, built from the images tables' `image_id` column; bytes are read lazily,
    one row group at a time, with a tiny LRU so consecutive samples reuse a decoded group."""

    def __init__(self, uris: list[str], cache_groups: int = 2):
        self._uris = uris
        self._index: dict[str, tuple[int, int, int]] | None = None
        self._files: dict[int, pq.ParquetFile] = {}
        self._groups: OrderedDict[tuple[int, int], pa.Array] = OrderedDict()
        self._cache_groups = cache_groups

    def _file(self, i: int) -> pq.ParquetFile:
        if i not in self._files:
            if self._uris[i].startswith("s3://") and len(self._files) >= self._cache_groups:
                self._files.pop(next(iter(self._files)))  # keep at most a few S3 files open
            self._files[i] = _parquet_file(self._uris[i])
        return self._files[i]

    @property
    def index(self) -> dict[str, tuple[int, int, int]]:
        if self._index is None:
            self._index = {}
            for i in range(len(self._uris)):
                pf = self._file(i)
                for rg in range(pf.num_row_groups):
                    ids = pf.read_row_group(rg, columns=["image_id"]).column(0).to_pylist()
                    for j, image_id in enumerate(ids):
                        self._index.setdefault(image_id, (i, rg, j))
        return self._index

    def get_bytes(self, image_id: str) -> bytes:
        try:
            i, rg, j = self.index[image_id]
        except KeyError:
            raise KeyError(
                f"image_id {image_id!r} is referenced by a sample but missing from the images table"
            ) from None
        key = (i, rg)
        if key not in self._groups:
            self._groups[key] = self._file(i).read_row_group(rg, columns=["image"]).column(0)
            while len(self._groups) > self._cache_groups:
                self._groups.popitem(last=False)
        self._groups.move_to_end(key)
        return self._groups[key][j].as_py()

    def get(self, image_id: str):
        from PIL import Image

        return Image.open(io.BytesIO(self.get_bytes(image_id))).convert("RGB")


@dataclass(frozen=True)
class SampleFile:
    uri: str
    rows: int
    buckets: frozenset[str]
    path: str  # relative to the run root, as the manifest lists it: the shuffle's seed, so a run trains
    # on the same row order wherever it lives (local tmp dir, S3, a copy)


class RunData:
    """A run's sample shards grouped by mixture bucket, plus its image store. Reads only the manifest
    (and the `lang` column of shards whose manifest entry has no `lang`)."""

    def __init__(self, run_uri: str):
        self.root, self.manifest = resolve_run(run_uri)
        files = self.manifest.get("files", [])
        self.samples: list[SampleFile] = []
        for f in files:
            if f.get("table") != "samples":
                continue
            uri = join(self.root, f["path"])
            if f.get("lang"):
                buckets = frozenset({bucket_of(f["lang"])})
            else:
                buckets = frozenset(
                    bucket_of(x) for x in set(read_shard(uri, ["lang"]).column(0).to_pylist())
                )
            self.samples.append(SampleFile(uri, int(f.get("rows", -1)), buckets, f["path"]))
        if not self.samples:
            raise ValueError(f"manifest under {self.root} lists no 'samples' files")
        self.images = ImageStore([join(self.root, f["path"]) for f in files if f.get("table") == "images"])

    def files_for(self, bucket: str) -> list[SampleFile]:
        return [f for f in self.samples if bucket in f.buckets and f.rows != 0]

    @property
    def buckets(self) -> set[str]:
        return {b for b in BUCKETS if self.files_for(b)}

    def rows(self, split: str, fraction: float) -> Iterator[dict]:
        """Rows in manifest order, filtered to 'train' / 'heldout' / 'all' (for eval and inspection)."""
        for f in self.samples:
            for row in read_shard(f.uri).to_pylist():
                held = is_heldout(row["sample_id"], fraction)
                if split == "all" or (split == "heldout") == held:
                    yield row


# --------------------------------------------------------------------------------------------- encoding
@dataclass
class Example:
    """One tokenized row. `position_ids` restart at 0 for every packed sub-sequence."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    pixel_values: Any = None  # torch.Tensor (n_tiles, 3, H, W) or None
    sample_ids: list[str] = field(default_factory=list)
    truncated: int = 0  # examples in this row whose answer was cut at max_seq_len

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def render_turns(processor, prompt: str, answer: str, n_images: int) -> tuple[str, str]:
    """(prefix, completion) strings: the user turn + generation prompt, then the assistant's part."""
    user = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
    msgs = [{"role": "user", "content": user}]
    prefix = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    full = processor.apply_chat_template(
        msgs + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}], tokenize=False
    )
    if not full.startswith(prefix):
        raise ValueError(
            "chat template does not render the user turn as a prefix of the full conversation; "
            "answer-only loss masking needs that property"
        )
    return prefix, full[len(prefix) :]


def encode_example(
    processor, prompt: str, answer: str, images: list, max_seq_len: int, sample_id: str = ""
) -> Example | None:
    """Chat-template one sample; labels are IGNORE_INDEX except on assistant tokens. Tokenizing the
    prefix and the completion separately makes the mask exact whatever BPE does at the boundary.
    Returns None when the prompt (with its image tokens) alone does not fit in max_seq_len; a
    too-long answer is truncated instead (image tokens must never be cut)."""
    tok = processor.tokenizer
    image_token = getattr(processor, "image_token", "<image>")
    prompt = prompt.replace(image_token, " ")  # a literal placeholder would desync images and tokens
    prefix, completion = render_turns(processor, prompt, answer, len(images))
    pixel_values = None
    if images:
        enc = processor(text=prefix, images=images, add_special_tokens=False, return_tensors="pt")
        prefix_ids = enc["input_ids"][0].tolist()
        pixel_values = enc["pixel_values"]
    else:
        prefix_ids = tok(prefix, add_special_tokens=False)["input_ids"]
    target_ids = tok(completion, add_special_tokens=False)["input_ids"]
    if len(prefix_ids) >= max_seq_len:
        return None
    room = max_seq_len - len(prefix_ids)
    truncated = int(len(target_ids) > room)
    target_ids = target_ids[:room]
    ids = prefix_ids + target_ids
    return Example(
        ids,
        [IGNORE_INDEX] * len(prefix_ids) + target_ids,
        list(range(len(ids))),
        pixel_values,
        [sample_id],
        truncated,
    )


def row_encoder(
    processor, images: ImageStore, max_seq_len: int, with_images: bool = True
) -> Callable[[dict], Example | None]:
    """Bind a processor and image store into `row -> Example`; text-only when with_images=False."""

    def encode(row: dict) -> Example | None:
        ims = [images.get(i) for i in (row.get("image_ids") or [])] if with_images else []
        return encode_example(processor, row["prompt"], row["answer"], ims, max_seq_len, row["sample_id"])

    return encode


def pack(examples: list[Example]) -> Example:
    """Concatenate examples into one row; restarting position_ids lets transformers build a
    block-diagonal mask (no attention across samples) when attention_mask is None."""
    import torch

    pv = [e.pixel_values for e in examples if e.pixel_values is not None]
    return Example(
        [t for e in examples for t in e.input_ids],
        [t for e in examples for t in e.labels],
        [p for e in examples for p in e.position_ids],
        torch.cat(pv) if pv else None,
        [s for e in examples for s in e.sample_ids],
        sum(e.truncated for e in examples),
    )


def collate(rows: list[Example], pad_id: int, packed: bool) -> dict:
    """Right-pad rows into tensors. Packed rows get position_ids and no attention_mask (so the
    packed-sequence mask applies; padding forms its own block); unpacked rows get an attention_mask."""
    import torch

    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    batch: dict[str, Any] = {}
    if packed:
        pos = torch.zeros((len(rows), T), dtype=torch.long)
    else:
        mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        if packed:
            pos[i, :n] = torch.tensor(r.position_ids)
            pos[i, n:] = torch.arange(T - n)
        else:
            mask[i, :n] = 1
    batch["input_ids"], batch["labels"] = ids, labels
    if packed:
        batch["position_ids"] = pos
    else:
        batch["attention_mask"] = mask
    pv = [r.pixel_values for r in rows if r.pixel_values is not None]
    if pv:
        batch["pixel_values"] = torch.cat(pv)
    return batch


# --------------------------------------------------------------------------------------------- streams
class _BucketStream:
    """Endless pass over one bucket's files: file order shuffled per epoch, rows shuffled per file,
    held-out rows skipped. Only the current shard is in memory; the cursor is three integers."""

    def __init__(self, bucket: str, files: list[SampleFile], seed: int, heldout_fraction: float):
        self.bucket, self.files, self.seed, self.fraction = bucket, files, seed, heldout_fraction
        self.epoch = self.file_pos = self.row_pos = 0
        self._loaded: tuple[int, int] | None = None
        self._rows: list[dict] = []
        self._perm: list[int] = []

    def _order(self) -> list[SampleFile]:
        order = list(self.files)
        random.Random(f"{self.seed}|{self.bucket}|epoch{self.epoch}").shuffle(order)
        return order

    def _load(self) -> None:
        if self._loaded == (self.epoch, self.file_pos):
            return
        f = self._order()[self.file_pos]
        self._rows = read_shard(f.uri).to_pylist()
        self._perm = list(range(len(self._rows)))
        random.Random(f"{self.seed}|{self.bucket}|epoch{self.epoch}|{f.path}").shuffle(self._perm)
        self._loaded = (self.epoch, self.file_pos)

    def next_row(self) -> dict:
        exhausted = 0  # files finished without yielding a row during this call
        while True:
            self._load()
            while self.row_pos < len(self._perm):
                row = self._rows[self._perm[self.row_pos]]
                self.row_pos += 1
                if bucket_of(row["lang"]) == self.bucket and not is_heldout(row["sample_id"], self.fraction):
                    return row
            exhausted += 1
            if exhausted > len(self.files):
                raise ValueError(f"bucket {self.bucket!r} has no training rows (all held out or empty)")
            self.row_pos, self.file_pos = 0, self.file_pos + 1
            if self.file_pos == len(self.files):
                self.file_pos, self.epoch = 0, self.epoch + 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "file_pos": self.file_pos, "row_pos": self.row_pos}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.file_pos, self.row_pos = s["epoch"], s["file_pos"], s["row_pos"]


class MixtureStream:
    """Endless, resumable example stream: draw k goes to a bucket chosen by hash(seed, k) with the
    mixture weights, then that bucket's next row is encoded. Rows whose prompt (with its image tokens)
    cannot fit are skipped and counted (`skipped`); answers cut at max_seq_len are counted (`truncated`).
    Both counters are part of the state, so they survive a resume."""

    def __init__(
        self,
        data: RunData,
        encode: Callable[[dict], Example | None],
        mixture: MixtureConfig,
        seed: int,
        heldout_fraction: float,
    ):
        self.weights = mixture_weights(mixture, data.buckets)
        self.seed, self.encode, self.k, self.skipped, self.truncated = seed, encode, 0, 0, 0
        self.streams = {b: _BucketStream(b, data.files_for(b), seed, heldout_fraction) for b in self.weights}
        self._peeked: tuple[Example, dict] | None = None

    def _pick(self) -> str:
        u, acc = _unit(f"mix|{self.seed}|{self.k}"), 0.0
        for b, w in self.weights.items():
            acc += w
            if u < acc:
                return b
        return b  # float rounding at the top end

    def next(self) -> Example:
        if self._peeked is not None:
            ex, self._peeked = self._peeked[0], None
            return ex
        while True:
            bucket = self._pick()
            self.k += 1
            ex = self.encode(self.streams[bucket].next_row())
            if ex is not None:
                self.truncated += ex.truncated
                return ex
            self.skipped += 1

    def push_back(self, ex: Example, state_before: dict) -> None:
        """Return one example to the stream (packing overflow); state_dict() then reports the state
        from before it was drawn, so a checkpoint taken now replays it after resume."""
        self._peeked = (ex, state_before)

    def state_dict(self) -> dict:
        if self._peeked is not None:
            return json.loads(json.dumps(self._peeked[1]))
        return {
            "k": self.k,
            "skipped": self.skipped,
            "truncated": self.truncated,
            "buckets": {b: s.state_dict() for b, s in self.streams.items()},
        }

    def load_state_dict(self, s: dict) -> None:
        self._peeked = None
        self.k, self.skipped, self.truncated = s["k"], s.get("skipped", 0), s.get("truncated", 0)
        for b, st in s["buckets"].items():
            self.streams[b].load_state_dict(st)


class BatchStream:
    """Batches of `batch_size` rows; with packing each row greedily holds whole examples up to
    max_seq_len (an example that does not fit starts the next row)."""

    def __init__(self, examples: MixtureStream, batch_size: int, max_seq_len: int, packing: bool):
        self.examples, self.batch_size, self.max_seq_len, self.packing = (
            examples,
            batch_size,
            max_seq_len,
            packing,
        )

    def _packed_row(self) -> Example:
        parts: list[Example] = []
        used = 0
        while True:
            before = self.examples.state_dict()
            ex = self.examples.next()
            if parts and used + len(ex) > self.max_seq_len:
                self.examples.push_back(ex, before)
                return pack(parts)
            parts.append(ex)
            used += len(ex)
            if used >= self.max_seq_len:
                return pack(parts)

    def next_rows(self) -> list[Example]:
        make = self._packed_row if self.packing else self.examples.next
        return [make() for _ in range(self.batch_size)]

    def state_dict(self) -> dict:
        return self.examples.state_dict()

    def load_state_dict(self, s: dict) -> None:
        self.examples.load_state_dict(s)


def heldout_examples(
    data: RunData, encode: Callable[[dict], Example | None], fraction: float, limit: int
) -> tuple[list[Example], int]:
    """The first `limit` encodable held-out rows in manifest order (the same set for every model), and
    how many held-out rows before that point were skipped because they cannot fit."""
    out: list[Example] = []
    skipped = 0
    for row in data.rows("heldout", fraction):
        ex = encode(row)
        if ex is None:
            skipped += 1
        else:
            out.append(ex)
        if len(out) >= limit:
            break
    return out, skipped

"""WebDataset tar shards: members `<key>.<ext>` grouped by key into samples, local or S3.

The plan walks the tar headers (through 1 MiB read-ahead blocks, so S3 costs few requests) and records
each sample's byte range; a shard task reads one contiguous range per tar and parses only its samples.
Per sample: images are the `.jpg/.jpeg/.png/.webp` members (in name order); the text is a `.json`
({conversations} LLaVA-style, {messages}, {question, answer} or {caption}) or a `.txt` caption, which
becomes one exchange with `input.caption_prompt` as the user turn and task type captioning.
source_id is the sample key.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator

from babelsynth import storage
from babelsynth.inputs.base import (
    Adapter,
    FileScan,
    image_count_problem,
    llava_turns,
    message_turns,
    quarantined,
    sample,
    task_type_for,
    turn,
)
from babelsynth.inputs.metering import Meter, ReadAhead
from babelsynth.inputs.parquet import dataset_name
from babelsynth.inputs.source import InputFile

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
BLOCK = 512


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first '.' of the file name; the rest is the ext."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def samples(tf: tarfile.TarFile) -> Iterator[tuple[str, list[tarfile.TarInfo]]]:
    """(key, members) of consecutive members sharing a key, in tar order (files only)."""
    key, group = None, []
    for m in tf:
        if not m.isfile():
            continue
        k, _ = split_name(m.name)
        if k != key and group:
            yield key, group
            group = []
        key = k
        group.append(m)
    if group:
        yield key, group


def end_of(m: tarfile.TarInfo) -> int:
    return m.offset_data + -(-m.size // BLOCK) * BLOCK


class WebDatasetAdapter(Adapter):
    name = "webdataset"
    suffixes = (".tar",)

    def scan(self, f: InputFile) -> FileScan:
        units, ids = [], []
        with tarfile.open(fileobj=ReadAhead(storage.open_input(f.uri)), mode="r:") as tf:
            for key, members in samples(tf):
                start, end = members[0].offset, end_of(members[-1])
                units.append((1, end - start, (start, end)))
                ids.append(key)
        return FileScan(units, ids)

    def merge(self, a: dict, b: dict) -> dict | None:
        return {
            "first": a["first"],
            "rows": a["rows"] + b["rows"],
            "bytes": a["bytes"] + b["bytes"],
            "loc": [a["loc"][0], b["loc"][1]],
        }

    def read(self, f: InputFile, pieces: list[dict], meter: Meter) -> Iterator[dict]:
        native = meter.wrap(storage.open_input(f.uri))
        for p in pieces:
            start, end = p["loc"]
            with tarfile.open(fileobj=io.BytesIO(native.read_at(end - start, start)), mode="r:") as tf:
                for key, members in samples(tf):
                    files = {split_name(m.name)[1]: tf.extractfile(m).read() for m in members}
                    yield self.convert(key, files, f)

    def convert(self, key: str, files: dict[str, bytes], f: InputFile) -> dict:
        source = dataset_name(f.rel)
        images = [files[e] for e in sorted(files) if e.rsplit(".", 1)[-1] in IMAGE_EXTS]
        task = None
        if "json" in files:
            try:
                meta = json.loads(files["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                return quarantined(key, "malformed_record", f"{f.rel}: {key}.json: {e}", source)
            if not isinstance(meta, dict):
                return quarantined(key, "malformed_record", f"{f.rel}: {key}.json is not an object", source)
            source = str(meta.get("source") or source)
            task = meta.get("task_type")
            if "conversations" in meta:
                conv, tokens, problem = llava_turns(meta["conversations"])
            elif "messages" in meta:
                conv, tokens, problem = message_turns(meta["messages"])
            elif "question" in meta:
                conv = [turn("user", str(meta["question"])), turn("assistant", str(meta.get("answer") or ""))]
                tokens, problem = 0, None
            elif meta.get("caption") or "txt" in files:
                conv, tokens, problem = self.caption(meta.get("caption"), files.get("txt")), 0, None
                task = task or "captioning"
            else:
                return quarantined(key, "missing_text", f"{f.rel}: {key}.json has no conversation", source)
            if problem:
                return quarantined(key, *problem, source)
            if not isinstance(conv, list):
                return quarantined(key, "bad_encoding", f"{f.rel}: {key}.txt is not UTF-8", source)
        elif "txt" in files:
            conv, tokens, task = self.caption(None, files["txt"]), 0, "captioning"
            if not isinstance(conv, list):
                return quarantined(key, "bad_encoding", f"{f.rel}: {key}.txt is not UTF-8", source)
        else:
            return quarantined(key, "missing_text", f"{f.rel}: sample {key} has no .json or .txt", source)
        problem_text = image_count_problem(tokens, len(images))
        if problem_text:
            return quarantined(key, "image_token_mismatch", problem_text, source, conversation=conv)
        return sample(key, task or task_type_for(self.cfg, source), conv, images, source)

    def caption(self, caption: str | None, txt: bytes | None) -> list[dict] | None:
        if caption is None:
            try:
                caption = (txt or b"").decode("utf-8")
            except UnicodeDecodeError:
                return None
        return [turn("user", self.cfg.caption_prompt), turn("assistant", caption.strip())]


ADAPTER = WebDatasetAdapter

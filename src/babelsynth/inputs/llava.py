"""LLaVA-style JSON (one array) or JSONL: {id, image (a path or a list), conversations [{from, value}]}.

Image paths are relative to `input.image_root` (default: the JSON file's folder). A path that is absolute
or climbs out of the root (`..`, a symlink) is never opened: the record is quarantined as
image_path_escapes; a path that does not exist gives missing_image_file. A JSONL line that is not valid
JSON becomes a quarantined record naming its line (malformed_record); a file that is not UTF-8, or a JSON
array that does not parse, stops the plan with the file and the byte offset.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator

from babelsynth import storage
from babelsynth.inputs.base import (
    Adapter,
    FileScan,
    image_count_problem,
    llava_turns,
    quarantined,
    sample,
    task_type_for,
)
from babelsynth.inputs.metering import Meter
from babelsynth.inputs.parquet import dataset_name
from babelsynth.inputs.source import InputFile

BOM = b"\xef\xbb\xbf"
CHUNK = 16 << 20
_WS = " \t\r\n,"


def not_utf8(f: InputFile, err: UnicodeDecodeError, base: int) -> ValueError:
    off = base + err.start
    bad = err.object[err.start : err.start + 1].hex()
    return ValueError(
        f"{f.uri} is not UTF-8 text: byte 0x{bad} at offset {off} ({err.reason}); re-encode it "
        "(e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`) and point input_uri at the result"
    )


def record_id(obj, positional: str) -> str:
    rid = obj.get("id") if isinstance(obj, dict) else None
    return positional if rid is None or rid == "" else str(rid)


class LlavaAdapter(Adapter):
    name = "llava"
    suffixes = (".json", ".jsonl")

    # ------------------------------------------------------------------ plan
    def scan(self, f: InputFile) -> FileScan:
        native = storage.open_input(f.uri)
        head = native.read_at(min(4096, f.size), 0)
        skip = len(BOM) if head.startswith(BOM) else 0
        if head[skip:].lstrip().startswith(b"["):
            return self._scan_array(f, native.read_at(f.size, 0), skip)
        return self._scan_lines(f, native, skip)

    def _scan_lines(self, f: InputFile, native, skip: int) -> FileScan:
        units, ids = [], []
        pos, line_no, carry = skip, 1, b""
        offset = skip  # file offset of carry[0]
        while pos < f.size or carry:
            chunk = native.read_at(min(CHUNK, f.size - pos), pos) if pos < f.size else b""
            pos += len(chunk)
            buf = carry + chunk
            lines = buf.split(b"\n")
            carry = lines.pop() if chunk else b""
            for line in lines:
                start, end = offset, offset + len(line)
                offset = end + 1
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise not_utf8(f, e, start) from None
                if text.strip():
                    try:
                        rid = record_id(json.loads(text), f"{f.rel}:{line_no}")
                    except json.JSONDecodeError:
                        rid = f"{f.rel}:{line_no}"  # quarantined when read, with the parser's message
                    units.append((1, end - start, (start, end, line_no, False)))
                    ids.append(rid)
                line_no += 1
            if not chunk:
                break
        return FileScan(units, ids)

    def _scan_array(self, f: InputFile, data: bytes, skip: int) -> FileScan:
        try:
            text = data[skip:].decode("utf-8")
        except UnicodeDecodeError as e:
            raise not_utf8(f, e, skip) from None
        dec = json.JSONDecoder()
        i = text.index("[") + 1
        units, ids = [], []
        byte_at, char_at = skip, 0  # a cursor mapping character offsets to byte offsets

        def to_byte(c: int) -> int:
            nonlocal byte_at, char_at
            byte_at += len(text[char_at:c].encode())
            char_at = c
            return byte_at

        index = 0
        while True:
            while i < len(text) and text[i] in _WS:
                i += 1
            if i >= len(text) or text[i] == "]":
                break
            try:
                obj, end = dec.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{f.uri} is not valid JSON at line {e.lineno} column {e.colno}: {e.msg}. One bad record "
                    "stops a JSON array; as JSONL (one record per line) a bad line is quarantined instead"
                ) from None
            start_b, end_b = to_byte(i), to_byte(end)
            units.append((1, end_b - start_b, (start_b, end_b, index, True)))
            ids.append(record_id(obj, f"{f.rel}#{index}"))
            index += 1
            i = end
        return FileScan(units, ids)

    def merge(self, a: dict, b: dict) -> dict | None:
        (s, _, first, arr), (_, e, _, _) = a["loc"], b["loc"]
        return {
            "first": a["first"],
            "rows": a["rows"] + b["rows"],
            "bytes": a["bytes"] + b["bytes"],
            "loc": [s, e, first, arr],
        }

    # ------------------------------------------------------------------ read
    def read(self, f: InputFile, pieces: list[dict], meter: Meter) -> Iterator[dict]:
        native = meter.wrap(storage.open_input(f.uri))
        for p in pieces:
            start, end, first, is_array = p["loc"]
            text = native.read_at(end - start, start).decode("utf-8")
            if is_array:
                dec, i, index = json.JSONDecoder(), 0, first
                while True:
                    while i < len(text) and text[i] in _WS:
                        i += 1
                    if i >= len(text):
                        break
                    obj, i = dec.raw_decode(text, i)
                    yield self.convert(obj, f, f"{f.rel}#{index}", meter)
                    index += 1
                continue
            for k, line in enumerate(text.split("\n")):
                if not line.strip():
                    continue
                line_no = first + k
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield quarantined(
                        f"{f.rel}:{line_no}",
                        "malformed_record",
                        f"{f.rel} line {line_no}: {e.msg} (column {e.colno})",
                        dataset_name(f.rel),
                    )
                    continue
                yield self.convert(obj, f, f"{f.rel}:{line_no}", meter)

    def convert(self, obj, f: InputFile, positional: str, meter: Meter) -> dict:
        source = dataset_name(f.rel)
        if not isinstance(obj, dict):
            return quarantined(positional, "malformed_record", f"{positional} is not a JSON object", source)
        rid = record_id(obj, positional)
        source = str(obj.get("source") or source)
        conv, tokens, problem = llava_turns(obj.get("conversations"))
        if problem:
            return quarantined(rid, *problem, source)
        paths = obj.get("image")
        paths = [] if paths in (None, "") else [paths] if isinstance(paths, str) else paths
        images = []
        for p in paths:
            uri, why = self.resolve_image(f, str(p))
            if why:
                return quarantined(rid, why[0], why[1], source, conversation=conv)
            images.append(meter.wrap(storage.open_input(uri)).read())
        problem_text = image_count_problem(tokens, len(images))
        if problem_text:
            return quarantined(rid, "image_token_mismatch", problem_text, source, conversation=conv)
        task = obj.get("task_type") or task_type_for(self.cfg, source)
        return sample(rid, task, conv, images, source)

    def image_root(self, f: InputFile) -> str:
        root = self.cfg.image_root or f.uri.rsplit("/", 1)[0]
        return root if root.startswith("s3://") else os.path.abspath(root)

    def resolve_image(self, f: InputFile, path: str) -> tuple[str, tuple[str, str] | None]:
        """(URI to read, None) for a path inside the image root, else ("", (reason, detail)); nothing
        outside the root is ever opened or even checked for existence."""
        root = self.image_root(f)
        escapes = ("image_path_escapes", f"image path {path!r} is outside the image root {root}")
        if not path or path.startswith(("/", "\\")) or "://" in path or (len(path) > 1 and path[1] == ":"):
            return "", escapes
        if root.startswith("s3://"):
            key = posixpath.normpath(posixpath.join(root, path).removeprefix("s3://"))
            if not key.startswith(root.removeprefix("s3://").rstrip("/") + "/"):
                return "", escapes
            uri = "s3://" + key
            from pyarrow import fs as pafs

            fs, inner = storage.arrow_filesystem(uri)
            if fs.get_file_info(inner).type != pafs.FileType.File:
                return "", ("missing_image_file", f"image {path!r} not found under {root}")
            return uri, None
        cand = os.path.normpath(os.path.join(root, path))
        real_root = os.path.realpath(root)
        if not cand.startswith(root.rstrip(os.sep) + os.sep):
            return "", escapes
        real = os.path.realpath(cand)  # a symlink inside the root may still point outside it
        if not real.startswith(real_root.rstrip(os.sep) + os.sep):
            return "", escapes
        if not os.path.isfile(real):
            return "", ("missing_image_file", f"image {path!r} not found under {root}")
        return real, None


ADAPTER = LlavaAdapter

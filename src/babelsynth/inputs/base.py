"""What every input adapter shares: the canonical record it yields, the plan units it reports, helpers.

An adapter turns one format's files into canonical records (schemas/input.v2.yaml: source_id, task_type,
conversation, images, source). It has two halves:

* `scan(file)` at plan time: the file's readable units in order (a Parquet row group, a JSON line, a tar
  sample) with their row counts, byte sizes and locators, plus each record's id when the format has ids
  (for duplicate detection across the whole input). Scans read metadata (footers, tar headers, id
  columns, JSON text), never image bytes.
* `read(file, pieces)` in a shard task: exactly the planned records of those pieces, reading only their
  byte ranges.

A record that cannot be made into a sample (malformed JSON line, image path outside the root, missing
image file, unsupported role) is still yielded, with `input_error` = {reason, detail}: ingest quarantines
it with that reason, so it is counted and never lost.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from babelsynth.config import InputSection
from babelsynth.inputs.metering import Meter
from babelsynth.inputs.source import InputFile

IMAGE_TOKEN = "<image>"
_TOKEN_AROUND = re.compile(r"[ \t]*<image>[ \t]*\n?")

# The Cauldron's subsets (and the usual names of the same sets elsewhere) -> task type; config wins.
KNOWN_SOURCES = {
    "ai2d": "textbook",
    "tqa": "textbook",
    "scienceqa": "textbook",
    "chartqa": "chart",
    "plotqa": "chart",
    "dvqa": "chart",
    "figureqa": "chart",
    "mapqa": "chart",
    "vistext": "chart",
    "chart2text": "chart",
    "infographicvqa": "chart",
    "lrvchart": "chart",
    "ocrvqa": "ocr",
    "textvqa": "ocr",
    "stvqa": "ocr",
    "docvqa": "ocr",
    "renderedtext": "ocr",
    "iam": "ocr",
    "textcaps": "captioning",
    "localizednarratives": "captioning",
    "screen2words": "captioning",
    "diagramimagetotext": "captioning",
    "coco": "captioning",
    "websight": "screenshot_code",
    "datikz": "screenshot_code",
    "tabmwp": "table",
    "tatqa": "table",
    "hitab": "table",
    "multihiertt": "table",
    "finqa": "table",
    "robutwtq": "table",
    "robutsqa": "table",
    "robutwikisql": "table",
    "geomverse": "reasoning",
    "clevrmath": "reasoning",
    "clevr": "reasoning",
    "raven": "reasoning",
    "iconqa": "reasoning",
    "intergps": "reasoning",
    "nlvr2": "two_image_difference",
    "spotthediff": "two_image_difference",
    "mimiccgd": "two_image_difference",
    "vqav2": "vqa",
    "cocoqa": "vqa",
    "visual7w": "vqa",
    "aokvqa": "vqa",
    "okvqa": "vqa",
    "vsr": "vqa",
    "tallyqa": "vqa",
    "vqarad": "vqa",
    "hatefulmemes": "vqa",
}


def source_key(source: str) -> str:
    return re.sub(r"[^a-z0-9]", "", (source or "").lower())


def task_type_for(cfg: InputSection, source: str) -> str:
    """The config's per-source task type, else a known dataset's, else input.task_type."""
    if source in cfg.task_types:
        return cfg.task_types[source]
    return KNOWN_SOURCES.get(source_key(source), cfg.task_type)


def strip_image_tokens(text: str) -> tuple[str, int]:
    """Text without `<image>` placeholders (images travel in their own column), and how many there were."""
    n = text.count(IMAGE_TOKEN)
    return (_TOKEN_AROUND.sub("", text).strip() if n else text), n


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def sample(
    source_id: str, task_type: str, conversation: list[dict], images: list[bytes], source: str
) -> dict:
    return {
        "source_id": source_id,
        "task_type": task_type,
        "conversation": conversation,
        "images": images,
        "source": source,
        "input_error": None,
    }


def quarantined(source_id: str, reason: str, detail: str, source: str = "", **known: Any) -> dict:
    """A record that cannot become a sample: ingest rejects it with `reason` (what is known is kept)."""
    return {
        "source_id": source_id,
        "task_type": known.get("task_type", ""),
        "conversation": known.get("conversation", []),
        "images": [],
        "source": source,
        "input_error": {"reason": reason, "detail": detail},
    }


def hf_image_bytes(obj: Any) -> bytes | None:
    """Bytes of a Hugging Face `Image` value as stored in Parquet ({bytes, path}), or raw bytes."""
    if isinstance(obj, bytes | bytearray):
        return bytes(obj)
    if isinstance(obj, dict):
        return obj.get("bytes")
    return None


def image_count_problem(n_tokens: int, n_images: int) -> str | None:
    if n_tokens > n_images:
        return f"{n_tokens} {IMAGE_TOKEN} placeholder(s) but {n_images} image(s)"
    return None


@dataclass
class FileScan:
    """One file's plan: `units` are (rows, bytes, locator) in file order; `ids` one per record when the
    format carries ids (None: positional ids, unique by construction)."""

    units: list[tuple[int, int, tuple]]
    ids: list[str] | None = None
    warnings: list[str] = field(default_factory=list)
    overhead: int = 0  # bytes every shard reading this file reads besides its units (a Parquet footer)


class Adapter(ABC):
    """One input format. `sliceable`: a unit of many rows may be split between shards by row slices (at the
    cost of reading the whole unit in each); otherwise units are single records."""

    name: str
    suffixes: tuple[str, ...]
    sliceable: bool = False

    def __init__(self, cfg: InputSection):
        self.cfg = cfg

    @abstractmethod
    def scan(self, f: InputFile) -> FileScan: ...

    @abstractmethod
    def read(self, f: InputFile, pieces: list[dict], meter: Meter) -> Iterator[dict]:
        """The canonical records of `pieces` (this file's, in plan order), exactly as many as planned."""

    def piece(self, first: int, lo: int, rows: int, nbytes: int, loc: tuple) -> dict:
        """A plan piece: the unit starting at record `first` of its file, rows [lo, lo + rows) of it."""
        return {"first": first + lo, "rows": rows, "bytes": nbytes, "loc": list(loc)}

    def merge(self, a: dict, b: dict) -> dict | None:
        """`b` appended to `a` when they are contiguous in the file (one ranged read), else None."""
        return None


Problem = tuple[str, str]  # (reason code, detail)
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def llava_turns(turns: Any) -> tuple[list[dict], int, Problem | None]:
    """LLaVA `conversations` ([{from: human|gpt, value}]) -> (conversation, `<image>` count, problem)."""
    if not isinstance(turns, list):
        return [], 0, ("malformed_record", "`conversations` is not a list")
    conv, tokens = [], 0
    for k, t in enumerate(turns):
        if not isinstance(t, dict):
            return [], 0, ("malformed_record", f"turn {k} is not an object")
        role = LLAVA_ROLES.get(str(t.get("from", "")).lower())
        if role is None:
            return (
                [],
                0,
                ("unsupported_role", f"turn {k} is from {t.get('from')!r}; only human and gpt turns"),
            )
        text, n = strip_image_tokens(str(t.get("value") or ""))
        tokens += n
        conv.append(turn(role, text))
    return conv, tokens, None


def message_turns(messages: Any) -> tuple[list[dict], int, Problem | None]:
    """Chat `messages` ([{role, content}], content a string or [{type: text|image, text}]) ->
    (conversation, image parts + `<image>` placeholders, problem)."""
    if not isinstance(messages, list):
        return [], 0, ("malformed_record", "`messages` is not a list")
    conv, images = [], 0
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            return [], 0, ("malformed_record", f"message {k} is not an object")
        role = m.get("role")
        if role not in ("user", "assistant"):
            return [], 0, ("unsupported_role", f"message {k} has role {role!r}; only user and assistant")
        content = m.get("content")
        if isinstance(content, str):
            text, n = strip_image_tokens(content)
        elif isinstance(content, list):
            parts, n = [], 0
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    n += 1
                elif kind == "text" and part.get("text"):
                    t, extra = strip_image_tokens(part["text"])
                    n += extra
                    parts.append(t)
            text = "\n".join(p for p in parts if p)
        else:
            return [], 0, ("malformed_record", f"message {k} has no text content")
        images += n
        conv.append(turn(role, text))
    return conv, images, None

"""Untrusted input, checked before any model sees it: images and text of one raw record (pure functions).

Images: a format allow-list (by magic bytes and by the decoder PIL is allowed to use), limits on bytes,
pixels (checked from the header, before any pixel is decoded, and `Image.MAX_IMAGE_PIXELS` set explicitly
with its bomb warning turned into an error whatever the process's warning filters say), side lengths and
aspect ratio, images per record; animated images, truncated files and bytes after the end of the image (a
polyglot) are refused. Each image is decoded exactly once, here: the decoded pixels give the stored image
(the original bytes when they are already a clean PNG/JPEG/WEBP, with metadata such as EXIF GPS stripped
losslessly; otherwise a PNG of the normalized pixels: EXIF orientation applied, CMYK, palette, 16-bit and
alpha turned into RGB or L) and, when it is larger than the teacher takes, the downscaled copy the teacher
is sent. Every refusal is an `Rejected` with a reason code (the reject reason) and a detail.

Text: strings only (bytes that are not UTF-8 and lone surrogates are refused), control characters (C0/C1,
ANSI escape sequences, bidi overrides) stripped or refused by rule, and text that tries to instruct the
teacher or the judge (chat-template tokens, the prompts' own tags, "ignore the previous instructions")
refused by rule.
"""

from __future__ import annotations

import io
import re
import struct
import unicodedata
import warnings
from dataclasses import dataclass

# reason codes (the rejected table's `reason`)
EMPTY_IMAGE = "empty_image"
NOT_AN_IMAGE = "not_an_image"
FORMAT_NOT_ALLOWED = "image_format_not_allowed"
IMAGE_TOO_LARGE = "image_too_large"
TOO_MANY_PIXELS = "image_too_many_pixels"
BAD_DIMENSIONS = "image_bad_dimensions"
ANIMATED = "animated_image"
CORRUPT = "corrupt_image"
TRAILING_DATA = "trailing_data"
TOO_MANY_IMAGES = "too_many_images"
MISSING_IMAGE = "missing_image"
NOT_TEXT = "not_text"
INVALID_UTF8 = "invalid_utf8"
CONTROL_CHARS = "control_characters"
PROMPT_INJECTION = "prompt_injection"

# What the first bytes say a file is; the decoder is then only allowed the formats of the allow-list.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
_AS_IS = {"PNG", "JPEG", "WEBP"}  # formats every model server decodes: kept byte for byte when clean
_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


class Rejected(ValueError):
    """A value refused with a reason code (the rejected table's `reason`) and a human detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ImageLimits:
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF")
    max_bytes: int = 20 << 20
    max_pixels: int = 50_000_000
    min_side: int = 8
    max_aspect_ratio: float = 50.0


@dataclass(frozen=True)
class PreparedImage:
    """One validated image: what is stored (and released) and, if it is larger, what the teacher gets."""

    data: bytes
    format: str
    width: int
    height: int
    normalized: bool  # the stored bytes were re-encoded from the decoded pixels
    model_data: bytes | None = None  # downscaled PNG for the teacher; None: send `data` as is


def sniff_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)


def mime(fmt: str) -> str:
    return _MIME[fmt]


def prepare_image(data: bytes, limits: ImageLimits, model_max_side: int | None = None) -> PreparedImage:
    """Validate and normalize one image with one decode; raises Rejected naming the reason."""
    from PIL import Image, ImageFile

    if not isinstance(data, bytes | bytearray) or not data:
        raise Rejected(EMPTY_IMAGE, "the image is empty (0 bytes)" if data is not None else "no bytes")
    data = bytes(data)
    if len(data) > limits.max_bytes:
        raise Rejected(IMAGE_TOO_LARGE, f"{len(data)} bytes > ingest.max_image_bytes={limits.max_bytes}")
    sniffed = sniff_format(data)
    if sniffed is not None and sniffed not in limits.formats:
        raise Rejected(FORMAT_NOT_ALLOWED, f"{sniffed} is not in ingest.image_formats={limits.formats}")
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently padded
    # Explicit, not PIL's default (89M): above it PIL warns, above twice it raises, while it parses the
    # header. The warning is made an error here, so no warning filter of the process can hide it; the
    # process-wide value is put back afterwards (other code decodes images too).
    pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limits.max_pixels
    try:
        return _prepare(data, sniffed, limits, model_max_side)
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit


def _prepare(
    data: bytes, sniffed: str | None, limits: ImageLimits, model_max_side: int | None
) -> PreparedImage:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data), formats=list(limits.formats))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise Rejected(TOO_MANY_PIXELS, str(e)) from None
        except Image.UnidentifiedImageError:
            if sniffed is None:
                raise Rejected(NOT_AN_IMAGE, f"not an image file (starts with {data[:8]!r})") from None
            raise Rejected(CORRUPT, f"{sniffed} header cannot be read") from None
        except Exception as e:  # noqa: BLE001 - PIL raises many types for hostile headers
            raise Rejected(CORRUPT, f"{type(e).__name__}: {e}") from None
        with im:
            return _prepare_open(im, data, limits, model_max_side)


def _prepare_open(im, data: bytes, limits: ImageLimits, model_max_side: int | None) -> PreparedImage:
    from PIL import Image, ImageOps

    fmt, (w, h) = im.format or "UNKNOWN", im.size
    if w * h > limits.max_pixels:
        raise Rejected(TOO_MANY_PIXELS, f"{w}x{h} = {w * h} pixels > ingest.max_image_pixels")
    if min(w, h) < limits.min_side or max(w, h) > limits.max_aspect_ratio * min(w, h):
        raise Rejected(
            BAD_DIMENSIONS,
            f"{w}x{h}: each side must be >= ingest.min_image_side={limits.min_side} and the aspect ratio "
            f"<= ingest.max_aspect_ratio={limits.max_aspect_ratio}",
        )
    # MPO (phone cameras: a JPEG with a second view appended) is a still image: its first frame is used
    if fmt != "MPO" and (getattr(im, "n_frames", 1) > 1 or getattr(im, "is_animated", False)):
        raise Rejected(ANIMATED, f"{fmt} with {getattr(im, 'n_frames', '?')} frames")
    try:
        orientation = im.getexif().get(0x0112, 1)  # EXIF orientation tag
        im.load()  # the one decode
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected(TOO_MANY_PIXELS, str(e)) from None
    except Exception as e:  # noqa: BLE001 - truncated streams, bad huffman tables, zlib errors, ...
        raise Rejected(CORRUPT, f"{type(e).__name__}: {e}") from None
    clean = _clean_bytes(data, fmt) if fmt in _AS_IS else None  # structure, trailing bytes, metadata
    if clean is not None and im.mode in ("RGB", "L") and orientation in (None, 1):
        stored, out_fmt, pixels = clean, fmt, im
    else:
        pixels = _normalize(ImageOps.exif_transpose(im) if orientation not in (None, 1) else im)
        stored, out_fmt = _png(pixels), "PNG"
    model = None
    if model_max_side and max(pixels.size) > model_max_side:
        small = pixels.copy()
        small.thumbnail((model_max_side, model_max_side))
        model = _png(small)
    return PreparedImage(stored, out_fmt, *pixels.size, pixels is not im, model)


def _normalize(im):
    """RGB (or L for grey) pixels: CMYK and palette converted, alpha composited on white, 16-bit scaled."""
    from PIL import Image

    if im.mode in ("RGB", "L"):
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        top = 65535 if im.mode.startswith("I;16") else max(1, im.getextrema()[1])
        return im.convert("I").point(lambda v: v * (255 / top)).convert("L")
    if im.mode == "F":
        lo, hi = im.getextrema()
        return im.point(lambda v: (v - lo) * (255 / ((hi - lo) or 1))).convert("L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, 1-bit


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------ byte-exact containers
_PNG_KEEP = {
    b"IHDR",
    b"PLTE",
    b"IDAT",
    b"IEND",
    b"tRNS",
    b"gAMA",
    b"cHRM",
    b"sRGB",
    b"iCCP",
    b"sBIT",
    b"pHYs",
}
_JPEG_DROP = {0xE1, 0xED, 0xFE}  # APP1 (EXIF, XMP), APP13 (IPTC), COM: metadata, GPS included


def _clean_bytes(data: bytes, fmt: str) -> bytes | None:
    """The image without metadata chunks; None when it cannot be kept byte for byte (then the decoded
    pixels are re-encoded); Rejected(trailing_data) when bytes follow the end of the image."""
    try:
        return {"PNG": _clean_png, "JPEG": _clean_jpeg, "WEBP": _check_webp}[fmt](data)
    except (struct.error, IndexError, _Unusual):
        return None


class _Unusual(Exception):
    """A container PIL decodes but our byte walk does not follow: re-encode instead of copying."""


def _trailing(data: bytes, end: int, fmt: str) -> None:
    rest = data[end:]
    if rest.strip(b"\x00"):  # zero padding is common and harmless; anything else rides along
        raise Rejected(TRAILING_DATA, f"{len(rest)} bytes after the end of the {fmt} image (a polyglot?)")


def _clean_png(data: bytes) -> bytes | None:
    out, pos = [data[:8]], 8
    while pos + 8 <= len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, end = data[pos + 4 : pos + 8], pos + 12 + n
        if end > len(data):
            raise _Unusual(f"PNG chunk {kind!r} runs past the end of the file")
        if kind in _PNG_KEEP:
            out.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            _trailing(data, pos, "PNG")
            return b"".join(out)
    raise _Unusual("PNG without IEND")


def _clean_jpeg(data: bytes) -> bytes | None:
    """Walk the markers; metadata segments are dropped, the entropy-coded scans are copied untouched."""
    out, pos, n = [b"\xff\xd8"], 2, len(data)
    while pos < n:
        if data[pos] != 0xFF:
            raise _Unusual(f"JPEG marker expected at byte {pos}")
        marker = data[pos + 1] if pos + 1 < n else None
        if marker is None:
            break
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            out.append(b"\xff\xd9")
            _trailing(data, pos + 2, "JPEG")
            return b"".join(out)
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            out.append(data[pos : pos + 2])
            pos += 2
            continue
        if pos + 4 > n:
            break
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        seg_end = pos + 2 + length
        if marker not in _JPEG_DROP:
            out.append(data[pos:seg_end])
        pos = seg_end
        if marker == 0xDA:  # start of scan: copy the entropy-coded data up to the next real marker
            scan = pos
            while pos + 1 < n and not (data[pos] == 0xFF and data[pos + 1] not in (0x00, *range(0xD0, 0xD8))):
                pos += 1
            out.append(data[scan:pos])
    raise _Unusual("JPEG without EOI")


def _check_webp(data: bytes) -> bytes | None:
    (size,) = struct.unpack("<I", data[4:8])
    _trailing(data, 8 + size + (size & 1), "WEBP")
    chunks, pos = set(), 12
    while pos + 8 <= min(len(data), 8 + size):
        kind, (n,) = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])
        chunks.add(kind)
        pos += 8 + n + (n & 1)
    return None if chunks & {b"EXIF", b"XMP "} else data  # metadata: re-encode rather than keep


# ------------------------------------------------------------------------------ text
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# Instructions aimed at the teacher or the judge, and the tokens/tags that would end our turn or our tags.
_INJECTION = re.compile(
    r"<\|[A-Za-z_ ]{2,40}\|>|\[/?INST\]|<<SYS>>|</?(?:answer|translation|system|assistant)>"
    r"|\b(?:ignore|disregard|forget|override)\s+(?:all\s+|any\s+)?(?:of\s+)?(?:the\s+|your\s+)?"
    r"(?:previous|prior|above|earlier|preceding|system)\s+(?:instructions?|prompts?|rules|directions)"
    r"|\b(?:final\s+decision|verdict)\s*(?:is|:)\s*(?:yes|no)\b"
    r"|\byou\s+(?:must|should)\s+(?:answer|respond|reply|say)\s+[\"']?(?:yes|no)\b",
    re.IGNORECASE,
)


def as_text(value) -> str:
    """A text field as str; Rejected for bytes that are not UTF-8, lone surrogates, or non-text values."""
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise Rejected(INVALID_UTF8, f"not UTF-8: {e}") from None
    if not isinstance(value, str):
        raise Rejected(NOT_TEXT, f"{type(value).__name__} where text was expected")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Rejected(INVALID_UTF8, f"lone surrogate: {e}") from None
    return value


def control_chars(text: str) -> int:
    """How many control characters (ANSI sequences count as one) a text has."""
    return len(_ANSI.findall(text)) + len(_CONTROL.findall(_ANSI.sub("", text)))


def strip_control(text: str) -> str:
    """Without C0/C1 controls (tab and newline kept; CR LF -> LF), ANSI sequences and bidi overrides."""
    return _CONTROL.sub("", _ANSI.sub("", text.replace("\r\n", "\n").replace("\r", "\n")))


def visible(text: str) -> bool:
    """Whether a text has anything to read (not only whitespace, zero-width or format characters)."""
    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cf", "Cc", "Zs") for ch in text)


def injection(text: str) -> str | None:
    """The first span of text that tries to instruct a model in the pipeline, or None."""
    m = _INJECTION.search(text)
    return m.group(0) if m else None


def check_text(r: dict, ic, stats: dict) -> tuple[str, str, str]:
    """(question, answer, source) of a raw record, checked and cleaned under `ic` (config.IngestSection);
    Rejected with the first reason: not_text, invalid_utf8, control_characters, empty_text,
    text_too_long, prompt_injection. Counts stripped records in stats["control_chars_stripped"]."""
    text = {k: as_text(r.get(k)) for k in ("question", "answer", "source")}
    dirty = {k: n for k, n in ((k, control_chars(v)) for k, v in text.items()) if n}
    if dirty:
        if ic.control_chars == "reject":
            raise Rejected(CONTROL_CHARS, f"control characters per field: {dirty}")
        text = {k: strip_control(v) for k, v in text.items()}
        stats["control_chars_stripped"] = stats.get("control_chars_stripped", 0) + 1
    q, a = text["question"].strip(), text["answer"].strip()
    if not visible(q) or not visible(a):
        raise Rejected("empty_text", "question or answer is empty")
    lim = ic.max_text_chars
    if len(q) > lim or len(a) > lim:
        raise Rejected("text_too_long", f"{max(len(q), len(a))} chars > ingest.max_text_chars={lim}")
    if ic.prompt_injection == "reject":
        for name, value in (("question", q), ("answer", a)):
            hit = injection(value)
            if hit:
                raise Rejected(PROMPT_INJECTION, f"{name} contains {hit[:80]!r} (ingest.prompt_injection)")
    return q, a, text["source"].strip()


def image_limits(ic) -> ImageLimits:
    """The image limits of config.IngestSection."""
    return ImageLimits(
        tuple(ic.image_formats),
        ic.max_image_bytes,
        ic.max_image_pixels,
        ic.min_image_side,
        ic.max_aspect_ratio,
    )


def printable(r: dict) -> dict:
    """A raw record as the rejected table keeps it: no image bytes; text that is not UTF-8 (bytes, lone
    surrogates) shown escaped; a source_id that is not text as its repr."""
    out = {}
    for k, v in r.items():
        if isinstance(v, bytes | bytearray) and k != "images":
            out[k] = bytes(v).decode("utf-8", "backslashreplace")
        elif isinstance(v, str):
            out[k] = v.encode("utf-8", "backslashreplace").decode("utf-8")
        elif isinstance(v, list) and k != "images":  # a conversation: each turn likewise
            out[k] = [printable(x) if isinstance(x, dict) else x for x in v]
        elif k != "images":
            out[k] = v
    if "source_id" in out and out["source_id"] is not None and not isinstance(out["source_id"], str):
        out["source_id"] = repr(out["source_id"])
    return out


def batch_rows(batch) -> list[dict]:
    """Rows of an Arrow batch; a string column holding bytes that are not UTF-8 (which pyarrow does not
    check when reading Parquet) gives those values as bytes, for ingest to refuse, instead of failing the
    whole shard."""
    import pyarrow as pa

    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        cols = {}
        for name, col in zip(batch.schema.names, batch.columns):
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                raw = col.view(pa.binary() if pa.types.is_string(col.type) else pa.large_binary())
                cols[name] = [_utf8_or_bytes(v) for v in raw.to_pylist()]
            else:
                cols[name] = col.to_pylist()
        return [dict(zip(cols, vals)) for vals in zip(*cols.values())]


def _utf8_or_bytes(v: bytes | None):
    if v is None:
        return None
    try:
        return v.decode("utf-8")
    except UnicodeDecodeError:
        return v

"""Validate raw English records."""

from __future__ import annotations

import hashlib
import io

from babelsynth.config import TASK_TYPES
from babelsynth.stages.base import Context, Stage, StageResult, reject

READS = ("source_id", "task_type", "question", "answer", "images", "source")
WRITES = ("source_id", "task_type", "question", "answer_gt", "image_ids", "source")


def ingest(ctx: Context, records: list[dict]) -> StageResult:
    """Validate raw input; bad records go to quarantine with a reason, never crash the shard.

    Each image is decoded once here; its bytes and metadata become the `images` artifact (content id ->
    bytes), the rows keep only the ids.
    Drop reasons: missing_id, unknown_task_type, empty_text, text_too_long, missing_image, corrupt_image.
    """
    from PIL import Image

    rows, rejected, images = [], [], {}
    lim = ctx.cfg.ingest.max_text_chars
    for r in records:
        q, a = (r.get("question") or "").strip(), (r.get("answer") or "").strip()
        bad = None
        if not r.get("source_id"):
            bad = ("missing_id", "source_id is empty")
        elif r.get("task_type") not in TASK_TYPES:
            bad = ("unknown_task_type", f"{r.get('task_type')!r} not in {TASK_TYPES}")
        elif not q or not a:
            bad = ("empty_text", "question or answer is empty")
        elif len(q) > lim or len(a) > lim:
            bad = ("text_too_long", f"{max(len(q), len(a))} chars > ingest.max_text_chars={lim}")
        elif not r.get("images"):
            bad = ("missing_image", "no image")
        ids, found = [], {}
        if bad is None:
            for data in r["images"]:
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        im.load()
                        meta = {"format": im.format or "UNKNOWN", "width": im.width, "height": im.height}
                except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes
                    bad = ("corrupt_image", f"{type(e).__name__}: {e}")
                    break
                iid = hashlib.sha256(data).hexdigest()
                found[iid] = {"image_id": iid, "image": data, **meta}
                ids.append(iid)
        if bad:
            rejected.append(reject({k: v for k, v in r.items() if k != "images"}, "ingest", *bad))
            continue
        images.update(found)
        rows.append(
            {
                "source_id": r["source_id"],
                "task_type": r["task_type"],
                "question": q,
                "answer_gt": a,
                "image_ids": ids,
                "source": r.get("source") or "",
            }
        )
    return StageResult(rows, rejected, artifacts={"images": ("images", list(images.values()))})


STAGE = Stage("ingest", ingest, READS, WRITES)

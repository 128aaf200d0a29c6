"""Validate raw English records (canonical input records from an input adapter)."""

from __future__ import annotations

import hashlib

from babelsynth import validate
from babelsynth.config import TASK_TYPES
from babelsynth.stages.base import Context, Stage, StageResult, reject

READS = ("source_id", "task_type", "conversation", "images", "source", "input_error", "duplicate_of")
WRITES = ("source_id", "task_type", "question", "answer_gt", "followups_gt", "image_ids", "source")
CONFIG = ("ingest", "input", "models.teacher.image_max_side")


def conversation_problem(conv) -> tuple[str, str] | None:
    """Why a conversation cannot be a sample: user first, roles alternating, an assistant turn last."""
    if not isinstance(conv, list) or len(conv) < 2:
        return ("bad_conversation", "needs at least one user turn followed by one assistant turn")
    for k, t in enumerate(conv):
        want = "user" if k % 2 == 0 else "assistant"
        if not isinstance(t, dict) or t.get("role") != want:
            got = t.get("role") if isinstance(t, dict) else type(t).__name__
            return (
                "bad_conversation",
                f"turn {k + 1} is {got!r}, expected {want!r} (user first, alternating)",
            )
    if len(conv) % 2:
        return ("bad_conversation", "the last turn is a user turn with no answer")
    return None


def check_conversation(r: dict, ic, stats: dict) -> tuple[list[dict], str]:
    """validate.check_text on every exchange (a user turn and its answer): the cleaned turns, in order,
    and the source. A record with control characters in several turns counts once as stripped."""
    conv, turns, source, stripped = r["conversation"], [], "", 0
    for k in range(0, len(conv), 2):
        local: dict = {}
        pair = {"question": conv[k].get("content"), "answer": conv[k + 1].get("content")}
        try:
            q, a, source = validate.check_text({**pair, "source": r.get("source")}, ic, local)
        except validate.Rejected as e:
            raise validate.Rejected(e.reason, f"exchange {k // 2 + 1}: {e.detail}") from None
        stripped = max(stripped, local.get("control_chars_stripped", 0))
        turns += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    stats["control_chars_stripped"] += stripped
    return turns, source


def ingest(ctx: Context, records: list[dict]) -> StageResult:
    """Validate raw input; bad records go to quarantine with a reason, never crash the shard.

    The first exchange of the conversation becomes question/answer_gt, later turns followups_gt (roles and
    order kept). Each image is decoded once, here (babelsynth/validate.py): the stored bytes and metadata
    become the `images` artifact (content id -> bytes), a copy downscaled for the teacher the
    `model_images` artifact; the rows keep only the ids. Every exchange's text is checked by validate.py.
    Drop reasons: the adapter's (input_error: malformed_record, image_path_escapes, missing_image_file,
    unsupported_role, ...), missing_id, duplicate_id (a source_id already seen in this run: the plan marks
    repeats across shards, the first occurrence is kept), unknown_task_type, bad_conversation,
    missing_image, too_many_images, those of validate.check_text (not_text, invalid_utf8,
    control_characters, empty_text, text_too_long, prompt_injection) and of validate.prepare_image
    (empty_image, not_an_image, image_format_not_allowed, image_too_large, image_too_many_pixels,
    image_bad_dimensions, animated_image, corrupt_image, trailing_data). Stats: control_chars_stripped
    (records), images_normalized (re-encoded images).
    """
    rows, rejected, images, model_images = [], [], {}, {}
    stats = {"control_chars_stripped": 0, "images_normalized": 0}
    ic = ctx.cfg.ingest
    limits = validate.image_limits(ic)
    seen: set[str] = set()
    for r in records:
        sid, err, dup = r.get("source_id"), r.get("input_error"), r.get("duplicate_of")
        bad = None
        if err:
            bad = (err["reason"], err["detail"])
        elif not isinstance(sid, str) or not sid.strip():
            bad = ("missing_id", f"source_id is empty or not text: {sid!r}"[:200])
        elif dup is not None or sid in seen:
            where = f"shard {dup}" if dup is not None else "this shard"
            bad = ("duplicate_id", f"source_id {sid!r} already seen in {where}; the first occurrence is kept")
        elif r.get("task_type") not in TASK_TYPES:
            bad = ("unknown_task_type", f"{r.get('task_type')!r} not in {TASK_TYPES}")
        else:
            bad = conversation_problem(r.get("conversation"))
        if bad is None and not r.get("images"):
            bad = ("missing_image", "no image")
        elif bad is None and len(r["images"]) > ic.max_images:
            bad = ("too_many_images", f"{len(r['images'])} images > ingest.max_images={ic.max_images}")
        if isinstance(sid, str) and sid:
            seen.add(sid)
        ids, found, small, turns, source = [], {}, {}, [], ""
        if bad is None:
            try:
                turns, source = check_conversation(r, ic, stats)
                for data in r["images"]:
                    img = validate.prepare_image(data, limits, ctx.cfg.models.teacher.image_max_side)
                    iid = hashlib.sha256(img.data).hexdigest()
                    found[iid] = {"image_id": iid, "image": img.data, "format": img.format}
                    found[iid].update(width=img.width, height=img.height)
                    if img.model_data is not None:
                        small[iid] = {"image_id": iid, "image": img.model_data, "format": "PNG"}
                    stats["images_normalized"] += img.normalized
                    ids.append(iid)
            except validate.Rejected as e:
                bad = (e.reason, e.detail)
        if bad:
            rejected.append(reject(validate.printable(r), "ingest", *bad))
            continue
        images.update(found)
        model_images.update(small)
        rows.append(
            {
                "source_id": sid,
                "task_type": r["task_type"],
                "question": turns[0]["content"],
                "answer_gt": turns[1]["content"],
                "followups_gt": turns[2:],
                "image_ids": ids,
                "source": source,
            }
        )
    artifacts = {
        "images": ("images", list(images.values())),
        "model_images": ("model_images", list(model_images.values())),
    }
    return StageResult(rows, rejected, stats, artifacts=artifacts)


STAGE = Stage("ingest", ingest, READS, WRITES, CONFIG)

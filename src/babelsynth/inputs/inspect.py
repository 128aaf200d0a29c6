"""`babelsynth inspect-input`: what a run would read, without running anything or writing a file.

It plans the input (footers, tar headers, id columns, JSON text: what `plan` reads) and reads the first
records of shard 0 through the adapter, then prints counts, shards, duplicates, what the adapter would
quarantine, task types and turns in that sample, and a few rows.
"""

from __future__ import annotations

import io
import itertools
from collections import Counter

from babelsynth.config import RunConfig
from babelsynth.inputs import adapter
from babelsynth.inputs.metering import Meter
from babelsynth.inputs.plan import plan_input
from babelsynth.inputs.source import InputFile

SAMPLE = 200


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def first_records(cfg: RunConfig, plan: dict, n: int, meter: Meter) -> list[dict]:
    """Up to n records from the start of shard 0, read piece by piece (not the whole shard)."""
    if not plan["pieces"]:
        return []
    ad = adapter(cfg.input, plan["input"]["format"])
    out: list[dict] = []
    for p in plan["pieces"][0]:
        fd = plan["input"]["files"][p["file"]]
        out += itertools.islice(
            ad.read(InputFile(fd["uri"], fd["rel"], fd["size"]), [p], meter), n - len(out)
        )
        if len(out) >= n:
            break
    return out


def image_note(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return f"{im.format} {im.width}x{im.height}, {human(len(data))}"
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad bytes
        return f"unreadable ({type(e).__name__}), {human(len(data))}"


def clip(text: str, width: int = 100) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def inspect_input(cfg: RunConfig, rows: int = 3) -> str:
    meter = Meter()
    plan = plan_input(cfg)
    files = plan["input"]["files"]
    lines = [
        f"input: {cfg.input_uri} (input.format={plan['input']['format']})",
        f"files: {len(files)}, {human(sum(f['size'] for f in files))}",
    ]
    lines += [f"  {f['rel']}: {f['records']} records, {human(f['size'])}" for f in files[:10]]
    if len(files) > 10:
        lines.append(f"  … and {len(files) - 10} more")
    limit = "" if cfg.run.limit is None else f" (run.limit={cfg.run.limit} of {plan['input_records']})"
    sizes = plan["shard_rows"]
    lines.append(
        f"records: {plan['records']}{limit} -> {len(sizes)} shard(s) of {min(sizes, default=0)}-"
        f"{max(sizes, default=0)} records, {human(max(plan['shard_bytes'], default=0))} at most per shard"
    )
    n_dups = sum(len(v) for v in plan["duplicates"].values())
    lines.append(
        f"duplicate source_ids: {n_dups} (quarantined as duplicate_id; the first occurrence is kept)"
    )
    lines += [f"warning: {w}" for w in plan["warnings"]]
    sample = first_records(cfg, plan, max(rows, SAMPLE), meter)
    errors = Counter(r["input_error"]["reason"] for r in sample if r.get("input_error"))
    ok = [r for r in sample if not r.get("input_error")]
    lines.append(f"first {len(sample)} records of shard 0:")
    lines.append(
        "  task types: "
        + (", ".join(f"{k}={v}" for k, v in Counter(r["task_type"] for r in ok).most_common()) or "-")
    )
    lines.append(
        "  exchanges per sample: "
        + (
            ", ".join(f"{k}={v}" for k, v in sorted(Counter(len(r["conversation"]) // 2 for r in ok).items()))
            or "-"
        )
    )
    lines.append(
        "  images per sample: "
        + (", ".join(f"{k}={v}" for k, v in sorted(Counter(len(r["images"]) for r in ok).items())) or "-")
    )
    lines.append(
        "  quarantined by the adapter: " + (", ".join(f"{k}={v}" for k, v in errors.most_common()) or "none")
    )
    for i, r in enumerate(sample[:rows]):
        lines.append(f"[{i}] source_id={r['source_id']} task_type={r['task_type']} source={r['source']}")
        if r.get("input_error"):
            lines.append(f"    quarantined: {r['input_error']['reason']}: {r['input_error']['detail']}")
            continue
        lines += [f"    image: {image_note(b)}" for b in r["images"]]
        lines += [f"    {t['role']}: {clip(t['content'])}" for t in r["conversation"]]
    lines.append(f"bytes read for this sample: {human(meter.bytes)} (plan scans not counted)")
    return "\n".join(lines)

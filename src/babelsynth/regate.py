"""`babelsynth regate`: re-apply changed gate thresholds to a finished run, without any model call.

An operation on top of the runner: it checks that only `score.gates` (and `cache_dir`) differ from the
config the run was made with, keeps the old manifest under _stages/regate/, and commits again; commit's
run-level gating (gating.run_gates) rewrites the kept/rejected sets of every shard whose outcome changes,
and the accounting reconciles as for any run.
"""

from __future__ import annotations

import json
import time

from babelsynth import redaction, runner, storage
from babelsynth.config import RunConfig

MAY_DIFFER = ("score.gates", "cache_dir")


def config_diff(a: dict, b: dict, prefix: str = "", may_differ: tuple[str, ...] = MAY_DIFFER) -> list[str]:
    """Dotted keys whose values differ between two dumped configs, except those under `may_differ`."""
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        if key in may_differ:
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{key}.", may_differ)
        elif va != vb:
            out.append(key)
    return out


def regate(cfg: RunConfig, run_id: str) -> dict:
    """Re-apply cfg's gates to a finished run: rewrite kept/rejected sets, counts and the manifest.

    Only `score.gates` (and `cache_dir`) may differ from the config the run was made with. Returns the
    new manifest."""
    lay = runner.layout(cfg, run_id)
    if lay.has_manifest():
        old = lay.read_manifest()
    else:  # a regate that stopped half way: the manifest it moved away is the reference
        prev = lay.previous_manifests()
        if not prev:
            raise RuntimeError(
                f"run {run_id} has no manifest.json under {lay.root}: it is not finished; commit it first"
            )
        old = json.loads(storage.read_bytes(prev[-1]))
    diff = config_diff(
        old["config"], redaction.redact(cfg.model_dump(mode="json"), redaction.secret_values(cfg))
    )
    if diff:
        raise ValueError(f"regate only re-applies score.gates; the config differs from the run's in: {diff}")
    if lay.has_manifest():  # keep the old manifest, then unpublish it: the run is unfinished until commit
        lay.unpublish_manifest(int(time.time() * 1000))
    new = runner.commit(cfg, run_id)
    runner.report(cfg, run_id)  # the report shows the new gates
    listed = {f["path"] for f in new["files"]}
    for f in old["files"]:  # e.g. an images part no longer needed
        if f["path"] not in listed:
            lay.delete(f["path"])
    return new

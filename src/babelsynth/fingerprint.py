"""What a re-triggered run may reuse: the config keys each part of a run depends on, hashed leaf by leaf.

Each stage declares the config keys it depends on next to its code (`Stage.config`); its result records a
hash per leaf of those keys and of every upstream stage's (a stage's output depends on its input too), so
a changed key can be named. The plan records the keys that decide the shards. On a re-trigger of the same
run id with another config:

* keys that decide the shards (PLAN_KEYS) or feed a model stage (recaption, judge, translate, rephrase)
  changed: refused before any work, naming the keys. Those results cost GPU hours and may already have
  been read; use a new run id (answers already in the cache are reused, so only what changed is asked).
* only keys of a stage marked `redo_on_change` (score: QE model, selection margin) changed: that stage is
  redone from the stored upstream results, then write and commit follow.
* only COMMIT_KEYS (gate thresholds and modes) changed: commit re-applies the gates to the stored scores
  (gating.run_gates), without any model call, and publishes a new manifest.

Fields that change how a model is reached but not what it answers (URLs, key names, concurrency, retries,
batching, devices) are in no fingerprint: a resumed run may use another server or worker.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from babelsynth.config import RunConfig

PLAN_KEYS = ("input_uri", "input", "run.limit", "run.shard_size", "run.max_shards")
COMMIT_KEYS = ("score.gates",)
TRANSPORT = frozenset(
    {
        "base_url",
        "api_key_env",
        "max_concurrency",
        "timeout_s",
        "max_retries",
        "backoff_s",
        "python",
        "startup_timeout_s",
        "max_restarts",
        "batch_size",
        "kv_cache_memory_bytes",
        "device",
        "gpus",
        "inter_threads",
        "intra_threads",
        "max_batch_tokens",
    }
)


class ConfigDriftError(ValueError):
    """A run id was re-triggered with a config its stored results were not made with."""


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            if prefix.startswith("models.") and k in TRANSPORT:
                continue
            _flatten(v, f"{prefix}.{k}", out)
    else:
        out[prefix] = value


def leaves(cfg: RunConfig, keys: tuple[str, ...] | list[str]) -> dict[str, str]:
    """{dotted leaf key: short hash of its value} for every leaf under `keys` (values are never stored:
    a config may carry things that are nobody's business in a result file)."""
    dump = cfg.model_dump(mode="json")
    flat: dict[str, Any] = {}
    for key in keys:
        node: Any = dump
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        _flatten(node, key, flat)
    return {
        k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:12] for k, v in flat.items()
    }


def drift(stored: dict[str, str], current: dict[str, str]) -> list[str]:
    """The leaf keys whose value differs, appeared or disappeared."""
    return sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))


def under(key: str, roots) -> bool:
    return any(key == r or key.startswith(r + ".") for r in roots)


def stage_keys(stages, name: str) -> tuple[str, ...]:
    """The config keys a stage's result depends on: its own and every upstream stage's."""
    out: list[str] = []
    for s in stages:
        out += [k for k in s.config if k not in out]
        if s.name == name:
            return tuple(out)
    raise ValueError(f"unknown stage {name!r}")


def run_keys(stages) -> tuple[str, ...]:
    """Every fingerprinted key of a run: plan, stages, commit."""
    out = list(PLAN_KEYS) + [k for k in stage_keys(stages, stages[-1].name) if k not in PLAN_KEYS]
    return tuple(out + [k for k in COMMIT_KEYS if k not in out])


def redo_keys(stages) -> set[str]:
    """Leaf keys whose change is repaired by redoing stages (no model stage) or by commit: the config keys of
    `redo_on_change` stages that no other stage depends on, and COMMIT_KEYS."""
    fixed = {k for s in stages if not s.redo_on_change for k in s.config}
    return {k for s in stages if s.redo_on_change for k in s.config if not under(k, fixed)} | set(COMMIT_KEYS)


def refused(changed: list[str], stages) -> list[str]:
    """The changed leaf keys a resume cannot repair by redoing work (see the module docstring)."""
    redo = redo_keys(stages)
    return [k for k in changed if not under(k, redo)]


def explain(run_id: str, what: str, keys: list[str], stages=()) -> str:
    """The refusal message: which keys, which results, and the ways out."""
    users = [s.name for s in stages if any(under(k, s.config) for k in keys)]
    return (
        f"run {run_id} was made with another config: {', '.join(keys)} differ from the values its {what} "
        f"{'were' if what.endswith('s') else 'was'} made with"
        + (f" (stages {', '.join(users)})" if users else "")
        + ". Re-trigger it with the config it was made with, or start a new run id: answers already in the "
        "cache are reused, so only what changed is asked again. Gate thresholds (score.gates) may change "
        "on a re-trigger: commit re-applies them without any model call."
    )

"""Shared pieces of the stages: the per-shard context with lazily built backends, results, rejects."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from babelsynth.cache import Cache
from babelsynth.config import RunConfig


@dataclass
class StageResult:
    rows: list[dict]
    rejected: list[dict] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    cfg: RunConfig
    run_id: str
    shard: int
    cache: Cache
    images: Callable[[], dict[str, bytes]] = lambda: {}
    _backends: dict[str, Any] = field(default_factory=dict)

    def _get(self, name: str, build: Callable[[], Any]) -> Any:
        if name not in self._backends:
            self._backends[name] = build()
        return self._backends[name]

    def chat(self, role: str):
        from babelsynth.backends.chat import make_chat_client  # by the backend's `kind`

        return self._get(role, lambda: make_chat_client(getattr(self.cfg.models, role), self.cache))

    def translator(self):
        from babelsynth.backends.nllb_ct2 import NLLBTranslator

        return self._get("translator", lambda: NLLBTranslator(self.cfg.models.translator, self.cache))

    def comet(self):
        from babelsynth.backends.comet_qe import CometScorer

        return self._get("comet", lambda: CometScorer(self.cfg.models.comet, self.cache))


def reject(row: dict, stage: str, reason: str, detail: str = "") -> dict:
    record = {k: v for k, v in row.items() if not isinstance(v, bytes)}
    return {
        "source_id": row.get("source_id") or "<missing>",
        "lang": row.get("lang"),
        "stage": stage,
        "reason": reason,
        "detail": detail,
        "record": json.dumps(record, ensure_ascii=False, default=str),
    }


def stable_seed(*parts: Any) -> int:
    return int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:8], 16)

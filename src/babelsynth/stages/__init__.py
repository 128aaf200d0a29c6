"""The pipeline stages, in pipeline order. Each module exports its `STAGE` (name, fn, reads, writes).

Units: ingest, recaption and judge count English records; translate and later count (record, language).
"""

from __future__ import annotations

from babelsynth.stages import ingest, judge, recaption, rephrase, score, translate
from babelsynth.stages.base import Context, Stage, StageResult, flag_or_reject, identity, reject

__all__ = [
    "BY_NAME",
    "STAGES",
    "STAGE_NAMES",
    "Context",
    "Stage",
    "StageResult",
    "flag_or_reject",
    "identity",
    "reject",
]

STAGES: tuple[Stage, ...] = tuple(m.STAGE for m in (ingest, recaption, judge, translate, rephrase, score))
STAGE_NAMES = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}

"""The pipeline stages, in pipeline order. Each module exports its `STAGE` (name, fn, reads, writes).

Units: ingest, safety_pre, recaption, safety_post and judge count English records; translate and later
count (record, language).
"""

from __future__ import annotations

from babelsynth.stages import ingest, judge, recaption, rephrase, safety, score, translate
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

STAGES: tuple[Stage, ...] = (
    ingest.STAGE,
    safety.STAGE_PRE,  # works when safety.position is before_recaption, else passes rows through
    recaption.STAGE,
    safety.STAGE_POST,  # ... after_recaption
    judge.STAGE,
    translate.STAGE,
    rephrase.STAGE,
    safety.STAGE_OUTPUT,  # every translated output
    score.STAGE,
)
STAGE_NAMES = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}

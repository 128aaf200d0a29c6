"""The pipeline stages. Each is a function over one shard's rows with declared reads/writes columns.

Stages never touch storage: the runner loads their input, gives them a context with lazily built
backends, and writes what they return (kept rows, rejected rows with a reason code, stats).
Units: ingest, recaption and judge count English records; translate and later count (record, lang).
One file per stage; this module is the registry (its order is the pipeline order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from babelsynth.stages import ingest, judge, recaption, rephrase, score, translate
from babelsynth.stages.base import Context, StageResult, reject

__all__ = ["BY_NAME", "STAGES", "STAGE_NAMES", "Context", "Stage", "StageResult", "reject"]


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[[Context, list[dict]], StageResult]
    reads: tuple[str, ...]
    writes: tuple[str, ...]


STAGES: tuple[Stage, ...] = (
    Stage("ingest", ingest.ingest, ingest.READS, ingest.WRITES),
    Stage("recaption", recaption.recaption, recaption.READS, recaption.WRITES),
    Stage("judge", judge.judge, judge.READS, judge.WRITES),
    Stage("translate", translate.translate, translate.READS, translate.WRITES),
    Stage("rephrase", rephrase.rephrase, rephrase.READS, rephrase.WRITES),
    Stage("score", score.score, score.READS, score.WRITES),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}

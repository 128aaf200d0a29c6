"""What every stage shares: the Stage record, its result, the per-shard context, rejects and row identity.

A stage is a function over one shard's rows. It never touches storage: the runner loads its input, gives
it a context with lazily built backends, checks what it read, wrote and dropped against its declaration,
and persists the result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from babelsynth.cache import Cache
from babelsynth.config import Mode, RunConfig
from babelsynth.languages import SOURCE_LANG

MISSING_ID = "<missing>"
Key = tuple[str, str]


def identity(row: dict) -> Key:
    """(source_id, lang) of a row or a rejected row: the unit every stage accounts for.

    Rows before translation carry no lang: they are English. Bookkeeping, not a read of the stage's:
    `dict.get` bypasses the runner's read tracking."""
    return (dict.get(row, "source_id") or MISSING_ID, dict.get(row, "lang") or SOURCE_LANG)


@dataclass
class StageResult:
    """What a stage returns for one shard.

    `counted_in` is the identities the stage took responsibility for, when that is not simply its input
    (translate expands one English row into (row, language) jobs and counts them from the jobs, never from
    its output). `artifacts` are extra tables the runner stores beside the result: {name: (schema, rows)}.
    `stats` are stage-specific counters that the manifest adds up. `errors` is how many rows ended in a
    request error (a server refusing that one request); the runner fails the task instead of writing when
    they pass run.max_error_rate."""

    rows: list[dict]
    rejected: list[dict] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    counted_in: list[Key] | None = None
    artifacts: dict[str, tuple[str, list[dict]]] = field(default_factory=dict)
    errors: int = 0


@dataclass(frozen=True)
class Stage:
    """A stage as the registry and the runner see it. `reads`/`writes` are enforced on every shard.

    `config`: the dotted config keys the stage's output depends on; its result records their fingerprint
    (babelsynth/fingerprint.py), so a re-trigger with other values is refused naming them, or, for a stage
    with `redo_on_change` (no generative model in it), redone. `section`: its config section, when not
    named after it (the safety stages share `safety`). `active`: whether the config runs it at all (None:
    always); an inactive stage writes no result and the next one reads the last active one's."""

    name: str
    fn: Callable[[Context, list[dict]], StageResult]
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    config: tuple[str, ...] = ()
    redo_on_change: bool = False
    section: str | None = None
    active: Callable[[RunConfig], bool] | None = None

    @property
    def config_section(self) -> str:
        return self.section or self.name


@dataclass
class Context:
    cfg: RunConfig
    run_id: str
    shard: int
    cache: Cache
    artifact: Callable[[str, str], Any] = lambda stage, name: None
    backends: dict[str, Any] = field(default_factory=dict)  # built on first use; tests may put their own

    def _get(self, name: str, build: Callable[[], Any]) -> Any:
        if name not in self.backends:
            self.backends[name] = build()
        return self.backends[name]

    def chat(self, role: str):
        from babelsynth.backends.registry import make_chat_client  # by the backend's `kind`

        return self._get(role, lambda: make_chat_client(getattr(self.cfg.models, role), self.cache))

    def translator(self):
        from babelsynth.backends.nllb_ct2 import NLLBTranslator

        return self._get("translator", lambda: NLLBTranslator(self.cfg.models.translator, self.cache))

    def llm_translator(self):
        """The translate stage's llm backend: models.llm_translator behind the prompt of translate.llm."""
        from babelsynth.backends.llm_translate import LLMTranslator
        from babelsynth.backends.registry import make_chat_client

        return self._get(
            "llm_translator",
            lambda: LLMTranslator(
                make_chat_client(self.cfg.models.llm_translator, self.cache), self.cfg.translate.llm
            ),
        )

    def text_classifier(self):
        from babelsynth.backends.text_classifier import TextClassifier

        return self._get("text_classifier", lambda: TextClassifier(self.cfg.models.toxicity))

    def comet(self):
        from babelsynth.backends.comet_qe import CometScorer

        return self._get("comet", lambda: CometScorer(self.cfg.models.comet, self.cache))


def reject(row: dict, stage: str, reason: str, detail: str = "") -> dict:
    """A rejected row: identity, stage, reason code, detail, and the record as JSON (bytes left out)."""
    record = {k: v for k, v in row.items() if not isinstance(v, bytes)}
    return {
        "source_id": identity(row)[0],
        "lang": dict.get(row, "lang"),
        "stage": stage,
        "reason": reason,
        "detail": detail,
        "record": json.dumps(record, ensure_ascii=False, default=str),
    }


def flag_or_reject(
    row: dict,
    stage: str,
    problems: list[tuple[str, str]],
    mode: Mode | Callable[[str], Mode],
    flags_col: str = "filter_flags",
) -> tuple[dict | None, dict | None]:
    """The one enforce/report switch of every rule and gate (datatrove's keep-or-drop-with-a-reason).

    `problems` are (reason code, detail). Report mode keeps the row with the codes appended to `flags_col`;
    enforce mode drops it with the first enforced code as reason. `mode` may be per reason (the gates).
    Returns (kept row, None) or (None, rejected row)."""
    mode_of = mode if callable(mode) else (lambda _reason: mode)
    enforced = [(code, detail) for code, detail in problems if mode_of(code) == "enforce"]
    reported = [code for code, _ in problems if mode_of(code) != "enforce"]
    if not problems:
        return row, None
    flagged = {**row, flags_col: [*(row.get(flags_col) or []), *(c for c, _ in problems)]}
    if enforced:  # the rejected record carries every code it was flagged with, enforced or not
        detail = enforced[0][1] or enforced[0][0]
        if len(enforced) > 1:
            detail += f" (also: {', '.join(c for c, _ in enforced[1:])})"
        return None, reject(flagged, stage, enforced[0][0], detail)
    return {**row, flags_col: [*(row.get(flags_col) or []), *reported]}, None


def stable_seed(*parts: Any) -> int:
    return int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:8], 16)

"""Validated run configuration (pydantic, extra="forbid"): errors surface at load, before any model loads.

A config is YAML; `${ENV}` references in strings are expanded at load; `overrides` take dotted keys
("models.teacher.base_url") so Airflow params and the CLI patch a config without copying it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from babelsynth.languages import AYA_TARGETS, validate_codes

Mode = Literal["enforce", "report"]
TASK_TYPES = (
    "captioning",
    "vqa",
    "ocr",
    "chart",
    "table",
    "reasoning",
    "textbook",
    "two_image_difference",
    "screenshot_code",
)


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OpenAIHTTPBackend(_Base):
    """Any OpenAI-compatible server: a vLLM server in production and in tests."""

    kind: Literal["openai_http"] = "openai_http"
    base_url: str
    model: str
    api_key_env: str | None = Field(None, description="env var holding the API key; never logged")
    max_concurrency: int = Field(16, ge=1, le=1024)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(4, ge=0, le=20)
    backoff_s: float = Field(0.5, ge=0)
    image_max_side: int = Field(1024, ge=16)

    @model_validator(mode="before")
    @classmethod
    def _no_connection_ids(cls, data: Any) -> Any:
        """The library reads no orchestrator's connections: it gets a URL and the name of a key variable."""
        if isinstance(data, dict) and "api_key_conn_id" in data:
            raise ValueError(
                "api_key_conn_id is no longer supported: keep the endpoint and key in an Airflow "
                "connection (babelsynth_teacher / babelsynth_llm), which the operators' "
                "BabelsynthEndpointHook turns into base_url and api_key_env, or set api_key_env to the env "
                "var holding the key"
            )
        return data


class VLLMOfflineBackend(_Base):
    """In-process `vllm.LLM` on a worker that owns its GPU. vLLM lives in its own venv, so the engine runs in
    a child process of that venv's python, fed JSON lines (backends/vllm_offline.py)."""

    kind: Literal["vllm_offline"] = "vllm_offline"
    model: str = Field(description="id recorded in outputs and cache keys (same role as a served model name)")
    path: str = Field(description="local HF model directory; never a hub id")
    python: str | None = Field(
        None, description="vLLM venv python; default $BABELSYNTH_VLLM_PYTHON or .venv-vllm"
    )
    max_model_len: int = Field(4096, ge=64)
    dtype: str = "auto"
    kv_cache_memory_bytes: int | None = Field(None, ge=1 << 20)
    limit_mm_per_prompt: dict[str, int] = Field(default_factory=lambda: {"image": 2})
    batch_size: int = Field(256, ge=1, description="requests per engine call; results are cached per call")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="more vllm.LLM keyword arguments")
    image_max_side: int = Field(1024, ge=16)
    startup_timeout_s: float = Field(900.0, gt=0)


ChatBackendConfig = Annotated[OpenAIHTTPBackend | VLLMOfflineBackend, Field(discriminator="kind")]


class CT2NLLBBackend(_Base):
    kind: Literal["ct2_nllb"] = "ct2_nllb"
    path: str = Field(description="CTranslate2 NLLB dir holding sentencepiece.bpe.model")
    model_id: str | None = Field(
        None, description="id recorded in outputs and cache keys; defaults to the dir name"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when a GPU is visible, else CPU"
    )
    compute_type: (
        Literal[
            "default",
            "auto",
            "int8",
            "int8_float32",
            "int8_float16",
            "int8_bfloat16",
            "int16",
            "float16",
            "bfloat16",
            "float32",
        ]
        | None
    ) = Field(None, description="default: int8_float16 on CUDA, int8 on CPU")
    beam_size: int = Field(4, ge=1, le=16)
    max_batch_tokens: int = Field(
        4096, ge=64, description="translate_batch max_batch_size with batch_type=tokens"
    )
    max_input_tokens: int = Field(
        200, ge=8, le=1024, description="longer segments are split, never truncated"
    )
    max_decoding_length: int = Field(256, ge=8, description="an output reaching it is flagged as truncated")
    inter_threads: int = Field(1, ge=1)
    intra_threads: int = Field(1, ge=0, description="1 per engine is fastest on a small CPU box")


class CometBackend(_Base):
    kind: Literal["comet"] = "comet"
    path: str = Field(description="local COMET checkpoint (.ckpt); never fetched from a hub")
    model_id: str | None = None
    batch_size: int = Field(32, ge=1)
    gpus: int | None = Field(None, description="None: 1 if CUDA is available else 0")


class ModelsConfig(_Base):
    teacher: ChatBackendConfig
    judge: ChatBackendConfig
    rephraser: ChatBackendConfig
    translator: CT2NLLBBackend
    comet: CometBackend


class RunSection(_Base):
    shard_size: int = Field(16, ge=1, le=100_000)
    max_shards: int = Field(256, ge=1, le=4096, description="fan-out bound; shards grow to respect it")
    languages: list[str] = Field(default_factory=lambda: list(AYA_TARGETS))
    language_ratio: float = Field(1.0, gt=0, le=1.0, description="share of the English pool per language")
    language_ratios: dict[str, float] = Field(default_factory=dict)
    seed: int = 0
    limit: int | None = Field(None, ge=1, description="use only the first N input records")

    @field_validator("languages")
    @classmethod
    def _langs(cls, v: list[str]) -> list[str]:
        return validate_codes(v)

    @model_validator(mode="after")
    def _ratios(self) -> RunSection:
        validate_codes(list(self.language_ratios))
        for k, r in self.language_ratios.items():
            if not 0 < r <= 1:
                raise ValueError(f"language_ratios[{k}] must be in (0, 1], got {r}")
        return self


class IngestSection(_Base):
    """Validation of raw records; a record that fails goes to quarantine with its reason."""

    max_text_chars: int = Field(8000, ge=16)


class RecaptionSection(_Base):
    """Teacher VLM recaption and the stage-1 rules (refusal, prompt echo, truncation, ...)."""

    mode: Mode = Field(
        "enforce", description="stage-1 rules: drop (enforce) or flag (report) after the last attempt"
    )
    max_regenerations: int = Field(2, ge=0, le=10, description="a flagged output is asked again, new seed")
    min_words: int = Field(3, ge=0)
    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    prompt_version: int = Field(1, ge=1)


class JudgeSection(_Base):
    """Stage-2 hallucination judge: a text LLM compares the recaption with the ground truth."""

    enabled: bool = True
    mode: Mode = "enforce"
    max_tokens: int = Field(256, ge=8)
    temperature: float = 0.0
    prompt_version: int = 1


class TranslateSection(_Base):
    mode: Mode = Field(
        "enforce",
        description="an output with a segment that hit the decoding limit or came back empty is dropped"
        " (enforce) or flagged (report)",
    )


class RephraseSection(_Base):
    enabled: bool = True
    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.3, ge=0)
    seed: int = 0
    prompt_version: int = 1
    keep_structure: bool = Field(
        True,
        description="a rephrase that loses a protected span (code, URL, "
        "placeholder) or changes the line structure of the draft keeps the draft",
    )


class Gate(_Base):
    mode: Mode = "enforce"


class CometGate(Gate):
    """Per language, the most specific rule wins: per_lang > per_lang_quantile > quantile > threshold.

    A quantile q drops the lowest q share of the language's QE scores over the whole run; it is resolved
    at commit (and by `babelsynth regate`) from the scored rows of every shard, never per shard."""

    threshold: float | None = Field(None, description="absolute minimum QE score for every language")
    per_lang: dict[str, float] = Field(default_factory=dict, description="absolute minimum per language")
    quantile: float | None = Field(None, ge=0, lt=1, description="run-level per-language quantile as minimum")
    per_lang_quantile: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_rule(self) -> CometGate:
        if self.threshold is not None and self.quantile is not None:
            raise ValueError("score.gates.comet: set threshold or quantile, not both")
        both = set(self.per_lang) & set(self.per_lang_quantile)
        if both:
            raise ValueError(f"score.gates.comet: {sorted(both)} in both per_lang and per_lang_quantile")
        validate_codes(list(self.per_lang) + list(self.per_lang_quantile))
        for k, q in self.per_lang_quantile.items():
            if not 0 <= q < 1:
                raise ValueError(f"score.gates.comet.per_lang_quantile[{k}] must be in [0, 1), got {q}")
        return self


class MTLDGate(Gate):
    min: float = Field(10.0, ge=0, description="MTLD floor of one document (the row's answer)")
    per_lang: dict[str, float] = Field(default_factory=dict, description="floor per language")
    min_tokens: int = Field(50, ge=1, description="below this MTLD is not meaningful and is not gated")


class LangIDGate(Gate):
    min_conf: float = Field(0.3, ge=0, le=1)
    min_chars: int = Field(20, ge=0, description="shorter texts (code and URLs removed) are exempt")


# Typical chars(translation) / chars(English) per language, x0.5 .. x2 (zh ~0.3, ja ~0.45, ko ~0.5).
_TYPICAL_LENGTH_RATIO = {
    "arb_Arab": 0.8,
    "ces_Latn": 0.9,
    "deu_Latn": 1.1,
    "ell_Grek": 1.1,
    "fra_Latn": 1.1,
    "heb_Hebr": 0.75,
    "hin_Deva": 1.0,
    "ind_Latn": 1.05,
    "ita_Latn": 1.05,
    "jpn_Jpan": 0.45,
    "kor_Hang": 0.5,
    "nld_Latn": 1.05,
    "pes_Arab": 0.85,
    "pol_Latn": 1.0,
    "por_Latn": 1.05,
    "ron_Latn": 1.05,
    "rus_Cyrl": 1.0,
    "spa_Latn": 1.1,
    "tur_Latn": 0.95,
    "ukr_Cyrl": 0.95,
    "vie_Latn": 1.0,
    "zho_Hans": 0.3,
    "zho_Hant": 0.3,
}


class LengthRatioGate(Gate):
    min: float = Field(0.3, gt=0, description="band for languages without a per_lang entry")
    max: float = Field(3.0, gt=0)
    per_lang: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {
            k: (round(v * 0.5, 3), round(v * 2.0, 3)) for k, v in _TYPICAL_LENGTH_RATIO.items()
        },
        description="[min, max] per language; the default covers the 23 targets (replace it whole to change)",
    )

    @model_validator(mode="after")
    def _bands(self) -> LengthRatioGate:
        for k, (lo, hi) in {"*": (self.min, self.max), **self.per_lang}.items():
            if not 0 < lo < hi:
                raise ValueError(
                    f"score.gates.length_ratio band for {k} must have 0 < min < max, got [{lo}, {hi}]"
                )
        validate_codes(list(self.per_lang))
        return self


class RepetitionGate(Gate):
    max: float = Field(0.5, ge=0, le=1, description="maximum repetition-loop score (metrics.repetition)")


class GatesSection(_Base):
    comet: CometGate = CometGate()
    mtld: MTLDGate = MTLDGate()
    langid: LangIDGate = LangIDGate()
    length_ratio: LengthRatioGate = LengthRatioGate()
    repetition: RepetitionGate = RepetitionGate()


class ScoreSection(_Base):
    """QE scoring, draft/rephrase selection and the quality gates (each gate enforce or report)."""

    selection_margin: float = Field(0.02, ge=0, description="keep rephrase unless its QE is worse by more")
    gates: GatesSection = GatesSection()


# Keys of older configs -> where they live now; an old file fails with the new name in the message.
RENAMED_KEYS = {
    "filter.rules.mode": "recaption.mode",
    "filter.rules.max_regenerations": "recaption.max_regenerations",
    "filter.rules.min_words": "recaption.min_words",
    "filter.judge": "judge",
    "filter.rules": "recaption (mode, max_regenerations, min_words)",
    "filter": "recaption (stage-1 rules) and judge",
    "gates": "score.gates",
    "translate.truncation": "translate.mode",
    "rephrase.selection_margin": "score.selection_margin",
    "run.max_text_chars": "ingest.max_text_chars",
}


def renamed_keys(data: dict) -> list[str]:
    """Messages for every old key present in a raw config dict (most specific first)."""
    out, seen = [], set()
    for old in sorted(RENAMED_KEYS, key=lambda k: -k.count(".")):
        node: Any = data
        for part in old.split("."):
            node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                break
        covered = any(s.startswith(old + ".") for s in seen)
        if node is not None and not covered:
            seen.add(old)
            out.append(f"config key '{old}' is now '{RENAMED_KEYS[old]}'")
    return out


class RunConfig(_Base):
    input_uri: str
    output_uri: str
    cache_dir: str = ".work/cache"
    run: RunSection = RunSection()
    models: ModelsConfig
    ingest: IngestSection = IngestSection()
    recaption: RecaptionSection = RecaptionSection()
    judge: JudgeSection = JudgeSection()
    translate: TranslateSection = TranslateSection()
    rephrase: RephraseSection = RephraseSection()
    score: ScoreSection = ScoreSection()

    @model_validator(mode="before")
    @classmethod
    def _no_old_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            problems = renamed_keys(data)
            if problems:
                raise ValueError("; ".join(problems))
        return data

    def fingerprint(self) -> str:
        """Hash of everything that changes outputs; stored in the manifest."""
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:16]


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(obj: Any) -> Any:
    """${VAR} and ${VAR:-default} in every string of a parsed YAML document; a missing VAR is an error."""
    if isinstance(obj, str):

        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ValueError(f"config references ${{{name}}} but it is not set in the environment")

        return _ENV.sub(sub, obj)
    if isinstance(obj, dict):
        return {k: expand_env(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [expand_env(v) for v in obj]
    return obj


def apply_overrides(data: dict, overrides: dict[str, Any] | None) -> dict:
    for key, value in (overrides or {}).items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return data


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load, expand ${ENV}, apply dotted overrides, validate. Raises ValueError with the field path."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    data = apply_overrides(expand_env(data), overrides)
    return RunConfig.model_validate(data)


def config_from_dict(data: dict) -> RunConfig:
    return RunConfig.model_validate(data)

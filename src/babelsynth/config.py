"""Validated run configuration (pydantic, extra="forbid"): errors surface at load, before any model loads.

A config is YAML; `${ENV}` references in strings are expanded at load; `overrides` take dotted keys
("models.teacher.base_url") so Airflow params and the CLI patch a config without copying it.
"""

from __future__ import annotations

import copy
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

# Task types whose images are documents, charts or screenshots: Aya Vision tiles an image into up to 12 crops
# of 364 px plus a thumbnail, so a page downscaled to 1024 px loses the detail its tiles exist for.
DOCUMENT_IMAGE_MAX_SIDE = {t: 2048 for t in ("ocr", "chart", "table", "textbook", "screenshot_code")}


def check_task_limits(v: dict[str, int]) -> dict[str, int]:
    unknown = sorted(set(v) - set(TASK_TYPES))
    if unknown:
        raise ValueError(
            f"image_max_side_by_task: unknown task type(s) {unknown}; task types are {TASK_TYPES}"
        )
    bad = {k: n for k, n in v.items() if n < 16}
    if bad:
        raise ValueError(f"image_max_side_by_task: sides must be >= 16, got {bad}")
    return v


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
    image_max_side: int = Field(1024, ge=16, description="longer image side sent to the model (photos)")
    image_max_side_by_task: dict[str, int] = Field(
        default_factory=lambda: dict(DOCUMENT_IMAGE_MAX_SIDE),
        description="per task type; documents, charts and screenshots keep their tiles' resolution",
    )
    revision: str | None = Field(None, description="model revision for the manifest and dataset card")

    @field_validator("image_max_side_by_task")
    @classmethod
    def _task_limits(cls, v: dict[str, int]) -> dict[str, int]:
        return check_task_limits(v)

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
    max_model_len: int | None = Field(
        None,
        ge=64,
        description="None: the model's own context (16k for Aya Vision 8B/32B). A recaption request holds up "
        "to 2 images (about 2.2k tokens each at 12 tiles + thumbnail), the prompt with its ground truth "
        "(ingest.max_text_chars / ~3 chars per token) and recaption.max_tokens: size it for that",
    )
    dtype: str = "auto"
    kv_cache_memory_bytes: int | None = Field(None, ge=1 << 20)
    limit_mm_per_prompt: dict[str, int] = Field(default_factory=lambda: {"image": 2})
    batch_size: int = Field(256, ge=1, description="requests per engine call; results are cached per call")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="more vllm.LLM keyword arguments")
    image_max_side: int = Field(1024, ge=16, description="longer image side sent to the model (photos)")
    image_max_side_by_task: dict[str, int] = Field(
        default_factory=lambda: dict(DOCUMENT_IMAGE_MAX_SIDE),
        description="per task type; documents, charts and screenshots keep their tiles' resolution",
    )
    revision: str | None = Field(None, description="model revision for the manifest and dataset card")
    startup_timeout_s: float = Field(900.0, gt=0)
    max_restarts: int = Field(
        1, ge=0, le=5, description="engine restarts within one task when it dies; then the task fails"
    )

    @field_validator("image_max_side_by_task")
    @classmethod
    def _task_limits(cls, v: dict[str, int]) -> dict[str, int]:
        return check_task_limits(v)


ChatBackendConfig = Annotated[OpenAIHTTPBackend | VLLMOfflineBackend, Field(discriminator="kind")]


class CT2NLLBBackend(_Base):
    """NLLB-200 converted by `ct2-transformers-converter` (docs/real-models.md).

    Device placement: `device_index` pins the GPU; unset, a process that sees one GPU uses it (a pod or a
    compose service given one device) and a process that sees several claims a free one for its lifetime
    (babelsynth.gpu), so the tasks of a GPU pool on one host never share cuda:0."""

    kind: Literal["ct2_nllb"] = "ct2_nllb"
    path: str = Field(
        description="CTranslate2 NLLB dir: model.bin + shared_vocabulary.json and the tokenizer, "
        "sentencepiece.bpe.model or else tokenizer.json"
    )
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
    device_index: int | None = Field(None, ge=0, description="CUDA device; unset: see the class docstring")
    beam_size: int = Field(4, ge=1, le=16)
    max_batch_tokens: int = Field(
        4096, ge=64, description="translate_batch max_batch_size with batch_type=tokens"
    )
    max_input_tokens: int = Field(
        128, ge=8, le=1024, description="longer segments are split at clause or word ends, never truncated"
    )
    max_decoding_length: int = Field(
        384,
        ge=8,
        description="an output reaching it is flagged as truncated; Greek, Devanagari, Arabic and Hebrew "
        "targets take up to ~2x the English token count, so keep it >= 2.5 x max_input_tokens",
    )
    inter_threads: int = Field(1, ge=1)
    revision: str | None = Field(None, description="model revision for the manifest and dataset card")
    intra_threads: int = Field(1, ge=0, description="1 per engine is fastest on a small CPU box")


class CometBackend(_Base):
    """A COMET checkpoint in the hub layout (<repo>/checkpoints/model.ckpt + <repo>/hparams.yaml).

    The checkpoint names its encoder by hub id (`microsoft/infoxlm-large` for wmt22-cometkiwi-da); only the
    encoder's config and tokenizer are read (the weights are in the checkpoint), offline: from `encoder_path`
    when set, else from the Hugging Face cache ($HF_HOME/hub). docs/real-models.md says what to download."""

    kind: Literal["comet"] = "comet"
    path: str = Field(description="local COMET checkpoint (.ckpt); never fetched from a hub")
    model_id: str | None = None
    encoder_path: str | None = Field(
        None, description="local dir with the encoder's config.json and tokenizer; default: the HF cache"
    )
    batch_size: int = Field(32, ge=1)
    gpus: int | None = Field(None, ge=0, description="0 or 1; None: 1 if CUDA is available else 0")
    revision: str | None = Field(None, description="model revision for the manifest and dataset card")
    device_index: int | None = Field(None, ge=0, description="CUDA device; unset: as the translator's")

    @field_validator("gpus")
    @classmethod
    def _one_device(cls, v: int | None) -> int | None:
        if v is not None and v > 1:
            raise ValueError(
                f"models.comet.gpus={v}: COMET on more than one GPU runs DDP, which ends its non-zero ranks "
                "with exit() inside the task; set 1 and scale with more score tasks (one GPU each)"
            )
        return v


class TextClassifierBackend(_Base):
    """A Hugging Face AutoModelForSequenceClassification dir (config.json, weights, tokenizer) read from a
    local path, never a hub id: multi-label, one sigmoid per label of its `id2label`, which must name
    safety.categories (a production multilingual toxicity classifier, or tinymodels/toxicity.py)."""

    kind: Literal["hf_sequence_classifier"] = "hf_sequence_classifier"
    path: str = Field(description="local model dir; never fetched from a hub")
    model_id: str | None = Field(None, description="id recorded in stats; defaults to the dir name")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(512, ge=8, description="tokens per text; longer texts are scored in windows")
    revision: str | None = Field(None, description="model revision for the manifest and dataset card")


class ModelsConfig(_Base):
    teacher: ChatBackendConfig
    judge: ChatBackendConfig
    rephraser: ChatBackendConfig
    translator: CT2NLLBBackend
    comet: CometBackend
    llm_translator: ChatBackendConfig | None = Field(
        None,
        description="instruction LLM of the translate stage's llm backend (translate.backend / per_lang)",
    )
    safety_judge: ChatBackendConfig | None = Field(
        None, description="VLM that judges images against the safety policy (safety.image)"
    )
    toxicity: TextClassifierBackend | None = Field(
        None, description="text classifier of the safety stages (safety.text, safety.outputs)"
    )


class RunSection(_Base):
    shard_size: int = Field(16, ge=1, le=100_000)
    max_shards: int = Field(256, ge=1, le=4096, description="fan-out bound; shards grow to respect it")
    languages: list[str] = Field(default_factory=lambda: list(AYA_TARGETS))
    language_ratio: float = Field(1.0, gt=0, le=1.0, description="share of the English pool per language")
    language_ratios: dict[str, float] = Field(default_factory=dict)
    seed: int = 0
    limit: int | None = Field(None, ge=1, description="use only the first N input records")
    max_error_rate: float = Field(
        0.1,
        ge=0,
        le=1,
        description="a stage whose rows end in request errors (a server refusing single requests) above this "
        "share fails its task instead of writing them as rejects",
    )
    min_errors_to_fail: int = Field(
        3, ge=1, description="...and at least this many: one refused record never fails a small shard"
    )

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


class InputSection(_Base):
    """How `input_uri` is read: which adapter (src/babelsynth/inputs/) turns its records into samples."""

    format: Literal["canonical", "cauldron", "messages", "llava", "webdataset"] = Field(
        "canonical",
        description="canonical: schemas/input.v2.yaml (or v1) Parquet; cauldron: HF Parquet with images + "
        "texts[{user, assistant, source}]; messages: HF Parquet with messages + images (TRL/LLaVA SFT sets); "
        "llava: LLaVA JSON/JSONL with conversations and image paths; webdataset: tar shards",
    )
    image_root: str | None = Field(
        None, description="llava: the folder image paths are relative to; default: the JSON file's folder"
    )
    task_type: str = Field("vqa", description="task type of records whose format carries none")
    task_types: dict[str, str] = Field(
        default_factory=dict, description="task type per record `source` (e.g. a Cauldron subset name)"
    )
    caption_prompt: str = Field(
        "Describe the image.", min_length=1, description="webdataset: the user turn of a bare caption (.txt)"
    )

    @model_validator(mode="after")
    def _task_types(self) -> InputSection:
        for where, t in [("input.task_type", self.task_type)] + [
            (f"input.task_types[{k}]", v) for k, v in self.task_types.items()
        ]:
            if t not in TASK_TYPES:
                raise ValueError(f"{where} is {t!r}; task types are {TASK_TYPES}")
        return self


ImageFormat = Literal["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]


class IngestSection(_Base):
    """Validation of raw records (babelsynth/validate.py); a record that fails goes to quarantine with its
    reason. Every limit is a reject reason of its own."""

    max_text_chars: int = Field(8000, ge=16)
    control_chars: Literal["strip", "reject"] = Field(
        "strip", description="C0/C1 controls, ANSI escapes, bidi overrides: removed, or the record rejected"
    )
    prompt_injection: Literal["reject", "off"] = Field(
        "reject", description="text that tries to instruct the teacher or the judge (chat tokens, our tags)"
    )
    image_formats: list[ImageFormat] = Field(
        default_factory=lambda: ["JPEG", "PNG", "WEBP", "GIF"], min_length=1, description="allow-list"
    )
    max_images: int = Field(2, ge=1, le=16, description="images per record")
    max_image_bytes: int = Field(20 << 20, ge=1024)
    max_image_pixels: int = Field(
        50_000_000, ge=64, le=1 << 31, description="width x height, checked from the header before decoding"
    )
    min_image_side: int = Field(8, ge=1)
    max_aspect_ratio: float = Field(50.0, ge=1)


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


TranslatorChoice = Literal["nllb", "llm", "both"]


class LLMTranslateSection(_Base):
    """The llm backend: one request per segment (same segmentation and protected spans as NLLB) through the
    versioned prompt translate/llm.v<N>; an answer without the tags falls back to NLLB for that segment."""

    prompt_version: int = Field(1, ge=1)
    max_tokens: int = Field(512, ge=16, description="per segment request")
    tokens_per_char: float | None = Field(
        2.0,
        gt=0,
        description="a request's max_tokens is at most this many tokens per source character plus 64 (a loop "
        "stops early and falls back to NLLB); None: max_tokens only",
    )
    temperature: float = Field(0.0, ge=0)
    seed: int = 0
    constrain_tags: bool = Field(
        True,
        description="ask the server (vLLM structured outputs) for an answer of the form "
        "<translation>...</translation> without raw < or >; off for servers without structured outputs",
    )


SAFETY_CATEGORIES = ("violence", "sexual", "hate", "self_harm", "illegal_activity", "personal_data")


class SafetySection(_Base):
    """The safety stages (stages/safety.py): a VLM judges the image against a versioned policy prompt, a
    text classifier scores the English text (`position`: before recaption, the ground truth; after, the
    recaption) and, in output_safety, every translated output. A row is dropped as `unsafe_<category>`
    when the judge says unsafe or a category's score reaches its threshold, unless the category is
    allow-listed. Off by default: it needs models.safety_judge and models.toxicity."""

    enabled: bool = False
    position: Literal["before_recaption", "after_recaption"] = Field(
        "after_recaption",
        description="before_recaption: stage safety_pre checks the image and the ground truth (no teacher "
        "call for an unsafe record); after_recaption: stage safety_post checks the image and the recaption",
    )
    categories: list[str] = Field(
        default_factory=lambda: list(SAFETY_CATEGORIES),
        min_length=1,
        description="the policy's categories: the judge's verdict enum and the classifier's labels",
    )
    image: bool = Field(True, description="judge images with models.safety_judge")
    text: bool = Field(True, description="score the English text with models.toxicity")
    outputs: bool = Field(True, description="output_safety: score every translated output (draft, rephrase)")
    prompt_version: int = Field(1, ge=1, description="prompts/safety/image_policy.v<N>.yaml")
    max_tokens: int = Field(
        512,
        ge=64,
        description="verdict tokens: its rationale is capped at 200 characters by the schema, so even one "
        "token per character ends well within it (a verdict cut short would fail the task)",
    )
    threshold: float = Field(0.5, gt=0, le=1, description="classifier score that drops, for every category")
    thresholds: dict[str, float] = Field(default_factory=dict, description="per category, over `threshold`")
    allow_categories: list[str] = Field(
        default_factory=list, description="allow-list: categories that never drop a row (still counted)"
    )

    @model_validator(mode="after")
    def _known(self) -> SafetySection:
        for where, names in (
            ("thresholds", list(self.thresholds)),
            ("allow_categories", self.allow_categories),
        ):
            unknown = sorted(set(names) - set(self.categories))
            if unknown:
                raise ValueError(
                    f"safety.{where}: unknown categories {unknown}; categories are {self.categories}"
                )
        bad = {k: v for k, v in self.thresholds.items() if not 0 < v <= 1}
        if bad:
            raise ValueError(f"safety.thresholds must be in (0, 1], got {bad}")
        return self

    def threshold_of(self, category: str) -> float:
        return self.thresholds.get(category, self.threshold)


class TranslateSection(_Base):
    mode: Mode = Field(
        "enforce",
        description="an output with a segment that hit the decoding limit or came back empty is dropped"
        " (enforce) or flagged (report)",
    )
    backend: TranslatorChoice = Field(
        "nllb",
        description="nllb (CTranslate2 NLLB), llm (models.llm_translator, NLLB where its answer is unusable) "
        "or both (per segment, the candidate with the higher COMET QE score)",
    )
    per_lang: dict[str, TranslatorChoice] = Field(
        default_factory=dict, description="backend per language code, over `backend`"
    )
    llm: LLMTranslateSection = LLMTranslateSection()

    @field_validator("per_lang")
    @classmethod
    def _codes(cls, v: dict[str, str]) -> dict[str, str]:
        validate_codes(list(v))
        return v

    def backend_for(self, lang: str) -> str:
        return self.per_lang.get(lang, self.backend)


class RephraseSection(_Base):
    enabled: bool = True
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="None: 2 x recaption.max_tokens (a translation of the longest answer takes more "
        "tokens than the English); never below recaption.max_tokens, or long answers keep the draft",
    )
    tokens_per_char: float | None = Field(
        2.0,
        gt=0,
        description="a request's max_tokens is at most this many tokens per character of the longer of "
        "source and draft, plus 64: an answer that long is a loop (it keeps the draft, as truncated) and "
        "would hold a server slot up to max_tokens; None: max_tokens only",
    )
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


# ------------------------------------------------------------------ run-level sections (no stage's output)
class Throughput(_Base):
    """Per-GPU speed of one engine, as the estimate divides work by it. `source` says where it comes from."""

    unit: Literal["output_tokens", "pairs"]
    per_second: float = Field(gt=0)
    gpus_per_replica: int = Field(1, ge=1, description="GPUs one replica holds (tensor parallel size)")
    source: str = Field(description="the published benchmark (or measurement) behind per_second")


_DATATROVE = (
    "vLLM 0.15 offline, Qwen3-8B on one H100 80GB, baseline: 6338 output tok/s "
    "(github.com/huggingface/datatrove/blob/main/examples/inference/benchmark/README.md); text-only 8B: "
    "image prefill and larger models are slower, replace with your measurement"
)


class ThroughputSection(_Base):
    teacher: Throughput = Throughput(unit="output_tokens", per_second=6338.0, source=_DATATROVE)
    judge: Throughput = Throughput(unit="output_tokens", per_second=6338.0, source=_DATATROVE)
    rephraser: Throughput = Throughput(unit="output_tokens", per_second=6338.0, source=_DATATROVE)
    translator: Throughput = Throughput(
        unit="output_tokens",
        per_second=4927.5,
        source="CTranslate2 NLLB, batch 64: 197.1 sentences/s (github.com/OpenNMT/CTranslate2/issues/1140; "
        "model size and GPU not stated there) x 25 tokens per sentence (our assumption): replace with your "
        "measurement",
    )
    llm_translator: Throughput = Throughput(unit="output_tokens", per_second=6338.0, source=_DATATROVE)
    safety_judge: Throughput = Throughput(unit="output_tokens", per_second=6338.0, source=_DATATROVE)
    comet: Throughput = Throughput(
        unit="pairs",
        per_second=1000.0,
        source="ASSUMPTION, no published GPU figure for CometKiwi (github.com/Unbabel/COMET/issues/5 reports "
        "400 segments in 30-40 min on CPU): replace with your measurement",
    )


class EstimateSection(_Base):
    """`babelsynth estimate` and the plan's budget check: tokens, model calls and GPU-hours per stage from a
    sample of the input, before any model call. Defaults are the paper's averages (arXiv 2505.08751)."""

    sample_records: int = Field(256, ge=1, description="input records read (evenly spaced) to estimate from")
    chars_per_token: float = Field(4.0, gt=0, description="tokens of a text = ceil(chars / chars_per_token)")
    image_tokens: int = Field(
        2197, ge=0, description="prompt tokens per image (Aya Vision 8B: up to 13 tiles x 169)"
    )
    recaption_tokens: float = Field(
        140.8, gt=0, description="expected recaption length in tokens (paper 2.2: 27.2 -> 140.8)"
    )
    judge_keep: float = Field(0.968, ge=0, le=1, description="share passing the judge (paper: 3.2% flagged)")
    throughput: ThroughputSection = ThroughputSection()
    gpu_hour_price: float | None = Field(None, ge=0, description="price of one GPU-hour (any currency)")
    max_gpu_hours: float | None = Field(None, gt=0, description="budget cap: plan refuses a larger run")
    max_cost: float | None = Field(None, gt=0, description="budget cap in gpu_hour_price units")

    @model_validator(mode="after")
    def _cost_needs_price(self) -> EstimateSection:
        if self.max_cost is not None and self.gpu_hour_price is None:
            raise ValueError("estimate.max_cost needs estimate.gpu_hour_price (the price of one GPU-hour)")
        return self


GATE_NAMES = tuple(GatesSection.model_fields)
ALARM_METRICS = ("rows", "kept_share", "comet_final", "mtld", *(f"pass_rate.{g}" for g in GATE_NAMES))


class Alarm(_Base):
    """One rule on a per-language metric of a committed run: fires when the metric drops by more than
    max_drop (absolute) or max_drop_relative (share of the previous run's value), or falls below min."""

    metric: str = Field(description=f"one of {ALARM_METRICS}")
    lang: str = Field("*", description="'*': every language on its own; 'all': the run as a whole; or a code")
    max_drop: float | None = Field(None, ge=0)
    max_drop_relative: float | None = Field(None, ge=0, le=1)
    min: float | None = None
    action: Literal["warn", "fail"] = "warn"

    @model_validator(mode="after")
    def _rule(self) -> Alarm:
        if self.metric not in ALARM_METRICS:
            raise ValueError(f"nightly.alarms: unknown metric {self.metric!r}; metrics are {ALARM_METRICS}")
        if self.max_drop is None and self.max_drop_relative is None and self.min is None:
            raise ValueError(
                f"nightly.alarms ({self.metric}): set max_drop, max_drop_relative or min, else it never fires"
            )
        if self.lang not in ("*", "all"):
            validate_codes([self.lang])
        return self


class NightlySection(_Base):
    """Living with a nightly schedule: comparison with the previous committed run, alarms, the `latest`
    pointer under output_uri (moved only by a run whose alarms pass) and retention of old runs."""

    series: str | None = Field(
        None,
        description="runs compared with each other under output_uri; default: the DAG id (CLI: 'default')",
    )
    baseline: Literal["previous", "latest"] = Field(
        "previous", description="previous: the last committed run; latest: the run `latest` names"
    )
    alarms: list[Alarm] = Field(
        default_factory=lambda: [
            Alarm(metric="comet_final", max_drop=0.02),
            Alarm(metric="kept_share", max_drop=0.05),
        ]
    )
    keep_last: int | None = Field(
        None, ge=1, description="retention: keep the last K committed runs (and the one `latest` names)"
    )


class CardSection(_Base):
    """What the dataset card says about the release (dataset_card.md per run)."""

    pretty_name: str = "babelsynth synthetic multilingual image-text instructions"
    license: str = Field(
        "cc-by-nc-4.0", description="Hugging Face license id; NLLB-200 weights are CC-BY-NC 4.0"
    )


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
    input_uri: str | list[str] = Field(
        description="a file, a directory, a glob or a list of them; local paths or s3:// URIs"
    )
    output_uri: str
    cache_dir: str = ".work/cache"
    run: RunSection = RunSection()
    models: ModelsConfig
    input: InputSection = InputSection()
    ingest: IngestSection = IngestSection()
    recaption: RecaptionSection = RecaptionSection()
    judge: JudgeSection = JudgeSection()
    safety: SafetySection = SafetySection()
    translate: TranslateSection = TranslateSection()
    rephrase: RephraseSection = RephraseSection()
    score: ScoreSection = ScoreSection()
    estimate: EstimateSection = EstimateSection()
    nightly: NightlySection = NightlySection()
    card: CardSection = CardSection()

    @model_validator(mode="before")
    @classmethod
    def _no_old_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            problems = renamed_keys(data)
            if problems:
                raise ValueError("; ".join(problems))
        return data

    @model_validator(mode="after")
    def _llm_translator(self) -> RunConfig:
        """A language translated by the llm backend needs its model."""
        llm = [lg for lg in self.run.languages if self.translate.backend_for(lg) != "nllb"]
        if llm and self.models.llm_translator is None:
            raise ValueError(
                f"translate: {llm[:3]}{'...' if len(llm) > 3 else ''} use the llm backend but "
                "models.llm_translator is not set"
            )
        return self

    @model_validator(mode="after")
    def _rephrase_room(self) -> RunConfig:
        """A rephrase shorter than the answer it rewrites is cut at the limit and silently keeps the draft."""
        if self.rephrase.max_tokens is None:
            self.rephrase.max_tokens = 2 * self.recaption.max_tokens
        elif self.rephrase.max_tokens < self.recaption.max_tokens:
            raise ValueError(
                f"rephrase.max_tokens={self.rephrase.max_tokens} is below recaption.max_tokens="
                f"{self.recaption.max_tokens}: answers longer than it can never be rephrased; set it to at "
                f"least {self.recaption.max_tokens} or leave it unset (2 x recaption.max_tokens)"
            )
        return self

    @model_validator(mode="after")
    def _safety_models(self) -> RunConfig:
        """An enabled safety check without its model would fail in the middle of a run: fail at load."""
        sc, missing = self.safety, []
        if sc.enabled and sc.image and self.models.safety_judge is None:
            missing.append("models.safety_judge (safety.image)")
        if sc.enabled and (sc.text or sc.outputs) and self.models.toxicity is None:
            missing.append("models.toxicity (safety.text / safety.outputs)")
        if missing:
            raise ValueError(f"safety.enabled needs {', '.join(missing)}; or turn those checks off")
        return self

    def fingerprint(self) -> str:
        """Hash of everything that changes outputs; stored in the manifest. The run-level sections (estimate,
        nightly, card) change no row, so a new alarm or budget does not make a run look different."""
        data = self.model_dump(exclude=set(RUN_LEVEL_SECTIONS))
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


RUN_LEVEL_SECTIONS = ("estimate", "nightly", "card")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(obj: Any, strict: bool = True) -> Any:
    """${VAR} and ${VAR:-default} in every string of a parsed YAML document; a missing VAR is an error
    (strict) or stays as written (strict=False: checks report every missing variable, not the first)."""
    if isinstance(obj, str):

        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            if not strict:
                return m.group(0)
            raise ValueError(f"config references ${{{name}}} but it is not set in the environment")

        return _ENV.sub(sub, obj)
    if isinstance(obj, dict):
        return {k: expand_env(v, strict) for k, v in obj.items()}
    if isinstance(obj, list):
        return [expand_env(v, strict) for v in obj]
    return obj


def missing_env(obj: Any, where: str = "") -> dict[str, list[str]]:
    """Unset variables referenced without a default -> the dotted keys that reference them."""
    out: dict[str, list[str]] = {}
    if isinstance(obj, str):
        for m in _ENV.finditer(obj):
            if m.group(1) not in os.environ and m.group(2) is None:
                out.setdefault(m.group(1), []).append(where or "<root>")
    elif isinstance(obj, dict | list):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for k, v in items:
            for name, keys in missing_env(v, f"{where}.{k}" if where else str(k)).items():
                out.setdefault(name, []).extend(keys)
    return out


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


def drop_overridden(data: dict, overrides: dict[str, Any] | None) -> dict:
    """A copy of `data` without the values that overrides replace, so their ${ENV} is never expanded: a pod
    given `models.teacher.base_url` on its command line needs no VLLM_TEACHER_URL in its environment."""
    out = copy.deepcopy(data)
    for key in overrides or {}:
        node: Any = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return out


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load, expand ${ENV} (except in values an override replaces), apply dotted overrides, validate.

    Raises ValueError with the field path."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    data = apply_overrides(expand_env(drop_overridden(data, overrides)), overrides)
    return RunConfig.model_validate(data)


def config_from_dict(data: dict) -> RunConfig:
    return RunConfig.model_validate(data)

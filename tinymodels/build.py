"""Build every tiny model under one root, each cached on its own digest.

A builder's digest covers what can change its output: its config, the source of its own module and of the
modules it uses (corpus, common, the weight-name mapping for Aya), the corpus text, the versions of the
libraries it runs, and (for a builder whose output embeds an absolute path, `located`) its final location.
So editing the COMET builder rebuilds COMET alone. Each model is built into ``root/.<name>.tmp-*``, verified
by its builder, and renamed into place with a stamp file, so a crash never leaves a valid-looking half model;
a file lock (``root/.build.lock``) serialises concurrent callers (e.g. pytest-xdist workers).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

from babelsynth import languages, paths, prompts
from babelsynth.train import weights
from tinymodels import aya, aya_echo, comet, common, corpus, nllb, nllb_copy, toxicity

STAMP_FILE = ".babelsynth-stamp.json"
LOCK_FILE = ".build.lock"

# Counts real (non-cached) builds per model name in this process; tests use it to observe cache hits.
BUILD_COUNTER: Counter[str] = Counter()


@dataclass(frozen=True)
class Builder:
    name: str  # directory under the root
    config: dict[str, Any]
    modules: tuple[ModuleType, ...]  # whose source is part of the digest
    distributions: tuple[str, ...]  # whose versions are part of the digest
    build: Callable[[Path, Path], Any]  # (build dir, final dir); builds and verifies
    located: bool = False  # the output embeds its final absolute path


# Builders are called through their module attribute, so a test can swap one (monkeypatch) to make it crash.
BUILDERS: tuple[Builder, ...] = (
    Builder(
        "nllb",
        nllb.NLLB_CONFIG,
        (nllb, corpus, common),
        nllb.DISTRIBUTIONS,
        lambda tmp, final: nllb.build_nllb(tmp),
    ),
    Builder(
        "nllb_copy",
        nllb_copy.NLLB_COPY_CONFIG,
        (nllb_copy, corpus, common),
        nllb_copy.DISTRIBUTIONS,
        lambda tmp, final: nllb_copy.build_nllb_copy(tmp),
    ),
    Builder(
        "aya_vision",
        aya.AYA_CONFIG,
        (aya, corpus, common, weights),
        aya.DISTRIBUTIONS,
        lambda tmp, final: aya.build_aya_vision(tmp),
    ),
    Builder(
        "aya_echo",
        aya_echo.ECHO_CONFIG,
        (aya_echo, aya, corpus, common, nllb_copy, weights, languages, paths, prompts),
        aya_echo.DISTRIBUTIONS,
        lambda tmp, final: aya_echo.build_aya_echo(tmp),
    ),
    Builder(
        "comet",
        comet.COMET_CONFIG,
        (comet, corpus, common),
        comet.DISTRIBUTIONS,
        lambda tmp, final: comet.build_comet(tmp),
    ),
    Builder(
        "toxicity",
        toxicity.TOXICITY_CONFIG,
        (toxicity, corpus, common),
        toxicity.DISTRIBUTIONS,
        lambda tmp, final: toxicity.build_toxicity(tmp),
    ),
)


def versions(distributions: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for dist in distributions:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def source_digest(module: ModuleType) -> str:
    return hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()


def spec(builder: Builder, final_dir: Path) -> dict[str, Any]:
    """Everything the builder's output depends on, as JSON-able data (stored in the stamp for diagnosis)."""
    out = {
        "name": builder.name,
        "config": builder.config,
        "sources": {m.__name__: source_digest(m) for m in builder.modules},
        "corpus": corpus.corpus_digest(),
        "versions": versions(builder.distributions),
    }
    if builder.located:
        out["location"] = str(Path(final_dir).resolve())
    return out


def digest(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def read_stamp(model_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(model_dir) / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_cached(root: Path, builder: Builder, force: bool = False) -> Path:
    final = root / builder.name
    want = spec(builder, final)
    h = digest(want)
    stamp = read_stamp(final)
    if not force and final.is_dir() and stamp is not None and stamp.get("hash") == h:
        return final
    tmp = root / f".{builder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        builder.build(tmp, final)
        (tmp / STAMP_FILE).write_text(
            json.dumps({"name": builder.name, "hash": h, "spec": want}, indent=1, sort_keys=True, default=str)
        )
        old = None
        if final.exists():
            old = root / f".{builder.name}.old-{uuid.uuid4().hex[:8]}"
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    BUILD_COUNTER[builder.name] += 1
    return final


def build_all(root: str | os.PathLike, *, force: bool = False) -> dict[str, str]:
    """Build (or reuse) every tiny model under ``root``; return absolute paths.

    Keys: ``nllb_ct2`` (CTranslate2 dir, ``root/nllb/ct2``), ``nllb_copy_ct2`` and
    ``nllb_copy_ct2_tokenizer_json`` (the copying NLLB, with sentencepiece.bpe.model or tokenizer.json),
    ``vlm`` (``root/aya_vision/vlm``), ``llm`` (``root/aya_vision/llm``), ``echo_vlm`` and ``echo_llm``
    (the echo-trained Aya Vision, sharded, and its text twin), ``comet``
    (``root/comet/cometkiwi/checkpoints/model.ckpt``, naming its encoder by hub id), ``comet_encoder`` (the
    encoder's files as a dir), ``comet_hf_home`` (an HF_HOME whose hub cache holds them) and ``toxicity``
    (the safety stages' text classifier, trained to flag planted markers).
    """
    root = Path(root).resolve()
    with _locked(root):
        for stale in [*root.glob(".*.tmp-*"), *root.glob(".*.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        built = {b.name: _build_cached(root, b, force) for b in BUILDERS}
    return {
        "nllb_ct2": str(built["nllb"] / "ct2"),
        "nllb_copy_ct2": str(built["nllb_copy"] / "ct2"),
        "nllb_copy_ct2_tokenizer_json": str(built["nllb_copy"] / "ct2-tokenizer-json"),
        "vlm": str(built["aya_vision"] / "vlm"),
        "llm": str(built["aya_vision"] / "llm"),
        "echo_vlm": str(built["aya_echo"] / "vlm"),
        "echo_llm": str(built["aya_echo"] / "llm"),
        "comet": str(built["comet"] / "cometkiwi" / "checkpoints" / "model.ckpt"),
        "comet_encoder": str(built["comet"] / "encoder"),
        "comet_hf_home": str(built["comet"] / "hf_home"),
        "toxicity": str(built["toxicity"]),
    }

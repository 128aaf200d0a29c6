"""Where a run's data came from, for the manifest and the dataset card: code version, model ids and
revisions, prompt ids and hashes, the rules and thresholds that kept or dropped rows. No model is loaded."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

from babelsynth import __version__
from babelsynth.config import TASK_TYPES, RunConfig

CODE_VERSION_ENV = "BABELSYNTH_CODE_VERSION"  # set by image builds (e.g. the git commit of the image)
_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})(?:/|$)")
_EDGE = 1 << 20


def code_version() -> str:
    """babelsynth's version, plus the git commit of a checkout (or $BABELSYNTH_CODE_VERSION)."""
    if os.environ.get(CODE_VERSION_ENV):
        return f"{__version__}+{os.environ[CODE_VERSION_ENV]}"
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return __version__
    return (
        f"{__version__}+g{out.stdout.strip()}" if out.returncode == 0 and out.stdout.strip() else __version__
    )


def local_revision(path: str | None) -> str | None:
    """A revision for a local checkpoint: the hub commit in a HF cache path, else a content fingerprint
    that reads little (file names and sizes, small JSON files whole, the first and last MiB of each other
    file), so a swapped checkpoint shows without hashing gigabytes at every commit."""
    if not path:
        return None
    m = _SNAPSHOT.search(path)
    if m:
        return m.group(1)
    p = Path(path)
    if not p.exists():
        return None
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}\0{size}\0".encode())
        with f.open("rb") as fh:
            if f.suffix == ".json" and size <= _EDGE:
                h.update(fh.read())
            else:
                h.update(fh.read(_EDGE))
                if size > 2 * _EDGE:
                    fh.seek(-_EDGE, os.SEEK_END)
                    h.update(fh.read())
    return "content-sha256:" + h.hexdigest()[:16]


def models(cfg: RunConfig) -> dict[str, dict]:
    """Per role: id, backend kind and revision (configured, else derived from the local checkpoint)."""
    m = cfg.models
    out = {}
    for role in ("teacher", "judge", "rephraser", "llm_translator"):
        c = getattr(m, role)
        if c is None:  # llm_translator: only when a language uses the llm backend
            continue
        out[role] = {
            "id": c.model,
            "kind": c.kind,
            "revision": c.revision or local_revision(getattr(c, "path", None)),
        }
    tr = m.translator
    out["translator"] = {
        "id": tr.model_id or Path(tr.path).name,
        "kind": tr.kind,
        "revision": tr.revision or local_revision(tr.path),
    }
    co = m.comet
    out["comet"] = {
        "id": co.model_id or co.path,
        "kind": co.kind,
        "revision": co.revision or local_revision(co.path),
    }
    return out


def prompts(cfg: RunConfig) -> dict[str, str]:
    """{prompt id: sha256 of the template file} of every template the config can use."""
    from babelsynth.prompts import load_prompt

    used = [("recaption", t, cfg.recaption.prompt_version) for t in TASK_TYPES]
    if cfg.judge.enabled:
        used.append(("judge", "hallucination", cfg.judge.prompt_version))
    if cfg.rephrase.enabled:
        used.append(("rephrase", "translation", cfg.rephrase.prompt_version))
    out = {}
    for family, name, version in used:
        p = load_prompt(family, name, version)
        out[p.id] = p.sha
    return out


def thresholds(cfg: RunConfig) -> dict:
    """The rules that kept or dropped rows, with their modes (enforce drops, report only flags)."""
    return {
        "recaption": {
            "mode": cfg.recaption.mode,
            "max_regenerations": cfg.recaption.max_regenerations,
            "min_words": cfg.recaption.min_words,
        },
        "judge": {"enabled": cfg.judge.enabled, "mode": cfg.judge.mode},
        "translate": {"mode": cfg.translate.mode},
        "score": {
            "selection_margin": cfg.score.selection_margin,
            "gates": cfg.score.gates.model_dump(mode="json"),
        },
    }


def collect(cfg: RunConfig) -> dict:
    return {
        "code_version": code_version(),
        "models": models(cfg),
        "prompts": prompts(cfg),
        "thresholds": thresholds(cfg),
    }

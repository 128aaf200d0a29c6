"""The privilege boundary of trigger-time params: paths and checkpoints only under the allowed roots.

Anyone who may trigger babelsynth_generate sets its params; the deployment, not that user, decides where
they may point: `allowed_roots` in the Airflow-side config ($BABELSYNTH_AIRFLOW_CONFIG, configs/airflow.yaml)
lists the local directories and s3:// bucket prefixes per kind of param. Nothing listed: the param is
refused (the deployment's own config, $BABELSYNTH_CONFIG, still applies).

Checked twice. At trigger time the params' JSON schema carries a pattern built from the roots, so the REST
API answers 400 and the UI refuses before a run exists. In every task, before anything is read, again with
symlinks and '..' resolved (a pattern cannot), so what a pattern lets through is a clear task failure.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field

# param (of babelsynth_generate and babelsynth_train) -> kind of root it must live under
PARAM_KINDS = {
    "config_path": "config",
    "input_uri": "input",
    "output_uri": "output",
    "translator_path": "models",
    "comet_path": "models",
    "manifest_uri": "output",
    "train_config": "config",
    "out_uri": "output",
}


class ParamBoundaryError(ValueError):
    """A param names a path or bucket outside the roots this deployment allows for it."""


class AllowedRoots(BaseModel):
    """Where path params may point: absolute local directories or s3://bucket[/prefix], per kind."""

    model_config = ConfigDict(extra="forbid")

    config: list[str] = Field(default_factory=list, description="config_path, train_config")
    input: list[str] = Field(default_factory=list, description="input_uri")
    output: list[str] = Field(default_factory=list, description="output_uri, manifest_uri, out_uri")
    models: list[str] = Field(default_factory=list, description="translator_path, comet_path")

    def of(self, param: str) -> list[str]:
        return getattr(self, PARAM_KINDS[param])


def _clean(root: str) -> str:
    return root if root in ("/", "s3://") else root.rstrip("/")


def pattern(roots: list[str]) -> str:
    """JSON-schema pattern (matched with re.search) accepting values under one of the roots as strings:
    no '..' or '.' segment, no empty segment; nothing at all when no root is allowed."""
    if not roots:
        return r"^(?!)"
    alts = "|".join(re.escape(_clean(r)) + ("" if _clean(r).endswith("/") else r"(?:/|$)") for r in roots)
    return rf"^(?!.*(?:^|/)\.{{1,2}}(?:/|$))(?!.*[^:]//)(?:{alts})"


def _local(value: str) -> str | None:
    if value.startswith("file://"):
        value = urlparse(value).path
    return value if os.path.isabs(value) else None


def _s3_parts(value: str) -> list[str] | None:
    u = urlparse(value)
    if u.scheme != "s3" or not u.netloc:
        return None
    key = [p for p in u.path.split("/") if p]
    if any(p in (".", "..") for p in key) or "//" in u.path:
        return None
    return [u.netloc, *key]


def allowed(value: str, roots: list[str]) -> bool:
    """Whether value lives under one of the roots: local paths with symlinks and '..' resolved, s3 URIs
    by bucket and whole key segments (s3://b/in matches s3://b/in/x, never s3://b/inx)."""
    if value.startswith("s3://"):
        parts = _s3_parts(value)
        for r in roots:
            rp = _s3_parts(r) if r.startswith("s3://") else None
            if parts and rp and parts[: len(rp)] == rp:
                return True
        return False
    path = _local(value)
    if path is None:
        return False
    real = os.path.realpath(path)
    for r in roots:
        root = _local(r)
        if root is None:
            continue
        rr = os.path.realpath(root)
        if real == rr or real.startswith(rr.rstrip(os.sep) + os.sep):
            return True
    return False


def check_params(params: dict, roots: AllowedRoots) -> None:
    """Raise ParamBoundaryError for the first path param outside its allowed roots (before any read)."""
    for name in PARAM_KINDS:
        value = params.get(name)
        if value in (None, ""):
            continue
        if not isinstance(value, str) or not allowed(value, roots.of(name)):
            kind = PARAM_KINDS[name]
            raise ParamBoundaryError(
                f"param {name}={value!r} is outside what this deployment allows for it "
                f"(allowed_roots.{kind}: {roots.of(name) or 'none'}); the roots are set by the deployment in "
                "$BABELSYNTH_AIRFLOW_CONFIG, not by a trigger"
            )

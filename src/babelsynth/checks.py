"""Deploy-time checks of a run config: every problem is one line that names the fix, never a traceback.

`babelsynth check-config` prints them (with `--probe` it also calls every endpoint); the Airflow `plan`
task runs the static ones before anything else and fails without retries, because a missing variable or
file does not heal by waiting. Nothing here loads a model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from babelsynth import storage
from babelsynth.config import (
    CometBackend,
    CT2NLLBBackend,
    OpenAIHTTPBackend,
    RunConfig,
    VLLMOfflineBackend,
    apply_overrides,
    expand_env,
    missing_env,
)

Kind = Literal["config", "env", "file", "endpoint"]


@dataclass(frozen=True)
class Problem:
    kind: Kind
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass
class Checked:
    """The validated config (None if it did not validate) and every problem found."""

    config: RunConfig | None
    problems: list[Problem] = field(default_factory=list)


class ConfigError(ValueError):
    """A config that cannot run as deployed; str() is one line per problem. `origin` says where the path
    came from (e.g. an environment variable), for the caller's message."""

    def __init__(self, path: str | Path, problems: list[Problem], origin: str = ""):
        self.path, self.problems, self.origin = str(path), problems, origin
        super().__init__("\n".join(f"{self.path}: {p}" for p in problems))


def check_config(
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    *,
    files: bool = True,
    probe: bool = False,
    timeout: float = 5.0,
) -> Checked:
    """Env variables, schema, then (files) local paths the run reads, then (probe) endpoints and S3 input."""
    p = Path(path)
    if not p.is_file():
        return Checked(None, [Problem("file", f"config file not found: {p.absolute()}")])
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        return Checked(None, [Problem("config", f"{p} is not valid YAML{at}: {getattr(e, 'problem', e)}")])
    if not isinstance(raw, dict):
        return Checked(None, [Problem("config", f"{p} must be a mapping of config keys")])

    given = tuple(overrides or ())  # a key set by an override does not need the variable it names

    def overridden(key: str) -> bool:
        return any(key == o or key.startswith(o + ".") for o in given)

    problems = [
        Problem("env", f"{name} is not set; {p.name} uses it in {', '.join(sorted(set(keys)))}")
        for name, all_keys in sorted(missing_env(raw).items())
        if (keys := [k for k in all_keys if not overridden(k)])
    ]
    try:
        data = apply_overrides(expand_env(raw, strict=False), overrides)
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        return Checked(None, problems + [Problem("config", _one_line(err)) for err in e.errors()])
    except ValueError as e:  # an override into a non-section
        return Checked(None, problems + [Problem("config", str(e))])
    if files:
        problems += _file_problems(cfg)
    if probe and not problems:
        problems += _probe_problems(cfg, timeout)
    return Checked(cfg, problems)


def validate_config(
    path: str | Path, overrides: dict[str, Any] | None = None, files: bool = False
) -> RunConfig:
    """The config, or ConfigError listing every problem (not only the first)."""
    checked = check_config(path, overrides, files=files)
    if checked.problems or checked.config is None:
        raise ConfigError(path, checked.problems)
    return checked.config


def _one_line(err: dict) -> str:
    where = ".".join(str(x) for x in err.get("loc", ()))
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def _unexpanded(value: str) -> bool:
    return "${" in value  # its variable is missing: already reported


def _file_problems(cfg: RunConfig) -> list[Problem]:
    out: list[Problem] = []
    out += _input_problems(cfg, remote=False)
    for key in ("output_uri", "cache_dir"):
        value = getattr(cfg, key)
        local = storage.local_path(value)
        if local is None or _unexpanded(value):
            continue
        parent = local.absolute()
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK):
            out.append(Problem("file", f"{key} {value}: {parent} is not writable by this user"))
    for role in ("teacher", "judge", "rephraser", "llm_translator", "translator", "comet"):
        backend = getattr(cfg.models, role)
        where = f"models.{role}"
        if isinstance(backend, CT2NLLBBackend) and not _unexpanded(backend.path):
            if not (Path(backend.path) / "model.bin").is_file():
                out.append(
                    Problem(
                        "file", f"{where}.path {backend.path} is not a CTranslate2 model dir (no model.bin)"
                    )
                )
            elif not (Path(backend.path) / "sentencepiece.bpe.model").is_file():
                out.append(Problem("file", f"{where}.path {backend.path} has no sentencepiece.bpe.model"))
        elif isinstance(backend, CometBackend) and not _unexpanded(backend.path):
            if not Path(backend.path).is_file():
                out.append(Problem("file", f"{where}.path {backend.path} does not exist (a COMET .ckpt)"))
        elif isinstance(backend, VLLMOfflineBackend):
            if not _unexpanded(backend.path) and not (Path(backend.path) / "config.json").is_file():
                out.append(
                    Problem("file", f"{where}.path {backend.path} is not a model dir (no config.json)")
                )
            if backend.python and not Path(backend.python).is_file():
                out.append(Problem("file", f"{where}.python {backend.python} does not exist"))
    return out


def _probe_problems(cfg: RunConfig, timeout: float) -> list[Problem]:
    """GET <base_url>/models of every OpenAI-compatible endpoint once; the model must be served there."""
    import httpx

    out: list[Problem] = []
    served: dict[tuple[str, str | None], list[str] | Problem] = {}
    for role in ("teacher", "judge", "rephraser", "llm_translator"):
        b = getattr(cfg.models, role)
        if not isinstance(b, OpenAIHTTPBackend):
            continue
        where = f"models.{role}"
        key = (b.base_url.rstrip("/"), b.api_key_env)
        if key not in served:
            served[key] = _list_models(httpx, key[0], b.api_key_env, timeout)
        got = served[key]
        if isinstance(got, Problem):
            out.append(Problem("endpoint", f"{where}.base_url {got.message}"))
        elif b.model not in got:
            out.append(
                Problem("endpoint", f"{where}.model {b.model!r} is not served at {key[0]} (it serves {got})")
            )
    return out + _input_problems(cfg, remote=True)


def _input_problems(cfg: RunConfig, remote: bool) -> list[Problem]:
    """Each entry of input_uri (a file, a directory, a glob) must name at least one input file; local
    entries are checked always, remote (s3://) ones only with --probe."""
    from babelsynth.inputs import adapter
    from babelsynth.inputs.source import resolve

    out: list[Problem] = []
    entries = [cfg.input_uri] if isinstance(cfg.input_uri, str) else list(cfg.input_uri)
    for e in entries:
        if _unexpanded(e) or (storage.local_path(e) is None) != remote:
            continue
        local = storage.local_path(e)
        if local is not None and not any(c in e for c in "*?[") and not local.exists():
            out.append(
                Problem(
                    "file",
                    f"input_uri {e} does not exist; write the sample input with "
                    f"`babelsynth samples --out {e}` or pass your own (param input_uri)",
                )
            )
            continue
        try:
            resolve(e, adapter(cfg.input).suffixes)
        except ValueError as err:  # a directory or glob with no input file in it
            out.append(Problem("file", str(err)))
        except Exception as err:  # noqa: BLE001 - any S3 client error is one line for the operator
            out.append(Problem("endpoint", f"input_uri {e}: {type(err).__name__}: {err}"))
    return out


def _list_models(httpx: Any, base_url: str, key_env: str | None, timeout: float) -> list[str] | Problem:
    key = os.environ.get(key_env) if key_env else None
    headers = {"Authorization": f"Bearer {key or 'EMPTY'}"}
    try:
        r = httpx.get(f"{base_url}/models", headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        return Problem("endpoint", f"{base_url} is unreachable ({type(e).__name__}: {e})")
    if r.status_code in (401, 403):
        var = f"${key_env}" if key_env else "api_key_env (none set)"
        return Problem("endpoint", f"{base_url} refused the key (HTTP {r.status_code}): check {var}")
    if r.status_code != 200:
        return Problem("endpoint", f"{base_url}/models answered HTTP {r.status_code}")
    try:
        return sorted(m["id"] for m in r.json()["data"])
    except (ValueError, KeyError, TypeError):
        return Problem("endpoint", f"{base_url}/models is not an OpenAI-compatible model list")

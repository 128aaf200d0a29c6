"""Versioned prompt templates from prompts/<family>/<name>.v<N>.yaml, rendered with StrictUndefined.

Each rendered prompt carries its id and the sha256 of the file, stored on every output row and in
cache keys: a released template never changes, new wording is a new version file.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import jinja2
import yaml

from babelsynth.paths import prompts_dir

_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)


@dataclass(frozen=True)
class Prompt:
    id: str
    sha: str
    system: str
    user: str
    output_tag: str | None
    spec: dict

    def render(self, **values: str) -> list[dict]:
        """OpenAI-style messages (text only); callers add image parts to the user turn."""
        return [
            {"role": "system", "content": compiled(self.system).render(**values)},
            {"role": "user", "content": compiled(self.user).render(**values)},
        ]


@functools.cache
def compiled(source: str) -> jinja2.Template:
    """A template compiled once per process (compiling costs more than rendering, and a stage renders one
    prompt per row)."""
    return _ENV.from_string(source)


@functools.cache
def load_prompt(family: str, name: str, version: int = 1) -> Prompt:
    path = prompts_dir() / family / f"{name}.v{version}.yaml"
    if not path.exists():
        available = sorted(p.name for p in (prompts_dir() / family).glob("*.yaml"))
        raise FileNotFoundError(f"no prompt {family}/{name}.v{version}; available: {available}")
    raw = path.read_bytes()
    spec = yaml.safe_load(raw)
    return Prompt(
        id=spec["id"],
        sha=hashlib.sha256(raw).hexdigest(),
        system=spec["system"],
        user=spec["user"],
        output_tag=spec.get("output_tag"),
        spec=spec,
    )


def all_prompt_files() -> list[str]:
    root = prompts_dir()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml"))

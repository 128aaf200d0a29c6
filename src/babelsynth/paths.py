"""Where babelsynth's data folders (prompts, schemas) are: installed package data, never a checkout path.

The repo keeps `prompts/` and `schemas/` at its root as the single source; the wheel maps them to
`babelsynth/_data/prompts` and `babelsynth/_data/schemas` (pyproject.toml, setuptools package-dir). A source
tree run without installing (PYTHONPATH=src) has no `_data` and reads the repo folders beside `src/`.
`BABELSYNTH_PROMPTS_DIR` / `BABELSYNTH_SCHEMAS_DIR` point at another folder (e.g. a deployment's own prompts).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

PROMPTS_ENV = "BABELSYNTH_PROMPTS_DIR"
SCHEMAS_ENV = "BABELSYNTH_SCHEMAS_DIR"


def package_data(name: str) -> Path | None:
    """`babelsynth/_data/<name>` of the installed package, or None when running from a source tree."""
    p = Path(str(resources.files("babelsynth"))) / "_data" / name
    return p if p.is_dir() else None


def source_checkout() -> Path | None:
    """The repo root when babelsynth runs from its source tree (src/babelsynth), else None."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "babelsynth").is_dir() else None


def _data_dir(name: str, env: str) -> Path:
    if os.environ.get(env):
        return Path(os.environ[env])
    found = package_data(name)
    if found is None:
        root = source_checkout()
        found = root / name if root is not None and (root / name).is_dir() else None
    if found is None:
        raise FileNotFoundError(
            f"babelsynth's {name}/ folder is missing: the package was installed without its data (build the "
            f"wheel from the repo root, which maps {name}/ into babelsynth/_data/) or set {env}"
        )
    return found


def prompts_dir() -> Path:
    return _data_dir("prompts", PROMPTS_ENV)


def schemas_dir() -> Path:
    return _data_dir("schemas", SCHEMAS_ENV)

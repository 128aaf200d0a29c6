"""Where the repo's data folders are (prompts/, schemas/), overridable for installed wheels."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def prompts_dir() -> Path:
    return Path(os.environ.get("BABELSYNTH_PROMPTS_DIR", REPO_ROOT / "prompts"))


def schemas_dir() -> Path:
    return Path(os.environ.get("BABELSYNTH_SCHEMAS_DIR", REPO_ROOT / "schemas"))

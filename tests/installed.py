"""Fresh virtualenvs with babelsynth installed for real (not editable), for the packaging and image tests.

The heavy dependencies (torch, CTranslate2, COMET, pyarrow, ...) come from the test interpreter's environment
through a `.pth` file listing its site-packages as a plain path. Python processes `.pth` files only in site
directories, so the `__editable__` .pth there, which points at a source checkout, is NOT activated: the only
babelsynth the fresh interpreter can import is the one installed into it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEEL_SOURCES = ("pyproject.toml", "README.md", "src", "prompts", "schemas")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of an installed tool: no PYTHONPATH into the repo, no data-dir overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "BABELSYNTH_", "VIRTUAL_ENV"))}
    env.update({"PYTHONNOUSERSITE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra})
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 900) -> str:
    out = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, (
        f"{cmd} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    )
    return out.stdout


def copy_sources(dest: Path, names=WHEEL_SOURCES) -> Path:
    """What a build context holds (no caches, no egg-info): the files the wheel is built from."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in names:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def build_wheel(work: Path) -> Path:
    """`pip wheel . --no-deps --no-build-isolation` on a copy of the sources; the wheel's path."""
    src = copy_sources(work / "context")
    run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-w", work / "dist"],
        src,
    )
    (wheel,) = (work / "dist").glob("babelsynth-*.whl")
    return wheel


def fresh_venv(path: Path) -> Path:
    """A new venv (its own pip, nothing else); returns its bin dir."""
    run([sys.executable, "-m", "venv", path], path.parent)
    return path / "bin"


def site_packages(bin_dir: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(run([bin_dir / "python", "-c", code], bin_dir).strip())


def lend_dependencies(bin_dir: Path) -> Path:
    """Make the test environment's packages importable in the venv (after babelsynth is installed there)."""
    pth = site_packages(bin_dir) / "_babelsynth_test_deps.pth"
    pth.write_text(sysconfig.get_paths()["purelib"] + "\n")
    return pth


def where_is_babelsynth(bin_dir: Path, cwd: Path) -> dict[str, str]:
    """babelsynth's file and its prompts/schemas dirs as the venv's interpreter sees them, from cwd."""
    code = (
        "import json, babelsynth, babelsynth.paths as p;"
        "from babelsynth.prompts import load_prompt; from babelsynth.schema import arrow_schema;"
        "pr = load_prompt('recaption', 'captioning'); sc = arrow_schema('samples');"
        "print(json.dumps({'file': babelsynth.__file__, 'prompts': str(p.prompts_dir()),"
        " 'schemas': str(p.schemas_dir()), 'prompt_id': pr.id, 'columns': len(sc.names)}))"
    )
    import json

    return json.loads(run([bin_dir / "python", "-c", code], cwd).strip().splitlines()[-1])

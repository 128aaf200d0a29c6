"""`python -m localstack up|down|status|purge` (what `make stack` and `make stack-down` run)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from localstack.postgres import PostgresError
from localstack.settings import StackSettings
from localstack.stack import StackError, down, purge, status, up


def main(argv: list[str] | None = None) -> int:
    defaults = StackSettings()
    ap = argparse.ArgumentParser(prog="python -m localstack", description=__doc__)
    ap.add_argument("action", choices=["up", "down", "status", "purge"])
    ap.add_argument("--root", type=Path, default=defaults.root, help="state, database, logs, runs")
    ap.add_argument("--models", type=Path, default=defaults.models, help="tiny models cache (make models)")
    for name in ("api_port", "pg_port", "teacher_port", "llm_port", "log_port", "trigger_log_port"):
        ap.add_argument(
            "--" + name.replace("_", "-"), type=int, default=getattr(defaults, name), help="0: a free port"
        )
    ap.add_argument("--parallelism", type=int, default=defaults.parallelism)
    ap.add_argument("--gpu-slots", type=int, default=defaults.gpu_slots, help="size of the `gpu` pool")
    ap.add_argument("--placement", type=Path, default=None, help="$BABELSYNTH_AIRFLOW_CONFIG for the DAGs")
    args = ap.parse_args(argv)
    root = args.root.absolute()
    try:
        if args.action == "up":
            s = StackSettings(
                root=root,
                models=args.models.absolute(),
                api_port=args.api_port,
                pg_port=args.pg_port,
                teacher_port=args.teacher_port,
                llm_port=args.llm_port,
                log_port=args.log_port,
                trigger_log_port=args.trigger_log_port,
                parallelism=args.parallelism,
                gpu_slots=args.gpu_slots,
                placement=args.placement.absolute() if args.placement else None,
            )
            up(s)
        elif args.action == "down":
            report = down(root)
            if report["survivors"] or report["ports"]:
                print(f"still there: processes {report['survivors']}, listening ports {report['ports']}")
                return 1
            print(f"babelsynth stack is down: {', '.join(report['stopped']) or 'nothing was running'}")
        elif args.action == "status":
            print(status(root))
        elif args.action == "purge":
            purge(root)
            print(f"deleted {root}")
    except (StackError, PostgresError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`babelsynth` command line: a thin shell over library calls, the same argv in workers and pods."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise SystemExit(f"--set expects key=value, got {p!r}")
        k, v = p.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _cfg(args):
    from babelsynth.config import load_config

    return load_config(args.config, _overrides(args.set))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="babelsynth", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("samples", help="write the PIL-drawn English sample input")
    s.add_argument("--out", required=True)
    s.add_argument("--per-task", type=int, default=12)

    for name in ("plan", "run-stage", "write", "commit", "run", "regate"):
        p = sub.add_parser(
            name,
            help="re-apply (changed) gates to a finished run; no model call" if name == "regate" else None,
        )
        p.add_argument("--config", required=True)
        p.add_argument("--run-id", required=True)
        p.add_argument("--set", action="append", default=[], help="dotted override, e.g. run.limit=8")
        if name in ("run-stage", "write"):
            p.add_argument("--shard", type=int, required=True)
        if name == "run-stage":
            p.add_argument("--stage", required=True)

    t = sub.add_parser(
        "train", help="training phases (alignment, then SFT) on a run's shards, then the cross-modal merge"
    )
    t.add_argument("--manifest", help="manifest.json URI of a finished run (not needed with --plan)")
    t.add_argument("--recipe", required=True, help="training YAML, e.g. configs/train_aya_vision_8b.yaml")
    t.add_argument("--out", default=None, help="output URI (S3 or path); default <run>/training")
    t.add_argument(
        "--plan",
        action="store_true",
        help="print per-rank memory (weights/grads/optimizer/activations) and exit; 1 if it does not fit",
    )
    t.add_argument("--nproc-per-node", type=int, default=None, help="with --plan: plan for this many GPUs")
    t.add_argument("--nnodes", type=int, default=None, help="with --plan: plan for this many nodes")
    t.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="end after this many optimizer steps (checkpointed) for a time-boxed slot; rerun to continue",
    )

    c = sub.add_parser("check-config", help="validate a config without loading any model")
    c.add_argument("--config", required=True)
    c.add_argument("--set", action="append", default=[])

    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from babelsynth import runner

    if args.cmd == "samples":
        from babelsynth.sample_data import write_samples

        print(write_samples(args.out, args.per_task))
    elif args.cmd == "train":
        return _train(args)
    elif args.cmd == "check-config":
        print(_cfg(args).model_dump_json(indent=1))
    elif args.cmd == "plan":
        print(json.dumps(runner.plan(_cfg(args), args.run_id)))
    elif args.cmd == "run-stage":
        print(json.dumps(runner.run_stage(_cfg(args), args.run_id, args.stage, args.shard)))
    elif args.cmd == "write":
        print(json.dumps(runner.write_shard(_cfg(args), args.run_id, args.shard)))
    elif args.cmd == "commit":
        print(runner.summary(runner.commit(_cfg(args), args.run_id)))
    elif args.cmd == "regate":
        from babelsynth.regate import regate

        print(runner.summary(regate(_cfg(args), args.run_id)))
    elif args.cmd == "run":
        print(runner.summary(runner.run_all(_cfg(args), args.run_id)))
    return 0


def _train(args) -> int:
    import os

    from babelsynth.train.run import load_recipe, plan_for, train_from_manifest

    if args.plan:
        from babelsynth.train.plan import format_plan

        plan = plan_for(load_recipe(args.recipe), args.nproc_per_node, args.nnodes)
        print(format_plan(plan))
        return 0 if plan.fits else 1
    if not args.manifest:
        raise SystemExit("babelsynth train: --manifest is required (unless --plan)")
    summary = train_from_manifest(args.manifest, args.recipe, args.out, args.stop_after)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
    from babelsynth.checks import validate_config

    return validate_config(args.config, _overrides(args.set))


def _check_config(args) -> int:
    """One line per problem on stderr and exit 1; one `ok` line (or the resolved config) otherwise."""
    from babelsynth import redaction
    from babelsynth.checks import check_config

    checked = check_config(args.config, _overrides(args.set), files=not args.no_files, probe=args.probe)
    for p in checked.problems:  # an endpoint's line names its URL: a password in it is masked
        print(redaction.redact_text(f"{args.config}: {p}", set()), file=sys.stderr)
    if checked.problems or checked.config is None:
        return 1
    cfg = checked.config
    if args.show:  # secrets (keys from the environment, URL passwords) masked
        doc = redaction.redact(cfg.model_dump(mode="json"), redaction.secret_values(cfg))
        print(json.dumps(doc, indent=1))
    else:
        probed = ", endpoints answered" if args.probe else ""
        print(
            f"ok: {args.config}: input {cfg.input_uri}, output {cfg.output_uri}, "
            f"{len(cfg.run.languages)} languages{probed}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="babelsynth", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("samples", help="write the PIL-drawn English sample input")
    s.add_argument("--out", required=True)
    s.add_argument("--per-task", type=int, default=12)
    s.add_argument("--multi-turn", type=int, default=0, help="add this many conversations of 3 exchanges")

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

    i = sub.add_parser(
        "inspect-input", help="what a run would read from input_uri (counts, task types, rows); runs nothing"
    )
    i.add_argument("--config", required=True)
    i.add_argument("--set", action="append", default=[], help="dotted override, e.g. input.format=llava")
    i.add_argument("--rows", type=int, default=3, help="rows to print")

    e = sub.add_parser("export", help="a trainer-ready copy of a finished run (hf | messages | llava)")
    e.add_argument("run", help="the run's folder or its manifest.json (local or s3://)")
    e.add_argument("--format", required=True, choices=("hf", "messages", "llava"))
    e.add_argument("--out", required=True, help="export folder (local or s3://)")
    e.add_argument("--lang", default=None, help="one language only (FLORES-200 code)")

    c = sub.add_parser(
        "check-config",
        help="validate a config as deployed (variables, schema, files; --probe: endpoints) without loading"
        " any model; one line per problem, exit 1 if any",
    )
    c.add_argument("--config", required=True)
    c.add_argument("--set", action="append", default=[])
    c.add_argument("--probe", action="store_true", help="also call every model endpoint and the S3 input")
    c.add_argument(
        "--no-files",
        action="store_true",
        help="skip local model/input paths: validate a config for another machine (a pod, a GPU host)",
    )
    c.add_argument("--show", action="store_true", help="print the resolved config as JSON (secrets masked)")

    e = sub.add_parser(
        "estimate", help="tokens, model calls and GPU-hours per stage before a run; no model call"
    )
    e.add_argument("--config", required=True)
    e.add_argument("--set", action="append", default=[])
    e.add_argument(
        "--records", type=int, default=None, help="scale to this many input records (a whole pool)"
    )
    e.add_argument("--json", action="store_true", help="print JSON instead of the table")

    i = sub.add_parser("inspect", help="where a finished or running run stands: shards and stages done")
    i.add_argument("run", nargs="?", help="run directory URI (<output_uri>/<run id>)")
    i.add_argument("--config")
    i.add_argument("--run-id")
    i.add_argument("--set", action="append", default=[])

    r = sub.add_parser("report", help="rebuild report.html and dataset_card.md of a committed run")
    r.add_argument("run", help="run directory URI (<output_uri>/<run id>)")

    for name, text in (
        ("publish", "move the `latest` pointer to a committed run unless a `fail` alarm fired"),
        ("retention", "remove committed runs older than the last nightly.keep_last (never `latest`)"),
    ):
        q = sub.add_parser(name, help=text)
        q.add_argument("--config", required=True)
        q.add_argument("--set", action="append", default=[])
        if name == "publish":
            q.add_argument("--run-id", required=True)
        else:
            q.add_argument("--keep-last", type=int, default=None, help="overrides nightly.keep_last")

    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from babelsynth import redaction
    from babelsynth.checks import ConfigError

    redaction.install_log_filter()  # secret values from the environment never reach a log line
    try:
        return _dispatch(args)
    except ConfigError as e:  # a deployment problem: its lines, not a traceback
        print(e, file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    from babelsynth import runner

    if args.cmd == "check-config":
        return _check_config(args)
    if args.cmd == "samples":
        from babelsynth.sample_data import write_samples

        print(write_samples(args.out, args.per_task, multi_turn=args.multi_turn))
    elif args.cmd == "train":
        return _train(args)
    elif args.cmd == "inspect-input":
        from babelsynth.inputs.inspect import inspect_input

        print(inspect_input(_cfg(args), args.rows))
    elif args.cmd == "export":
        from babelsynth.export import export

        print(json.dumps(export(args.run, args.out, args.format, args.lang)))
    elif args.cmd == "plan":
        print(json.dumps(runner.plan(_cfg(args), args.run_id)))
    elif args.cmd == "run-stage":
        print(json.dumps(runner.run_stage(_cfg(args), args.run_id, args.stage, args.shard)))
    elif args.cmd == "write":
        print(json.dumps(runner.write_shard(_cfg(args), args.run_id, args.shard)))
    elif args.cmd == "commit":
        cfg = _cfg(args)
        manifest = runner.commit(cfg, args.run_id)
        runner.report(cfg, args.run_id)  # the Airflow DAG runs it as its own task
        print(runner.summary(manifest))
    elif args.cmd == "regate":
        from babelsynth.regate import regate

        print(runner.summary(regate(_cfg(args), args.run_id)))
    elif args.cmd == "run":
        cfg = _cfg(args)
        print(runner.summary(runner.run_all(cfg, args.run_id)))
        return _publish(cfg, args.run_id)
    elif args.cmd == "estimate":
        from babelsynth.estimate import estimate_run, format_estimate

        cfg = _cfg(args)
        est = estimate_run(cfg, args.records)
        print(json.dumps(est.as_dict(), indent=1) if args.json else format_estimate(est, cfg))
    elif args.cmd == "inspect":
        from babelsynth.inspect_run import format_status, status
        from babelsynth.layout import RunLayout

        if args.run:
            lay = RunLayout.from_root(args.run)
        elif args.config and args.run_id:
            lay = runner.layout(_cfg(args), args.run_id)
        else:
            raise SystemExit("inspect needs a run directory, or --config and --run-id")
        print(format_status(status(lay)))
    elif args.cmd == "report":
        from babelsynth.report import write_for_run

        print(json.dumps(write_for_run(args.run), indent=1))
    elif args.cmd == "publish":
        return _publish(_cfg(args), args.run_id)
    elif args.cmd == "retention":
        from babelsynth.nightly import retain

        print(json.dumps(retain(_cfg(args), args.keep_last), indent=1))
    return 0


def _publish(cfg, run_id: str) -> int:
    """Publish a committed run; a failed alarm is exit code 2 with the reason (latest unchanged)."""
    from babelsynth.nightly import AlarmFailed, publish

    try:
        res = publish(cfg, run_id)
    except AlarmFailed as e:
        print(f"NOT PUBLISHED: {e}", file=sys.stderr)
        return 2
    for w in res["warnings"]:
        print(f"alarm (warn): {w}", file=sys.stderr)
    print(f"latest: {res['latest']['run_id']} ({res['latest']['manifest_uri']})")
    return 0


def _train(args) -> int:
    import os

    from babelsynth.train.run import load_recipe, plan_for, train_from_manifest

    if args.plan:
        from babelsynth.train.plan import PlanError, format_plan

        try:
            plan = plan_for(load_recipe(args.recipe), args.nproc_per_node, args.nnodes)
        except PlanError as e:  # a missing config.json is a setup problem, not a crash: one line, exit 2
            print(f"babelsynth train --plan: {e}", file=sys.stderr)
            return 2
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

"""The training task: one `babelsynth train` argv, run under torchrun wherever the placement config puts it.

`worker`: torchrun starts the recipe's `resources.nproc_per_node` processes beside the Airflow worker
(LocalExecutor on a GPU box, or CPU processes with gloo). `kubernetes`: operators/train_pod.py runs the
same argv in one pod with that many GPUs. Either way the summary comes back from the output URI
(`<out>/summary.json`, written by rank 0), never from a process's stdout.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


def train_config(params: dict[str, Any] | None) -> str:
    """The training recipe of a run: the `train_config` param, else $BABELSYNTH_TRAIN_CONFIG. No
    fallback: a production run silently training the demo recipe is worse than a failed task."""
    path = (params or {}).get("train_config") or os.environ.get("BABELSYNTH_TRAIN_CONFIG")
    if not path:
        raise ValueError(
            "no training recipe: pass the `train_config` param or set $BABELSYNTH_TRAIN_CONFIG "
            "(e.g. configs/train_aya_vision_8b.yaml); there is no default recipe"
        )
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"training recipe {path} (train_config / $BABELSYNTH_TRAIN_CONFIG) does not exist"
        )
    return path


def train_argv(manifest_uri: str, recipe_path: str, out_uri: str) -> list[str]:
    """The `babelsynth` CLI arguments of one training run: what every rank runs, in a worker or a pod."""
    return ["train", "--manifest", manifest_uri, "--recipe", recipe_path, "--out", out_uri]


def torchrun_args(nproc: int, argv: list[str]) -> list[str]:
    """torchrun's arguments (after `torchrun` / `python -m torch.distributed.run`) for one node."""
    return ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "-m", "babelsynth.cli", *argv]


@dataclass(frozen=True)
class Launch:
    recipe_path: str
    out_uri: str
    nproc: int
    argv: list[str]


def prepare(manifest_uri: str, params: dict[str, Any] | None, recipe_in_pod: str | None = None) -> Launch:
    """Read the recipe (small YAML, no model) for the process count and the output URI."""
    from babelsynth.train.run import load_recipe, out_uri_for

    path = train_config(params)
    recipe = load_recipe(path)
    res = recipe.train.resources
    if res.nnodes > 1:
        raise ValueError(
            f"{path}: resources.nnodes={res.nnodes}; this task launches one node. Run one torchrun per node "
            "(docs/training.md) or use resources.cpu_offload to fit one node"
        )
    out = out_uri_for(manifest_uri, recipe, (params or {}).get("out_uri"))
    return Launch(path, out, res.nproc_per_node, train_argv(manifest_uri, recipe_in_pod or path, out))


def read_summary(out_uri: str) -> dict:
    from babelsynth import storage

    return json.loads(storage.read_bytes(storage.join(out_uri, SUMMARY_FILE)))


def run_local(manifest_uri: str, params: dict[str, Any] | None) -> dict:
    """torchrun with the recipe's process count, in this worker; returns rank 0's summary."""
    launch = prepare(manifest_uri, params)
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(launch.nproc, launch.argv)]
    log.info("launching: %s", " ".join(cmd))
    # the training's logging (INFO progress) goes to the task's stdout: Airflow logs a task's stderr at
    # error level, and progress is not an error; the failure itself is raised below
    proc = subprocess.run(cmd, env=dict(os.environ), stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"training exited with {proc.returncode} (torchrun, {launch.nproc} processes)")
    return read_summary(launch.out_uri)

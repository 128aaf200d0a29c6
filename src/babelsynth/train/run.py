"""Entry point for the training DAG and the CLI: a YAML recipe (model dirs + TrainConfig) over a manifest.

Order matters: the recipe is validated, the memory plan is checked for the actual world size and the two
models' configs are checked to be one family, all from config files, before a single weight is read.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict

from babelsynth.config import expand_env
from babelsynth.train.config import Resources, TrainConfig

log = logging.getLogger(__name__)


class TrainRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vlm_dir: str  # the multimodal model to fine-tune (Aya Vision architecture)
    text_dir: str  # the text-only LLM the VLM's language model was initialised from: the merge's W_text
    out_uri: str | None = None  # default: <run root>/training (S3 or local, like the run)
    scratch_dir: str | None = None  # node-local; default $BABELSYNTH_TRAIN_SCRATCH or a temp dir
    train: TrainConfig = TrainConfig()


def load_recipe(path: str | Path) -> TrainRecipe:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"training recipe {p} does not exist")
    return TrainRecipe.model_validate(expand_env(yaml.safe_load(p.read_text()) or {}))


def out_uri_for(manifest_uri: str, recipe: TrainRecipe, out_uri: str | None = None) -> str:
    """Where a run's training output goes: the explicit URI, the recipe's, or next to the run."""
    run_root = manifest_uri.rsplit("/", 1)[0] if manifest_uri.endswith(".json") else manifest_uri.rstrip("/")
    return (out_uri or recipe.out_uri or f"{run_root}/training").rstrip("/")


def with_world(cfg: TrainConfig, nproc_per_node: int | None = None, nnodes: int | None = None) -> TrainConfig:
    """The config with resources overridden (e.g. by the actual torchrun world)."""
    res = cfg.resources.model_dump()
    if nproc_per_node:
        res["nproc_per_node"] = nproc_per_node
    if nnodes:
        res["nnodes"] = nnodes
    return cfg.model_copy(update={"resources": Resources(**res)})


def plan_for(recipe: TrainRecipe, nproc_per_node: int | None = None, nnodes: int | None = None):
    """The memory plan of a recipe (reads only vlm_dir/config.json)."""
    from babelsynth.train.plan import plan_recipe, read_dims

    return plan_recipe(read_dims(recipe.vlm_dir), with_world(recipe.train, nproc_per_node, nnodes))


def launched_world() -> tuple[int, int]:
    """(nproc_per_node, nnodes) of this process's launch: torchrun's env, else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return local, max(1, world // max(local, 1))


def train_from_manifest(
    manifest_uri: str, recipe_path: str, out_uri: str | None = None, stop_after: int | None = None
) -> dict:
    from babelsynth.train.merge import check_compatible

    recipe = load_recipe(recipe_path)
    nproc, nnodes = launched_world()
    if (nproc, nnodes) != (recipe.train.resources.nproc_per_node, recipe.train.resources.nnodes):
        log.warning(
            "launched as %d x %d processes, the recipe says %d x %d; planning for the launch",
            nnodes,
            nproc,
            recipe.train.resources.nnodes,
            recipe.train.resources.nproc_per_node,
        )
    plan_for(recipe, nproc, nnodes).check()
    check_compatible(recipe.vlm_dir, recipe.text_dir)
    from babelsynth.train.pipeline import train_and_merge

    cfg = with_world(recipe.train, nproc, nnodes)
    return train_and_merge(
        manifest_uri,
        recipe.vlm_dir,
        recipe.text_dir,
        out_uri_for(manifest_uri, recipe, out_uri),
        cfg,
        scratch=recipe.scratch_dir,
        stop_after=stop_after,
    )

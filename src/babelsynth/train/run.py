"""Entry point for the training DAG and the CLI: a YAML recipe (model dirs + TrainConfig) over a manifest."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict

from babelsynth.config import expand_env
from babelsynth.train.config import TrainConfig


class TrainRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vlm_dir: str  # the multimodal model to fine-tune (Aya Vision architecture)
    text_dir: str  # the text-only LLM it was initialised from: the merge's W_text
    out_dir: str | None = None  # default: <run root>/training
    train: TrainConfig = TrainConfig()


def load_recipe(path: str | Path) -> TrainRecipe:
    return TrainRecipe.model_validate(expand_env(yaml.safe_load(Path(path).read_text()) or {}))


def train_from_manifest(manifest_uri: str, recipe_path: str, out_uri: str | None = None) -> dict:
    from babelsynth.train.pipeline import train_and_merge

    recipe = load_recipe(recipe_path)
    run_root = manifest_uri.rsplit("/", 1)[0]
    out = out_uri or recipe.out_dir or f"{run_root}/training"
    if out.startswith("s3://"):
        raise ValueError("training writes checkpoints to a local or mounted path; set out_uri to one")
    return train_and_merge(manifest_uri, recipe.vlm_dir, recipe.text_dir, out, recipe.train)

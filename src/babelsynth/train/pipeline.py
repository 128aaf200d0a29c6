"""alignment -> sft -> merge (alpha + sweep) -> held-out eval, in one call.

This is what the Airflow training DAG and `make demo` run. Every step is restartable: phases resume
from their checkpoints, merges overwrite their own output dirs, so re-running after a crash redoes
only what was lost. Layout of out_dir (local path):

    alignment/  sft/            loadable HF dirs (+ checkpoints/)
    merged/                     alpha = cfg.merge.alpha
    merged_a0.30/ ...           one per extra sweep alpha
    eval.json                   losses of text base, sft and every merge
"""

from __future__ import annotations

import gc
import json
import logging
import os
from pathlib import Path

from babelsynth.train.config import PHASES, TrainConfig
from babelsynth.train.evaluate import evaluate_models
from babelsynth.train.merge import merge_llm, merged_dirname
from babelsynth.train.sft import load_vlm, resolve_device, run_phase

log = logging.getLogger(__name__)


def train_and_merge(manifest_uri: str, vlm_dir: str, text_dir: str, out_dir: str, cfg: TrainConfig) -> dict:
    """Run the whole training recipe on one pipeline run; returns a small JSON-able summary."""
    from transformers import AutoProcessor

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor = AutoProcessor.from_pretrained(vlm_dir)
    model = load_vlm(vlm_dir, resolve_device(cfg.device))

    phases = {}
    for phase in PHASES:
        res = run_phase(model, phase, processor=processor, run_uri=manifest_uri, cfg=cfg, out_dir=out / phase)
        phases[phase] = {
            "dir": res.out_dir,
            "steps": res.steps,
            "final_loss": res.final_loss,
            "resumed_from": res.resumed_from,
            "skipped_examples": res.skipped_examples,
        }
    del model
    gc.collect()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 merges and evaluates
        return {"out_dir": str(out), "phases": phases, "rank": int(os.environ["RANK"])}

    sft_dir = out / "sft"
    merges = {
        "merged": merge_llm(sft_dir, text_dir, out / "merged", cfg.merge.alpha, cfg.merge.max_shard_bytes)
    }
    for alpha in cfg.merge.sweep:
        if alpha != cfg.merge.alpha:
            name = merged_dirname(alpha)
            merges[name] = merge_llm(sft_dir, text_dir, out / name, alpha, cfg.merge.max_shard_bytes)

    evals = evaluate_models(
        {"text_base": text_dir, "sft": sft_dir, **merges},
        manifest_uri,
        processor,
        cfg,
        out_path=out / "eval.json",
        write_next_to={"sft", *merges},
    )
    summary = {
        "out_dir": str(out),
        "phases": phases,
        "merged": {
            name: {"dir": str(p), "alpha": json.loads((p / "merge.json").read_text())["alpha"]}
            for name, p in merges.items()
        },
        "eval": {name: {"text_loss": r["text_loss"], "mm_loss": r["mm_loss"]} for name, r in evals.items()},
        "eval_json": str(out / "eval.json"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log.info("train_and_merge done: %s", json.dumps(summary["eval"]))
    return summary

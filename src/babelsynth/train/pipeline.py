"""alignment -> sft -> merge (alpha; optional in-memory sweep) -> held-out eval, in one call.

This is what `babelsynth train` runs, in each of torchrun's processes (or in one). Every step is
restartable: phases resume from their uploaded checkpoints and a completed phase is not trained again;
the merge and the eval are recomputed (they are cheap next to training). Output layout: see
`babelsynth.train.outputs`. Merge and eval run on rank 0 only; the other ranks return once the phases
are done, so only rank 0 ever writes the merged model.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from pathlib import Path

from babelsynth.train.config import PHASES, TrainConfig
from babelsynth.train.merge import PROVENANCE_FILE, check_compatible, merge_llm
from babelsynth.train.outputs import Outputs
from babelsynth.train.parallel import process_group
from babelsynth.train.sft import run_phase

log = logging.getLogger(__name__)

MERGED, EVAL_FILE, SUMMARY_FILE = "merged", "eval.json", "summary.json"


def saved_fast_image_processor(model_dir: str) -> bool:
    """Whether the checkpoint was saved with a fast image processor. Asking for that same kind keeps its
    preprocessing and says so: with `use_fast` unset, transformers 4.5x logs a notice about its future
    default on every load, which Airflow shows as an error-level stderr line."""
    try:
        cfg = json.loads((Path(model_dir) / "preprocessor_config.json").read_text())
    except (OSError, ValueError):
        return False
    return str(cfg.get("image_processor_type", "")).endswith("Fast")


def train_and_merge(
    manifest_uri: str,
    vlm_dir: str,
    text_dir: str,
    out_uri: str,
    cfg: TrainConfig,
    scratch: str | None = None,
    stop_after: int | None = None,
) -> dict:
    """Run the whole training recipe on one pipeline run; returns a small JSON-able summary (rank 0's
    is also written to <out_uri>/summary.json). `stop_after` bounds the optimizer steps of this call."""
    from transformers import AutoProcessor

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_compatible(vlm_dir, text_dir)  # before a single step: a wrong merge base wastes the whole run
    out = Outputs(out_uri, scratch)
    processor = AutoProcessor.from_pretrained(vlm_dir, use_fast=saved_fast_image_processor(vlm_dir))
    with process_group(cfg.device) as d:
        phases, src, budget = {}, vlm_dir, stop_after
        for phase in PHASES:
            if budget is not None and budget <= 0:  # the step budget ended exactly at a phase boundary
                return {
                    "out_uri": out.uri,
                    "completed": False,
                    "rank": d.rank,
                    "world": d.world,
                    "phases": phases,
                }
            res = run_phase(
                phase,
                src_dir=src,
                processor=processor,
                run_uri=manifest_uri,
                cfg=cfg,
                out=out,
                d=d,
                stop_after=budget,
            )
            phases[phase] = {k: v for k, v in res.to_dict().items() if k != "local_dir"}
            if not res.completed:
                return {
                    "out_uri": out.uri,
                    "completed": False,
                    "rank": d.rank,
                    "world": d.world,
                    "phases": phases,
                }
            if budget is not None:
                budget -= res.ran
            src = res.local_dir
            gc.collect()
        if not d.main:
            return {"out_uri": out.uri, "completed": True, "rank": d.rank, "world": d.world, "phases": phases}
        return _merge_and_eval(manifest_uri, text_dir, processor, cfg, out, d.device, d.world, phases)


def _merge_and_eval(
    manifest_uri, text_dir, processor, cfg: TrainConfig, out: Outputs, device, world, phases
) -> dict:
    from babelsynth.train.evaluate import evaluate_models, evaluate_sweep, heldout

    sft_dir = out.local("sft")
    merged = merge_llm(
        sft_dir, text_dir, out.local(MERGED), cfg.merge.alpha, cfg.merge.max_shard_bytes, cfg.merge.dtype
    )
    out.upload_dir(MERGED, last=PROVENANCE_FILE)
    ho = heldout(manifest_uri, processor, cfg)
    models = evaluate_models({"text_base": text_dir, "sft": sft_dir, MERGED: merged}, ho, cfg, device)
    sweep = evaluate_sweep(sft_dir, text_dir, cfg.merge.sweep, ho, cfg, device)
    doc = {
        "alpha": cfg.merge.alpha,
        "models": models,
        "sweep": sweep,
        # rows dropped because the prompt with its image tokens exceeds the phase's max_seq_len
        "skipped_for_length": {
            **{ph: phases[ph]["skipped_for_length"] for ph in PHASES},
            "eval_text": ho.skipped_text,
            "eval_mm": ho.skipped_mm,
        },
        "truncated_answers": {ph: phases[ph]["truncated_answers"] for ph in PHASES},
        "max_seq_len": {ph: cfg.phase(ph).max_seq_len for ph in PHASES},
    }
    (out.local(EVAL_FILE)).write_text(json.dumps(doc, indent=1))
    out.upload_file(EVAL_FILE)
    summary = {
        "out_uri": out.uri,
        "completed": True,
        "rank": 0,
        "world": world,
        "phases": phases,
        "merged": {"uri": out.remote(MERGED), "alpha": cfg.merge.alpha, "dtype": cfg.merge.dtype},
        "eval": {n: {"text_loss": r["text_loss"], "mm_loss": r["mm_loss"]} for n, r in models.items()},
        "sweep": {a: {"text_loss": r["text_loss"], "mm_loss": r["mm_loss"]} for a, r in sweep.items()},
        "eval_json": out.remote(EVAL_FILE),
    }
    out.local(SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    out.upload_file(SUMMARY_FILE)
    log.info("train_and_merge done: %s", json.dumps(summary["eval"]))
    return summary

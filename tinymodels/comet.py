"""Tiny CometKiwi-style reference-free ``UnifiedMetric`` (``input_segments=["mt", "src"]``) in the hub
layout, so ``comet.load_from_checkpoint(ckpt)`` loads it offline. See :func:`build_comet`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from babelsynth.languages import SOURCE_LANG
from tinymodels.common import offline_env, seeded
from tinymodels.corpus import corpus_lines, train_spm

# Library versions the output depends on (part of the build digest).
DISTRIBUTIONS = (
    "torch",
    "transformers",
    "tokenizers",
    "sentencepiece",
    "unbabel-comet",
    "pytorch-lightning",
    "pyyaml",
)

COMET_CONFIG: dict[str, Any] = {
    "seed": 0,
    "spm_vocab_size": 1500,
    "encoder": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    "hidden_sizes": [64, 32],
}


def build_comet(out_dir: Path, *, final_dir: Path | None = None) -> Path:
    """Build a tiny CometKiwi-style ``UnifiedMetric``; return ``out_dir/cometkiwi/checkpoints/model.ckpt``.

    Layout: ``out_dir/encoder`` (XLM-R config + tokenizer trained on the corpus; COMET builds the encoder from
    config.json, no weights are looked up) and ``out_dir/cometkiwi/{hparams.yaml,checkpoints/model.ckpt}``,
    the hub layout, so ``comet.load_from_checkpoint(ckpt)`` works offline; score with
    ``model.predict([{"src": ..., "mt": ...}], gpus=0, progress_bar=False)``.

    The encoder path stored in the hparams is ABSOLUTE. ``final_dir`` is where ``out_dir`` will live once
    moved (``build_all`` builds in a temp dir and renames); the stored path points there. If the model is
    moved elsewhere, load it with ``UnifiedMetric.load_from_checkpoint(ckpt, pretrained_model=<new encoder
    dir>, load_pretrained_weights=False)`` or rebuild.
    """
    offline_env()
    import torch
    import yaml

    cfg = COMET_CONFIG
    out_dir = Path(out_dir).resolve()
    final = Path(final_dir).resolve() if final_dir is not None else out_dir
    scratch = out_dir / "_build"
    scratch.mkdir(parents=True, exist_ok=True)
    enc_dir = out_dir / "encoder"
    enc_final = final / "encoder"

    from transformers import XLMRobertaConfig, XLMRobertaTokenizer, XLMRobertaTokenizerFast

    spm_file = train_spm(scratch / "xlmr_spm.model", model_type="unigram", vocab_size=cfg["spm_vocab_size"])
    XLMRobertaTokenizer(vocab_file=str(spm_file)).save_pretrained(str(enc_dir))
    tok = XLMRobertaTokenizerFast.from_pretrained(str(enc_dir))
    tok.save_pretrained(str(enc_dir))  # writes tokenizer.json, which COMET loads
    XLMRobertaConfig(
        vocab_size=len(tok),
        max_position_embeddings=514,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
        **cfg["encoder"],
    ).save_pretrained(str(enc_dir))

    import logging

    from comet.models import UnifiedMetric

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import pytorch_lightning as ptl

    with seeded(cfg["seed"]):
        model = UnifiedMetric(
            encoder_model="XLM-RoBERTa",
            pretrained_model=str(enc_dir),
            hidden_sizes=cfg["hidden_sizes"],
            activations="Tanh",
            layer_transformation="sparsemax",
            batch_size=16,
            load_pretrained_weights=False,
            local_files_only=True,
            sent_layer="mix",
            word_layer=2,
            input_segments=["mt", "src"],
            word_level_training=False,
            final_activation="Sigmoid",
        )
    model_dir = out_dir / "cometkiwi"
    (model_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    hp = dict(model.hparams)
    hp.pop("load_pretrained_weights", None)
    hp.pop("local_files_only", None)
    hp["pretrained_model"] = str(enc_final)
    (model_dir / "hparams.yaml").write_text(yaml.safe_dump(hp), encoding="utf-8")
    ckpt = model_dir / "checkpoints" / "model.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": hp,
            "pytorch-lightning_version": ptl.__version__,
            "epoch": 0,
            "global_step": 0,
        },
        ckpt,
    )
    shutil.rmtree(scratch)
    _verify_comet(ckpt, None if final == out_dir else enc_dir)
    return ckpt


def _verify_comet(ckpt: Path, encoder_override: Path | None) -> None:
    import logging
    import math

    import comet
    from comet.models import UnifiedMetric

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if encoder_override is None:
        m = comet.load_from_checkpoint(str(ckpt), local_files_only=True)
    else:
        m = UnifiedMetric.load_from_checkpoint(
            str(ckpt), pretrained_model=str(encoder_override), load_pretrained_weights=False, strict=False
        )
    sents = corpus_lines([SOURCE_LANG, "fra_Latn"])
    data = [{"src": s, "mt": t} for s, t in zip(sents[SOURCE_LANG][:2], sents["fra_Latn"][:2], strict=True)]
    out = m.predict(data, batch_size=8, gpus=0, progress_bar=False)
    if len(out.scores) != 2 or not all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in out.scores):
        raise RuntimeError(f"tiny CometKiwi gave bad scores: {out.scores}")

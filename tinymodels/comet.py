"""Tiny CometKiwi-style reference-free ``UnifiedMetric`` (``input_segments=["mt", "src"]``) in the real
layout of ``Unbabel/wmt22-cometkiwi-da``: its hparams name the encoder by hub id, ``microsoft/infoxlm-large``,
so loading it exercises what production does. See :func:`build_comet`.
"""

from __future__ import annotations

import hashlib
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

ENCODER_HUB_ID = "microsoft/infoxlm-large"  # what wmt22-cometkiwi-da's hparams.yaml names
HUB_REVISION = "0" * 40  # the snapshot id in the tiny HF cache (a real one is the repo's commit sha)

COMET_CONFIG: dict[str, Any] = {
    "seed": 0,
    "spm_vocab_size": 1500,
    "encoder": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64},
    "hidden_sizes": [64, 32],
    "encoder_hub_id": ENCODER_HUB_ID,
}


def hf_cache_put(hub_cache: Path, repo_id: str, files: dict[str, Path], revision: str = HUB_REVISION) -> Path:
    """Lay files out as `huggingface_hub` caches a download: blobs by sha256, snapshot symlinks, refs/main.

    Returns the snapshot dir. With HF_HOME (or HF_HUB_CACHE) pointing there and HF_HUB_OFFLINE=1,
    `from_pretrained(repo_id)` resolves these files without any network."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    for name, src in files.items():
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snap / name
        link.unlink(missing_ok=True)
        link.symlink_to(Path("..", "..", "blobs", blob.name))
    return snap


def build_comet(out_dir: Path) -> Path:
    """Build a tiny CometKiwi; return ``out_dir/cometkiwi/checkpoints/model.ckpt``.

    Layout (the hub repo + what a deployment downloads beside it, docs/real-models.md):

    * ``cometkiwi/{hparams.yaml, checkpoints/model.ckpt}`` with ``pretrained_model: microsoft/infoxlm-large``;
    * ``hf_home/hub/models--microsoft--infoxlm-large/...``: the encoder's config.json,
      sentencepiece.bpe.model, tokenizer.json, tokenizer_config.json and special_tokens_map.json (no weights:
      they are in the checkpoint) in the Hugging Face cache layout, for HF_HOME=``out_dir/hf_home``;
    * ``encoder/``: the same files as a plain dir, for ``models.comet.encoder_path``.

    COMET builds the encoder from config.json only and loads its weights from the checkpoint, so no encoder
    weights exist anywhere. Nothing here holds an absolute path: the build is relocatable and byte-stable.
    """
    offline_env()
    import torch
    import yaml

    cfg = COMET_CONFIG
    out_dir = Path(out_dir).resolve()
    scratch = out_dir / "_build"
    scratch.mkdir(parents=True, exist_ok=True)
    enc_dir = out_dir / "encoder"

    from transformers import XLMRobertaConfig, XLMRobertaTokenizer, XLMRobertaTokenizerFast

    spm_file = train_spm(scratch / "xlmr_spm.model", model_type="unigram", vocab_size=cfg["spm_vocab_size"])
    XLMRobertaTokenizer(vocab_file=str(spm_file)).save_pretrained(str(enc_dir))
    tok = XLMRobertaTokenizerFast.from_pretrained(str(enc_dir))
    tok.save_pretrained(str(enc_dir))  # writes tokenizer.json beside sentencepiece.bpe.model
    XLMRobertaConfig(
        vocab_size=len(tok),
        max_position_embeddings=514,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
        **cfg["encoder"],
    ).save_pretrained(str(enc_dir))
    hf_cache_put(
        out_dir / "hf_home" / "hub",
        cfg["encoder_hub_id"],
        {p.name: p for p in sorted(enc_dir.iterdir()) if p.is_file()},
    )

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
    hp["pretrained_model"] = cfg["encoder_hub_id"]  # as the real checkpoint stores it
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
    _verify_comet(ckpt, enc_dir)
    return ckpt


def _verify_comet(ckpt: Path, encoder_dir: Path) -> None:
    import logging
    import math

    from comet.models import UnifiedMetric

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    m = UnifiedMetric.load_from_checkpoint(
        str(ckpt), pretrained_model=str(encoder_dir), load_pretrained_weights=False, strict=False
    )
    sents = corpus_lines([SOURCE_LANG, "fra_Latn"])
    data = [{"src": s, "mt": t} for s, t in zip(sents[SOURCE_LANG][:2], sents["fra_Latn"][:2], strict=True)]
    out = m.predict(data, batch_size=8, gpus=0, progress_bar=False)
    if len(out.scores) != 2 or not all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in out.scores):
        raise RuntimeError(f"tiny CometKiwi gave bad scores: {out.scores}")

"""Tiny models in the real checkpoints' on-disk layouts, loaded the way production loads them, offline.

* COMET: the checkpoint names its encoder by hub id (microsoft/infoxlm-large, as wmt22-cometkiwi-da does); the
  encoder's config and tokenizer come from a Hugging Face cache (HF_HOME) or an explicit encoder dir, with
  HF_HUB_OFFLINE=1 and, for the cache, no network at all (`unshare -n`).
* NLLB: CTranslate2 dirs exactly as `ct2-transformers-converter` writes them, with `sentencepiece.bpe.model`
  or with `tokenizer.json` only.
* Aya Vision: a sharded safetensors checkpoint with its index, loaded by transformers (and by vLLM in
  tests/test_production.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from babelsynth.backends import comet_qe
from babelsynth.config import CometBackend, CT2NLLBBackend
from tests.installed import clean_env

pytestmark = pytest.mark.slow
CONVERTER_FILES = {"model.bin", "config.json", "shared_vocabulary.json"}  # what the converter itself writes


# ------------------------------------------------------------------------------------------------ COMET
def test_the_tiny_cometkiwi_names_its_encoder_by_hub_id_like_the_real_one(models):
    import yaml

    ckpt = Path(models["comet"])
    hp = yaml.safe_load((ckpt.parents[1] / "hparams.yaml").read_text())
    assert hp["pretrained_model"] == "microsoft/infoxlm-large" and hp["class_identifier"] == "unified_metric"
    assert hp["input_segments"] == ["mt", "src"]
    snap = Path(models["comet_hf_home"], "hub", "models--microsoft--infoxlm-large")
    rev = (snap / "refs" / "main").read_text()
    files = {p.name for p in (snap / "snapshots" / rev).iterdir()}
    assert {"config.json", "sentencepiece.bpe.model", "tokenizer.json"} <= files
    assert not any(f.endswith((".bin", ".safetensors")) for f in files)  # no encoder weights anywhere


_SCORE = """
import json, sys
from babelsynth.backends.comet_qe import CometScorer
from babelsynth.config import CometBackend
cfg = CometBackend(**json.loads(sys.argv[1]))
print(json.dumps(CometScorer(cfg).score([("The red car is parked.", "Die rote Auto parkt.")])))
"""


def _score_offline(backend: dict, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Score one pair in a fresh process with no network interface at all (`unshare -n`) and HF offline."""
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is needed to prove there is no network"
    src = str(Path(comet_qe.__file__).parents[2])
    cmd = [unshare, "-n", sys.executable, "-c", _SCORE, json.dumps(backend)]
    full_env = {**clean_env(**env), "PYTHONPATH": src}
    full_env.pop("HF_HUB_CACHE", None)
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=600)


def test_cometkiwi_finds_its_encoder_in_the_hf_cache_without_network(models):
    out = _score_offline({"path": models["comet"], "gpus": 0}, {"HF_HOME": models["comet_hf_home"]})
    assert out.returncode == 0, out.stderr[-3000:]
    (score,) = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.0 <= score <= 1.0


def test_cometkiwi_loads_from_an_explicit_encoder_dir_without_any_cache(models, tmp_path):
    empty = tmp_path / "empty-hf-home"
    empty.mkdir()
    backend = {"path": models["comet"], "gpus": 0, "encoder_path": models["comet_encoder"]}
    out = _score_offline(backend, {"HF_HOME": str(empty)})
    assert out.returncode == 0, out.stderr[-3000:]
    via_cache = _score_offline({"path": models["comet"], "gpus": 0}, {"HF_HOME": models["comet_hf_home"]})
    assert json.loads(out.stdout.splitlines()[-1]) == json.loads(via_cache.stdout.splitlines()[-1])


def test_without_the_encoder_files_loading_fails_naming_both_fixes(models, tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"microsoft/infoxlm-large.*huggingface-cli download.*encoder_path"
    ):
        comet_qe.resolve_encoder(Path(models["comet"]), None, hub_cache=str(tmp_path))
    (tmp_path / "enc").mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json and its tokenizer"):
        comet_qe.resolve_encoder(Path(models["comet"]), str(tmp_path / "enc"))
    assert comet_qe.resolve_encoder(Path(models["comet"]), models["comet_encoder"]) == models["comet_encoder"]


def test_scores_without_lightning_equal_comets_own_predict_and_the_model_stays_resident(models):
    from babelsynth.backends.comet_qe import CometScorer
    from tinymodels.corpus import corpus_lines

    c = corpus_lines(["eng_Latn", "deu_Latn"])
    pairs = list(zip(c["eng_Latn"], c["deu_Latn"], strict=True))
    a = CometScorer(CometBackend(path=models["comet"], gpus=0, batch_size=4))
    got = a.score(pairs)  # short pairs: one chunk each, scored by the Trainer-free loop
    raw = a.model.predict([{"src": s, "mt": t} for s, t in pairs], batch_size=4, gpus=0, progress_bar=False)
    assert got == pytest.approx(raw.scores, abs=1e-6)
    b = CometScorer(CometBackend(path=models["comet"], gpus=0, batch_size=8))  # the next shard's scorer
    assert b.model is a.model and a.device == "cpu"


def test_comet_is_capped_to_one_device_per_task():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="DDP"):
        CometBackend(path="x.ckpt", gpus=2)


# ------------------------------------------------------------------------------------------------ NLLB
def test_nllb_dirs_are_exactly_what_the_converter_writes(models):
    spm_dir, json_dir = Path(models["nllb_copy_ct2"]), Path(models["nllb_copy_ct2_tokenizer_json"])
    assert {p.name for p in spm_dir.iterdir()} == CONVERTER_FILES | {"sentencepiece.bpe.model"}
    assert {p.name for p in json_dir.iterdir()} == CONVERTER_FILES | {"tokenizer.json"}
    cfg = json.loads((spm_dir / "config.json").read_text())
    assert cfg["decoder_start_token"] == "</s>" and cfg["add_source_bos"] is False


def test_the_tokenizer_json_fallback_gives_the_same_pieces_and_text(models):
    from babelsynth.backends.nllb_ct2 import TokenizerJSONPieces, load_tokenizer
    from tests.test_production import hostile_texts

    sp = load_tokenizer(Path(models["nllb_copy_ct2"]))
    tj = load_tokenizer(Path(models["nllb_copy_ct2_tokenizer_json"]))
    assert isinstance(tj, TokenizerJSONPieces) and not isinstance(sp, TokenizerJSONPieces)
    from babelsynth.segment import segments

    segs = sorted({s for t in hostile_texts().values() for s in segments(t)})
    assert tj.encode(segs, out_type=str) == sp.encode(segs, out_type=str)
    for s in segs:
        assert tj.decode(tj.encode(s, out_type=str)) == sp.decode(sp.encode(s, out_type=str)) == s


def test_an_nllb_dir_without_a_tokenizer_fails_with_the_converter_fix(models, tmp_path):
    from babelsynth.backends.nllb_ct2 import NLLBTranslator

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in CONVERTER_FILES:
        (bare / f).symlink_to(Path(models["nllb_copy_ct2"]) / f)
    with pytest.raises(FileNotFoundError, match=r"--copy_files sentencepiece\.bpe\.model"):
        NLLBTranslator(CT2NLLBBackend(path=str(bare), device="cpu"))


# ------------------------------------------------------------------------------------------------ Aya Vision
def test_the_aya_vision_checkpoint_is_sharded_with_its_index_and_loads(models):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    vlm = Path(models["echo_vlm"])
    index = json.loads((vlm / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all(s.startswith("model-0000") and "-of-0000" in s for s in shards)
    assert not (vlm / "model.safetensors").exists()
    on_disk = set()
    for s in shards:
        with safe_open(str(vlm / s), "pt") as f:
            on_disk |= set(f.keys())
    assert on_disk == set(index["weight_map"])
    model = AutoModelForImageTextToText.from_pretrained(str(vlm)).eval()
    assert type(model).__name__ == "AyaVisionForConditionalGeneration"
    sd = model.state_dict()
    with safe_open(str(vlm / shards[-1]), "pt") as f:  # tensors of the last shard are the loaded model's
        stored = [f.get_tensor(k) for k in f.keys()]
    assert stored and all(any(torch.equal(t, v) for v in sd.values()) for t in stored)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"

"""Tiny random NLLB-200 (M2M100) with an NLLB BPE sentencepiece that carries every FLORES-200 code, saved as
HF and converted to CTranslate2 int8, so translation needs only ``ctranslate2`` + ``sentencepiece``::

    source = ["eng_Latn"] + sp.encode(text, out_type=str) + ["</s>"]
    hyp = translator.translate_batch([source], target_prefix=[["fra_Latn"]])[0].hypotheses[0]
    text = sp.decode(hyp[1:])                      # drop the forced target-language token
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from babelsynth.languages import AYA_TARGETS, SOURCE_LANG
from tinymodels.common import offline_env, seeded
from tinymodels.corpus import CORPUS_CODES, corpus_lines, train_spm

# Library versions the output depends on (part of the build digest).
DISTRIBUTIONS = ("torch", "transformers", "tokenizers", "sentencepiece", "ctranslate2", "safetensors")

NLLB_CONFIG: dict[str, Any] = {
    "seed": 0,
    "spm_vocab_size": 2000,
    "model": {
        "d_model": 64,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 128,
        "decoder_ffn_dim": 128,
        "max_position_embeddings": 1024,
        "activation_function": "relu",
        "scale_embedding": True,
        "tie_word_embeddings": True,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "decoder_start_token_id": 2,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "init_std": 0.2,
    },
    "quantization": "int8",
}


def build_nllb(out_dir: Path) -> Path:
    """Build the tiny random NLLB-200 model; return the CTranslate2 (int8) directory ``out_dir/"ct2"``.

    Layout: ``out_dir/hf`` (transformers M2M100ForConditionalGeneration + NllbTokenizerFast, safetensors),
    ``out_dir/ct2`` (model.bin int8 + config.json + shared_vocabulary.json + sentencepiece.bpe.model +
    tokenizer.json / tokenizer_config.json / special_tokens_map.json). The tokenizer carries every FLORES-200
    code as a special token; the source convention is ``[src_lang] + pieces + ["</s>"]`` and the target is
    forced with ``target_prefix=[[tgt_lang]]`` (CT2 adds the ``</s>`` decoder start itself).
    """
    offline_env()
    import transformers
    from ctranslate2.converters import TransformersConverter
    from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer

    cfg = NLLB_CONFIG
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = out_dir / "_build"
    (scratch / "spm").mkdir(parents=True, exist_ok=True)

    # (a) NLLB-style BPE sentencepiece: unk=0 bos=1 eos=2, no pad.
    spm_file = train_spm(
        scratch / "spm" / "sentencepiece.bpe.model", model_type="bpe", vocab_size=cfg["spm_vocab_size"]
    )

    # (b) fairseq id layout + <mask> + all FLORES-200 codes as special tokens.
    if transformers.__version__.startswith("4."):
        from transformers import NllbTokenizerFast

        NllbTokenizer(vocab_file=str(spm_file), src_lang=SOURCE_LANG).save_pretrained(
            str(scratch / "tok_slow")
        )
        tok = NllbTokenizerFast.from_pretrained(str(scratch / "tok_slow"), src_lang=SOURCE_LANG)
    else:  # transformers 5.x: codes must be passed explicitly or they all map to <unk>
        from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES

        tok = NllbTokenizer.from_pretrained(
            str(scratch / "spm"), src_lang=SOURCE_LANG, extra_special_tokens=FAIRSEQ_LANGUAGE_CODES
        )
    for code in CORPUS_CODES:
        if tok.convert_tokens_to_ids(code) == tok.unk_token_id:
            raise RuntimeError(f"NLLB tokenizer lost language code {code}")

    # (c) tiny random M2M100 with the NLLB flavour of config.
    with seeded(cfg["seed"]):
        model = M2M100ForConditionalGeneration(M2M100Config(vocab_size=len(tok), **cfg["model"])).eval()
    hf_dir = out_dir / "hf"
    model.save_pretrained(str(hf_dir), safe_serialization=True)
    tok.save_pretrained(str(hf_dir))
    if not (hf_dir / "sentencepiece.bpe.model").exists():
        shutil.copy2(spm_file, hf_dir / "sentencepiece.bpe.model")

    # (d) CTranslate2 conversion + tokenizer files for a torch-free runtime.
    ct2_dir = out_dir / "ct2"
    copy = [
        f
        for f in (
            "sentencepiece.bpe.model",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        )
        if (hf_dir / f).exists()
    ]
    TransformersConverter(str(hf_dir), copy_files=copy).convert(
        str(ct2_dir), quantization=cfg["quantization"], force=True
    )
    (ct2_dir / "babelsynth_nllb.json").write_text(
        json.dumps(
            {
                "source_lang": SOURCE_LANG,
                "source_format": "[src_lang] + pieces + ['</s>']",
                "target_prefix": "[[tgt_lang]]",
                "spm": "sentencepiece.bpe.model",
                "compute_type": cfg["quantization"],
            },
            indent=1,
        )
    )
    shutil.rmtree(scratch)
    _verify_nllb(ct2_dir)
    return ct2_dir


def _verify_nllb(ct2_dir: Path) -> None:
    import ctranslate2
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(ct2_dir / "sentencepiece.bpe.model"))
    tr = ctranslate2.Translator(
        str(ct2_dir), device="cpu", compute_type="int8", inter_threads=1, intra_threads=1
    )
    text = corpus_lines([SOURCE_LANG])[SOURCE_LANG][0]
    src = [SOURCE_LANG] + sp.encode(text, out_type=str) + ["</s>"]
    res = tr.translate_batch(
        [src] * len(AYA_TARGETS),
        target_prefix=[[c] for c in AYA_TARGETS],
        beam_size=1,
        max_decoding_length=24,
    )
    for code, r in zip(AYA_TARGETS, res, strict=True):
        hyp = r.hypotheses[0]
        if hyp[0] != code or not sp.decode(hyp[1:]).strip():
            raise RuntimeError(f"tiny NLLB produced no text for {code}: {hyp}")

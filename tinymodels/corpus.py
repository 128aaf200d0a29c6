"""The hand-written corpus every tiny tokenizer is trained on: about a dozen everyday sentences per
language in ``corpus/<code>.txt``, for the source language and every Aya target."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from babelsynth.languages import AYA_TARGETS, SOURCE_LANG

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
CORPUS_CODES: tuple[str, ...] = (SOURCE_LANG, *AYA_TARGETS)


def corpus_lines(codes: tuple[str, ...] | list[str] = CORPUS_CODES) -> dict[str, list[str]]:
    """{code: [sentence, ...]} for the given codes, in file order."""
    out: dict[str, list[str]] = {}
    for code in codes:
        path = CORPUS_DIR / f"{code}.txt"
        out[code] = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return out


def corpus_digest() -> str:
    """The codes (so also the source language and the targets, in order) and every file's bytes."""
    h = hashlib.sha256()
    for code in CORPUS_CODES:
        h.update(code.encode() + b"\0" + (CORPUS_DIR / f"{code}.txt").read_bytes() + b"\0")
    return h.hexdigest()


def train_spm(model_file: Path, *, model_type: str, vocab_size: int) -> Path:
    """Train a fairseq-style sentencepiece (unk=0 bos=1 eos=2, no pad) on the corpus.

    Trained from an iterator into memory, so no file path ends up inside the model proto (byte-stable builds).
    """
    import sentencepiece as spm

    lines = [s for sents in corpus_lines().values() for s in sents]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type=model_type,
        vocab_size=vocab_size,
        character_coverage=1.0,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    model_file.parent.mkdir(parents=True, exist_ok=True)
    model_file.write_bytes(buf.getvalue())
    return model_file

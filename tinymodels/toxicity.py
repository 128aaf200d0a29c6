"""A tiny multi-label BERT-shaped text classifier over the safety categories, trained to flag planted markers.

A random classifier cannot drop a planted unsafe caption honestly: its scores are noise. So this one is
trained briefly on CPU (cached like every tiny model) on the corpus in every language and the sample input's
texts, each also with one category's `MARKERS` word inserted at a random word position, labelled with that
category. It learns exactly that: a marker word flags its category in any language, every other text scores
near 0. The builder checks it on held-out insertions before saving.

Layout (what a real classifier ships): ``config.json`` (BertForSequenceClassification, `id2label` over the
categories, problem_type multi_label_classification), ``model.safetensors``, a WordPiece ``tokenizer.json``
with its ``tokenizer_config.json`` and ``special_tokens_map.json``, via save_pretrained.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from babelsynth.config import SAFETY_CATEGORIES
from tinymodels.common import offline_env, seeded
from tinymodels.corpus import CORPUS_CODES, corpus_lines

DISTRIBUTIONS = ("torch", "transformers", "tokenizers", "safetensors")
MARKERS = {c: "planted" + c.replace("_", "") for c in SAFETY_CATEGORIES}  # e.g. plantedviolence

TOXICITY_CONFIG: dict[str, Any] = {
    "vocab_size": 3000,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
    "steps": 1500,
    "batch_size": 32,
    "lr": 1e-3,
    "warmup_steps": 100,
    "seed": 0,
    "min_planted": 0.7,  # the build fails unless every held-out planted marker scores at least this...
    "max_clean": 0.3,  # ...and every other (text, category) at most this: threshold 0.5 separates them
}


def _texts() -> list[str]:
    from babelsynth.sample_data import make_samples

    out = [s for sents in corpus_lines(CORPUS_CODES).values() for s in sents]
    for rec in make_samples(n_per_task=4, bad=False, multi_turn=2):
        out += [t["content"] for t in rec["conversation"] if isinstance(t.get("content"), str)]
    return sorted({t for t in out if t.strip()})


def plant(text: str, category: str, rng: random.Random) -> str:
    """`text` with the category's marker word inserted between two words (or appended)."""
    words = text.split(" ")
    words.insert(rng.randint(0, len(words)), MARKERS[category])
    return " ".join(words)


def _tokenizer(texts: list[str], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special, limit_alphabet=5000)
    tok.train_from_iterator([*texts, *list(MARKERS.values()) * 50], trainer)  # each marker: one token
    from tokenizers.processors import TemplateProcessing

    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    fast = BertTokenizerFast(tokenizer_object=tok, do_lower_case=True, model_max_length=256)
    fast.save_pretrained(out)
    return fast


def build_toxicity(out: Path) -> Path:
    """Train and save the classifier into `out`; raises if it misses a held-out marker or flags clean text."""
    offline_env()
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    c = TOXICITY_CONFIG
    cats = list(SAFETY_CATEGORIES)
    rng = random.Random(c["seed"])
    texts = _texts()
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(texts, c["vocab_size"], out)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=c["hidden_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        intermediate_size=c["intermediate_size"],
        max_position_embeddings=c["max_position_embeddings"],
        num_labels=len(cats),
        id2label=dict(enumerate(cats)),
        label2id={k: i for i, k in enumerate(cats)},
        problem_type="multi_label_classification",
        pad_token_id=tok.pad_token_id,
    )
    with seeded(c["seed"]):
        model = BertForSequenceClassification(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=c["lr"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / c["warmup_steps"]))
        model.train()
        for _ in range(c["steps"]):
            batch, labels = [], []
            for _ in range(c["batch_size"]):
                t = rng.choice(texts)
                y = [0.0] * len(cats)
                if rng.random() < 0.5:
                    k = rng.randrange(len(cats))
                    t, y[k] = plant(t, cats[k], rng), 1.0
                batch.append(t)
                labels.append(y)
            enc = tok(batch, truncation=True, max_length=64, padding=True, return_tensors="pt")
            loss = model(**enc, labels=torch.tensor(labels)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    check = random.Random(c["seed"] + 1)
    probe = [(t, None) for t in texts] + [(plant(t, k, check), k) for t in texts[::7] for k in cats]
    with torch.inference_mode():
        enc = tok([t for t, _ in probe], truncation=True, max_length=128, padding=True, return_tensors="pt")
        probs = torch.sigmoid(model(**enc).logits)
    for (t, k), p in zip(probe, probs.tolist()):
        for j, cat in enumerate(cats):
            bad = p[j] < c["min_planted"] if cat == k else p[j] > c["max_clean"]
            if bad:
                raise RuntimeError(f"tiny toxicity classifier: {cat}={p[j]:.3f} on {t!r} (planted: {k})")
    model.save_pretrained(out)
    return out

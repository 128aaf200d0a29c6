"""A local sequence-classification model (transformers) scoring texts per label: the safety text check.

Loaded from a directory only (`local_files_only`): a worker never reaches a model hub. Multi-label: one
sigmoid per label of the model's `id2label`. A text longer than `max_length` tokens is scored in
overlapping windows and keeps each label's highest score, so nothing is cut off unread.
"""

from __future__ import annotations

from pathlib import Path

from babelsynth.config import TextClassifierBackend

STRIDE = 32  # tokens two windows of one long text share (at most a quarter of max_length)


class TextClassifier:
    def __init__(self, cfg: TextClassifierBackend):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(cfg.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"models.toxicity.path {path}: no config.json (a local model dir)")
        self.cfg = cfg
        self.model_id = cfg.model_id or path.name
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.model.to(device)
        id2label = self.model.config.id2label
        self.labels = [id2label[i] for i in range(len(id2label))]
        self.calls = 0

    def check_labels(self, categories: list[str]) -> None:
        """The classifier must score every policy category: a missing one would silently never drop."""
        missing = sorted(set(categories) - set(self.labels))
        if missing:
            raise ValueError(
                f"text classifier {self.model_id} has labels {self.labels}, not safety.categories {missing}"
            )

    def scores(self, texts: list[str]) -> list[dict[str, float]]:
        """{label: probability} per text, in batches of `batch_size` windows."""
        import torch

        if not texts:
            return []
        enc = self.tokenizer(
            texts,
            truncation=True,
            max_length=self.cfg.max_length,
            stride=min(STRIDE, self.cfg.max_length // 4),
            return_overflowing_tokens=True,
            padding=True,
            return_tensors="pt",
        )
        owner = enc.pop("overflow_to_sample_mapping").tolist()
        enc.pop("offset_mapping", None)
        best = [[0.0] * len(self.labels) for _ in texts]
        n, bs = len(owner), self.cfg.batch_size
        with torch.inference_mode():
            for start in range(0, n, bs):
                batch = {k: v[start : start + bs].to(self.device) for k, v in enc.items()}
                probs = torch.sigmoid(self.model(**batch).logits.float()).cpu().tolist()
                self.calls += 1
                for j, p in enumerate(probs):
                    row = best[owner[start + j]]
                    for k, v in enumerate(p):
                        row[k] = max(row[k], v)
        return [dict(zip(self.labels, row)) for row in best]

    def usage(self) -> dict[str, int]:
        return {"model_calls": self.calls}

"""Reference-free quality estimation (CometKiwi-style) from a local COMET checkpoint, never a hub."""

from __future__ import annotations

import logging

from babelsynth.cache import Cache, cache_key
from babelsynth.config import CometBackend


class CometScorer:
    def __init__(self, cfg: CometBackend, cache: Cache | None = None):
        import comet
        import torch

        for n in ("pytorch_lightning", "lightning.pytorch", "lightning", "comet"):
            logging.getLogger(n).setLevel(logging.ERROR)
        self.cfg = cfg
        self.cache = cache
        self.model_id = cfg.model_id or cfg.path
        self.gpus = cfg.gpus if cfg.gpus is not None else (1 if torch.cuda.is_available() else 0)
        self.model = comet.load_from_checkpoint(cfg.path)
        self.calls = 0

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        keys = [cache_key(kind="comet", model=self.model_id, src=s, mt=t) for s, t in pairs]
        hits = self.cache.get_many(keys) if self.cache else {}
        todo = sorted({k: i for i, k in enumerate(keys) if k not in hits}.values())
        if todo:
            self.calls += 1
            data = [{"src": pairs[i][0], "mt": pairs[i][1]} for i in todo]
            out = self.model.predict(data, batch_size=self.cfg.batch_size, gpus=self.gpus, progress_bar=False)
            fresh = {keys[i]: float(s) for i, s in zip(todo, out.scores)}
            if self.cache:
                self.cache.put_many(fresh)
            hits = {**hits, **fresh}
        return [hits[k] for k in keys]

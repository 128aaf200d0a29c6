"""Reference-free quality estimation (CometKiwi-style) from a local COMET checkpoint, never a hub.

COMET encodes `mt </s></s> src` in one window of the encoder (512 tokens for XLM-R) and silently cuts
whatever is longer. Long pairs are therefore scored by segments: both texts are cut at sentence and line
boundaries (babelsynth.segment), aligned in order, packed into chunks that fit the window, scored, and
the chunk scores averaged weighted by translation tokens. All chunks of a call go to the model in one
batched, length-sorted pass (GPU when present); finished pair scores go to the content-addressed cache.

Loading follows real checkpoints: the encoder is named by hub id in the hparams and only its config and
tokenizer are read, offline (`resolve_encoder`). Scoring runs the model's own prepare/predict steps on one
device, without a Lightning Trainer: no DDP (which `exit()`s non-zero ranks inside the task), and the model
stays on its device, loaded once per process (`load_model`) for every shard the process scores.
"""

from __future__ import annotations

import logging
import math
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from babelsynth.cache import Cache, cache_key
from babelsynth.config import CometBackend
from babelsynth.progress import Progress

log = logging.getLogger(__name__)
PREDICT_GROUP = 1024  # pairs per predict call at least: progress steps on big shards
# unbabel-comet 2.2.7 pins torchmetrics 0.10 (it imports pkg_resources) and a lightning older than torch
# 2.13's pytree API. Every scoring task logged both deprecations, which no caller can act on: only these
# two messages, only from those two libraries, are silenced.
warnings.filterwarnings("ignore", "pkg_resources is deprecated", UserWarning, r"torchmetrics\.")
warnings.filterwarnings(
    "ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"pytorch_lightning\."
)


@dataclass(frozen=True)
class Chunk:
    src: str
    mt: str
    weight: int  # translation tokens: the share of the pair's score this chunk carries


def _units(text: str) -> list[str]:
    """Sentence/line units whose concatenation is text: each translatable piece with the text after it."""
    from babelsynth.segment import split

    units: list[str] = []
    lead = ""  # markers and spaces before the first sentence join it
    for p in split(text):
        if p.translate:
            units.append(lead + p.text)
            lead = ""
        elif units:
            units[-1] += p.text
        else:
            lead += p.text
    return [u for u in units if u] or [text]


def _cut(text: str, count: Callable[[str], int], limit: int) -> list[str]:
    """Cut one over-long unit into pieces of at most ~limit tokens, at whitespace when there is some."""
    n = count(text)
    if n <= limit or len(text) < 2:
        return [text]
    k = math.ceil(n / limit)
    size = math.ceil(len(text) / k)
    out, i = [], 0
    while i < len(text):
        j = min(len(text), i + size)
        if j < len(text):
            sp = text.rfind(" ", i + size // 2, j)
            j = sp + 1 if sp > i else j
        out.append(text[i:j])
        i = j
    return [p for q in out for p in _cut(q, count, limit)] if any(count(q) > limit for q in out) else out


def plan_chunks(src: str, mt: str, count: Callable[[str], int], budget: int) -> list[Chunk]:
    """Pure: chunks of (src, mt) that each fit `budget` tokens together and cover all of mt and src in order.

    Units are aligned 1:1 when both sides have as many, else by relative position (each source unit goes
    with the translation units over the same share of the text). One chunk when the pair already fits."""
    n_mt, n_src = count(mt), count(src)
    if n_mt + n_src <= budget:
        return [Chunk(src, mt, max(n_mt, 1))]
    share = n_mt / max(n_mt + n_src, 1)
    mt_units = [p for u in _units(mt) for p in _cut(u, count, max(8, int(budget * share) // 2))]
    src_units = [p for u in _units(src) for p in _cut(u, count, max(8, int(budget * (1 - share)) // 2))]
    if len(mt_units) == len(src_units):
        groups = [([m], [s]) for m, s in zip(mt_units, src_units)]
    else:  # src unit i joins the mt unit that spans the relative position of its midpoint
        total = sum(map(len, mt_units)) or 1
        ends, acc = [], 0
        for u in mt_units:
            acc += len(u)
            ends.append(acc / total)
        groups = [([m], []) for m in mt_units]
        stotal, acc = sum(map(len, src_units)) or 1, 0
        for u in src_units:
            mid = (acc + len(u) / 2) / stotal
            acc += len(u)
            groups[next((i for i, e in enumerate(ends) if mid <= e), len(ends) - 1)][1].append(u)
    chunks: list[Chunk] = []
    cur_m: list[str] = []
    cur_s: list[str] = []
    cur_n = 0
    for ms, ss in groups:
        n = (
            sum(map(count, ms)) + sum(map(count, ss)) + len(ms) + len(ss)
        )  # +1 per join: merges can add a token
        if cur_m and cur_n + n > budget and "".join(cur_s).strip():
            chunks.append(Chunk("".join(cur_s), "".join(cur_m), max(count("".join(cur_m)), 1)))
            cur_m, cur_s, cur_n = [], [], 0
        cur_m += ms
        cur_s += ss
        cur_n += n
    if cur_m:
        if not "".join(cur_s).strip() and chunks:  # translation tail without source: join the last chunk
            last = chunks.pop()
            cur_m, cur_s = [last.mt, *cur_m], [last.src]
        chunks.append(Chunk("".join(cur_s), "".join(cur_m), max(count("".join(cur_m)), 1)))
    return chunks


# ------------------------------------------------------------------------------------------------ loading
ENCODER_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "sentencepiece.bpe.model")  # either one: COMET builds a fast tokenizer


def checkpoint_hparams(ckpt: Path) -> dict:
    """hparams.yaml of a hub-layout checkpoint (<repo>/checkpoints/model.ckpt -> <repo>/hparams.yaml)."""
    import yaml

    hp = ckpt.parents[1] / "hparams.yaml"
    if not ckpt.is_file() or not hp.is_file():
        raise FileNotFoundError(
            f"{ckpt} is not a COMET checkpoint in the hub layout (<repo>/checkpoints/model.ckpt with "
            f"<repo>/hparams.yaml beside checkpoints/)"
        )
    return yaml.safe_load(hp.read_text(encoding="utf-8"))


def _has_encoder_files(found: Callable[[str], bool]) -> bool:
    return all(found(f) for f in ENCODER_FILES) and any(found(f) for f in TOKENIZER_FILES)


def resolve_encoder(ckpt: Path, encoder_path: str | None, hub_cache: str | None = None) -> str | None:
    """The encoder dir to load in place of the checkpoint's stored name, or None when the name resolves.

    Order: `encoder_path` (models.comet.encoder_path); the stored name when it is a local dir; the stored hub
    id in the Hugging Face cache (`hub_cache`, default $HF_HUB_CACHE / $HF_HOME/hub). Never the network."""
    name = str(checkpoint_hparams(ckpt).get("pretrained_model") or "")
    if encoder_path:
        d = Path(encoder_path)
        if not _has_encoder_files(lambda f: (d / f).is_file()):
            raise FileNotFoundError(
                f"models.comet.encoder_path={d} must hold the encoder's config.json and its tokenizer "
                f"({' or '.join(TOKENIZER_FILES)}), e.g. the files of {name or 'the encoder'} from the hub"
            )
        return str(d)
    if name and Path(name).is_dir():
        return None
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    cache_dir = hub_cache or HF_HUB_CACHE
    if name and _has_encoder_files(lambda f: isinstance(try_to_load_from_cache(name, f, cache_dir), str)):
        return None
    raise FileNotFoundError(
        f"COMET checkpoint {ckpt} builds its encoder from {name!r}, whose config.json and tokenizer are not "
        f"in the Hugging Face cache {cache_dir} (no download is ever attempted). Fix: "
        f"`huggingface-cli download {name} --exclude '*.bin' '*.safetensors'` with HF_HOME set to the cache "
        f"the workers mount, or set models.comet.encoder_path to a dir holding those files "
        f"(docs/real-models.md)"
    )


_MODELS: dict[tuple, object] = {}
_MODELS_LOCK = threading.Lock()


def load_model(path: str, encoder_path: str | None, device: str):
    """The COMET model on `device`, loaded once per process and kept there across shards (one resident)."""
    import torch
    from comet.models import str2model

    ckpt = Path(path)
    key = (str(ckpt.resolve()), encoder_path, device)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS.clear()
            hp = checkpoint_hparams(ckpt)
            encoder = resolve_encoder(ckpt, encoder_path)
            kw: dict = {"load_pretrained_weights": False, "local_files_only": True}
            if encoder is not None:
                kw["pretrained_model"] = encoder
            if hp.get("layer_transformation") == "sparsemax_patch":  # as comet.load_from_checkpoint does
                kw["layer_transformation"] = "softmax"
            model = str2model[hp["class_identifier"]].load_from_checkpoint(
                checkpoint_path=ckpt, map_location=torch.device("cpu"), strict=False, **kw
            )
            _MODELS[key] = model.to(device).eval()
        return _MODELS[key]


def _to_device(batch, device):
    if hasattr(batch, "to"):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


class CometScorer:
    """The checkpoint is loaded on the first pair the cache cannot answer: a shard whose pairs are all
    cached (a re-run, a grown input) never pays the model load. The encoder window that cache keys
    carry is remembered in the cache too, so even the keys need no model. Loaded, it stays resident in
    the process across shards (load_model), on one device."""

    def __init__(self, cfg: CometBackend, cache: Cache | None = None, window: int | None = None):
        for n in ("pytorch_lightning", "lightning.pytorch", "lightning", "lightning_fabric", "comet"):
            logging.getLogger(n).setLevel(logging.ERROR)
        self.cfg = cfg
        self.cache = cache
        self.model_id = cfg.model_id or cfg.path
        self._model = None
        self._device: str | None = None
        self._window = window
        self.calls = 0  # predict calls that reached the model
        self.segments_scored = 0  # chunks sent to the model
        self.split_pairs = 0  # pairs longer than the window, scored by segments
        self.tokens_scored = 0  # encoder input tokens of the chunks sent (special tokens aside)

    def usage(self) -> dict[str, int]:
        """The model's own work (cache hits excluded), in the keys every backend reports."""
        return {"model_calls": self.calls, "tokens_in": self.tokens_scored, "tokens_out": 0}

    @property
    def model(self):
        if self._model is None:
            self._model = load_model(self.cfg.path, self.cfg.encoder_path, self.device)
            for n in ("pytorch_lightning", "lightning.pytorch", "lightning", "lightning_fabric", "comet"):
                logging.getLogger(n).setLevel(logging.ERROR)  # comet's import configures them
        return self._model

    @property
    def device(self) -> str:
        """cpu, or the one CUDA device this process claimed (models.comet.device_index pins it)."""
        if self._device is None:
            import torch

            from babelsynth import gpu

            n_cuda = torch.cuda.device_count()
            if self.gpus and not n_cuda:
                raise ValueError(
                    "models.comet.gpus is 1 but no CUDA device is visible; set it to 0 or unset it"
                )
            index = 0
            if self.gpus:
                index = (
                    self.cfg.device_index if self.cfg.device_index is not None else gpu.claim_device(n_cuda)
                )
            self._device = f"cuda:{index}" if self.gpus else "cpu"
        return self._device

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def gpus(self) -> int:
        if self.cfg.gpus is not None:
            return self.cfg.gpus
        import torch

        return 1 if torch.cuda.is_available() else 0

    @property
    def window(self) -> int:
        """Encoder positions for [CLS] mt [SEP][SEP] src [SEP] (512 for XLM-R)."""
        if self._window is None:
            key = cache_key(kind="comet_window", model=self.model_id, path=self.cfg.path)
            known = self.cache.get(key) if self.cache else None
            self._window = known or self.model.encoder.max_positions
            if self.cache and not known:
                self.cache.put(key, self._window)
        return self._window

    @property
    def budget(self) -> int:
        """What is left of the window for the two texts."""
        return self.window - (1 + 2 * getattr(self.model.encoder, "size_separator", 2))

    @property
    def tokenizer(self):
        return self.model.encoder.tokenizer

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _counter(self, texts: list[str]) -> Callable[[str], int]:
        """Token counts, the given texts tokenized in one batch, anything else once on demand."""
        uniq = list(dict.fromkeys(texts))
        ids = self.tokenizer(uniq, add_special_tokens=False)["input_ids"] if uniq else []
        memo = {t: len(x) for t, x in zip(uniq, ids)}

        def count(text: str) -> int:
            if text not in memo:
                memo[text] = self.count_tokens(text)
            return memo[text]

        return count

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        """QE score per (source, translation) pair, in input order."""
        keys = [
            cache_key(kind="comet", model=self.model_id, window=self.window, src=s, mt=t) for s, t in pairs
        ]
        hits = self.cache.get_many(keys) if self.cache else {}
        todo = sorted({k: i for i, k in enumerate(keys) if k not in hits}.values())
        if todo:
            count = self._counter([t for i in todo for t in pairs[i]])
            plans = {i: plan_chunks(pairs[i][0], pairs[i][1], count, self.budget) for i in todo}
            self.split_pairs += sum(len(p) > 1 for p in plans.values())
            uniq = sorted(
                {(c.src, c.mt) for p in plans.values() for c in p}, key=lambda sm: count(sm[0]) + count(sm[1])
            )
            self.tokens_scored += sum(count(s) + count(m) for s, m in uniq)
            chunk_score: dict[tuple[str, str], float] = {}
            step = max(PREDICT_GROUP, 32 * self.cfg.batch_size)  # a predict per group: progress steps at
            with Progress(len(uniq), "pairs") as prog:  # a negligible per-call cost
                for i in range(0, len(uniq), step):
                    group = uniq[i : i + step]
                    chunk_score.update(zip(group, self._predict(group)))
                    prog.advance(len(group))
            fresh = {}
            for i, plan in plans.items():
                w = sum(c.weight for c in plan)
                fresh[keys[i]] = sum(chunk_score[(c.src, c.mt)] * c.weight for c in plan) / w
            if self.cache:
                self.cache.put_many(fresh)
            hits = {**hits, **fresh}
        return [hits[k] for k in keys]

    def _predict(self, sorted_pairs: list[tuple[str, str]]) -> list[float]:
        """Scores of pairs already sorted by length, batch by batch on the model's device.

        The model's own `prepare_for_inference` and `predict_step` (what COMET's `predict` runs inside a
        Lightning Trainer), in eval mode under inference_mode: the same scores, no Trainer."""
        import torch

        self.calls += 1
        self.segments_scored += len(sorted_pairs)
        data = [{"src": s, "mt": t} for s, t in sorted_pairs]
        out: list[float] = []
        bs = self.cfg.batch_size
        with torch.inference_mode():
            for i in range(0, len(data), bs):
                batch = _to_device(self.model.prepare_for_inference(data[i : i + bs]), self.device)
                out += [float(x) for x in self.model.predict_step(batch)["scores"].float().cpu()]
        return out

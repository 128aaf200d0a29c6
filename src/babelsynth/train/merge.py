"""Cross-modal merge (Aya Vision, paper Eq. 1): W = alpha * W_multimodal + (1 - alpha) * W_text.

Only the language model is interpolated (embeddings and LM head included); the vision tower and the
connector are copied from the VLM unchanged, because the text LLM has none. The merge is tensor by
tensor: inputs are read through `safe_open` and the output safetensors are written with a streaming
writer (header first, then one tensor at a time), so peak memory is a few tensors, never the model.

Name mapping: `babelsynth.train.weights` (shared with the tiny-model builder). The VLM layout is
detected from the actual key names; the merged checkpoint keeps the VLM's names and files' metadata, so
whatever loads the VLM loads the result. The output is bf16 by default (`dtype`); the interpolation
itself runs in fp32.

The two models must be the same family: the text model has to be the LLM the VLM's language model was
initialised from (Aya Vision 8B: Command R7B, Cohere2; 32B: Aya Expanse 32B, Cohere). `check_compatible`
compares model_type, hidden size, vocabulary and layer count from the config files before any tensor is
read: `aya-expanse-8b` (Cohere v1) has the same tensor shapes as R7B and would otherwise merge into
meaningless weights.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from babelsynth.train.weights import TEXT_LAYOUT, detect_vlm_layout, is_text_only

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PROVENANCE_FILE = "merge.json"
_NOT_COPIED = {"eval.json", "phase_result.json", PROVENANCE_FILE, "pytorch_model.bin", "training_args.bin"}
_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
TORCH_TO_ST = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
COMPATIBLE_FIELDS = ("model_type", "hidden_size", "vocab_size", "num_hidden_layers")


def lerp(
    a_mm: torch.Tensor, w_text: torch.Tensor, alpha: float, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """alpha * a_mm + (1 - alpha) * w_text in (at least) fp32, returned in `dtype` (default a_mm's).
    Written as the paper's formula, so alpha=0 and alpha=1 reproduce the inputs exactly."""
    if a_mm.shape != w_text.shape:
        raise ValueError(f"shape mismatch: multimodal {tuple(a_mm.shape)} vs text {tuple(w_text.shape)}")
    work = torch.promote_types(a_mm.dtype, torch.float32)
    out = a_mm.to(work) * alpha  # same rounding as the formula, one temporary fewer
    out += w_text.to(work) * (1.0 - alpha)
    return out.to(dtype or a_mm.dtype)


def read_config(model_dir: str | os.PathLike) -> dict:
    p = Path(model_dir) / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"{p} not found: a model dir needs its config.json")
    return json.loads(p.read_text())


def check_compatible(vlm_dir: str | os.PathLike, text_dir: str | os.PathLike) -> None:
    """Refuse two models that are not the same family, naming every mismatch; reads config.json only."""
    vcfg, tcfg = read_config(vlm_dir), read_config(text_dir)
    inner = vcfg.get("text_config")
    if inner is None:
        raise ValueError(f"{vlm_dir}/config.json has no text_config: not a VLM")
    if "text_config" in tcfg or "vision_config" in tcfg:
        raise ValueError(f"{text_dir}/config.json is a multimodal config; the merge needs the text-only LLM")
    bad = [
        f"{f}: VLM language model {inner.get(f)!r} vs text model {tcfg.get(f)!r}"
        for f in COMPATIBLE_FIELDS
        if inner.get(f) != tcfg.get(f)
    ]
    if bad:
        raise ValueError(
            f"cannot merge {vlm_dir} with {text_dir}: not the LLM the VLM was initialised from "
            "(point text_dir at the VLM's own language-model base):\n  " + "\n  ".join(bad)
        )


# ----------------------------------------------------------------------------------------------- reading
class TensorSource:
    """The safetensors of a HF model dir (single file or sharded with an index), read lazily."""

    def __init__(self, model_dir: str | os.PathLike, stack: ExitStack):
        self.dir = Path(model_dir)
        if (self.dir / INDEX_FILE).exists():
            weight_map = json.loads((self.dir / INDEX_FILE).read_text())["weight_map"]
        elif (self.dir / SINGLE_FILE).exists():
            weight_map = None
        else:
            raise FileNotFoundError(f"{self.dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        self._handles = {f: stack.enter_context(safe_open(str(self.dir / f), framework="pt")) for f in files}
        self.file_of = {k: f for f, h in self._handles.items() for k in h.keys()}
        self.meta = {k: self._handles[f].get_slice(k) for k, f in self.file_of.items()}

    def keys(self) -> list[str]:
        return sorted(self.file_of)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.meta[key].get_shape())

    def dtype(self, key: str) -> str:
        return self.meta[key].get_dtype()

    def get(self, key: str) -> torch.Tensor:
        return self._handles[self.file_of[key]].get_tensor(key)

    def config(self) -> dict:
        p = self.dir / "config.json"
        return json.loads(p.read_text()) if p.exists() else {}


def plan_merge(vlm: TensorSource, text: TensorSource) -> list[tuple[str, str | None]]:
    """[(vlm_key, text_key or None)] for every VLM tensor; None means copy unchanged. Raises one
    error listing every missing key, unexpected key and shape mismatch."""
    check_compatible(vlm.dir, text.dir)
    vkeys, tkeys = vlm.keys(), text.keys()
    lay = detect_vlm_layout(vkeys)
    if not is_text_only(tkeys):
        raise ValueError(f"{text.dir} does not look like a text-only causal LM (keys {tkeys[:5]})")
    plan: list[tuple[str, str | None]] = []
    problems: list[str] = []
    for k in vkeys:
        t = lay.text_name(k)
        if t is None or k != lay.lm_head or t in text.file_of:
            plan.append((k, t))
        elif text.config().get("tie_word_embeddings", True):
            plan.append((k, TEXT_LAYOUT.lm_prefix + "embed_tokens.weight"))  # text head is tied
        else:
            problems.append(f"VLM has {k} but the text model has no {TEXT_LAYOUT.lm_head} and is not tied")
    if TEXT_LAYOUT.lm_head in text.file_of and lay.lm_head not in vlm.file_of:
        problems.append(
            f"text model has an untied {TEXT_LAYOUT.lm_head} but the VLM ties its head to the "
            "embeddings; the merge would silently drop the text head"
        )
    used = {t for _, t in plan if t is not None}
    for v, t in plan:
        if t is None:
            continue
        if t not in text.file_of:
            problems.append(f"missing in text model: {t} (for {v})")
        elif vlm.shape(v) != text.shape(t):
            problems.append(f"shape mismatch: {v} {vlm.shape(v)} vs text {t} {text.shape(t)}")
        elif vlm.dtype(v) not in ("F64", "F32", "F16", "BF16"):
            problems.append(f"cannot interpolate non-float tensor {v} ({vlm.dtype(v)})")
    extra = [k for k in tkeys if k not in used and k != TEXT_LAYOUT.lm_head]
    problems += [f"text tensor has no counterpart in the VLM: {k}" for k in extra]
    if problems:
        raise ValueError(f"cannot merge {vlm.dir} with {text.dir}:\n  " + "\n  ".join(problems))
    return plan


# ----------------------------------------------------------------------------------------------- writing
def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    n = _ITEMSIZE[dtype]
    for d in shape:
        n *= d
    return n


def write_safetensors_streaming(
    path: Path,
    entries: list[tuple[str, str, tuple[int, ...]]],
    produce,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file whose tensors are produced one at a time by `produce(key)`.
    The header is computed from (key, dtype, shape) alone, so no two tensors need to be in memory."""
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for key, dtype, shape in entries:
        n = _nbytes(shape, dtype)
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, dtype, shape in entries:
            t = produce(key)
            if TORCH_TO_ST.get(t.dtype) != dtype or tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"{key}: produced {t.dtype} {tuple(t.shape)}, header says {dtype} {shape}")
            f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
            del t


def shard_entries(entries: list[tuple[str, str, tuple[int, ...]]], max_bytes: int) -> list[list]:
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        n = _nbytes(e[2], e[1])
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def write_sharded(out: Path, entries: list[tuple[str, str, tuple[int, ...]]], produce, max_bytes: int) -> int:
    """Safetensors shards of at most max_bytes (one file when it fits) plus the index; returns the count.
    `produce(key)` is called once per key, in `entries` order."""
    shards = shard_entries(entries, max_bytes)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, shard in zip(names, shards):
        write_safetensors_streaming(out / name, shard, produce)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(_nbytes(s, d) for _, d, s in entries)},
            "weight_map": {k: n for n, sh in zip(names, shards) for k, _, _ in sh},
        }
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
    return len(shards)


def copy_model_files(src: str | os.PathLike, dst: Path, dtype: str | None = None) -> None:
    """Config, tokenizer and processor files of a model dir (not its weights or our own reports); the
    config's dtype is set to what the weights now are."""
    for p in Path(src).iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name != INDEX_FILE and p.name not in _NOT_COPIED:
            shutil.copy2(p, dst / p.name)
    cfg = dst / "config.json"
    if dtype and cfg.exists():
        doc = json.loads(cfg.read_text())
        for holder in (doc, doc.get("text_config") or {}, doc.get("vision_config") or {}):
            for k in ("dtype", "torch_dtype"):
                if k in holder:
                    holder[k] = dtype
        doc["dtype"] = dtype
        cfg.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


class Merge:
    """Both models opened lazily and paired (after the compatibility checks); `tensor(key, alpha)` is one
    merged tensor, so a merge can be written (merge_llm) or loaded into a model in memory (the sweep)."""

    def __init__(self, vlm_dir: str | os.PathLike, text_dir: str | os.PathLike, stack: ExitStack, dtype: str):
        check_compatible(vlm_dir, text_dir)  # config files only, before any tensor file is opened
        self.vlm, self.text = TensorSource(vlm_dir, stack), TensorSource(text_dir, stack)
        self.plan = dict(plan_merge(self.vlm, self.text))
        self.dtype = DTYPES[dtype]

    def out_dtype(self, key: str) -> str:
        src = self.vlm.dtype(key)
        return TORCH_TO_ST[self.dtype] if src in ("F64", "F32", "F16", "BF16") else src

    def tensor(self, key: str, alpha: float) -> torch.Tensor:
        t_key = self.plan[key]
        v = self.vlm.get(key)
        if t_key is None:
            return v.to(self.dtype) if v.is_floating_point() else v
        return lerp(v, self.text.get(t_key), alpha, self.dtype)


def merged_dirname(alpha: float) -> str:
    return f"merged_a{alpha:.2f}"


def merge_llm(
    vlm_dir: str | os.PathLike,
    text_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    alpha: float,
    max_shard_bytes: int = 2 << 30,
    dtype: str = "bfloat16",
) -> Path:
    """Merge the VLM's language model with the text LLM at `alpha` (weight on the VLM) into out_dir:
    sharded safetensors + index (one file when it fits), plus the VLM's config/tokenizer/processor."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / PROVENANCE_FILE).exists():
        raise FileExistsError(f"{out} exists and is not a previous merge output; refusing to overwrite")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with ExitStack() as stack:
            m = Merge(vlm_dir, text_dir, stack, dtype)
            entries = [(k, m.out_dtype(k), m.vlm.shape(k)) for k in m.vlm.keys()]
            n_shards = write_sharded(tmp, entries, lambda key: m.tensor(key, alpha), max_shard_bytes)
            n_merged = sum(1 for t in m.plan.values() if t is not None)
            n_total = len(m.plan)
        copy_model_files(vlm_dir, tmp, dtype)
        (tmp / PROVENANCE_FILE).write_text(
            json.dumps(
                {
                    "method": "linear",
                    "alpha": alpha,
                    "formula": "alpha * multimodal + (1 - alpha) * text",
                    "dtype": dtype,
                    "multimodal": str(vlm_dir),
                    "text": str(text_dir),
                    "merged_tensors": n_merged,
                    "copied_tensors": n_total - n_merged,
                    "shards": n_shards,
                },
                indent=2,
            )
        )
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

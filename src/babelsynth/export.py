"""`babelsynth export`: a trainer-ready copy of a finished run, in the conversation formats trainers load.

* `hf`: Parquet per language and shard, The Cauldron's shape (`images` as the Hugging Face `Image`
  feature with the bytes embedded, `texts` [{user, assistant, source}]), plus a dataset card (README.md)
  whose `configs` make each language a config: `datasets.load_dataset(<out>, "deu_Latn")`.
* `messages`: the same layout in the chat shape of TRL / LLaVA-style SFT sets: `messages`
  [{role, content: [{type: image|text, text}]}] + `images` (HF `Image`, embedded).
* `llava`: LLaVA JSON arrays per language and shard ({id, image, conversations [{from, value}]}, `<image>`
  placeholders in the first human turn) with the images as files under `images/`, referenced by path
  relative to the export root (LLaVA's `--image_folder`).

Memory is one shard at a time (the run's images are read per shard, `release.RunReader`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from babelsynth import storage
from babelsynth.layout import parquet_bytes
from babelsynth.release import RunReader

FORMATS = ("hf", "messages", "llava")
EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif"}
_S = {"dtype": "string", "_type": "Value"}
# Hugging Face `datasets` features, in the list form every datasets version reads
FEATURES = {
    "hf": {
        "sample_id": _S,
        "source_id": _S,
        "lang": _S,
        "task_type": _S,
        "images": [{"_type": "Image"}],
        "texts": [{"user": _S, "assistant": _S, "source": _S}],
    },
    "messages": {
        "sample_id": _S,
        "source_id": _S,
        "lang": _S,
        "task_type": _S,
        "messages": [{"role": _S, "content": [{"type": _S, "text": _S}]}],
        "images": [{"_type": "Image"}],
    },
}


def arrow_schema(fmt: str):
    import pyarrow as pa

    s = pa.string()
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    head = [("sample_id", s), ("source_id", s), ("lang", s), ("task_type", s)]
    if fmt == "hf":
        texts = pa.list_(pa.struct([("user", s), ("assistant", s), ("source", s)]))
        fields = [*head, ("images", pa.list_(image)), ("texts", texts)]
    else:
        content = pa.list_(pa.struct([("type", s), ("text", s)]))
        fields = [
            *head,
            ("messages", pa.list_(pa.struct([("role", s), ("content", content)]))),
            ("images", pa.list_(image)),
        ]
    meta = {"huggingface": json.dumps({"info": {"features": FEATURES[fmt]}})}
    return pa.schema(fields, metadata=meta)


def exchanges(conv: list[dict]) -> Iterator[tuple[str, str]]:
    for k in range(0, len(conv) - 1, 2):
        yield conv[k]["content"], conv[k + 1]["content"]


def hf_row(s: dict, source: str) -> dict:
    return {
        **{k: s[k] for k in ("sample_id", "source_id", "lang", "task_type")},
        "images": [{"bytes": b, "path": None} for b in s["images"]],
        "texts": [{"user": u, "assistant": a, "source": source} for u, a in exchanges(s["conversation"])],
    }


def messages_row(s: dict) -> dict:
    msgs = []
    for k, t in enumerate(s["conversation"]):
        parts = [{"type": "image", "text": None} for _ in s["images"]] if k == 0 else []
        msgs.append({"role": t["role"], "content": [*parts, {"type": "text", "text": t["content"]}]})
    return {
        **{k: s[k] for k in ("sample_id", "source_id", "lang", "task_type")},
        "messages": msgs,
        "images": [{"bytes": b, "path": None} for b in s["images"]],
    }


def llava_item(s: dict, paths: list[str]) -> dict:
    convs = []
    for k, t in enumerate(s["conversation"]):
        text = "\n".join(["<image>"] * len(paths) + [t["content"]]) if k == 0 else t["content"]
        convs.append({"from": "human" if t["role"] == "user" else "gpt", "value": text})
    item = {"id": s["sample_id"], "lang": s["lang"], "task_type": s["task_type"], "conversations": convs}
    if paths:
        item["image"] = paths[0] if len(paths) == 1 else paths
    return item


def export(run_uri: str, out_uri: str, fmt: str, lang: str | None = None) -> dict:
    """Write the export; returns {files, samples, images} counts. Idempotent: files are overwritten whole."""
    import pyarrow as pa

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; formats are {FORMATS}")
    reader = RunReader(run_uri)
    langs = [lang] if lang else reader.languages
    if lang and lang not in reader.languages:
        raise ValueError(f"run has no samples in {lang}; it has {reader.languages}")
    counts = {"files": 0, "samples": 0, "images": 0}
    written_images: set[str] = set()
    for lg in langs:
        for shard, files in reader.sample_files(lg).items():
            rows = list(reader.iter_shard(files, shard))
            if not rows:
                continue
            counts["samples"] += len(rows)
            if fmt == "llava":
                items = []
                for s in rows:
                    paths = []
                    for iid, data, f in zip(s["image_ids"], s["images"], s["image_formats"]):
                        rel = f"images/{iid[:2]}/{iid}.{EXT.get(f, 'bin')}"
                        if iid not in written_images:
                            storage.write_bytes(storage.join(out_uri, rel), data)
                            written_images.add(iid)
                            counts["images"] += 1
                        paths.append(rel)
                    items.append(llava_item(s, paths))
                body = json.dumps(items, ensure_ascii=False, indent=1).encode()
                storage.write_bytes(storage.join(out_uri, f"llava/{lg}/part-{shard:05d}.json"), body)
            else:
                conv = [hf_row(s, s.get("source") or "") if fmt == "hf" else messages_row(s) for s in rows]
                table = pa.Table.from_pylist(conv, schema=arrow_schema(fmt))
                storage.write_bytes(
                    storage.join(out_uri, f"data/{lg}/part-{shard:05d}.parquet"), parquet_bytes(table)
                )
                counts["images"] += sum(len(s["images"]) for s in rows)
            counts["files"] += 1
    if fmt != "llava":
        storage.write_bytes(storage.join(out_uri, "README.md"), dataset_card(reader, langs, fmt).encode())
    return counts


def dataset_card(reader: RunReader, langs: list[str], fmt: str) -> str:
    """A Hugging Face dataset card whose YAML `configs` map each language to its files."""
    configs = "\n".join(
        f"- config_name: {lg}\n  data_files:\n  - split: train\n    path: data/{lg}/*.parquet" for lg in langs
    )
    m = reader.manifest
    return (
        f"---\nconfigs:\n{configs}\n---\n\n# babelsynth run {m['run_id']} ({fmt} export)\n\n"
        f"Samples per language: {json.dumps({lg: m['samples_by_lang'][lg] for lg in langs})}.\n"
        f"Models: {json.dumps(m.get('models', {}))}. Config fingerprint: {m.get('config_fingerprint')}.\n"
    )

"""Input adapters on fixtures written in each format's real layout, the plan, ranged reads and identity.

Fixtures are written by the format's own tools: Hugging Face `datasets` for The Cauldron and the chat
`messages` shape (Parquet with the HF `Image` feature), `tarfile` for WebDataset shards, `json` for
LLaVA. S3 is a real S3 protocol server (moto), read through pyarrow's S3 filesystem.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from babelsynth import runner, storage
from babelsynth.config import load_config
from babelsynth.inputs.metering import Meter
from babelsynth.inputs.plan import plan_input, read_shard
from babelsynth.schema import to_table
from tests.proxies import moto_s3

ROOT = Path(__file__).resolve().parents[1]


def png(colour: str, size: int = 16) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def noise_png(seed: int, size: int = 32) -> bytes:
    """An image that does not compress away: byte counts in these tests are about real data."""
    import random

    from PIL import Image

    rng = random.Random(seed)
    im = Image.frombytes("RGB", (size, size), bytes(rng.getrandbits(8) for _ in range(size * size * 3)))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("BABELSYNTH_WORK", str(tmp_path))
    monkeypatch.setenv("BABELSYNTH_MODELS", str(tmp_path / "models"))  # never loaded here

    def make(input_uri, **over):
        return load_config(
            ROOT / "configs" / "demo.yaml",
            {"input_uri": input_uri, "output_uri": str(tmp_path / "out"), **over},
        )

    return make


def records(cfg) -> list[dict]:
    plan = plan_input(cfg)
    return [r for s in plan["shards"] for r in read_shard(cfg, plan, s)]


def conv(*texts: str) -> list[dict]:
    return [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(texts)]


def canonical_rows(n: int, start: int = 0, ids=None) -> list[dict]:
    return [
        {
            "source_id": ids[i] if ids else f"s{start + i:05d}",
            "task_type": "vqa",
            "conversation": conv(f"Question {start + i}?", f"Answer {start + i}."),
            "images": [noise_png(start + i)],
            "source": "fixture",
        }
        for i in range(n)
    ]


def write_parquet(path: Path, rows: list[dict], row_group_size: int) -> str:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    # statistics of small image blobs would land in the footer, which every shard of the file reads
    pq.write_table(
        to_table("input", rows), path, row_group_size=row_group_size, write_statistics=["source_id"]
    )
    return str(path)


# ------------------------------------------------------------------------------------ canonical Parquet
def test_canonical_v1_files_still_read_as_one_exchange(tmp_path, config):
    import pyarrow.parquet as pq

    rows = [
        {
            "source_id": "a",
            "task_type": "ocr",
            "question": "What word?",
            "answer": "STOP",
            "images": [png("red")],
        }
    ]
    pq.write_table(
        to_table("input", [{**r, "source": "old"} for r in rows], version=1), tmp_path / "v1.parquet"
    )
    (rec,) = records(config(str(tmp_path / "v1.parquet")))
    assert rec["conversation"] == conv("What word?", "STOP") and rec["images"] == [png("red")]


def test_plan_is_row_group_aligned_and_a_shard_reads_only_its_row_groups(tmp_path, config):
    uri = write_parquet(tmp_path / "in.parquet", canonical_rows(400), row_group_size=50)
    cfg = config(uri, **{"run.shard_size": 100})
    plan = plan_input(cfg)
    assert plan["shard_rows"] == [100] * 4
    assert [[p["loc"][0] for p in s] for s in plan["pieces"]] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert all(p["loc"][1:] == [0, 50] for s in plan["pieces"] for p in s)  # whole row groups
    size = Path(uri).stat().st_size
    for shard in (0, 3):
        meter = Meter()
        got = read_shard(cfg, plan, shard, meter)
        assert [r["source_id"] for r in got] == [f"s{i:05d}" for i in range(shard * 100, shard * 100 + 100)]
        assert meter.bytes == plan["shard_bytes"][shard] + plan["shard_overhead"][shard]  # + the footer
        assert meter.bytes <= 1.2 * plan["shard_bytes"][shard] and meter.bytes < 0.3 * size


def test_row_groups_larger_than_a_shard_are_split_with_a_warning(tmp_path, config):
    uri = write_parquet(tmp_path / "big.parquet", canonical_rows(90), row_group_size=90)
    plan = plan_input(config(uri, **{"run.shard_size": 30}))
    assert plan["shard_rows"] == [30, 30, 30]
    assert [p["loc"] for s in plan["pieces"] for p in s] == [[0, 0, 30], [0, 30, 60], [0, 60, 90]]
    assert any("larger than a shard" in w for w in plan["warnings"])
    cfg = config(uri, **{"run.shard_size": 30})
    assert [r["source_id"] for r in read_shard(cfg, plan, 1)] == [f"s{i:05d}" for i in range(30, 60)]


def test_split_row_groups_never_push_the_fan_out_past_max_shards(tmp_path, config):
    uri = write_parquet(tmp_path / "odd.parquet", canonical_rows(130), row_group_size=13)
    plan = plan_input(config(uri, **{"run.shard_size": 1, "run.max_shards": 15}))
    assert plan["shard_size"] == 9 and len(plan["shards"]) == 15 and sum(plan["shard_rows"]) == 130
    assert all(rows == 9 for rows in plan["shard_rows"][:-1])


def test_directory_glob_and_list_inputs(tmp_path, config):
    a = write_parquet(tmp_path / "data" / "a" / "part-0.parquet", canonical_rows(5), 5)
    b = write_parquet(tmp_path / "data" / "b" / "part-0.parquet", canonical_rows(7, start=5), 5)
    (tmp_path / "data" / "_SUCCESS").write_text("")
    as_dir = plan_input(config(str(tmp_path / "data")))
    assert [f["rel"] for f in as_dir["input"]["files"]] == ["a/part-0.parquet", "b/part-0.parquet"]
    assert as_dir["records"] == 12
    assert plan_input(config(str(tmp_path / "data" / "*" / "part-*.parquet")))["records"] == 12
    assert plan_input(config(str(tmp_path / "data" / "a" / "*.parquet")))["records"] == 5
    listed = plan_input(config([b, a]))
    assert [f["uri"] for f in listed["input"]["files"]] == [b, a] and listed["records"] == 12
    with pytest.raises(ValueError, match=r"matched no input file"):
        plan_input(config(str(tmp_path / "data" / "*.jsonl")))


def test_a_file_of_another_format_fails_naming_the_setting(tmp_path, config):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"images": [[]], "texts": [[]]}), tmp_path / "c.parquet")
    with pytest.raises(ValueError, match=r"no column\(s\) \['source_id', 'task_type'\].*set input.format"):
        plan_input(config(str(tmp_path / "c.parquet")))


# ------------------------------------------------------------------------------------ Hugging Face shapes
def hf_image_features():
    import datasets

    return (
        datasets.List(datasets.Image()) if hasattr(datasets, "List") else datasets.Sequence(datasets.Image())
    )


def test_cauldron_parquet_multi_turn_rows(tmp_path, config):
    """The Cauldron's layout as `datasets` writes it: `images` (HF Image) + `texts` [{user, assistant,
    source}], one subset per folder."""
    import datasets

    feats = datasets.Features(
        {
            "images": hf_image_features(),
            "texts": [{k: datasets.Value("string") for k in ("user", "assistant", "source")}],
        }
    )
    data = {
        "images": [[{"bytes": png("red"), "path": None}], [{"bytes": png("blue"), "path": None}] * 2],
        "texts": [
            [
                {"user": "What colour is it?", "assistant": "Red.", "source": "chartqa"},
                {"user": "Is it dark?", "assistant": "No.", "source": "chartqa"},
            ],
            [{"user": "Are they the same?", "assistant": "Yes.", "source": ""}],
        ],
    }
    out = tmp_path / "cauldron" / "ai2d" / "train-00000-of-00001.parquet"
    out.parent.mkdir(parents=True)
    datasets.Dataset.from_dict(data, features=feats).to_parquet(str(out))
    first, second = records(config(str(tmp_path / "cauldron"), **{"input.format": "cauldron"}))
    assert first["conversation"] == conv("What colour is it?", "Red.", "Is it dark?", "No.")
    assert first["task_type"] == "chart" and first["source"] == "chartqa"  # a known subset's task
    assert first["images"] == [png("red")] and first["source_id"] == "ai2d/train-00000-of-00001.parquet#0"
    assert second["source"] == "ai2d" and second["task_type"] == "textbook"  # the folder names the subset
    assert second["images"] == [png("blue")] * 2 and second["input_error"] is None


def test_messages_parquet_with_image_parts_and_placeholders(tmp_path, config):
    """The chat shape of TRL / LLaVA-style SFT sets (e.g. llava-instruct-mix-vsft): `messages` with typed
    content parts + `images`."""
    import datasets

    part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    feats = datasets.Features(
        {"messages": [{"role": datasets.Value("string"), "content": [part]}], "images": hf_image_features()}
    )
    img = [{"bytes": png("green"), "path": None}]
    data = {
        "messages": [
            [
                {
                    "role": "user",
                    "content": [{"type": "image", "text": None}, {"type": "text", "text": "Shape?"}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
                {"role": "user", "content": [{"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Green."}]},
            ],
            [
                {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            ],
            [
                {
                    "role": "user",
                    "content": [{"type": "image", "text": None}, {"type": "image", "text": None}],
                },
                {"role": "assistant", "content": [{"type": "text", "text": "Two."}]},
            ],
        ],
        "images": [img, img, img],
    }
    datasets.Dataset.from_dict(data, features=feats).to_parquet(str(tmp_path / "sft.parquet"))
    cfg = config(
        str(tmp_path / "sft.parquet"), **{"input.format": "messages", "input.task_type": "reasoning"}
    )
    ok, system, mismatch = records(cfg)
    assert ok["conversation"] == conv("Shape?", "A square.", "Colour?", "Green.")
    assert ok["images"] == [png("green")] and ok["task_type"] == "reasoning"
    assert (
        system["input_error"]["reason"] == "unsupported_role" and "system" in system["input_error"]["detail"]
    )
    assert mismatch["input_error"]["reason"] == "image_token_mismatch"


# ------------------------------------------------------------------------------------ LLaVA JSON / JSONL
@pytest.fixture
def llava_root(tmp_path):
    root = tmp_path / "llava"
    (root / "images" / "coco").mkdir(parents=True)
    (root / "images" / "coco" / "1.png").write_bytes(png("red"))
    (root / "images" / "coco" / "2.png").write_bytes(png("blue"))
    (tmp_path / "secret.png").write_bytes(png("black"))
    os.symlink(tmp_path / "secret.png", root / "images" / "link.png")
    return root


def llava(rid, image, *turns):
    return {
        "id": rid,
        "image": image,
        "conversations": [
            {"from": "human" if k % 2 == 0 else "gpt", "value": t} for k, t in enumerate(turns)
        ],
    }


def test_llava_jsonl_paths_quarantine_and_line_numbers(llava_root, config, monkeypatch):
    lines = [
        json.dumps(
            llava("ok", "coco/1.png", "<image>\nWhat colour?", "Red.", "Sure?", "Yes."), ensure_ascii=False
        ),
        json.dumps(llava("two", ["coco/1.png", "coco/2.png"], "<image>\n<image>\nSame?", "No.")),
        json.dumps(llava("up", "../../secret.png", "<image>\nQ?", "A.")),
        json.dumps(llava("abs", str(llava_root.parent / "secret.png"), "<image>\nQ?", "A.")),
        json.dumps(llava("link", "link.png", "<image>\nQ?", "A.")),
        "",
        '{"id": "broken", "image": "coco/1.png", "conversations": [',
        json.dumps(llava("gone", "coco/404.png", "<image>\nQ?", "A.")),
        json.dumps(llava("text-only", None, "Hello?", "Hi.")),
    ]
    (llava_root / "data.jsonl").write_text("\n".join(lines) + "\n")
    opened: list[str] = []
    real_open = storage.open_input
    monkeypatch.setattr(storage, "open_input", lambda uri: opened.append(uri) or real_open(uri))
    cfg = config(
        str(llava_root / "data.jsonl"),
        **{"input.format": "llava", "input.image_root": str(llava_root / "images")},
    )
    by_id = {r["source_id"]: r for r in records(cfg)}
    assert by_id["ok"]["conversation"] == conv("What colour?", "Red.", "Sure?", "Yes.")
    assert by_id["ok"]["images"] == [png("red")] and by_id["ok"]["input_error"] is None
    assert by_id["two"]["images"] == [png("red"), png("blue")]
    for rid in ("up", "abs", "link"):
        assert by_id[rid]["input_error"]["reason"] == "image_path_escapes", rid
    assert not any("secret" in u for u in opened)  # nothing outside the root was ever opened
    assert by_id["gone"]["input_error"]["reason"] == "missing_image_file"
    broken = by_id["data.jsonl:7"]
    assert broken["input_error"]["reason"] == "malformed_record"
    assert broken["input_error"]["detail"].startswith("data.jsonl line 7:")
    assert (
        by_id["text-only"]["images"] == [] and by_id["text-only"]["input_error"] is None
    )  # ingest: missing_image
    assert len(by_id) == 8  # the blank line is no record


def test_llava_json_array_reads_by_item_range_with_the_folder_as_default_root(tmp_path, config):
    (tmp_path / "img.png").write_bytes(png("red"))
    items = [
        llava(f"r{i}", "img.png", "<image>\nWhat is shown — in détail?", f"Réponse {i}.") for i in range(10)
    ]
    (tmp_path / "llava.json").write_text(json.dumps(items, ensure_ascii=False, indent=2))
    cfg = config(str(tmp_path / "llava.json"), **{"input.format": "llava", "run.shard_size": 4})
    plan = plan_input(cfg)
    assert plan["shard_rows"] == [4, 4, 2]
    got = read_shard(cfg, plan, 1)
    assert [r["source_id"] for r in got] == ["r4", "r5", "r6", "r7"]
    assert got[0]["conversation"] == conv("What is shown — in détail?", "Réponse 4.")


def test_a_non_utf8_file_stops_the_plan_with_a_clear_error(tmp_path, config):
    good = json.dumps(llava("a", "x.png", "Q?", "A."))
    (tmp_path / "latin1.jsonl").write_bytes(
        (good + "\n" + good.replace("Q?", "Caf\xe9?") + "\n").encode("latin-1")
    )
    cfg = config(str(tmp_path / "latin1.jsonl"), **{"input.format": "llava"})
    with pytest.raises(ValueError, match=r"latin1.jsonl is not UTF-8 text: byte 0xe9 at offset \d+.*iconv"):
        plan_input(cfg)


def test_a_json_array_that_does_not_parse_stops_the_plan(tmp_path, config):
    (tmp_path / "bad.json").write_text('[{"id": 1, "conversations": []}, {"id": 2,,}]')
    with pytest.raises(ValueError, match=r"bad.json is not valid JSON at line 1 column \d+.*JSONL"):
        plan_input(config(str(tmp_path / "bad.json"), **{"input.format": "llava"}))


# ------------------------------------------------------------------------------------ WebDataset
def write_tar(path: Path, samples: list[dict[str, bytes]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for files in samples:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return str(path)


def wds_samples(n: int, start: int = 0) -> list[dict[str, bytes]]:
    out = []
    for i in range(start, start + n):
        key = f"shard0/{i:06d}"
        if i % 3 == 0:
            out.append({f"{key}.png": noise_png(i), f"{key}.txt": f"A picture number {i}.".encode()})
        else:
            meta = {
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is it?"},
                    {"from": "gpt", "value": f"Thing {i}."},
                ]
            }
            out.append({f"{key}.jpg": noise_png(i), f"{key}.json": json.dumps(meta).encode()})
    return out


def test_webdataset_tar_samples_by_key_and_ranged_reads(tmp_path, config):
    samples = wds_samples(30)
    samples.append({"shard0/bad.png": png("red"), "shard0/bad.json": b"{not json"})
    samples.append({"shard0/latin.png": png("red"), "shard0/latin.txt": "caf\xe9".encode("latin-1")})
    uri = write_tar(tmp_path / "wds" / "train-000.tar", samples)
    cfg = config(str(tmp_path / "wds"), **{"input.format": "webdataset", "run.shard_size": 8})
    plan = plan_input(cfg)
    assert plan["shard_rows"] == [8, 8, 8, 8]
    meter = Meter()
    got = read_shard(cfg, plan, 1, meter)
    assert [r["source_id"] for r in got] == [f"shard0/{i:06d}" for i in range(8, 16)]
    assert meter.bytes == plan["shard_bytes"][1] < Path(uri).stat().st_size / 3  # its range only
    caption = next(r for r in got if r["source_id"].endswith("000009"))
    assert (
        caption["task_type"] == "captioning"
        and caption["conversation"][0]["content"] == "Describe the image."
    )
    assert caption["conversation"][1]["content"] == "A picture number 9." and caption["images"] == [
        noise_png(9)
    ]
    chat = next(r for r in got if r["source_id"].endswith("000010"))
    assert chat["conversation"] == conv("What is it?", "Thing 10.")
    last = read_shard(cfg, plan, 3)
    reasons = {r["source_id"]: (r["input_error"] or {}).get("reason") for r in last}
    assert reasons["shard0/bad"] == "malformed_record" and reasons["shard0/latin"] == "bad_encoding"


# ------------------------------------------------------------------------------------ identity
def test_duplicate_ids_are_quarantined_across_shards_first_occurrence_kept(tmp_path, config):
    """The same source_id in shard 0 and shard 2 (and twice inside shard 1): every repeat is rejected as
    duplicate_id by the ingest of its own shard, the first occurrence is kept, sample ids stay unique."""
    ids = [f"id{i}" for i in range(12)]
    ids[9] = "id1"  # shard 2 repeats shard 0
    ids[5] = ids[4]  # shard 1 repeats itself
    uri = write_parquet(tmp_path / "dups.parquet", canonical_rows(12, ids=ids), row_group_size=4)
    cfg = config(uri, **{"run.shard_size": 4})
    shards = runner.plan(cfg, "dups")
    assert runner.layout(cfg, "dups").read_plan()["duplicates"] == {"1": [[1, 1]], "2": [[1, 0]]}
    kept, rejected = [], []
    for s in shards:
        runner.run_stage(cfg, "dups", "ingest", s)
        doc = runner.layout(cfg, "dups").read_stage_result("ingest", s)
        kept += [(s, r["source_id"]) for r in doc["rows"]]
        rejected += [(s, r["source_id"], r["reason"], r["detail"]) for r in doc["rejected"]]
    assert [(s, i, why) for s, i, why, _ in rejected] == [
        (1, "id4", "duplicate_id"),
        (2, "id1", "duplicate_id"),
    ]
    assert "already seen in shard 0" in rejected[1][3]
    assert (0, "id1") in kept and len({i for _, i in kept}) == len(kept) == 10
    assert len({runner.sample_id(i, "deu_Latn") for _, i in kept}) == 10


def test_inspect_input_prints_counts_task_types_and_rows_and_writes_nothing(tmp_path, config, capsys):
    from babelsynth.cli import main

    uri = write_parquet(
        tmp_path / "in.parquet", canonical_rows(30, ids=[f"x{i % 25}" for i in range(30)]), 10
    )
    (tmp_path / "c.yaml").write_text((ROOT / "configs" / "demo.yaml").read_text())
    before = sorted(p for p in tmp_path.rglob("*"))
    main(["inspect-input", "--config", str(tmp_path / "c.yaml"), "--set", f"input_uri={uri}", "--rows", "2"])
    out = capsys.readouterr().out
    assert "records: 30 -> 2 shard(s)" in out and "duplicate source_ids: 5" in out
    assert (
        "first 20 records of shard 0:\n  task types: vqa=20" in out
        and "[1] source_id=x1" in out
        and "user: Question 1?" in out
    )
    assert sorted(p for p in tmp_path.rglob("*")) == before


# ------------------------------------------------------------------------------------ S3
@pytest.fixture(scope="module")
def s3():
    """A real S3 protocol server; input is read through pyarrow's S3 filesystem (ranged GETs)."""
    with moto_s3("inputs") as (_, client):
        yield client


def test_s3_parquet_and_webdataset_are_read_by_range(tmp_path, config, s3):
    local = write_parquet(tmp_path / "in.parquet", canonical_rows(200), row_group_size=25)
    s3.upload_file(local, "inputs", "cauldron/part-0.parquet")
    tar = write_tar(tmp_path / "t.tar", wds_samples(40))
    s3.upload_file(tar, "inputs", "wds/train-000.tar")
    cfg = config("s3://inputs/cauldron/", **{"run.shard_size": 50})
    plan = plan_input(cfg)
    assert plan["input"]["files"][0]["uri"] == "s3://inputs/cauldron/part-0.parquet"
    meter = Meter()
    got = read_shard(cfg, plan, 3, meter)
    assert [r["source_id"] for r in got] == [f"s{i:05d}" for i in range(150, 200)]
    assert meter.bytes == plan["shard_bytes"][3] + plan["shard_overhead"][3]
    assert meter.bytes < 0.35 * Path(local).stat().st_size
    wcfg = config("s3://inputs/wds/*.tar", **{"input.format": "webdataset", "run.shard_size": 10})
    wplan = plan_input(wcfg)
    meter = Meter()
    got = read_shard(wcfg, wplan, 2, meter)
    assert [r["source_id"] for r in got] == [f"shard0/{i:06d}" for i in range(20, 30)]
    assert meter.bytes == wplan["shard_bytes"][2]

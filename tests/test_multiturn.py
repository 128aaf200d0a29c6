"""Multi-turn samples through the whole pipeline on real engines, then out again as trainers load them.

Every prompt and every answer is its own text through recaption (one teacher request per assistant turn),
translate (each turn translated alone) and rephrase; roles and order survive in every language. The run
is then exported (hf, messages, llava) and read back with Hugging Face `datasets`, images decoded, and
through the deduplicated layout's reader.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from babelsynth import runner
from babelsynth.export import export
from babelsynth.languages import SOURCE_LANG
from babelsynth.release import RunReader
from babelsynth.sample_data import write_samples
from tests.conftest import make_config

pytestmark = pytest.mark.slow
LANGS = ["deu_Latn", "jpn_Jpan", "arb_Arab"]
FOLLOW_UPS = ("What colour are they?", "What is the background colour?")


@pytest.fixture(scope="module")
def run(models, vllm_servers, tmp_path_factory):
    out = tmp_path_factory.mktemp("multiturn")
    n = write_samples(str(out / "in.parquet"), n_per_task=1, bad=False, multi_turn=4)
    cfg = make_config(
        models,
        vllm_servers,
        str(out / "in.parquet"),
        str(out / "runs"),
        str(out / "cache"),
        **{"run.languages": LANGS, "run.language_ratio": 1.0, "run.shard_size": 3, "judge.mode": "report"},
    )
    manifest = runner.run_all(cfg, "multiturn")
    return cfg, manifest, n, out


def kept_rows(manifest) -> list[dict]:
    return list(RunReader(manifest["path"]).iter_samples())


def test_every_turn_is_its_own_teacher_request(run):
    cfg, m, n, _ = run
    lay = runner.layout(cfg, "multiturn")
    exchanges = sum(
        1 + len(r["followups_gt"]) // 2
        for s in range(m["shards"])
        for r in lay.read_stage_result("ingest", s)["rows"]
    )
    assert m["stages"]["ingest"]["out"] == n == 8 and exchanges == 4 + 4 * 3
    assert m["stages"]["recaption"]["requests_sent"] == exchanges  # report mode: no regeneration


def test_roles_and_order_are_kept_in_every_language(run):
    _, m, _, _ = run
    rows = kept_rows(m)
    multi = [r for r in rows if len(r["conversation"]) > 2]
    assert {r["lang"] for r in multi} == {SOURCE_LANG, *LANGS}
    for r in multi:
        assert [t["role"] for t in r["conversation"]] == ["user", "assistant"] * 3
        assert [t["role"] for t in r["conversation_en"]] == ["user", "assistant"] * 3
        assert (r["conversation"][0]["content"], r["conversation"][1]["content"]) == (
            r["prompt"],
            r["answer"],
        )
        assert r["conversation_en"][0]["content"].startswith("How many")
        assert tuple(r["conversation_en"][k]["content"] for k in (2, 4)) == FOLLOW_UPS
        assert all(t["content"].strip() for t in r["conversation"])
        if r["lang"] == SOURCE_LANG:
            assert r["conversation"] == r["conversation_en"]


def test_each_turn_is_translated_as_its_own_text(run, models):
    """The draft of every turn equals translating that turn alone: turns were never merged or reordered."""
    from babelsynth.backends.nllb_ct2 import NLLBTranslator

    cfg, m, _, _ = run
    lay = runner.layout(cfg, "multiturn")
    tr = NLLBTranslator(cfg.models.translator)
    checked = 0
    for s in range(m["shards"]):
        for r in lay.read_stage_result("translate", s)["rows"]:
            if r["lang"] == SOURCE_LANG or not r["followups_en"]:
                continue
            texts = [r["question"], r["answer_en"], *(t["content"] for t in r["followups_en"])]
            drafts = [r["draft_prompt"], r["draft_answer"], *r["followups_draft"]]
            assert [t.text for t in tr.translate(texts, r["lang"])] == drafts
            checked += 1
    assert checked >= 4 * len(LANGS) // 2
    for s in range(m["shards"]):  # the rephraser saw every turn too
        for r in lay.read_stage_result("rephrase", s)["rows"]:
            if r["lang"] != SOURCE_LANG and r["followups_en"]:
                assert len(r["followups_rephrase"]) == len(r["followups_en"]) == 4


def test_export_hf_and_messages_load_with_datasets_images_decoded(run, tmp_path):
    import datasets
    from PIL import Image

    _, m, _, _ = run
    for fmt in ("hf", "messages"):
        out = tmp_path / fmt
        counts = export(m["path"], str(out), fmt)
        assert counts["samples"] == sum(m["samples_by_lang"].values())
        for lang in [SOURCE_LANG, *LANGS]:
            ds = datasets.load_dataset(str(out), lang, split="train", cache_dir=str(tmp_path / "hf-cache"))
            assert ds.num_rows == m["samples_by_lang"][lang]
            for row in ds:
                assert row["images"] and all(isinstance(im, Image.Image) for im in row["images"])
                assert row["images"][0].size[0] > 0 and row["lang"] == lang
                if fmt == "hf":
                    assert all(t["user"] and t["assistant"] for t in row["texts"])
                else:
                    roles = [x["role"] for x in row["messages"]]
                    assert roles == ["user", "assistant"] * (len(roles) // 2)
                    first = row["messages"][0]["content"]
                    assert [p["type"] for p in first] == ["image"] * len(row["images"]) + ["text"]
            multi = [
                r for r in ds if len(r["texts" if fmt == "hf" else "messages"]) > (1 if fmt == "hf" else 2)
            ]
            assert multi, f"{fmt}/{lang}: the multi-turn samples are missing"


def test_export_llava_references_images_by_path(run, tmp_path):
    import datasets
    from PIL import Image

    _, m, _, _ = run
    out = tmp_path / "llava"
    export(m["path"], str(out), "llava", lang="jpn_Jpan")
    ds = datasets.load_dataset(
        "json",
        data_files=str(out / "llava" / "jpn_Jpan" / "*.json"),
        split="train",
        cache_dir=str(tmp_path / "c"),
    )
    assert ds.num_rows == m["samples_by_lang"]["jpn_Jpan"]
    for row in ds:
        convs = row["conversations"]
        assert [c["from"] for c in convs] == ["human", "gpt"] * (len(convs) // 2)
        assert convs[0]["value"].startswith("<image>\n")
        with Image.open(Path(out, row["image"])) as im:
            im.load()
            assert im.size[0] > 0
    assert not list(out.glob("*.parquet"))


def test_reader_joins_samples_and_images_by_id_for_datasets(run):
    """The deduplicated layout read directly: `datasets.IterableDataset.from_generator` over the reader."""
    import datasets
    from PIL import Image

    _, m, _, _ = run
    reader = RunReader(m["path"])
    assert m["image_index"]["by"] == "shard" and len(m["image_index"]["parts"]) == m["shards"]
    feats = datasets.Features(
        {
            "sample_id": datasets.Value("string"),
            "lang": datasets.Value("string"),
            "conversation": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
            "images": [datasets.Image()],
        }
    )

    def gen():
        for s in reader.iter_samples():
            yield {k: s[k] for k in ("sample_id", "lang", "conversation")} | {"images": s["images"]}

    ds = datasets.IterableDataset.from_generator(gen, features=feats)
    seen = 0
    ids = set()
    for row in ds:
        assert all(isinstance(im, Image.Image) for im in row["images"])
        ids.add(row["sample_id"])
        seen += 1
    assert seen == len(ids) == sum(m["samples_by_lang"].values())

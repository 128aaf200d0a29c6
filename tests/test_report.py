"""Seeing a run and living with it nightly, on real runs of the demo config (real vLLM servers, CTranslate2,
COMET on tiny models): report.html in a real headless Chromium, the dataset card against the manifest,
progress lines, `inspect`, the budget cap at real servers, and two nightly runs where the second regresses.
"""

from __future__ import annotations

import html.parser
import io
import json
import logging
import re
import shutil
import sqlite3
from contextlib import redirect_stdout
from pathlib import Path

import httpx
import pytest
import yaml

from babelsynth import nightly, progress, runner
from babelsynth.estimate import BudgetExceeded
from babelsynth.layout import OutputLayout, RunLayout
from babelsynth.sample_data import write_samples
from tests.conftest import make_config

pytestmark = pytest.mark.slow
LANGS = ["deu_Latn", "jpn_Jpan", "zho_Hant"]
OVER = {"run.languages": LANGS, "run.language_ratio": 1.0, "run.shard_size": 10}


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def small_input(tmp_path_factory) -> str:
    """Every task type (4 records each) and the three bad records the demo quarantines."""
    uri = str(tmp_path_factory.mktemp("report_in") / "samples.parquet")
    write_samples(uri, n_per_task=4)
    return uri


@pytest.fixture(scope="module")
def demo(models, vllm_servers, small_input, tmp_path_factory):
    """A run of configs/demo.yaml (19 records, 3 languages), its progress lines captured as a task log."""
    out = tmp_path_factory.mktemp("report_out")
    lines = Lines()
    logger = logging.getLogger("babelsynth.progress")
    old_level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    mp = pytest.MonkeyPatch()
    mp.setenv(progress.INTERVAL_ENV, "0")  # a line per step: the work is short here
    try:
        cfg = make_config(models, vllm_servers, small_input, str(out / "runs"), str(out / "cache"), **OVER)
        m = runner.run_all(cfg, "demo")
    finally:
        mp.undo()
        logger.removeHandler(lines)
        logger.setLevel(old_level)
    return cfg, m, lines.lines


# ------------------------------------------------------------------------------------------ the report
def test_the_report_renders_in_headless_chromium_offline(demo, tmp_path):
    from PIL import Image, ImageStat

    from tests.headless import render

    _, m, _ = demo
    page = render(Path(m["path"]) / "report.html")
    png = tmp_path / "report.png"
    png.write_bytes(page.png)
    with Image.open(png) as im:
        assert im.width == 1280 and im.height > 3000  # the whole page, not a blank viewport
        stats = ImageStat.Stat(im.convert("L"))
        assert stats.stddev[0] > 20, "screenshot is (nearly) one colour"
        assert len(im.convert("RGB").getcolors(1 << 20) or []) > 200
    assert page.title == "babelsynth run demo"
    plots = [i for i in page.images if not i["alt"].startswith("image ")]
    assert len(plots) == 6 and len(page.images) > len(plots)  # six plots, and thumbnails
    broken = [i for i in page.images if not (i["complete"] and i["naturalWidth"] > 0)]
    assert broken == [], broken
    assert {i["src_scheme"] for i in page.images} == {"data"}
    # no request left the machine: the page fetched only itself and its data: URLs, nothing reached the
    # proxy every non-loopback connection of the browser goes through
    assert {u.split(":", 1)[0] for u in page.requests} == {"file", "data"}
    assert page.failed == [] and page.proxied == []


def test_the_browser_check_sees_a_request_that_would_leave(tmp_path):
    """The checks above can fail: a page with a remote image is caught by both the log and the proxy."""
    from tests.headless import render

    probe = tmp_path / "probe.html"
    probe.write_text('<html><body><img alt="remote" src="http://example.com/x.png"></body></html>')
    page = render(probe)
    assert "http://example.com/x.png" in page.requests
    assert any("example.com" in x for x in page.proxied)
    assert not page.images[0]["naturalWidth"]


class _Doc(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> tuple[_Doc, str]:
    doc = _Doc()
    doc.feed(path.read_text())
    return doc, re.sub(r"\s+", " ", " ".join(doc.text))


def test_the_report_has_funnel_quality_references_samples_and_performance(demo):
    _, m, _ = demo
    doc, text = _parse(Path(m["path"]) / "report.html")
    csp = [
        a["content"] for t, a in doc.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"
    ]
    assert csp == ["default-src 'none'; img-src data:; style-src 'unsafe-inline'"]
    assert not [t for t, _ in doc.tags if t in ("script", "link", "iframe", "object")]
    assert not [a for _, a in doc.tags for k in ("src", "href") if a.get(k, "data:").split(":")[0] != "data"]
    # funnel with reasons, counts and shares (the three bad records, the judge's rejections)
    ingest = m["stages"]["ingest"]
    for reason, n in ingest["reasons"].items():
        assert f"{reason} {n} ({100 * n / ingest['in']:.1f}%)" in text
    for reason, n in m["stages"]["judge"]["reasons"].items():
        assert f"{reason} {n}" in text
    # per language, with the paper's reference values beside ours
    for lang in LANGS:
        assert lang in text
    assert "0.7876 → 0.8275" in text and "0.7271 → 0.8596" in text and "0.4436 → 0.7997" in text  # Table 7
    assert "0.7455 → 0.8293" in text and "27.2 → 140.8" in text and "11.0 → 61.2" in text
    for header in ("COMET draft", "COMET final", "rephrase win", "MTLD", "lang-ID pass", "length ratio"):
        assert header in text
    assert all(f"pass {g}" in text for g in ("comet", "mtld", "langid", "length_ratio", "repetition"))
    # samples: thumbnails, English recaption, target languages side by side, rejected per reason
    assert "recaption" in text and "ground truth" in text
    for reason in (*ingest["reasons"], *m["stages"]["judge"]["reasons"]):
        assert re.search(rf"\w+ / {reason}", text), reason
    # performance: model calls and cache hits per stage, measured
    u = m["stages"]["recaption"]["usage"]
    assert u["model_calls"] > 0 and u["tokens_out"] > 0 and u["cache_lookups"] >= u["model_calls"]
    assert "cache hit rate" in text and "tokens out/s" in text


def test_the_report_is_built_from_the_manifest_and_parquet_files_alone(demo, tmp_path):
    """A copy of the release without _stages/ (what another tool would write) reports the same."""
    from babelsynth.cli import main

    _, m, _ = demo
    copy = tmp_path / "elsewhere" / "demo"
    shutil.copytree(
        m["path"], copy, ignore=shutil.ignore_patterns("_stages", "report.html", "dataset_card.md")
    )
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["report", str(copy)]) == 0
    _, original = _parse(Path(m["path"]) / "report.html")
    _, rebuilt = _parse(copy / "report.html")
    assert rebuilt.replace(str(copy), m["path"]) == original
    assert (copy / "dataset_card.md").read_text() == (Path(m["path"]) / "dataset_card.md").read_text()
    # a manifest that only lists its files (another tool's): what the files hold is still reported
    (copy / "manifest.json").write_text(json.dumps({"run_id": "theirs", "files": m["files"]}))
    with redirect_stdout(io.StringIO()):
        assert main(["report", str(copy)]) == 0
    doc, text = _parse(copy / "report.html")
    assert "babelsynth run theirs" in text and all(lang in text for lang in LANGS)
    assert len([a for t, a in doc.tags if t == "img"]) >= 4  # COMET, lengths, ratios, MTLD plots + thumbnails


# ------------------------------------------------------------------------------------------ the card
def test_the_dataset_card_parses_and_its_lineage_is_the_manifests(demo):
    from huggingface_hub import DatasetCard

    _, m, _ = demo
    text = (Path(m["path"]) / "dataset_card.md").read_text()
    head = yaml.safe_load(text.split("---\n")[1])
    card = DatasetCard(text)
    assert card.data.to_dict() == head
    assert head["language"] == ["de", "en", "ja", "zh"] and head["license"] == "cc-by-nc-4.0"
    assert head["task_categories"] == ["image-text-to-text", "visual-question-answering"]
    assert head["size_categories"] == ["n<1K"] and sum(m["samples_by_lang"].values()) < 1000
    assert {c["config_name"] for c in head["configs"]} == {"default", *m["samples_by_lang"]}
    lin, meta = m["lineage"], head["babelsynth"]
    assert meta["run_id"] == m["run_id"] and meta["config_fingerprint"] == m["config_fingerprint"]
    assert meta["code_version"] == lin["code_version"]
    assert meta["models"] == {r: {"id": v["id"], "revision": v["revision"]} for r, v in lin["models"].items()}
    assert set(meta["models"]) == {"teacher", "judge", "rephraser", "translator", "comet"}
    assert meta["models"]["translator"]["revision"].startswith("content-sha256:")  # a local CT2 dir
    assert meta["prompts"] == lin["prompts"] and "judge/hallucination.v1" in lin["prompts"]
    body = card.text
    for v in lin["models"].values():
        assert f"`{v['id']}`" in body and f"`{v['revision'] or 'not recorded'}`" in body
    for pid, sha in lin["prompts"].items():
        assert f"| `{pid}` | `{sha}` |" in body
    for lang, n in m["samples_by_lang"].items():
        assert re.search(rf"\| `{lang}` \| {n} \|", body), lang
    assert f"config fingerprint: `{m['config_fingerprint']}`" in body
    assert "CC-BY-NC 4.0" in body and "inherits the terms of the teacher" in body
    import pyarrow.parquet as pq

    f = next(f for f in m["files"] if f["table"] == "samples")
    for col in pq.read_schema(Path(m["path"], f["path"])).names:
        assert f"| `{col}` |" in body, col
    assert 'datasets.load_dataset("parquet"' in body


# ------------------------------------------------------------------------------------------ progress, inspect
def test_model_stages_log_progress_lines(demo):
    _, _, lines = demo
    for stage, unit in (("recaption", "requests"), ("judge", "requests"), ("rephrase", "requests")):
        mine = [x for x in lines if x.startswith(f"{stage} shard ")]
        assert mine and all(re.search(rf"\d+/\d+ {unit} \(\d+%\)", x) for x in mine), stage
    assert any(x.startswith("translate shard ") and " segments " in x for x in lines)
    assert any(x.startswith("score shard ") and " pairs " in x for x in lines)
    assert any(x.startswith("run demo: ") and "tasks" in x for x in lines)


def test_inspect_shows_a_finished_and_a_running_run(demo, tmp_path):
    from babelsynth.cli import main

    cfg, m, _ = demo
    out = io.StringIO()
    with redirect_stdout(out):
        main(["inspect", m["path"]])
    text = out.getvalue()
    for stage in ("ingest", "recaption", "judge", "translate", "rephrase", "score", "write"):
        assert re.search(rf"^  {stage}\s+2/2\s+##$", text, re.M), stage
    assert "commit: " in text and "alarms: passed" in text and "report: " in text
    # a run that has planned and ingested one shard only
    runner.plan(cfg, "halfway")
    runner.run_stage(cfg, "halfway", "ingest", 1)
    out = io.StringIO()
    with redirect_stdout(out):
        main(["inspect", RunLayout(cfg.output_uri, "halfway").root])
    text = out.getvalue()
    assert re.search(r"^  ingest\s+1/2\s+\.#$", text, re.M) and re.search(
        r"^  recaption\s+0/2\s+\.\.$", text, re.M
    )
    assert "commit: not yet" in text and "plan: 2 shard(s) of 10 records, 19 input records" in text


# ------------------------------------------------------------------------------------------ budget cap
def _served(servers) -> float:
    """Requests the vLLM servers finished (their Prometheus counter)."""
    total = 0.0
    for s in servers.values():
        for line in httpx.get(f"{s.root_url}/metrics", timeout=30).text.splitlines():
            if line.startswith("vllm:request_success_total"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_the_budget_cap_stops_a_run_before_any_model_call(demo, models, vllm_servers, small_input, tmp_path):
    cfg, _, _ = demo
    capped = make_config(
        models,
        vllm_servers,
        small_input,
        cfg.output_uri,
        cfg.cache_dir,
        **OVER,
        **{"estimate.max_gpu_hours": 1e-9},
    )
    db = Path(cfg.cache_dir) / "requests.sqlite"
    rows = lambda: sqlite3.connect(db).execute("SELECT count(*) FROM kv").fetchone()[0]  # noqa: E731
    served, cached = _served(vllm_servers), rows()
    assert served > 0  # the counter counts: the demo run made requests
    with pytest.raises(BudgetExceeded, match="refused before any model call"):
        runner.run_all(capped, "over-budget")
    assert _served(vllm_servers) == served and rows() == cached  # no request, no engine answer cached
    assert not Path(RunLayout(cfg.output_uri, "over-budget").root).exists()


# ------------------------------------------------------------------------------------------ nightly
@pytest.fixture(scope="module")
def nights(demo, models, vllm_servers, small_input, tmp_path_factory):
    """Three runs under one output root: night1 publishes; night2 enforces a stricter COMET gate on
    deu_Latn (its kept rows fall) and fails its alarm; night3 repeats night2 and passes (no further drop)."""
    from babelsynth.cli import main

    cfg0, _, _ = demo
    root = tmp_path_factory.mktemp("nights")
    base = {
        **OVER,
        "nightly.alarms": [{"metric": "kept_share", "max_drop": 0.1, "action": "fail"}],
        "nightly.keep_last": 1,
    }
    stricter = {
        "score.gates.comet.mode": "enforce",
        "score.gates.comet.threshold": None,
        "score.gates.comet.per_lang": {"deu_Latn": 0.99},
    }

    def config(**over):  # the demo's cache: these runs make no model call the demo made
        return make_config(models, vllm_servers, small_input, str(root), cfg0.cache_dir, **base, **over)

    c1, c2 = config(), config(**stricter)
    res = {"m1": runner.run_all(c1, "night1"), "p1": nightly.publish(c1, "night1")}
    res["m2"] = runner.run_all(c2, "night2")
    with pytest.raises(nightly.AlarmFailed) as e:
        nightly.publish(c2, "night2")
    res["refusal"] = str(e.value)
    cfg_file = root / "night2.yaml"
    cfg_file.write_text(yaml.safe_dump(c2.model_dump(mode="json")))
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stderr", err)
        res["cli_rc"] = main(["publish", "--config", str(cfg_file), "--run-id", "night2"])
    res["cli_err"] = err.getvalue()
    res["latest_after_2"] = nightly.read_latest(str(root))
    res["report2"] = _parse(Path(RunLayout(str(root), "night2").report_uri))[1]
    res["retain_after_2"] = nightly.retain(c2)
    res["dirs_after_2"] = sorted(p.name for p in root.iterdir())
    res["m3"] = runner.run_all(c2, "night3")
    res["p3"] = nightly.publish(c2, "night3")
    res["retain_after_3"] = nightly.retain(c2)
    res["dirs_after_3"] = sorted(p.name for p in root.iterdir())
    res["root"] = root
    return res


def test_the_second_run_is_compared_with_the_first(nights):
    m1, m2 = nights["m1"], nights["m2"]
    cmp = m2["comparison"]
    assert cmp["baseline"]["run_id"] == "night1"
    deu = cmp["languages"]["deu_Latn"]
    assert m2["samples_by_lang"].get("deu_Latn", 0) < m1["samples_by_lang"]["deu_Latn"]
    assert (
        deu["rows"]["delta"] == m2["samples_by_lang"].get("deu_Latn", 0) - m1["samples_by_lang"]["deu_Latn"]
    )
    assert deu["kept_share"]["delta"] < -0.1
    assert cmp["languages"]["jpn_Jpan"]["rows"]["delta"] == 0  # only the stricter language moved
    assert any(k.startswith("score.gates.comet") for k in cmp["config_changed"])
    assert cmp["models_changed"] == {} and cmp["prompts_changed"] == {}
    assert m2["stages"]["recaption"]["usage"]["model_calls"] == 0  # answered from the demo's cache
    # the report shows the delta and the alarm
    text = nights["report2"]
    assert "Baseline: night1" in text and "FAIL kept_share [deu_Latn]" in text
    assert "score.gates.comet" in text


def test_the_failed_alarm_stops_publishing_and_latest_names_the_first(nights):
    assert nights["p1"]["published"] and nights["m2"]["alarms"]["failed"]
    assert (
        "`latest` still names 'night1'" in nights["refusal"] and "kept_share [deu_Latn]" in nights["refusal"]
    )
    assert nights["latest_after_2"]["run_id"] == "night1"
    assert nights["latest_after_2"]["manifest_uri"] == RunLayout(str(nights["root"]), "night1").manifest_uri
    assert nights["cli_rc"] == 2 and "NOT PUBLISHED" in nights["cli_err"]


def test_retention_keeps_the_last_k_and_never_the_run_latest_names(nights):
    after2 = nights["retain_after_2"]  # keep_last=1: night2 is the last, night1 is what latest names
    assert after2["removed"] == [] and after2["kept"] == ["night1", "night2"]
    assert {"night1", "night2"} <= set(nights["dirs_after_2"])
    assert (
        nights["m3"]["comparison"]["baseline"]["run_id"] == "night2" and not nights["m3"]["alarms"]["failed"]
    )
    assert nights["p3"]["published"] and nights["p3"]["latest"]["run_id"] == "night3"
    after3 = nights["retain_after_3"]
    assert sorted(after3["removed"]) == ["night1", "night2"] and after3["kept"] == ["night3"]
    assert nights["dirs_after_3"] == ["_history", "latest.json", "night2.yaml", "night3"]  # (our config file)
    out = OutputLayout(str(nights["root"]))
    assert [e["run_id"] for e in out.history()] == ["night3"]
    assert json.loads(Path(out.latest_uri).read_text())["run_id"] == "night3"

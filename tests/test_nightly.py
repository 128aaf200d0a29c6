"""Nightly life on hand-made manifests (no model): per-language metrics, comparison, alarm rules, the
`latest` pointer and retention. The same promises on two real pipeline runs are in tests/test_report.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from babelsynth import nightly
from babelsynth.config import load_config
from babelsynth.layout import OutputLayout, RunLayout

ROOT = Path(__file__).resolve().parents[1]
GATES = ("comet", "mtld", "langid", "length_ratio", "repetition")


def manifest(
    run_id: str, created: int, kept: dict[str, tuple[int, int]], comet: float = 0.8, **extra
) -> dict:
    """A committed run's manifest as nightly reads it: per language (kept, assigned)."""
    by_lang = {lg: {"in": a, "out": k, "rejected": a - k} for lg, (k, a) in kept.items()}
    return {
        "run_id": run_id,
        "created_unix": created,
        "samples_by_lang": {lg: k for lg, (k, _) in kept.items() if k},
        "stages": {"score": {"by_lang": by_lang}},
        "languages": {
            lg: {
                "rows": a,
                "kept": k,
                "comet_final": None if lg == "eng_Latn" else comet,
                "mtld": 40.0,
                "pass_rate": dict.fromkeys(GATES, k / a),
                "gate_rows": dict.fromkeys(GATES, a),
            }
            for lg, (k, a) in kept.items()
        },
        "config": extra.pop("config", {"score": {"gates": {"comet": {"threshold": 0.5}}}}),
        "lineage": extra.pop(
            "lineage", {"models": {"teacher": {"id": "t1", "revision": "r1"}}, "prompts": {}}
        ),
        **extra,
    }


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("BABELSYNTH_WORK", str(tmp_path))
    monkeypatch.setenv("BABELSYNTH_MODELS", str(tmp_path / "models"))

    def make(**over):
        return load_config(ROOT / "configs" / "demo.yaml", {"output_uri": str(tmp_path / "out"), **over})

    return make


def commit(cfg, m: dict) -> RunLayout:
    """What runner.commit does for nightly: register (history, comparison, alarms), then the manifest."""
    lay = RunLayout(cfg.output_uri, m["run_id"])
    (Path(lay.root) / "samples").mkdir(parents=True, exist_ok=True)
    (Path(lay.root) / "samples" / "part.parquet").write_bytes(b"data")
    nightly.register(cfg, lay, m)
    lay.write_manifest(m)
    return lay


GOOD = {"eng_Latn": (10, 10), "deu_Latn": (9, 10), "jpn_Jpan": (8, 10)}


def test_metrics_per_language_and_for_the_run():
    m = nightly.metrics(manifest("a", 1, GOOD, comet=0.7))
    assert m["deu_Latn"]["kept_share"] == 0.9 and m["deu_Latn"]["rows"] == 9
    assert m["deu_Latn"]["comet_final"] == 0.7 and m["deu_Latn"]["pass_rate.mtld"] == 0.9
    assert m["all"]["rows"] == 27 and m["all"]["kept_share"] == 27 / 30
    assert m["all"]["comet_final"] == pytest.approx(0.7)  # English carries no COMET: not in the mean


def test_the_comparison_shows_deltas_and_what_changed(cfg):
    c = cfg()
    prev = manifest(
        "a", 1, GOOD, lineage={"models": {"teacher": {"id": "t1", "revision": "r1"}}, "prompts": {"p": "1"}}
    )
    cur = manifest(
        "b",
        2,
        {**GOOD, "deu_Latn": (2, 10)},
        config={"score": {"gates": {"comet": {"threshold": 0.9}}}},
        lineage={"models": {"teacher": {"id": "t2", "revision": "r1"}}, "prompts": {"p": "2"}},
    )
    cmp = nightly.compare(prev, cur)
    assert cmp["baseline"]["run_id"] == "a"
    d = cmp["languages"]["deu_Latn"]
    assert d["rows"] == {"previous": 9, "current": 2, "delta": -7}
    assert d["kept_share"]["delta"] == pytest.approx(-0.7)
    assert cmp["languages"]["jpn_Jpan"]["rows"]["delta"] == 0
    assert cmp["models_changed"] == {"teacher": ["t1", "t2"]}
    assert cmp["prompts_changed"] == {"p": ["1", "2"]}
    assert cmp["config_changed"] == {"score.gates.comet.threshold": [0.5, 0.9]}
    assert nightly.compare(None, cur) == {"baseline": None}
    assert c.nightly.baseline == "previous"


@pytest.mark.parametrize(
    ("rule", "fires"),
    [
        ({"metric": "kept_share", "max_drop": 0.5}, ["deu_Latn"]),  # 0.9 -> 0.2
        ({"metric": "kept_share", "max_drop": 0.8}, []),
        ({"metric": "rows", "max_drop_relative": 0.5}, ["deu_Latn"]),  # 9 -> 2: -78%
        ({"metric": "kept_share", "lang": "jpn_Jpan", "max_drop": 0.01}, []),
        ({"metric": "kept_share", "lang": "all", "max_drop": 0.2}, ["all"]),  # 27/30 -> 20/30
        ({"metric": "comet_final", "min": 0.85}, ["deu_Latn", "jpn_Jpan"]),  # an absolute floor, per language
        ({"metric": "comet_final", "lang": "all", "min": 0.85}, ["all"]),
        ({"metric": "pass_rate.comet", "max_drop": 0.5}, ["deu_Latn"]),
    ],
)
def test_alarm_rules(cfg, rule, fires):
    c = cfg(**{"nightly.alarms": [{**rule, "action": "fail"}]})
    prev, cur = manifest("a", 1, GOOD), manifest("b", 2, {**GOOD, "deu_Latn": (2, 10)})
    res = nightly.check_alarms(c, cur, nightly.compare(prev, cur))
    assert [f["lang"] for f in res["fired"]] == fires
    assert res["failed"] == bool(fires)


def test_a_language_that_vanished_fires_its_drop(cfg):
    c = cfg(**{"nightly.alarms": [{"metric": "rows", "max_drop": 0, "action": "warn"}]})
    prev, cur = manifest("a", 1, GOOD), manifest("b", 2, {"eng_Latn": (10, 10), "deu_Latn": (9, 10)})
    res = nightly.check_alarms(c, cur, nightly.compare(prev, cur))
    assert [(f["lang"], f["previous"], f["current"]) for f in res["fired"]] == [("jpn_Jpan", 8, 0.0)]
    assert not res["failed"]  # warn only


def test_bad_alarm_rules_fail_at_load(cfg):
    with pytest.raises(ValueError, match="unknown metric 'comet'"):
        cfg(**{"nightly.alarms": [{"metric": "comet", "max_drop": 0.1}]})
    with pytest.raises(ValueError, match="set max_drop, max_drop_relative or min"):
        cfg(**{"nightly.alarms": [{"metric": "rows"}]})


def test_a_failed_alarm_keeps_latest_on_the_last_good_run(cfg):
    c = cfg(**{"nightly.alarms": [{"metric": "kept_share", "max_drop": 0.1, "action": "fail"}]})
    commit(c, manifest("good", 100, GOOD))
    first = nightly.publish(c, "good")
    assert first["published"] and first["latest"]["run_id"] == "good"
    commit(c, manifest("bad", 200, {**GOOD, "deu_Latn": (1, 10)}))
    bad = RunLayout(c.output_uri, "bad").read_manifest()
    assert bad["alarms"]["failed"] and bad["comparison"]["baseline"]["run_id"] == "good"
    with pytest.raises(nightly.AlarmFailed, match=r"`latest` still names 'good'.*kept_share \[deu_Latn\]"):
        nightly.publish(c, "bad")
    assert OutputLayout(c.output_uri).read_latest()["run_id"] == "good"
    with pytest.raises(nightly.AlarmFailed):  # a retry fails the same way: the verdict is in the manifest
        nightly.publish(c, "bad")


def test_warn_alarms_publish_and_an_older_run_never_moves_latest_back(cfg):
    c = cfg(**{"nightly.alarms": [{"metric": "kept_share", "max_drop": 0.1, "action": "warn"}]})
    commit(c, manifest("n1", 100, GOOD))
    commit(c, manifest("n2", 200, {**GOOD, "deu_Latn": (1, 10)}))
    res = nightly.publish(c, "n2")
    assert res["published"] and res["warnings"] and "deu_Latn" in res["warnings"][0]
    late = nightly.publish(c, "n1")  # an older run's publish, retried late
    assert not late["published"] and OutputLayout(c.output_uri).read_latest()["run_id"] == "n2"


def test_publishing_an_uncommitted_run_is_an_error(cfg):
    with pytest.raises(RuntimeError, match="not committed"):
        nightly.publish(cfg(), "never")


def test_the_latest_pointer_is_one_small_json_object_written_atomically(cfg):
    c = cfg()
    lay = commit(c, manifest("r", 100, GOOD))
    nightly.publish(c, "r")
    out = Path(c.output_uri)
    doc = json.loads((out / "latest.json").read_text())
    assert (
        doc["manifest_uri"] == lay.manifest_uri and doc["path"] == lay.root and doc["committed_unix"] == 100
    )
    assert not [p for p in out.iterdir() if p.name.startswith(".latest.json")]  # no temp file left
    assert nightly.read_latest(c.output_uri) == doc


def test_retention_keeps_the_last_k_and_always_the_latest(cfg):
    c = cfg()
    for i in range(5):
        commit(c, manifest(f"run{i}", 100 + i, GOOD))
    nightly.publish(c, "run1")  # latest names an old run
    OutputLayout(c.output_uri).write_latest({**nightly.read_latest(c.output_uri), "committed_unix": 10**10})
    (Path(c.output_uri) / "running" / "_stages").mkdir(parents=True)  # a run still in progress: no manifest
    other = cfg(**{"nightly.series": "backfill"})
    commit(other, manifest("other", 50, GOOD))
    res = nightly.retain(c, keep_last=2)
    assert sorted(res["removed"]) == ["run0", "run2"]
    left = sorted(p.name for p in Path(c.output_uri).iterdir())
    assert left == ["_history", "latest.json", "other", "run1", "run3", "run4", "running"]
    assert sorted(p.stem for p in (Path(c.output_uri) / "_history").iterdir()) == [
        "other",
        "run1",
        "run3",
        "run4",
    ]
    assert nightly.retain(c, keep_last=2)["removed"] == []  # idempotent


def test_an_interrupted_removal_is_finished_next_time(cfg, monkeypatch):
    c = cfg()
    for i in range(3):
        commit(c, manifest(f"run{i}", 100 + i, GOOD))
    calls = []

    def crash(self, run_id):  # fault injection: the process dies after marking, before deleting
        calls.append(run_id)
        raise KeyboardInterrupt

    monkeypatch.setattr(OutputLayout, "delete_run", crash)
    with pytest.raises(KeyboardInterrupt):
        nightly.retain(c, keep_last=1)
    monkeypatch.undo()
    assert json.loads((Path(c.output_uri) / "_history" / "run0.json").read_text())["retiring"] is True
    assert [e["run_id"] for e in nightly.committed_runs(OutputLayout(c.output_uri), "default")] == [
        "run1",
        "run2",
    ]
    res = nightly.retain(c, keep_last=1)
    assert sorted(res["removed"]) == ["run0", "run1"] and not (Path(c.output_uri) / "run0").exists()


def test_the_run_summary_names_each_column_once():
    """The log's quality table used to head two different columns `mtld` (a gate's pass rate, the mean)."""
    from babelsynth.gating import format_language_summary

    lang = manifest("a", 1, GOOD)["languages"]["deu_Latn"]
    row = {**lang, "comet_draft": 0.7, "rephrase_selected": 0.5}
    head = format_language_summary({"deu_Latn": row})[2].split()
    assert len(head) == len(set(head)) and "mtld" in head and "p.mtld" in head

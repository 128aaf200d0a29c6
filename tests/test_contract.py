"""The stage contract, enforced by the runner on every shard (distilabel's wiring check, on real rows).

A stage may read only the columns it declares and write only the columns it declares, and every row it
is given (or counts in) must end in its output or its rejects exactly once per (source_id, lang). A stage
that breaks this fails its task, naming the stage and the columns or keys, and its result is not kept.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from babelsynth import runner
from babelsynth.cache import Cache
from babelsynth.config import load_config
from babelsynth.runner import StageContractError, check_contract
from babelsynth.sample_data import write_samples
from babelsynth.schema import columns
from babelsynth.stages import BY_NAME, STAGES, Context, Stage, StageResult, reject
from tests.conftest import make_config

RUNNER_COLUMNS = {"run_id", "sample_id", "shard"}  # stamped by the writer


# ------------------------------------------------------------------------------ declarations
def test_each_stage_reads_what_upstream_wrote():
    available = set(STAGES[0].reads)
    for stage in STAGES:
        missing = set(stage.reads) - available
        assert not missing, f"{stage.name} reads {missing} that no earlier stage writes"
        available |= set(stage.writes)


def test_samples_schema_is_fully_produced():
    produced = set().union(*(s.writes for s in STAGES)) | RUNNER_COLUMNS
    missing = set(columns("samples")) - produced
    assert not missing, f"samples columns nobody writes: {missing}"


def test_stage_names_are_unique_and_documented():
    names = [s.name for s in STAGES]
    assert len(names) == len(set(names))
    for s in STAGES:
        assert s.fn.__doc__, f"stage {s.name} has no docstring"


# ------------------------------------------------------------------------------ check_contract, pure
ROWS = [
    {"source_id": f"s{i}", "task_type": "vqa", "question": f"q{i}", "answer_en": f"a{i}"} for i in range(4)
]


def _stage(fn, reads=("source_id", "question"), writes=("answer_en",)) -> Stage:
    return Stage("probe", fn, reads, writes)


def _through_tracking(stage: Stage, rows=ROWS):
    """What run_stage does: rows that record their lookups, then the contract check."""
    from babelsynth.runner import track_reads

    tracked, read = track_reads(rows)
    return check_contract(stage, 7, rows, stage.fn(None, tracked), read)


def test_a_stage_that_keeps_its_contract_passes():
    ok = _stage(lambda ctx, rows: StageResult([{**r, "answer_en": r["question"].upper()} for r in rows]))
    assert _through_tracking(ok) == {"eng_Latn": 4}


def test_reading_an_undeclared_column_fails_naming_it():
    sneaky = _stage(lambda ctx, rows: StageResult([{**r, "answer_en": r["task_type"]} for r in rows]))
    with pytest.raises(StageContractError, match=r"stage probe \(shard 7\) read column\(s\) task_type"):
        _through_tracking(sneaky)


def test_writing_an_undeclared_column_fails_naming_it():
    sneaky = _stage(lambda ctx, rows: StageResult([{**r, "answer_en": "x", "secret": 1} for r in rows]))
    with pytest.raises(StageContractError, match=r"wrote column\(s\) secret, which it does not declare"):
        _through_tracking(sneaky)


def test_changing_an_undeclared_column_is_a_write():
    sneaky = _stage(lambda ctx, rows: StageResult([{**r, "question": "changed"} for r in rows]))
    with pytest.raises(StageContractError, match=r"wrote column\(s\) question"):
        _through_tracking(sneaky)


def test_passing_columns_through_is_not_reading_them():
    through = _stage(lambda ctx, rows: StageResult([dict(r) for r in rows]), reads=(), writes=())
    assert _through_tracking(through) == {"eng_Latn": 4}


# ------------------------------------------------------------------------------ reconciliation in run_stage
@pytest.fixture
def ingested(tmp_path, monkeypatch):
    """A real plan and a real ingest result for one shard of 8 records; the next stage is swapped."""
    monkeypatch.setenv("BABELSYNTH_WORK", str(tmp_path))
    monkeypatch.setenv("BABELSYNTH_MODELS", str(tmp_path / "models"))  # never loaded here
    write_samples(str(tmp_path / "input" / "samples.parquet"), n_per_task=2, bad=False)
    cfg = load_config("configs/demo.yaml", {"run.shard_size": 8})
    runner.plan(cfg, "contract")
    runner.run_stage(cfg, "contract", "ingest", 0)
    return cfg


def _swap_recaption(monkeypatch, fn) -> None:
    real = BY_NAME["recaption"]
    monkeypatch.setitem(BY_NAME, "recaption", replace(real, fn=fn, reads=("source_id",), writes=()))


def _drop_one(ctx, rows):
    return StageResult([dict(r) for r in rows[1:]])


def _duplicate_one(ctx, rows):
    return StageResult([dict(r) for r in rows] + [dict(rows[0])])


def _drop_one_duplicate_another(ctx, rows):
    return StageResult([dict(r) for r in rows[1:]] + [dict(rows[1])])


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (_drop_one, r"lost 1 row\(s\), neither kept nor rejected: \('{first}', 'eng_Latn'\)"),
        (_duplicate_one, r"duplicated 1 row\(s\): \('{first}', 'eng_Latn'\)"),
        (
            _drop_one_duplicate_another,
            r"lost 1 row.*\('{first}', 'eng_Latn'\).*duplicated 1 row.*\('{second}'",
        ),
    ],
    ids=["drops", "duplicates", "drops-and-duplicates"],
)
def test_a_stage_that_loses_or_duplicates_rows_fails_its_task_and_keeps_nothing(
    ingested, monkeypatch, fn, message
):
    rows = runner.layout(ingested, "contract").read_stage_result("ingest", 0)["rows"]
    _swap_recaption(monkeypatch, fn)
    pattern = r"stage recaption \(shard 0\) does not reconcile.*" + message.format(
        first=rows[0]["source_id"], second=rows[1]["source_id"]
    )
    with pytest.raises(StageContractError, match=pattern):
        runner.run_stage(ingested, "contract", "recaption", 0, Cache(ingested.cache_dir + "/c.sqlite"))
    assert not runner.layout(ingested, "contract").has_stage_result("recaption", 0)


def test_a_rejected_row_counts_as_accounted_for(ingested, monkeypatch):
    def keep_half(ctx, rows):
        return StageResult(
            [dict(r) for r in rows[::2]], [reject(r, "recaption", "probe") for r in rows[1::2]]
        )

    _swap_recaption(monkeypatch, keep_half)
    stats = runner.run_stage(ingested, "contract", "recaption", 0, Cache(ingested.cache_dir + "/c.sqlite"))
    assert (
        stats["in"] == 8 and stats["out"] == 4 and stats["rejected"] == 4 and stats["reasons"] == {"probe": 4}
    )


def test_an_expansion_must_cover_its_input(ingested, monkeypatch):
    """translate-style counted_in: the jobs given, checked against the input, not derived from the output."""

    def forgets_english(ctx, rows):
        out = [{**r, "lang": "deu_Latn"} for r in rows]
        return StageResult(out, counted_in=[(r["source_id"], "deu_Latn") for r in rows])

    real = BY_NAME["recaption"]
    monkeypatch.setitem(
        BY_NAME, "recaption", replace(real, fn=forgets_english, reads=("source_id",), writes=("lang",))
    )
    with pytest.raises(StageContractError, match="input rows not counted"):
        runner.run_stage(ingested, "contract", "recaption", 0, Cache(ingested.cache_dir + "/c.sqlite"))


# ------------------------------------------------------------------------------ every real stage, real rows
@pytest.fixture(scope="module")
def real_run(models, vllm_servers, tmp_path_factory):
    out = tmp_path_factory.mktemp("contract")
    write_samples(str(out / "in.parquet"), n_per_task=2, bad=True)
    cfg = make_config(
        models,
        vllm_servers,
        str(out / "in.parquet"),
        str(out / "runs"),
        str(out / "cache"),
        **{"run.languages": ["deu_Latn", "jpn_Jpan"], "run.shard_size": 64},
    )
    runner.run_all(cfg, "contract-real")
    return cfg


def _stage_input(cfg, stage: Stage) -> list[dict]:
    lay = runner.layout(cfg, "contract-real")
    i = [s.name for s in STAGES].index(stage.name)
    if i == 0:
        return runner.read_input_shard(cfg, lay, 0)
    ran = runner.pipeline(cfg)  # the stage before it that this config runs (the safety stages are off)
    return lay.read_stage_result([s.name for s in STAGES[:i] if s.name in ran][-1], 0)["rows"]


def _context(cfg) -> Context:
    lay = runner.layout(cfg, "contract-real")
    return Context(
        cfg,
        "contract-real",
        0,
        runner.open_cache(cfg),
        artifact=lambda s, n: lay.read_stage_artifact(s, n, 0),
    )


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES, ids=[s.name for s in STAGES])
def test_every_stage_keeps_its_contract_on_real_rows(real_run, stage):
    """Each real stage, re-run on its real input (answers from the cache): it reads only what it declares,
    reads something (the tracking sees it), writes only what it declares and reconciles."""
    from babelsynth.runner import track_reads

    rows = _stage_input(real_run, stage)
    tracked, read = track_reads(rows)
    res = stage.fn(_context(real_run), tracked)
    n_in = check_contract(stage, 0, rows, res, read)
    passes_through = stage.section == "safety" and not real_run.safety.enabled  # off in the demo config
    assert (read or passes_through) and read <= set(stage.reads)
    assert sum(n_in.values()) == len(res.rows) + len(res.rejected)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "column", "side"),
    [
        ("judge", "source_id", "reads"),
        ("judge", "answer_gt", "reads"),
        ("recaption", "recaption_tokens", "writes"),
    ],
)
def test_the_check_catches_a_real_stage_with_a_column_missing_from_its_declaration(
    real_run, name, column, side
):
    """The very omissions the contract was written for (judge read source_id undeclared; recaption wrote
    recaption_tokens undeclared) fail on real rows."""
    from babelsynth.runner import track_reads

    real = BY_NAME[name]
    broken = replace(real, **{side: tuple(c for c in getattr(real, side) if c != column)})
    rows = _stage_input(real_run, broken)
    tracked, read = track_reads(rows)
    res = broken.fn(_context(real_run), tracked)
    verb = "read" if side == "reads" else "wrote"
    with pytest.raises(StageContractError, match=rf"stage {name} \(shard 0\) {verb} column\(s\) .*{column}"):
        check_contract(broken, 0, rows, res, read)

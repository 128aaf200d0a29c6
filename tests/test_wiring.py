"""distilabel-style wiring: every stage reads only what earlier stages wrote, and the final samples
schema is fully produced by the stages."""

from babelsynth.schema import columns
from babelsynth.stages import STAGES

RUNNER_COLUMNS = {"run_id", "sample_id", "shard"}  # stamped by the writer


def test_each_stage_reads_what_upstream_wrote():
    available = set(STAGES[0].reads)
    for stage in STAGES:
        missing = set(stage.reads) - available
        assert not missing, f"{stage.name} reads {missing} that no earlier stage writes"
        available |= set(stage.writes)


def test_samples_schema_is_fully_produced():
    produced = set().union(*(s.writes for s in STAGES)) | RUNNER_COLUMNS | {"source_id", "task_type"}
    produced |= {"answer_gt", "image_ids"}
    missing = set(columns("samples")) - produced
    assert not missing, f"samples columns nobody writes: {missing}"


def test_stage_names_are_unique_and_documented():
    names = [s.name for s in STAGES]
    assert len(names) == len(set(names))
    for s in STAGES:
        assert s.fn.__doc__, f"stage {s.name} has no docstring"

"""Config validation: bad input fails at load with a message that names the fix."""

import pytest
from pydantic import ValidationError

from babelsynth.config import load_config
from babelsynth.languages import AYA_TARGETS, validate_codes

ENV = {"BABELSYNTH_WORK": "/tmp/w", "BABELSYNTH_MODELS": "/tmp/m"}


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)


def test_demo_config_loads_with_23_default_targets():
    cfg = load_config("configs/demo.yaml")
    assert cfg.run.languages == list(AYA_TARGETS) and len(AYA_TARGETS) == 23
    assert cfg.models.translator.path == "/tmp/m/nllb/ct2"


def test_unknown_language_lists_valid_codes():
    with pytest.raises(ValidationError) as e:
        load_config("configs/demo.yaml", {"run.languages": ["deu_Latn", "xxx_Latn"]})
    assert "xxx_Latn" in str(e.value) and "zho_Hant" in str(e.value)


def test_any_flores_code_is_accepted():
    assert validate_codes(["swh_Latn", "yue_Hant"]) == ["swh_Latn", "yue_Hant"]


def test_extra_keys_are_rejected():
    with pytest.raises(ValidationError, match="typo_key"):
        load_config("configs/demo.yaml", {"run.typo_key": 1})


def test_bad_backend_kind_is_rejected():
    with pytest.raises(ValidationError):
        load_config("configs/demo.yaml", {"models.teacher.kind": "magic"})


def test_missing_env_var_is_named(monkeypatch):
    monkeypatch.delenv("BABELSYNTH_MODELS")
    with pytest.raises(ValueError, match="BABELSYNTH_MODELS"):
        load_config("configs/demo.yaml")


def test_production_config_validates(monkeypatch):
    monkeypatch.setenv("VLLM_TEACHER_URL", "http://gpu:8000/v1")
    monkeypatch.setenv("VLLM_LLM_URL", "http://gpu:8001/v1")
    cfg = load_config("configs/production.yaml")
    assert cfg.score.gates.comet.mode == "enforce" and cfg.models.translator.model_id == "nllb-200-3.3B"


def test_fingerprint_changes_with_config():
    a = load_config("configs/demo.yaml")
    b = load_config("configs/demo.yaml", {"run.seed": 7})
    assert a.fingerprint() == load_config("configs/demo.yaml").fingerprint() != b.fingerprint()


@pytest.mark.parametrize(
    ("old", "value", "new"),
    [
        ("filter.rules.mode", "report", "recaption.mode"),
        ("filter.judge.enabled", False, "'judge'"),
        ("gates.comet.threshold", 0.5, "score.gates"),
        ("translate.truncation", "report", "translate.mode"),
        ("rephrase.selection_margin", 0.1, "score.selection_margin"),
        ("run.max_text_chars", 100, "ingest.max_text_chars"),
    ],
)
def test_an_old_config_key_fails_naming_the_new_one(old, value, new):
    """One config section per stage, named after it: configs written before the rename fail clearly."""
    with pytest.raises(ValidationError) as e:
        load_config("configs/demo.yaml", {old: value})
    assert f"'{old.split('.')[0]}" in str(e.value) and new in str(e.value)


def test_each_stage_has_its_config_section_and_every_rule_switch_is_called_mode():
    from babelsynth.config import RunConfig
    from babelsynth.stages import STAGES

    cfg = load_config("configs/demo.yaml")
    assert {s.config_section for s in STAGES} <= set(RunConfig.model_fields)
    assert [s.name for s in STAGES if s.section] == ["safety_pre", "safety_post", "output_safety"]
    switches = [
        cfg.recaption,
        cfg.judge,
        cfg.translate,
        *(getattr(cfg.score.gates, g) for g in cfg.score.gates.model_fields),
    ]
    assert all(s.mode in ("enforce", "report") for s in switches)

"""Released prompt templates never change: new wording must be a new version file."""

import hashlib
import json

import pytest

from babelsynth.config import TASK_TYPES
from babelsynth.paths import prompts_dir
from babelsynth.prompts import all_prompt_files, load_prompt

RELEASED = json.loads((prompts_dir() / "RELEASED.json").read_text())


@pytest.mark.parametrize("rel", sorted(RELEASED))
def test_released_prompt_is_unchanged(rel):
    assert hashlib.sha256((prompts_dir() / rel).read_bytes()).hexdigest() == RELEASED[rel], (
        f"{rel} was edited after release; put new wording in a new .vN file"
    )


def test_every_prompt_file_is_released():
    assert sorted(all_prompt_files()) == sorted(RELEASED)


@pytest.mark.parametrize("task", TASK_TYPES)
def test_each_task_type_has_a_recaption_template_anchored_on_the_answer(task):
    p = load_prompt("recaption", task)
    msgs = p.render(question="Q?", answer="GT")
    assert "GT" in msgs[1]["content"] and "<answer>" in msgs[1]["content"]
    assert "Never mention" in msgs[1]["content"]
    assert len(p.sha) == 64 and p.id == f"recaption/{task}.v1"


def test_missing_variable_fails_loudly():
    import jinja2

    with pytest.raises(jinja2.UndefinedError):
        load_prompt("rephrase", "translation").render(source="x")

"""Noise in task logs is lowered where it starts, narrowly; warnings that matter still show.

The real-scheduler test (tests/test_airflow_scheduler.py) checks the task logs of a whole run; these pin
each fix to its cause."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from babelsynth.train.pipeline import saved_fast_image_processor

LOAD = (
    "import sys\n"
    "from transformers import AutoProcessor\n"
    "from babelsynth.train.pipeline import saved_fast_image_processor\n"
    "d = sys.argv[1]\n"
    "kw = {'use_fast': saved_fast_image_processor(d)} if sys.argv[2] == 'as-training' else {}\n"
    "print(type(AutoProcessor.from_pretrained(d, **kw).image_processor).__name__)\n"
)


def test_saved_fast_image_processor_reads_the_checkpoint(tmp_path):
    (tmp_path / "fast").mkdir()
    (tmp_path / "fast" / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "GotOcr2ImageProcessorFast"})
    )
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "GotOcr2ImageProcessor"})
    )
    assert saved_fast_image_processor(str(tmp_path / "fast")) is True
    assert saved_fast_image_processor(str(tmp_path / "slow")) is False
    assert saved_fast_image_processor(str(tmp_path / "none")) is False


@pytest.mark.slow
def test_training_loads_the_processor_it_was_saved_with_and_logs_no_notice(models):
    """transformers' `use_fast` notice (an error-level stderr line under Airflow) is gone, the processor
    class is unchanged; loaded without the choice, the notice is still there (the test can fail)."""

    def load(how: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", LOAD, models["vlm"], how], capture_output=True, text=True, timeout=300
        )

    as_training, bare = load("as-training"), load("bare")
    assert as_training.returncode == 0 and bare.returncode == 0, as_training.stderr + bare.stderr
    assert as_training.stdout == bare.stdout == "GotOcr2ImageProcessor\n"
    assert "slow image processor" in bare.stderr
    assert "slow image processor" not in as_training.stderr, as_training.stderr


def test_comet_deprecation_filters_are_narrow():
    """Two messages from two libraries, nothing wholesale: other warnings of the same kind still show."""
    # in a fresh interpreter: pytest restores warnings.filters after each test, so an import made by an
    # earlier test leaves nothing to inspect here
    listing = (
        "import warnings, babelsynth.backends.comet_qe\n"
        "for f in warnings.filters:\n"
        "    if f[0] == 'ignore' and f[1] is not None and f[3] is not None:\n"
        "        print(f[1].pattern.split(' ')[0], f[3].pattern)\n"
    )
    r = subprocess.run([sys.executable, "-c", listing], capture_output=True, text=True, timeout=120)
    ours = {tuple(line.split(" ", 1)) for line in r.stdout.splitlines()}
    assert {
        ("pkg_resources", r"torchmetrics\."),
        (r"`isinstance\(treespec,", r"pytorch_lightning\."),
    } <= ours, r.stdout + r.stderr
    code = (
        "import warnings, babelsynth.backends.comet_qe\n"
        "def warn(msg): warnings.warn_explicit(msg, UserWarning, 'x.py', 1, 'torchmetrics.x')\n"
        "warn('pkg_resources is deprecated as an API')\n"
        "warn('something else')\n"
    )
    r = subprocess.run(
        [sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert "something else" in r.stderr and "pkg_resources" not in r.stderr, r.stderr

"""Defaults that would quietly make worse data with real models, and config loading for pods."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from babelsynth import metrics
from babelsynth.config import (
    DOCUMENT_IMAGE_MAX_SIDE,
    CT2NLLBBackend,
    OpenAIHTTPBackend,
    VLLMOfflineBackend,
    load_config,
)
from tests.conftest import ROOT

PRODUCTION = ROOT / "configs" / "production.yaml"
ENDPOINTS = {"VLLM_TEACHER_URL": "http://t/v1", "VLLM_LLM_URL": "http://l/v1"}


@pytest.fixture
def endpoints(monkeypatch):
    for k, v in ENDPOINTS.items():
        monkeypatch.setenv(k, v)


def test_length_ratio_ignores_code_urls_and_placeholders():
    """A zh answer that keeps the code block and URL of the English (as it must) is judged on its prose."""
    code = "```python\nfor i in range(10):\n    print(i * i)\n```"
    en = f"The loop prints the squares.\n{code}\nSee https://example.com/docs/squares for more."
    zh = f"循环打印平方数。\n{code}\n更多内容见 https://example.com/docs/squares 。"
    prose_en = "Theloopprintsthesquares.Seeformore."
    assert metrics.length_ratio(zh, en) == pytest.approx(len("循环打印平方数。更多内容见。") / len(prose_en))
    assert metrics.length_ratio(zh, en) < 0.6  # in zh's band [0.15, 0.6]; with the code counted it was ~0.8
    raw = len(zh) / len(en)
    assert raw > 0.6
    assert metrics.length_ratio("```x = 1```", "```x = 1```") is None  # no prose: the gate does not apply


def test_rephrase_gets_at_least_the_tokens_of_the_answer_it_rewrites(endpoints):
    cfg = load_config(PRODUCTION)
    assert cfg.recaption.max_tokens == 1024 and cfg.rephrase.max_tokens == 2048
    with pytest.raises(
        ValidationError, match=r"rephrase\.max_tokens=512 is below recaption\.max_tokens=1024"
    ):
        load_config(PRODUCTION, {"rephrase.max_tokens": 512})
    assert load_config(PRODUCTION, {"rephrase.max_tokens": 1024}).rephrase.max_tokens == 1024


def test_translator_defaults_leave_decoding_headroom_for_expanding_scripts():
    t = CT2NLLBBackend(path="/m")
    assert t.max_decoding_length >= 2.5 * t.max_input_tokens
    assert t.max_input_tokens <= 128  # NLLB degrades on long inputs; longer sentences are chunked


def test_documents_and_screenshots_keep_more_pixels_than_photos():
    for backend in (
        OpenAIHTTPBackend(base_url="http://x/v1", model="m"),
        VLLMOfflineBackend(model="m", path="/m"),
    ):
        assert backend.image_max_side == 1024
        assert backend.image_max_side_by_task == DOCUMENT_IMAGE_MAX_SIDE
        assert set(DOCUMENT_IMAGE_MAX_SIDE) == {"ocr", "chart", "table", "textbook", "screenshot_code"}
        assert min(DOCUMENT_IMAGE_MAX_SIDE.values()) >= 2048
    with pytest.raises(ValidationError, match="unknown task type"):
        OpenAIHTTPBackend(base_url="http://x/v1", model="m", image_max_side_by_task={"receipts": 2048})


def test_recaption_sends_each_task_type_its_own_image_size():
    """The request the recaption stage builds: a photo at image_max_side, a document at its task's size."""
    import base64
    import io

    from PIL import Image

    from babelsynth.backends.chat import ChatResult
    from babelsynth.config import config_from_dict
    from babelsynth.stages.base import Context
    from babelsynth.stages.recaption import recaption

    big = io.BytesIO()
    Image.new("RGB", (3000, 1500), (200, 200, 200)).save(big, format="PNG")
    cfg = config_from_dict(
        {
            "input_uri": "/x",
            "output_uri": "/y",
            "models": {
                "teacher": {
                    "kind": "openai_http",
                    "base_url": "http://x/v1",
                    "model": "m",
                    "image_max_side": 512,
                },
                "judge": {"kind": "openai_http", "base_url": "http://x/v1", "model": "m"},
                "rephraser": {"kind": "openai_http", "base_url": "http://x/v1", "model": "m"},
                "translator": {"path": "/m"},
                "comet": {"path": "/c"},
            },
            "recaption": {"max_regenerations": 0, "mode": "report"},
        }
    )

    class RecordingTeacher:  # STAND-IN for the HTTP client: records requests, answers like a model would
        model_id, sent, tokenize_sent = "m", 0, 0

        def __init__(self, cfg):
            self.cfg, self.sides = cfg, {}

        def count_tokens(self, texts):
            return [None] * len(texts)

        def chat_many(self, reqs):
            for r in reqs:
                url = r.messages[1]["content"][0]["image_url"]["url"]
                im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
                self.sides[r.messages[1]["content"][1]["text"].split("\n")[0]] = max(im.size)
            return [
                ChatResult("<answer>A grey page with no text at all.</answer>", "stop", 10, 10) for _ in reqs
            ]

    teacher = RecordingTeacher(cfg.models.teacher)

    import pyarrow as pa

    # ingest's artifacts: the stored image, and its copy downscaled to models.teacher.image_max_side
    small = io.BytesIO()
    Image.new("RGB", (512, 256), (200, 200, 200)).save(small, format="PNG")
    artifacts = {
        "images": pa.table(
            {
                "image_id": ["img"],
                "image": [big.getvalue()],
                "width": [3000],
                "height": [1500],
                "format": ["PNG"],
            }
        ),
        "model_images": pa.table({"image_id": ["img"], "image": [small.getvalue()], "format": ["PNG"]}),
    }
    ctx = Context(cfg, "r", 0, cache=None, artifact=lambda s, n: artifacts[n], backends={"teacher": teacher})
    rows = [
        {
            "source_id": t,
            "task_type": t,
            "question": f"Q {t}",
            "answer_gt": "A grey page.",
            "image_ids": ["img"],
        }
        for t in ("captioning", "ocr", "screenshot_code")
    ]
    res = recaption(ctx, rows)
    assert len(res.rows) == 3
    assert {k.split(": ", 1)[-1]: v for k, v in teacher.sides.items()} == {
        "Q captioning": 512,
        "Q ocr": 2048,
        "Q screenshot_code": 2048,
    }


def test_offline_vllm_uses_the_models_own_context_by_default():
    assert VLLMOfflineBackend(model="m", path="/m").max_model_len is None


def test_an_overridden_value_is_never_expanded_so_pods_need_no_endpoint_env(monkeypatch):
    for k in ENDPOINTS:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match=r"\$\{VLLM_TEACHER_URL\}"):
        load_config(PRODUCTION)
    over = {
        "models.teacher.base_url": "http://10.0.0.1:8000/v1",
        "models.judge.base_url": "http://10.0.0.2:8000/v1",
        "models.rephraser.base_url": "http://10.0.0.2:8000/v1",
    }
    cfg = load_config(PRODUCTION, over)
    assert cfg.models.teacher.base_url == "http://10.0.0.1:8000/v1"
    # an override's own value is taken literally (never expanded from the worker's environment)
    monkeypatch.setenv("SECRET_LOOKING", "leak")
    assert load_config(PRODUCTION, {**over, "run.seed": 3, "input_uri": "${SECRET_LOOKING}"}).input_uri == (
        "${SECRET_LOOKING}"
    )

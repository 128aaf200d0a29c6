"""Progress of long work: a tqdm bar on a terminal, periodic log lines (done/total, rate, ETA) in a log."""

from __future__ import annotations

import io
import logging
import re
import time

from babelsynth import progress
from babelsynth.backends.chat import CachedChatClient, ChatResult
from babelsynth.cache import Cache


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_and_no_log_line(caplog):
    tty = Terminal()
    with caplog.at_level(logging.INFO, logger="babelsynth.progress"):
        with progress.Progress(5, "requests", desc="recaption shard 0", stream=tty, interval_s=0) as p:
            for _ in range(5):
                time.sleep(0.12)  # tqdm redraws at most every 0.1 s
                p.advance()
    bar = tty.getvalue()
    assert "recaption shard 0:" in bar and "4/5" in bar and "requests/s" in bar and "|" in bar  # tqdm's bar
    assert caplog.records == []


def test_a_log_gets_periodic_lines_with_done_total_rate_and_eta(caplog):
    log_file = io.StringIO()  # what Airflow gives a task: not a terminal
    with caplog.at_level(logging.INFO, logger="babelsynth.progress"):
        with progress.Progress(
            4, "segments", desc="translate shard 2", stream=log_file, interval_s=0.05
        ) as p:
            for _ in range(4):
                time.sleep(0.06)
                p.advance()
    lines = [r.getMessage() for r in caplog.records]
    assert log_file.getvalue() == ""  # no bar redrawn into the log
    assert re.fullmatch(r"translate shard 2: 1/4 segments \(25%\), .* ETA \d+s", lines[0]), lines[0]
    assert re.fullmatch(r"translate shard 2: 4/4 segments \(100%\), .*, \d+s", lines[-1]), lines[-1]
    assert all("/s" in x or "s per segment" in x for x in lines)


def test_short_work_logs_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="babelsynth.progress"):
        with progress.Progress(3, "pairs", stream=io.StringIO(), interval_s=60) as p:
            p.advance(3)
    assert caplog.records == []


def test_the_line_format():
    assert progress.line("x", 120, 512, 30.0, "requests") == (
        "x: 120/512 requests (23%), 4.0 requests/s, ETA 1m38s"
    )
    assert progress.line("x", 3, 12, 30.0, "tasks") == "x: 3/12 tasks (25%), 10.0 s per task, ETA 1m30s"
    assert progress.line("x", 12, 12, 4000.0, "tasks").endswith("1h06m")


class Answers(CachedChatClient):
    """A chat backend for this test only: answers at once, from a thread like the HTTP client."""

    def _fetch(self, requests, deliver):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(4) as pool:
            for i, _ in enumerate(requests):
                pool.submit(lambda i=i: (time.sleep(0.02), deliver(i, ChatResult("ok", "stop", 3, 2))))

    def _fetch_token_counts(self, texts):
        return [None] * len(texts)


def test_a_chat_stage_reports_its_requests_under_the_runner_label(tmp_path, monkeypatch, caplog):
    from babelsynth.backends.chat import ChatRequest

    monkeypatch.setenv(progress.INTERVAL_ENV, "0")

    class Cfg:
        model = "m"

    client = Answers(Cfg(), Cache(tmp_path / "c.sqlite"))
    reqs = [ChatRequest([{"role": "user", "content": f"q{i}"}], 8, seed=i) for i in range(6)]
    with caplog.at_level(logging.INFO, logger="babelsynth.progress"), progress.label("judge shard 7"):
        client.chat_many(reqs)
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all(x.startswith("judge shard 7: ") for x in lines)
    assert "6/6 requests" in lines[-1]
    assert client.usage() == {"model_calls": 0, "tokens_in": 18, "tokens_out": 12}  # `sent` counts HTTP sends
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="babelsynth.progress"):
        client.chat_many(reqs)  # all cached: no work, no progress line
    assert caplog.records == []

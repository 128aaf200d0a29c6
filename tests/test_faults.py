"""Fault injection with real processes: real `babelsynth run-stage` / `write` / `commit` processes SIGKILLed
in the middle of each model stage, of write and of commit, then resumed; a real vLLM engine killed mid-stage;
a real judge forced to both verdicts; secrets planted everywhere a user can put one, searched for in every
output, log and XCom of a real Airflow run.

Tools (fault injection, named as such): `ChatProxy`, a relay in front of a real vLLM server that logs every
request (body and status, so requests are counted at the server), can kill a process after N answers,
rewrite a request, or demand an API key; `babelsynth.faults` points, where a process SIGKILLs itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from babelsynth import runner
from babelsynth.backends.chat import BackendError
from babelsynth.stages import BY_NAME
from tests.conftest import ROOT, make_config
from tests.proxies import ChatProxy, cached_keys, chat_key

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]  # ~20 real processes; a busy box is slow
HTTP_STAGES = ("recaption", "judge", "rephrase")
LOCAL_STAGES = ("translate", "score")


# ------------------------------------------------------------------------------------ the measured matrix
MATRIX: list[tuple[str, ...]] = []  # (fault, stage, left behind, outcome, model work on resume), as measured


def matrix(*row: str) -> None:
    MATRIX.append(row)


@pytest.fixture(scope="module", autouse=True)
def fault_matrix(tmp_path_factory):
    """After this module's tests: print (and store as fault-matrix.md) the fault x stage -> outcome table
    that they measured; a row is added only by a test that got that far."""
    yield MATRIX
    head = ("fault", "stage", "left behind", "outcome", "model work on resume")
    table = [head, ("---",) * len(head), *MATRIX]
    text = "\n".join("| " + " | ".join(r) + " |" for r in table) + "\n"
    print("\n\nMeasured fault matrix:\n" + text)
    (tmp_path_factory.getbasetemp() / "fault-matrix.md").write_text(text)


def sha_files(root: Path, manifest: dict) -> dict[str, str]:
    return {f["path"]: hashlib.sha256((root / f["path"]).read_bytes()).hexdigest() for f in manifest["files"]}


def cli(cfg_file: Path, *args: str, fault: str | None = None, kill=None, timeout: float = 600):
    """Run the real CLI in its own process; `kill(proc)` may be installed to kill it from outside."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    env.pop("BABELSYNTH_FAULT", None)
    if fault:
        env["BABELSYNTH_FAULT"] = fault
    argv = [sys.executable, "-m", "babelsynth.cli", args[0], "--config", str(cfg_file), *args[1:]]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill:
        kill(proc)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def counting_stages(monkeypatch) -> Counter:
    """Count every execution of a stage function (the real one runs): what a skipped stage never does."""
    calls: Counter = Counter()
    for name, stage in list(BY_NAME.items()):

        def fn(ctx, rows, _fn=stage.fn, _name=name):
            calls[_name] += 1
            return _fn(ctx, rows)

        monkeypatch.setitem(BY_NAME, name, replace(stage, fn=fn))
    return calls


# ---------------------------------------------------------------------------------------------- the matrix
@pytest.fixture(scope="module")
def fault_run(models, vllm_servers, tmp_path_factory):
    """One run of 8 records in 2 shards; shard 0 is killed in each model stage, in write and in commit, and
    resumed each time; shard 1 runs undisturbed. Returns what was observed, for the tests below."""
    from babelsynth.sample_data import write_samples

    tmp = tmp_path_factory.mktemp("faults")
    write_samples(str(tmp / "in.parquet"), n_per_task=2, bad=False)
    teacher, llm = ChatProxy(vllm_servers["teacher"].port), ChatProxy(vllm_servers["llm"].port)
    servers = {"teacher": teacher, "llm": llm}
    over = {
        "run.shard_size": 4,
        "run.languages": ["deu_Latn"],
        "run.language_ratio": 1.0,
        "recaption.max_tokens": 32,
        "judge.max_tokens": 16,
        "rephrase.max_tokens": 32,
        **{f"models.{r}.max_concurrency": 1 for r in ("teacher", "judge", "rephraser")},  # requests in order
    }
    cfg = make_config(models, servers, str(tmp / "in.parquet"), str(tmp / "out"), str(tmp / "cache"), **over)
    cfg_file = tmp / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    rid, obs = "faults", {"stages": {}}
    proxy_of = {"recaption": teacher, "judge": llm, "rephrase": llm}
    lay = runner.layout(cfg, rid)
    try:
        assert runner.plan(cfg, rid) == [0, 1]
        for shard in (0, 1):
            runner.run_stage(cfg, rid, "ingest", shard)
        for stage in (*HTTP_STAGES[:2], "translate", "rephrase", "score"):
            o: dict = {}
            if stage in HTTP_STAGES:
                proxy = proxy_of[stage]
                n0 = len(proxy.log)

                n_before = proxy.answered()

                def killer(proc, proxy=proxy, n_before=n_before):
                    def on_answer(n):
                        if n - n_before >= 2 and proc.poll() is None:
                            time.sleep(0.3)  # the client stores what it received, then dies mid-stage
                            os.kill(proc.pid, signal.SIGKILL)

                    proxy.on_answer = on_answer

                rc, _, _ = cli(
                    cfg_file, "run-stage", "--run-id", rid, "--stage", stage, "--shard", "0", kill=killer
                )
                proxy.on_answer = None
                o["persisted_after_kill"] = lay.has_stage_result(stage, 0)
                proxy.idle()  # the killed client's last request may still be on its way to the server
                before_kill = proxy.chats(n0)
                finished = {chat_key(b) for b in before_kill} & cached_keys(tmp / "cache")
                n1 = len(proxy.log)
                rc2, out2, err2 = cli(
                    cfg_file, "run-stage", "--run-id", rid, "--stage", stage, "--shard", "0"
                )
                after = [chat_key(b) for b in proxy.chats(n1)]
                o.update(sent_before_kill=len(before_kill), finished=len(finished), resent_after=len(after))
                o["repeated"] = len(finished & set(after))
            else:
                point = f"stage.{stage}.before_persist"
                rc, _, _ = cli(
                    cfg_file, "run-stage", "--run-id", rid, "--stage", stage, "--shard", "0", fault=point
                )
                o["persisted_after_kill"] = lay.has_stage_result(stage, 0)
                rc2, out2, err2 = cli(
                    cfg_file, "run-stage", "--run-id", rid, "--stage", stage, "--shard", "0"
                )
            o.update(rc_killed=rc, rc_resumed=rc2, err=err2[-2000:])
            o["stats"] = json.loads(out2.strip().splitlines()[-1]) if rc2 == 0 else None
            obs["stages"][stage] = o
            runner.run_stage(cfg, rid, stage, 1)
        # write: killed after its first Parquet file, before its marker
        rc, _, _ = cli(cfg_file, "write", "--run-id", rid, "--shard", "0", fault="write.after_first_file")
        partial = sorted(p.name for p in (Path(lay.root) / "samples").rglob("*.parquet"))
        obs["write"] = {
            "rc_killed": rc,
            "marker_after_kill": lay.has_write_marker(0),
            "files_after_kill": partial,
        }
        rc2, _, err2 = cli(cfg_file, "write", "--run-id", rid, "--shard", "0")
        obs["write"].update(rc_resumed=rc2, err=err2[-2000:])
        # commit: killed after writing every file, before the manifest
        rc, _, _ = cli(cfg_file, "commit", "--run-id", rid, fault="commit.before_manifest")
        obs["commit"] = {"rc_killed": rc, "manifest_after_kill": lay.has_manifest()}
        rc2, _, err2 = cli(cfg_file, "commit", "--run-id", rid)
        obs["commit"].update(rc_resumed=rc2, err=err2[-2000:])
        obs["manifest"] = lay.read_manifest() if lay.has_manifest() else None
        obs.update(cfg=cfg, rid=rid, tmp=tmp, servers=servers, root=Path(lay.root))
        yield obs
    finally:
        teacher.close()
        llm.close()


def test_every_killed_process_died_by_sigkill_and_every_resume_succeeded(fault_run):
    for stage, o in fault_run["stages"].items():
        assert o["rc_killed"] == -signal.SIGKILL, stage
        assert not o["persisted_after_kill"], f"{stage}: a killed task left a result behind"
        assert o["rc_resumed"] == 0, (stage, o["err"])
        if stage in HTTP_STAGES:
            how = (
                f"SIGKILL (`run-stage`) after {o['sent_before_kill']} requests sent, {o['finished']} answered"
            )
            work = f"{o['resent_after']} requests, {o['repeated']} repeated"
        else:
            how = "SIGKILL (`run-stage`) after the engine's work, before the result is persisted"
            st = o["stats"]
            work = f"{st.get('engine_calls', st.get('comet_calls'))} engine calls"
        matrix(how, stage, "no stage result", "resumed: rc 0", work)
    for step in ("write", "commit"):
        assert fault_run[step]["rc_killed"] == -signal.SIGKILL and fault_run[step]["rc_resumed"] == 0, (
            fault_run[step]
        )
    assert not fault_run["write"]["marker_after_kill"] and fault_run["write"]["files_after_kill"]
    assert not fault_run["commit"]["manifest_after_kill"]
    partial = len(fault_run["write"]["files_after_kill"])
    matrix(
        "SIGKILL (`write`) after its first Parquet file",
        "write",
        f"{partial} file(s), no write marker",
        "resumed: rc 0, shard rewritten",
        "none",
    )
    matrix("SIGKILL (`commit`) before manifest.json", "commit", "files, no manifest", "resumed: rc 0", "none")


def test_killed_mid_stage_finished_requests_are_not_asked_again(fault_run):
    for stage in HTTP_STAGES:
        o = fault_run["stages"][stage]
        print(stage, {k: o[k] for k in ("sent_before_kill", "finished", "resent_after", "repeated")})
        assert o["finished"] >= 1, f"{stage}: nothing had finished before the kill: not mid-stage"
        assert o["repeated"] == 0, f"{stage}: {o['repeated']} finished request(s) were sent again"
        assert o["stats"]["requests_sent"] == o["resent_after"]  # counted at the server = the client's count
    tr, sc = fault_run["stages"]["translate"]["stats"], fault_run["stages"]["score"]["stats"]
    assert tr["engine_calls"] == 0 and tr["cache_hits"] > 0  # the killed process's translations were kept
    assert sc["comet_calls"] == 0 and sc["comet_pairs"] > 0


def test_the_resumed_run_commits_exactly_what_an_uninterrupted_run_commits(fault_run, tmp_path):
    """The reference: the same run id and config, never interrupted, into another output root, over the
    same answers (the cache the faulted run filled; no request reaches a server)."""
    m = fault_run["manifest"]
    assert m and m["reconciliation"]["ok"]
    cfg = fault_run["cfg"].model_copy(update={"output_uri": str(tmp_path / "ref")})
    n = {k: len(p.log) for k, p in fault_run["servers"].items()}
    ref = runner.run_all(cfg, fault_run["rid"])
    assert {
        k: len(p.log) for k, p in fault_run["servers"].items()
    } == n  # nothing asked: the cache is complete
    assert sha_files(fault_run["root"], m) == sha_files(Path(ref["path"]), ref)  # identical committed files
    assert {f["path"]: f["sha256"] for f in m["files"]} == sha_files(fault_run["root"], m)
    import duckdb

    ids = duckdb.sql(
        f"SELECT sample_id FROM read_parquet('{fault_run['root']}/samples/*/*.parquet')"
    ).fetchall()
    assert len(ids) == len(set(ids)) == sum(m["samples_by_lang"].values())  # no duplicate sample ids
    matrix(
        "all the kills above, one run",
        "run",
        "-",
        f"committed files sha256-identical to an uninterrupted run ({len(m['files'])} files), "
        f"{len(ids)} sample ids, no duplicate",
        "reference run: 0 requests (cache complete)",
    )


def test_a_second_trigger_after_a_crash_skips_every_finished_stage(fault_run, monkeypatch):
    """Crash the committed run where it hurts most (manifest gone, a shard's marker gone), trigger the same
    run id again: no stage function runs, no request is sent, the same files are committed again."""
    cfg, rid, root = fault_run["cfg"], fault_run["rid"], fault_run["root"]
    before = fault_run["manifest"]
    lay = runner.layout(cfg, rid)
    Path(lay.manifest_uri).unlink()
    lay.delete_write_marker(1)
    calls = counting_stages(monkeypatch)
    n = {k: len(p.log) for k, p in fault_run["servers"].items()}
    again = runner.run_all(cfg, rid)
    assert sum(calls.values()) == 0, calls
    assert {k: len(p.log) for k, p in fault_run["servers"].items()} == n
    assert again["created_unix"] >= before["created_unix"] and lay.has_manifest()
    assert [(f["path"], f["sha256"]) for f in again["files"]] == [
        (f["path"], f["sha256"]) for f in before["files"]
    ]
    assert sha_files(root, again) == {f["path"]: f["sha256"] for f in again["files"]}
    matrix(
        "crash after commit (manifest and a write marker gone), same run id triggered again",
        "all",
        "stage results, shard 0 marker",
        "same files re-committed",
        "0 stage executions, 0 requests",
    )


def test_config_drift_on_the_finished_run(fault_run, monkeypatch):
    """A changed model-stage key is refused before any work; a changed QE selection margin redoes score
    only; a changed gate threshold re-commits without any stage or model call."""
    cfg, rid, root = fault_run["cfg"], fault_run["rid"], fault_run["root"]
    lay = runner.layout(cfg, rid)
    before = lay.read_manifest()
    calls = counting_stages(monkeypatch)
    n = {k: len(p.log) for k, p in fault_run["servers"].items()}
    hot = cfg.model_copy(update={"rephrase": cfg.rephrase.model_copy(update={"temperature": 0.2})})
    with pytest.raises(ValueError, match=r"rephrase\.temperature differ.*stages rephrase"):
        runner.run_all(hot, rid)
    assert sum(calls.values()) == 0 and lay.read_manifest() == before

    margin = cfg.model_copy(update={"score": cfg.score.model_copy(update={"selection_margin": 0.5})})
    m2 = runner.run_all(margin, rid)
    assert dict(calls) == {"score": 2}  # both shards rescored from stored upstream results
    assert m2["config"]["score"]["selection_margin"] == 0.5 and len(lay.previous_manifests()) == 1

    gates = cfg.score.gates.model_copy(
        update={"comet": cfg.score.gates.comet.model_copy(update={"threshold": 0.99, "mode": "enforce"})}
    )
    strict = margin.model_copy(update={"score": margin.score.model_copy(update={"gates": gates})})
    calls.clear()
    m3 = runner.run_all(strict, rid)
    assert sum(calls.values()) == 0
    assert m3["gates"]["comet_min"] and m3["stages"]["score"]["reasons"].get("gate_comet", 0) > 0
    assert m3["reconciliation"]["ok"] and len(lay.previous_manifests()) == 2
    assert {k: len(p.log) for k, p in fault_run["servers"].items()} == n  # no model request at all
    assert sha_files(root, m3) == {f["path"]: f["sha256"] for f in m3["files"]}
    matrix("re-trigger, rephrase.temperature changed", "plan", "-", "refused naming the key", "none")
    matrix(
        "re-trigger, score.selection_margin changed", "score", "-", "score redone, re-committed", "score x2"
    )
    matrix("re-trigger, a gate threshold changed", "commit", "-", "gates re-applied, re-committed", "none")


# ------------------------------------------------------------------------------------------ judge verdicts
def test_the_judge_rejects_what_it_says_no_to_and_keeps_what_it_says_yes_to(models, vllm_servers, tmp_path):
    """Both verdicts, forced on the real judge: the proxy narrows the structured-output choice of each
    decision request to YES (captioning, chart) or NO (vqa, ocr); the server really answers."""
    from babelsynth.sample_data import write_samples

    write_samples(str(tmp_path / "in.parquet"), n_per_task=2, bad=False)
    llm = ChatProxy(vllm_servers["llm"].port)
    forced = {}

    def force(body):
        so = body.get("structured_outputs")
        if so and so.get("choice") == ["YES", "NO"]:
            prompt = json.dumps(body["messages"])
            verdict = "NO" if "How many" in prompt or "What word" in prompt else "YES"
            forced[prompt] = verdict
            return {**body, "structured_outputs": {"choice": [verdict]}}
        return body

    llm.rewrite = force
    try:
        servers = {"teacher": vllm_servers["teacher"], "llm": llm}
        cfg = make_config(
            models, servers, str(tmp_path / "in.parquet"), str(tmp_path / "out"), str(tmp_path / "c")
        )
        runner.plan(cfg, "verdicts")
        for s in ("ingest", "recaption", "judge"):
            runner.run_stage(cfg, "verdicts", s, 0)
        res = runner.layout(cfg, "verdicts").read_stage_result("judge", 0)
    finally:
        llm.close()
    assert Counter(forced.values()) == {"YES": 4, "NO": 4}
    assert {r["task_type"] for r in res["rows"]} == {"captioning", "chart"} and len(res["rows"]) == 4
    assert all(r["judge_decision"] == "YES" for r in res["rows"])
    assert len(res["rejected"]) == 4 and all(
        r["reason"] == "judge_rejected" and r["detail"] for r in res["rejected"]
    )
    assert {json.loads(r["record"])["task_type"] for r in res["rejected"]} == {"vqa", "ocr"}
    assert res["stats"]["by_task"]["all"]["stage2_dropped"] == 4


# ------------------------------------------------------------------------------------ a rephraser in a loop
def test_a_rephraser_that_never_stops_is_cut_at_a_budget_proportional_to_its_text(
    models, vllm_servers, tmp_path
):
    """The real LLM server is made to ignore its end-of-sequence token on every rephrase (the proxy adds
    vLLM's `ignore_eos`): each request asks for its proportional budget, far below rephrase.max_tokens, and
    the server generates exactly that many tokens and stops ('length'), never up to max_tokens."""
    from babelsynth.sample_data import write_samples
    from babelsynth.stages.rephrase import text_parts, token_budget

    write_samples(str(tmp_path / "in.parquet"), n_per_task=1, bad=False)
    llm = ChatProxy(vllm_servers["llm"].port)
    llm.rewrite = lambda body: {**body, "ignore_eos": True}
    try:
        servers = {"teacher": vllm_servers["teacher"], "llm": llm}
        over = {"judge.enabled": False, "run.language_ratio": 0.1, "rephrase.max_tokens": 2048}
        cfg = make_config(
            models, servers, str(tmp_path / "in.parquet"), str(tmp_path / "out"), str(tmp_path / "c"), **over
        )
        runner.plan(cfg, "loop")
        for s in ("ingest", "recaption", "judge", "translate"):
            runner.run_stage(cfg, "loop", s, 0)
        before = len(llm.answers)
        runner.run_stage(cfg, "loop", "rephrase", 0)
        lay = runner.layout(cfg, "loop")
        drafts, rows = (
            lay.read_stage_result("translate", 0)["rows"],
            lay.read_stage_result("rephrase", 0)["rows"],
        )
    finally:
        llm.close()
    answers = llm.answers[before:]
    budgets = {
        token_budget(2048, cfg.rephrase.tokens_per_char, src, d)
        for r in drafts
        if r["lang"] != "eng_Latn"
        for src, d in text_parts(r)
        if d and d.strip()
    }
    assert answers and max(budgets) < 2048
    for body, ans in answers:
        assert body["max_tokens"] in budgets
        assert ans["choices"][0]["finish_reason"] == "length"
        assert (
            ans["usage"]["completion_tokens"] == body["max_tokens"]
        )  # the loop ran to its budget, no further
    statuses = [r["rephrase_status"] for r in rows if r["lang"] != "eng_Latn"]
    assert statuses and not [
        s for s in statuses if "request_rejected" in s
    ]  # a cut answer is the row's outcome
    matrix(
        "rephraser never stops (ignore_eos)",
        "rephrase",
        "-",
        f"{len(answers)} requests cut at <= {max(budgets)} tokens (max_tokens 2048)",
        "none",
    )


# ------------------------------------------------------------------------------------ offline engine death
def test_a_killed_vllm_engine_is_restarted_within_the_bound_then_fails_then_resumes_cleanly(
    models, vllm_servers, tmp_path
):
    """The judge on the vllm_offline backend (a real engine process); its engine is SIGKILLed twice mid-stage:
    one restart within models.judge.max_restarts, then a clear failure with nothing written, then the
    resumed task finishes and asks only what was never answered."""
    from babelsynth.backends import vllm_offline
    from babelsynth.sample_data import write_samples

    write_samples(str(tmp_path / "in.parquet"), n_per_task=2, bad=False)
    judge = {
        "kind": "vllm_offline",
        "model": "tiny-llm",
        "path": models["llm"],
        "max_model_len": 2048,
        "dtype": "bfloat16",
        "kv_cache_memory_bytes": 64 << 20,
        "engine_args": {"enforce_eager": True},
        "batch_size": 2,  # answers arrive (and are cached) two at a time
        "max_restarts": 1,
    }
    cfg = make_config(
        models,
        vllm_servers,
        str(tmp_path / "in.parquet"),
        str(tmp_path / "out"),
        str(tmp_path / "c"),
        **{"models.judge": judge, "recaption.mode": "report"},
    )
    runner.plan(cfg, "engine")
    for s in ("ingest", "recaption"):
        runner.run_stage(cfg, "engine", s, 0)
    base = len(cached_keys(tmp_path / "c"))
    judge_spec = vllm_offline.worker_for(cfg.models.judge).spec  # the same registry entry the stage uses
    kills: list[int] = []

    def killer(times: int) -> None:
        deadline = time.monotonic() + 300
        while len(kills) < times and time.monotonic() < deadline:
            # this judge's engine only: an engine another test left running in this process is not it
            workers = [w for w in vllm_offline.running_workers() if w.spec == judge_spec]
            proc = workers[0].proc if workers else None
            if (
                proc
                and proc.poll() is None
                and len(cached_keys(tmp_path / "c")) >= base + 2 * (len(kills) + 1)
            ):
                os.kill(proc.pid, signal.SIGKILL)
                kills.append(proc.pid)
            time.sleep(0.05)

    try:
        t = threading.Thread(target=killer, args=(2,), daemon=True)
        t.start()
        with pytest.raises(BackendError, match=r"failed 2 time\(s\).*max_restarts=1.*exited with code -9"):
            runner.run_stage(cfg, "engine", "judge", 0)
        t.join(30)
        assert len(set(kills)) == 2  # two engine processes, each killed
        assert not runner.layout(cfg, "engine").has_stage_result("judge", 0)
        finished = len(cached_keys(tmp_path / "c")) - base
        assert finished >= 4
        st = runner.run_stage(cfg, "engine", "judge", 0)  # the resumed task starts the engine again
        assert st["in"] == st["out"] + st["rejected"] == 8
        assert st["requests_sent"] == 16 - finished  # 8 explanations + 8 decisions; none answered twice
        matrix(
            "offline vLLM engine SIGKILLed twice (max_restarts=1)",
            "judge",
            f"no stage result, {finished} answers cached",
            "1 restart, then BackendError; retry: rc 0",
            f"{st['requests_sent']} requests, 0 repeated",
        )
    finally:
        vllm_offline.close_all()


# ------------------------------------------------------------------------------------ HTTP server death
def test_a_killed_vllm_server_fails_the_stage_after_bounded_retries_then_resumes_after_restart(
    models, vllm_servers, tmp_path
):
    """The judge's own real `vllm serve` is SIGKILLed (whole process group) mid-stage: the client retries
    within models.judge.max_retries against the dead port, then the task fails naming the URL with nothing
    written; after the server is restarted the resumed task finishes and asks only what was never answered,
    counted in the server's own access log."""
    from babelsynth.sample_data import write_samples
    from babelsynth.vllm_server import VLLMServer

    write_samples(str(tmp_path / "in.parquet"), n_per_task=2, bad=False)
    llm = vllm_servers["llm"]
    server = VLLMServer(models["llm"], served_model_name="tiny-llm", python=llm.python, work_dir=llm.work_dir)

    def answered() -> int:  # uvicorn's access log (the child runs unbuffered): answers given by the server
        text = server.log_path.read_text(errors="replace") if server.log_path.exists() else ""
        return text.count('"POST /v1/chat/completions HTTP/1.1" 200')

    def config():
        over = {
            "recaption.mode": "report",  # every record reaches the judge: 8 explanations + 8 decisions
            "models.judge.max_concurrency": 1,
            "models.judge.max_retries": 2,
            "models.judge.backoff_s": 0.2,
        }
        servers = {"teacher": vllm_servers["teacher"], "llm": server}
        dirs = [str(tmp_path / d) for d in ("in.parquet", "out", "c")]
        return make_config(models, servers, *dirs, **over)

    server.start()
    try:
        cfg, rid = config(), "server-death"
        runner.plan(cfg, rid)
        for s in ("ingest", "recaption"):
            runner.run_stage(cfg, rid, s, 0)
        base_cached, base_answered = len(cached_keys(tmp_path / "c")), answered()
        killed: list[int | None] = []

        def killer() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and server.is_running():
                if answered() - base_answered >= 3:
                    killed.append(server.kill())
                    return
                time.sleep(0.02)

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        with pytest.raises(
            BackendError, match=r"model server at \S+ \(model 'tiny-llm'\) failed after 3 attempts"
        ):
            runner.run_stage(cfg, rid, "judge", 0)
        t.join(30)
        assert killed and killed[0] == -signal.SIGKILL
        assert not runner.layout(cfg, rid).has_stage_result("judge", 0)
        finished = len(cached_keys(tmp_path / "c")) - base_cached
        assert 3 <= finished < 16
        # every answer the server gave is kept (uvicorn logs a response at its start: the one being sent at
        # the kill may be logged and lost)
        assert answered() - base_answered - finished in (0, 1)

        server.start()  # same port unless taken meanwhile; how a model is reached is in no fingerprint
        cfg = config()
        before = answered()
        st = runner.run_stage(cfg, rid, "judge", 0)
        resent = answered() - before
        assert st["in"] == st["out"] + st["rejected"] == 8
        assert st["requests_sent"] == resent == 16 - finished  # none answered twice, none lost
        matrix(
            f"vLLM server SIGKILLed after {finished} answers",
            "judge",
            "no stage result",
            "3 attempts on the dead port, then BackendError; after restart: rc 0",
            f"{resent} requests, 0 repeated",
        )
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------ S3 faults
def step_of(rel: str) -> str:
    """The pipeline step that PUT an object of a run, from its path under the run (layout.py's paths)."""
    parts = rel.split("/")
    if parts[0] == "_stages":
        return "plan" if parts[1] == "plan.json" else parts[1]
    if parts[0] in ("samples", "rejected", "images"):
        return "write"
    return "commit"  # manifest.json and the release files beside it


def test_a_whole_run_on_s3_completes_though_every_upload_is_throttled_then_reset(
    models, vllm_servers, tmp_path, monkeypatch
):
    """Every object of a whole run (plan, each stage's result, Parquet files, write marker, manifest) goes
    to the real S3 protocol (moto's server) through the fault proxy, which answers each key's first PUT with
    503 SlowDown and resets the connection in the middle of the second one's body: each is retried, the run
    commits, and every committed file is whole (sha256)."""
    import boto3
    from moto.server import ThreadedMotoServer

    from babelsynth.sample_data import write_samples
    from tests.proxies import S3FaultProxy

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    moto.start()
    proxy = S3FaultProxy(moto.get_host_and_port())
    proxy.policy = lambda path, attempt: ("slowdown", "reset")[attempt] if attempt < 2 else "ok"
    try:
        for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("BABELSYNTH_S3_ENDPOINT_URL", proxy.url)
        direct = boto3.client("s3", endpoint_url="http://{}:{}".format(*moto.get_host_and_port()))
        direct.create_bucket(Bucket="bkt")
        write_samples(str(tmp_path / "in.parquet"), n_per_task=1, bad=False)
        over = {"run.languages": ["deu_Latn"], "run.language_ratio": 1.0}
        cfg = make_config(
            models, vllm_servers, str(tmp_path / "in.parquet"), "s3://bkt/runs", str(tmp_path / "c"), **over
        )
        m = runner.run_all(cfg, "s3faults")
        assert m["reconciliation"]["ok"] and m["files"]
        for f in m["files"]:
            body = direct.get_object(Bucket="bkt", Key=f"runs/s3faults/{f['path']}")["Body"].read()
            assert hashlib.sha256(body).hexdigest() == f["sha256"], f["path"]
        by_key: dict[str, list[str]] = {}
        for method, path, outcome in proxy.log:
            if method == "PUT":  # the run's objects, and the run-level ones beside it (latest.json, history)
                by_key.setdefault(path.split("?")[0].split("/bkt/runs/", 1)[1], []).append(outcome)
        for key, outcomes in by_key.items():
            assert outcomes[:3] == ["503", "reset", "200"], (key, outcomes)  # both faults, then whole
        run_keys = [k.split("s3faults/", 1)[1] for k in by_key if k.startswith("s3faults/")]
        steps = Counter(step_of(k) for k in run_keys)
        assert {"plan", *runner.pipeline(cfg), "write", "commit"} <= set(steps), steps
    finally:
        proxy.close()
        moto.stop()
    for step, n in steps.items():
        matrix(
            "S3: 503 SlowDown, then a connection reset mid-upload, on every object",
            step,
            "-",
            f"{n} object(s), each retried twice then whole; run committed, sha256 verified",
            "none",
        )

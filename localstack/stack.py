"""up / down / status of the local stack. The state file (`<root>/stack.json`) records the settings, every
service's PID and every port, so `down` stops exactly what `up` started, by PID, from another process.

`up` is idempotent (a healthy stack is left alone) and all-or-nothing: if a service fails to become
healthy, everything already started is stopped and the log that explains it is printed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from babelsynth.vllm_server import VLLMServer
from localstack import postgres, procs
from localstack.settings import (
    ADMIN,
    PASSWORDS_FILE,
    VENV_BIN,
    StackSettings,
    component_env,
    deployment_file,
    env_script,
    trigger_command,
)

AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
VLLM_SERVICES = {"vllm-teacher": ("vlm", "tiny-aya-vision"), "vllm-llm": ("llm", "tiny-llm")}
# Stop what creates work first (scheduler), the database last.
STOP_ORDER = ("scheduler", "triggerer", "dag-processor", "api-server", "vllm-teacher", "vllm-llm")
HEALTH_KEYS = ("metadatabase", "scheduler", "dag_processor", "triggerer")
DAG_IDS = ("babelsynth_generate", "babelsynth_train")
# What a live service's command line contains: a recorded PID reused by something else is never signalled.
CMD_MARKERS = {**{c: "airflow" for c in AIRFLOW_COMPONENTS}, **{v: "vllm" for v in VLLM_SERVICES}}


class StackError(RuntimeError):
    pass


@dataclass
class State:
    settings: StackSettings
    pids: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0
    ready_seconds: float | None = None

    def save(self) -> None:
        doc = {
            "settings": self.settings.to_json(),
            "pids": self.pids,
            "ports": self.settings.ports,
            "started_at": self.started_at,
            "ready_seconds": self.ready_seconds,
        }
        tmp = self.settings.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(self.settings.state_file)


def read_state(root: Path) -> State | None:
    path = Path(root) / "stack.json"
    if not path.exists():
        return None
    doc = json.loads(path.read_text())
    return State(
        StackSettings.from_json(doc["settings"]),
        {k: int(v) for k, v in doc["pids"].items()},
        doc.get("started_at", 0.0),
        doc.get("ready_seconds"),
    )


def running(state: State) -> dict[str, list[int]]:
    """Service -> its live processes (a service whose leader died may still have children)."""
    out = {}
    for name, pid in state.pids.items():
        if name == "postgres":
            live = [pid] if procs.alive(pid) else []
        else:
            live = procs.session_pids(pid)
            if procs.alive(pid) and CMD_MARKERS.get(name, "") not in procs.cmdline(pid):
                live = []  # the PID was reused by an unrelated process
        if live:
            out[name] = live
    return out


def resolve_ports(s: StackSettings) -> StackSettings:
    """0 -> a free port; a fixed port someone else listens on fails now, naming the option to change."""
    taken = procs.listening_ports()
    chosen: dict[str, int] = {}
    for name in ("api_port", "pg_port", "teacher_port", "llm_port", "log_port", "trigger_log_port"):
        port = getattr(s, name)
        if port == 0:
            port = procs.free_port(taken | set(chosen.values()))
        elif port in taken:
            option = "--" + name.replace("_", "-")
            raise StackError(
                f"port {port} is already in use on this machine: pass {option} N (or 0 for a free one)"
            )
        chosen[name] = port
    return dataclasses.replace(s, **chosen)


def up(s: StackSettings, say: Callable[[str], None] = print) -> State:
    existing = read_state(s.root)
    if existing is not None:
        live = running(existing)
        if live and set(live) == set(existing.pids) and healthy(existing.settings):
            say("babelsynth stack is already up")
            say(summary(existing))
            return existing
        if live:
            raise StackError(
                f"the stack in {s.root} is partly up ({', '.join(sorted(live))} running): "
                "run `make stack-down` first"
            )
    s = resolve_ports(s)
    s.root.mkdir(parents=True, exist_ok=True)
    for d in (s.logs, s.home, s.work):
        d.mkdir(parents=True, exist_ok=True)
    if s.placement is None:
        s.deployment.write_text(deployment_file(s))
    state = State(s, {}, time.time())
    state.save()
    env = component_env(s, dict(os.environ))
    t0 = time.monotonic()
    started: dict[str, subprocess.Popen] = {}
    try:
        step = _stepper(say, t0)
        with step("tiny models and the sample input"):
            models = _models_and_input(s)
        with step("PostgreSQL"):
            state.pids["postgres"] = postgres.start(s.pg_dir, s.pg_port, s.logs / "postgres.log")
            state.save()
        for name, (key, served) in VLLM_SERVICES.items():  # they load while Airflow migrates
            port = s.teacher_port if name == "vllm-teacher" else s.llm_port
            srv = VLLMServer(
                models[key],
                served_model_name=served,
                port=port,
                python=s.vllm_python,
                work_dir=s.root / "vllm",
                log_path=s.logs / f"{name}.log",
            )
            started[name] = procs.spawn(srv.command(), srv.child_env(), srv.log_path, srv.work_dir)
            state.pids[name] = started[name].pid
        state.save()
        with step("airflow db migrate, gpu pool"):
            _airflow(env, s, ["db", "migrate"])
            _airflow(
                env,
                s,
                ["pools", "set", "gpu", str(s.gpu_slots), "GPU slots (CPU here)", "--include-deferred"],
            )
        for name in AIRFLOW_COMPONENTS:
            started[name] = procs.spawn(
                [str(VENV_BIN / "airflow"), name], env, s.logs / f"{name}.log", s.home
            )
            state.pids[name] = started[name].pid
        state.save()
        with step("every service healthy"):
            _wait(lambda: healthy(s), started, s, timeout=600)
        with step("DAGs parsed, babelsynth_generate unpaused"):
            _dags_ready(s, started, say)
        with step("babelsynth check-config --probe"):
            r = subprocess.run(
                [
                    str(VENV_BIN / "python"),
                    "-m",
                    "babelsynth.cli",
                    "check-config",
                    "--config",
                    str(s.config),
                    "--probe",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            if r.returncode != 0:
                raise StackError(f"check-config failed:\n{r.stderr.strip()}")
        s.env_file.write_text(env_script(s))
    except BaseException as e:
        say(f"babelsynth stack failed to come up: {e}\nstopping what was started")
        report = down(s.root, say=say)
        if report["survivors"]:
            say(f"left running: {report['survivors']}")
        raise
    state.ready_seconds = round(time.monotonic() - t0, 1)
    state.save()
    say(summary(state))
    return state


def _stepper(say: Callable[[str], None], t0: float):
    class Step:
        def __init__(self, name: str):
            self.name = name

        def __enter__(self):
            self.t = time.monotonic()

        def __exit__(self, exc_type, *_):
            if exc_type is None:
                now = time.monotonic()
                say(f"  {self.name}: {now - self.t:.1f}s (at {now - t0:.0f}s)")

    return Step


def _models_and_input(s: StackSettings) -> dict[str, str]:
    from babelsynth.sample_data import write_samples
    from tinymodels.build import build_all

    models = build_all(s.models)
    sample = s.work / "input" / "samples.parquet"
    if not sample.exists():
        write_samples(str(sample))
    return models


def _airflow(env: dict[str, str], s: StackSettings, args: list[str]) -> None:
    log = s.logs / f"airflow-{args[0]}.log"
    with open(log, "ab") as fh:
        r = subprocess.run(
            [str(VENV_BIN / "airflow"), *args],
            env=env,
            cwd=s.home,
            stdout=fh,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    if r.returncode != 0:
        raise StackError(f"airflow {' '.join(args)} failed (rc {r.returncode}):\n{tail(log)}")


def healthy(s: StackSettings) -> bool:
    """Airflow's own health endpoint (no auth) for its four components, /health for each vLLM server."""
    try:
        h = httpx.get(f"{s.api_url}/api/v2/monitor/health", timeout=5).json()
        if not all((h.get(k) or {}).get("status") == "healthy" for k in HEALTH_KEYS):
            return False
        return all(
            httpx.get(url.removesuffix("/v1") + "/health", timeout=5).status_code == 200
            for url in (s.teacher_url, s.llm_url)
        )
    except (httpx.HTTPError, ValueError):
        return False


def _wait(
    ok: Callable[[], bool], started: dict[str, subprocess.Popen], s: StackSettings, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        for name, p in started.items():
            if p.poll() is not None:
                raise StackError(
                    f"{name} exited with code {p.returncode}; {s.logs / (name + '.log')}:\n"
                    + tail(s.logs / f"{name}.log")
                )
        if time.monotonic() > deadline:
            raise StackError(f"not healthy after {timeout:.0f}s: {health_report(s)}")
        time.sleep(1)


def health_report(s: StackSettings) -> str:
    try:
        h = httpx.get(f"{s.api_url}/api/v2/monitor/health", timeout=5).json()
        parts = [f"{k}={(h.get(k) or {}).get('status')}" for k in HEALTH_KEYS]
    except (httpx.HTTPError, ValueError) as e:
        parts = [f"api-server: {type(e).__name__}"]
    for name, url in (("vllm-teacher", s.teacher_url), ("vllm-llm", s.llm_url)):
        try:
            code = httpx.get(url.removesuffix("/v1") + "/health", timeout=5).status_code
        except httpx.HTTPError as e:
            code = type(e).__name__
        parts.append(f"{name}={code}")
    return ", ".join(parts)


def password(s: StackSettings) -> str:
    """The admin password the simple auth manager generated at the api-server's first start."""
    return json.loads((s.home / PASSWORDS_FILE).read_text())[ADMIN]


def token(s: StackSettings) -> str:
    r = httpx.post(f"{s.api_url}/auth/token", json={"username": ADMIN, "password": password(s)}, timeout=30)
    r.raise_for_status()
    return r.json()["access_token"]


def _dags_ready(
    s: StackSettings, started: dict[str, subprocess.Popen], say: Callable[[str], None], timeout: float = 180
) -> None:
    api = httpx.Client(
        base_url=f"{s.api_url}/api/v2", headers={"Authorization": f"Bearer {token(s)}"}, timeout=30
    )
    deadline = time.monotonic() + timeout
    with api:
        while True:
            errors = api.get("/importErrors").json()
            if errors["total_entries"]:
                raise StackError(
                    "DAG import errors:\n"
                    + "\n".join(
                        f"{e['filename']}: {e['stack_trace'][-1500:]}" for e in errors["import_errors"]
                    )
                )
            dags = {
                d["dag_id"]: d
                for d in api.get("/dags", params={"dag_id_pattern": "babelsynth"}).json()["dags"]
            }
            if set(DAG_IDS) <= set(dags):
                break
            if time.monotonic() > deadline:
                raise StackError(
                    f"DAGs not parsed after {timeout:.0f}s:\n{tail(s.logs / 'dag-processor.log')}"
                )
            for name, p in started.items():
                if p.poll() is not None:
                    raise StackError(
                        f"{name} exited with code {p.returncode}:\n{tail(s.logs / f'{name}.log')}"
                    )
            time.sleep(1)
        api.patch("/dags/babelsynth_generate", json={"is_paused": False}).raise_for_status()
        if dags["babelsynth_train"]["is_paused"]:
            say(
                "note: babelsynth_train is paused: it will not run after a generation run;"
                " unpause it with `airflow dags unpause babelsynth_train`"
            )


def down(root: Path, grace: float = 20.0, say: Callable[[str], None] = print) -> dict:
    """Stop every recorded service by PID (SIGTERM, then SIGKILL after `grace`), PostgreSQL last; report
    what survived and which of the stack's ports still listen."""
    state = read_state(Path(root))
    if state is None:
        return {"stopped": [], "survivors": [], "ports": []}
    s = state.settings
    stopped, survivors = [], []
    live = running(state)
    for name in STOP_ORDER:
        if name in live:
            t = time.monotonic()
            left = procs.stop_session(state.pids[name], grace)
            survivors += left
            stopped.append(name)
            took = f"{time.monotonic() - t:.1f}s"
            say(
                f"  stopped {name} (pid {state.pids[name]}, {took})" + (f", survivors {left}" if left else "")
            )
    if "postgres" in state.pids:
        try:
            postgres.stop(s.pg_dir)
            stopped.append("postgres")
            say(f"  stopped postgres (pid {state.pids['postgres']})")
        except postgres.PostgresError as e:
            say(f"  postgres: {e}")
        if procs.alive(state.pids["postgres"]):
            survivors.append(state.pids["postgres"])
    ports = sorted(set(s.ports.values()) & procs.listening_ports())
    state.pids = {}
    state.save()
    return {"stopped": stopped, "survivors": survivors, "ports": ports}


def purge(root: Path) -> None:
    """Delete the stack's folder (database, Airflow home, runs, logs); only when nothing runs."""
    state = read_state(Path(root))
    if state is not None and running(state):
        raise StackError("the stack is running: `make stack-down` first")
    shutil.rmtree(root, ignore_errors=True)


def summary(state: State) -> str:
    s = state.settings
    ready = f" in {state.ready_seconds:.0f}s" if state.ready_seconds else ""
    return "\n".join(
        [
            f"babelsynth stack is up{ready}: PostgreSQL, Airflow api-server, scheduler, dag-processor,"
            " triggerer, vLLM teacher + LLM (tiny models, CPU)",
            f"  UI       {s.api_url}",
            f"  login    {ADMIN} / {password(s)}   (from {s.home / PASSWORDS_FILE})",
            f"  health   {s.api_url}/api/v2/monitor/health",
            f"  logs     {s.logs}/",
            f"  trigger  {trigger_command(s)}",
            "  stop     make stack-down",
        ]
    )


def status(root: Path) -> str:
    state = read_state(Path(root))
    if state is None:
        return f"no stack in {root}"
    live = running(state)
    lines = [
        f"  {name:<14} pid {pid:<8} {'running' if name in live else 'stopped'}"
        for name, pid in state.pids.items()
    ]
    listening = procs.listening_ports()
    lines += [
        f"  port {port:<6} {name:<22} {'listening' if port in listening else '-'}"
        for name, port in state.settings.ports.items()
    ]
    if live:
        lines.append("  health: " + health_report(state.settings))
    return "\n".join(lines) if lines else "  stopped"


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else f"{path} missing"

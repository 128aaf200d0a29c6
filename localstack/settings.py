"""The stack's settings, from one place: `make stack`, the real-scheduler test and docs/airflow.md agree.

`site_values` are what differs per deployment (the variables docs/airflow.md asks the reader to set);
`airflow_env` and `babelsynth_env` derive every setting of the components from them, exactly as the
copyable blocks of docs/airflow.md do (tests/test_airflow_docs.py checks that they agree).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from babelsynth.vllm_server import default_vllm_python

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
ADMIN = "admin"
PASSWORDS_FILE = "simple_auth_manager_passwords.json.generated"
JWT_SECRET_FILE = "jwt_secret"
# PyJWT warns on every token signed with an HMAC key shorter than the hash (64 bytes for Airflow's HS512).
JWT_SECRET_BYTES = 64
# Settings only the stack sets: free ports for the log servers, so a stack runs beside another Airflow.
STACK_ONLY = ("AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT", "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT")
# A run that shows the whole pipeline in about a minute on 2 CPU cores.
DEMO_CONF = {"limit": 12, "shard_size": 6, "languages": ["deu_Latn", "jpn_Jpan"]}


@dataclass
class StackSettings:
    """Ports (0: pick a free one at `up`), where everything lives, and the sizes of a CPU machine."""

    root: Path = REPO / ".work" / "stack"
    models: Path = REPO / ".work" / "models"
    api_port: int = 8080
    pg_port: int = 5433
    teacher_port: int = 8011
    llm_port: int = 8012
    log_port: int = 8793
    trigger_log_port: int = 8794
    parallelism: int = 2
    gpu_slots: int = 1  # on CPU the "gpu" pool bounds how many model stages share the cores at once
    placement: Path | None = None  # $BABELSYNTH_AIRFLOW_CONFIG; None: deployment_file(), stages in the worker
    config: Path = REPO / "configs" / "demo.yaml"
    train_config: Path = REPO / "configs" / "train_demo.yaml"
    schedule: str = "none"  # manual runs only; a cron here starts a full nightly run at deploy time
    vllm_python: Path = field(default_factory=default_vllm_python)

    @property
    def deployment(self) -> Path:
        """$BABELSYNTH_AIRFLOW_CONFIG: the given placement, else the stack's own (deployment_file)."""
        return self.placement or self.root / "deployment.yaml"

    @property
    def home(self) -> Path:
        return self.root / "airflow-home"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def pg_dir(self) -> Path:
        return self.root / "pg"

    @property
    def state_file(self) -> Path:
        return self.root / "stack.json"

    @property
    def env_file(self) -> Path:
        return self.root / "env.sh"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def db_url(self) -> str:
        return f"postgresql+psycopg2://airflow:airflow@127.0.0.1:{self.pg_port}/airflow"

    @property
    def teacher_url(self) -> str:
        return f"http://127.0.0.1:{self.teacher_port}/v1"

    @property
    def llm_url(self) -> str:
        return f"http://127.0.0.1:{self.llm_port}/v1"

    @property
    def ports(self) -> dict[str, int]:
        return {
            "api-server": self.api_port,
            "postgres": self.pg_port,
            "vllm-teacher": self.teacher_port,
            "vllm-llm": self.llm_port,
            "worker log server": self.log_port,
            "triggerer log server": self.trigger_log_port,
        }

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> StackSettings:
        paths = {f.name for f in dataclasses.fields(cls) if "Path" in str(f.type)}
        return cls(**{k: Path(v) if k in paths and v is not None else v for k, v in data.items()})


def jwt_secret(home: Path) -> str:
    """The JWT signing secret every component shares: made once, kept in AIRFLOW_HOME (mode 600)."""
    path = home / JWT_SECRET_FILE
    if not path.exists() or not path.read_text().strip():
        home.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(JWT_SECRET_BYTES) + "\n")
    return path.read_text().strip()


def site_values(s: StackSettings) -> dict[str, str]:
    """The variables docs/airflow.md's first block asks for, with this stack's values."""
    return {
        "BABELSYNTH_REPO": str(REPO),
        "BABELSYNTH_WORK": str(s.work),
        "BABELSYNTH_MODELS": str(s.models),
        "BABELSYNTH_TEACHER_URL": s.teacher_url,
        "BABELSYNTH_LLM_URL": s.llm_url,
        "AIRFLOW_HOME": str(s.home),
        "AIRFLOW_DB": s.db_url,
        "AIRFLOW_API_PORT": str(s.api_port),
    }


def airflow_env(s: StackSettings) -> dict[str, str]:
    """Every Airflow setting of the stack (one host: all components read the same values)."""
    return {
        "AIRFLOW_HOME": str(s.home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": s.db_url,
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": str(s.parallelism),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{s.api_url}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(s.api_port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API_AUTH__JWT_SECRET": jwt_secret(s.home),
        "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
        "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(s.log_port),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(s.trigger_log_port),
    }


def babelsynth_env(s: StackSettings) -> dict[str, str]:
    """What the DAG files and the tasks read (docs/airflow.md: environment variables)."""
    env = {
        "BABELSYNTH_CONFIG": str(s.config),
        "BABELSYNTH_TRAIN_CONFIG": str(s.train_config),
        "BABELSYNTH_GENERATE_SCHEDULE": s.schedule,
        "BABELSYNTH_WORK": str(s.work),
        "BABELSYNTH_MODELS": str(s.models),
        "BABELSYNTH_TEACHER_URL": s.teacher_url,
        "BABELSYNTH_LLM_URL": s.llm_url,
        "BABELSYNTH_VLLM_PYTHON": str(s.vllm_python),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env["BABELSYNTH_AIRFLOW_CONFIG"] = str(s.deployment)
    return env


def deployment_file(s: StackSettings) -> str:
    """The stack's placement when none is given: every stage in the worker, and path params allowed under
    the stack's own directories (operators/boundary.py; without roots every path param is refused)."""
    roots = {
        "config": [str(REPO / "configs"), str(s.root)],
        "input": [str(s.work)],
        "output": [str(s.work)],
        "models": [str(s.models)],
    }
    return "# written by `make stack`\n" + json.dumps({"allowed_roots": roots}, indent=1) + "\n"


def python_path() -> str:
    """src/ first: this checkout's babelsynth wins over an installed one; the root holds operators/."""
    return f"{REPO / 'src'}:{REPO}"


def component_env(s: StackSettings, base: dict[str, str]) -> dict[str, str]:
    """The environment of every Airflow component: `base` without any Airflow or babelsynth setting of the
    caller (the stack is hermetic), then the stack's own."""
    kept = {
        k: v
        for k, v in base.items()
        if not k.startswith(("AIRFLOW__", "AIRFLOW_CONN_", "AIRFLOW_VAR_", "BABELSYNTH_"))
        and k not in ("AIRFLOW_HOME", "PYTHONWARNINGS", "PYTHONPATH")
    }
    return {
        **kept,
        "PATH": f"{VENV_BIN}:{base.get('PATH', '/usr/bin:/bin')}",
        "PYTHONPATH": python_path(),
        **babelsynth_env(s),
        **airflow_env(s),
    }


def env_script(s: StackSettings) -> str:
    """env.sh: `source` it to use the airflow and babelsynth CLIs against the stack."""
    env = {**site_values(s), **babelsynth_env(s), **airflow_env(s)}
    lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append(f'export PATH={shlex.quote(str(VENV_BIN))}:"$PATH"')
    lines.append(f"export PYTHONPATH={shlex.quote(python_path())}")
    return "# babelsynth local stack: source this file\n" + "\n".join(lines) + "\n"


def trigger_command(s: StackSettings) -> str:
    return (
        f"source {shlex.quote(str(s.env_file))} && "
        f"airflow dags trigger babelsynth_generate -c {shlex.quote(json.dumps(DEMO_CONF))}"
    )

"""A private PostgreSQL cluster of the Debian package, on 127.0.0.1: the Airflow metadata database.

`initdb` refuses to run as root, so as root the cluster runs as the `postgres` user (its directory is
handed to that user). Install once with `make postgres` (apt-get install postgresql).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

PG_ROOT = Path("/usr/lib/postgresql")


class PostgresError(RuntimeError):
    pass


def pg_bin() -> Path:
    """The newest installed server's bin/ directory."""
    versions = sorted(PG_ROOT.glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not versions:
        raise PostgresError(f"PostgreSQL is not installed ({PG_ROOT} missing): run `make postgres`")
    return versions[-1].parent


def as_pg(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], timeout: float = 120) -> str:
    r = subprocess.run(as_pg(cmd), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise PostgresError(
            f"{' '.join(cmd[:2])} failed (rc {r.returncode}): {(r.stderr or r.stdout).strip()}"
        )
    return r.stdout


def _own(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def start(pg_dir: Path, port: int, log: Path) -> int:
    """Create the cluster (once), start it, create the `airflow` role and database (once); its PID."""
    b = pg_bin()
    data = pg_dir / "data"
    pg_dir.mkdir(parents=True, exist_ok=True)
    _own(pg_dir)
    stack_root = pg_dir.parent  # the server user must be able to traverse it (mkdtemp makes it 0700)
    if os.geteuid() == 0 and not stack_root.stat().st_mode & 0o001:
        stack_root.chmod(stack_root.stat().st_mode | 0o011)
    if not (data / "PG_VERSION").exists():
        _run([str(b / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
    log.parent.mkdir(parents=True, exist_ok=True)
    log.touch()
    _own(log)
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {pg_dir} -c max_connections=100 -c fsync=off"
    _run([str(b / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", opts, "start"])
    psql = [str(b / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1"]
    if _run([*psql, "-tAc", "SELECT 1 FROM pg_roles WHERE rolname='airflow'"]).strip() != "1":
        _run(
            [
                *psql,
                "-c",
                "CREATE USER airflow PASSWORD 'airflow'",
                "-c",
                "CREATE DATABASE airflow OWNER airflow",
            ]
        )
    return postmaster_pid(pg_dir)


def postmaster_pid(pg_dir: Path) -> int:
    try:
        return int((pg_dir / "data" / "postmaster.pid").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return 0


def ready(port: int) -> bool:
    r = subprocess.run(
        [str(pg_bin() / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-q"], capture_output=True
    )
    return r.returncode == 0


def stop(pg_dir: Path, timeout: float = 60) -> None:
    """Fast shutdown (active sessions are rolled back), waiting for the postmaster to exit."""
    data = pg_dir / "data"
    if not (data / "postmaster.pid").exists():
        return
    pid = postmaster_pid(pg_dir)
    _run([str(pg_bin() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", str(int(timeout)), "stop"])
    deadline = time.monotonic() + 10
    while pid and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.2)

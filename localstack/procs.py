"""Processes the stack starts: detached into their own session, found again by session id, stopped by PID.

Each service is the leader of a new session (`start_new_session`), so everything it forks (LocalExecutor
workers, task supervisors, the tasks) shares its session id even after the starter has exited. Stopping a
service is SIGTERM to each of those PIDs, then SIGKILL to what is left after a grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def spawn(argv: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    """Start `argv` detached (new session, no stdin), appending stdout and stderr to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        fh.flush()
        return subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, session id) of a live process; None if it does not exist."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[3])
    except (OSError, IndexError, ValueError):
        return None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of a session: the leader and everything it forked."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = proc_stat(int(d.name))
            if st is not None and st[1] == sid and st[0] != "Z":
                out.append(int(d.name))
    return sorted(out)


def alive(pid: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st[0] != "Z"


def stop_session(sid: int, grace: float = 20.0) -> list[int]:
    """SIGTERM every process of the session, SIGKILL the rest after `grace` s; returns the survivors."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        pids = session_pids(sid)
        if not pids:
            return []
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.3)
    return session_pids(sid)


def listening_ports() -> set[int]:
    """TCP ports some process listens on (IPv4 and IPv6), from /proc/net."""
    ports: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A":  # TCP_LISTEN
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


def free_port(taken: set[int] = frozenset()) -> int:
    """A port nothing listens on, below the kernel's ephemeral range: a port picked inside that range can
    be handed to another process's outgoing or port-0 socket (vLLM's engine binds several) before the
    service that was meant to get it binds it."""
    import random
    import socket

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        if port in taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port below {low}")

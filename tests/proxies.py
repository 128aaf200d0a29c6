"""Fault-injection and measurement relays for the reliability tests, and the local S3 server the tests share
(not tests themselves)."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import socket
import sqlite3
import struct
import threading
from pathlib import Path

from babelsynth.cache import cache_key

CHAT = "/v1/chat/completions"


@contextlib.contextmanager
def moto_s3(bucket: str, key: str = "test", set_env: bool = True):
    """moto's server (the S3 wire protocol) on a free local port with `bucket` created; yields (env, boto3
    client), env holding the endpoint and credentials babelsynth reads. With `set_env` this process's
    environment carries them until the block ends (children such as torchrun inherit them)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "BABELSYNTH_S3_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    if set_env:
        os.environ.update(env)
    client = boto3.client(
        "s3",
        endpoint_url=env["BABELSYNTH_S3_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id=key,
        aws_secret_access_key=key,
    )
    client.create_bucket(Bucket=bucket)
    try:
        yield env, client
    finally:
        server.stop()
        if set_env:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


class ChatProxy:
    """Relay in front of a real OpenAI-compatible server (fault injection and measurement)."""

    def __init__(self, upstream_port: int, require_key: str | None = None):
        self.log: list[tuple[str, dict, int]] = []  # (path, body, status) of every request forwarded
        self.answers: list[tuple[dict, dict]] = []  # (request body, answer) of every chat request answered
        self.lock = threading.Lock()
        self.on_answer = None  # called with the number of chat answers so far, after each is sent
        self.rewrite = None  # body -> body, before forwarding
        self.inflight = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                with proxy.lock:
                    proxy.inflight += 1
                try:
                    self.relay()
                finally:
                    with proxy.lock:
                        proxy.inflight -= 1

            def relay(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw)
                if require_key and self.headers.get("Authorization") != f"Bearer {require_key}":
                    status, data = 401, b'{"error": "unauthorized"}'
                else:
                    if proxy.rewrite and self.path == CHAT:
                        raw = json.dumps(proxy.rewrite(body)).encode()
                    try:
                        conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=300)
                        conn.request("POST", self.path, raw, {"Content-Type": "application/json"})
                        r = conn.getresponse()
                        status, data = r.status, r.read()
                        conn.close()
                    except OSError as e:
                        status, data = 502, json.dumps({"error": type(e).__name__}).encode()
                with proxy.lock:
                    proxy.log.append((self.path, body, status))
                    if self.path == CHAT and status == 200:
                        proxy.answers.append((body, json.loads(data)))
                    n = len([e for e in proxy.log if e[0] == CHAT and e[2] == 200])
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client was killed
                    return
                if proxy.on_answer and self.path == CHAT and status == 200:
                    proxy.on_answer(n)

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 256

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def idle(self, timeout: float = 300) -> None:
        """Wait until no request is being relayed (a killed client's last request included)."""
        import time

        deadline = time.monotonic() + timeout
        while self.inflight and time.monotonic() < deadline:
            time.sleep(0.05)

    def answered(self) -> int:
        with self.lock:
            return len([e for e in self.log if e[0] == CHAT and e[2] == 200])

    def chats(self, since: int = 0) -> list[dict]:
        with self.lock:
            return [b for p, b, s in self.log[since:] if p == CHAT]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def chat_key(body: dict) -> str:
    """The client's cache key of a request body, as it reached the server (backends/chat.request_key)."""
    return cache_key(kind="chat", model=body["model"], body=body)


def cached_keys(cache_dir: Path) -> set[str]:
    db = cache_dir / "requests.sqlite"
    if not db.exists():
        return set()
    with sqlite3.connect(db) as c:
        return {k for (k,) in c.execute("SELECT k FROM kv")}


class S3FaultProxy:
    """FAKE for fault injection, in front of the real moto S3 server: forwards every request, except that
    `faults` (a list consumed in order, per PUT) turns the next PUTs into "slowdown" (503 SlowDown),
    "reset" (the connection is reset after part of the body was read) or "ok"; HEADs of keys containing
    `deny` answer 403."""

    def __init__(self, upstream: tuple[str, int]):
        self.faults: list[str] = []
        self.policy = None  # or (path, attempt of that path) -> fault, when `faults` is empty
        self.attempts: dict[str, int] = {}
        self.log: list[tuple[str, str, str]] = []  # (method, path, outcome)
        self.deny = None
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _forward(self, body: bytes | None):
                conn = http.client.HTTPConnection(*upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "expect")}
                conn.request(self.command, self.path, body, headers)
                r = conn.getresponse()
                data = r.read()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # a HEAD answer has no body but says the object's size (ranged readers rely on it)
                size = r.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", size)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                proxy.log.append((self.command, self.path, str(r.status)))

            def _status(self, code: int, xml: str):
                raw = xml.encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(raw)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(raw)

            def do_PUT(self):
                n = int(self.headers.get("Content-Length", 0))
                with proxy.lock:
                    k = proxy.attempts[self.path] = proxy.attempts.get(self.path, -1) + 1
                    fault = proxy.faults.pop(0) if proxy.faults else "ok"
                    if proxy.policy and fault == "ok":
                        fault = proxy.policy(self.path, k)
                if fault == "reset":
                    self.rfile.read(min(n, max(1, n // 2)))  # part of the body arrives, then the line dies
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    proxy.log.append(("PUT", self.path, "reset"))
                    self.close_connection = True
                    return
                body = self.rfile.read(n)
                if fault == "slowdown":
                    proxy.log.append(("PUT", self.path, "503"))
                    return self._status(
                        503,
                        "<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>",
                    )
                self._forward(body)

            def do_HEAD(self):
                if proxy.deny and proxy.deny in self.path:
                    proxy.log.append(("HEAD", self.path, "403"))
                    return self._status(403, "")
                self._forward(None)

            def do_GET(self):
                self._forward(None)

            def do_POST(self):
                self._forward(self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def do_DELETE(self):
                self._forward(None)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()

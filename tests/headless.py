"""Render a local HTML file in a real headless Chromium (Debian's `chromium`) and report what happened.

Driven over the DevTools protocol (websocket-client): every request the page makes is logged
(Network.requestWillBeSent), the page's images are inspected after load (`complete && naturalWidth > 0`),
and a full-page PNG is captured. Chromium is also pointed at a local recording proxy, so any connection
it tries to open to the network, from the page or from the browser itself, is seen there.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    # Chromium's own background traffic (network time, the omnibox's AI-mode probe, search preconnect,
    # safe browsing, field trials...), so that the proxy below sees only what a page asks for. One
    # --disable-features only: Chromium keeps the last one given.
    "--no-pings",
    "--no-default-browser-check",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-breakpad",
    "--disable-field-trial-config",
    "--metrics-recording-only",
    "--safebrowsing-disable-auto-update",
    "--disable-features=NetworkTimeServiceQuerying,AimEnabled,AimServerEligibilityEnabled,"
    "AimServerRequestOnStartupEnabled,PreconnectToSearch,OptimizationHints,Translate,MediaRouter,"
    "AutofillServerCommunication,CertificateTransparencyComponentUpdater,InterestFeedContentSuggestions,"
    "DialMediaRouteProvider,SafeBrowsing",
    # the sign-in cookie probe, the push-messaging check-in and (Chromium 156, despite
    # --disable-component-update) the component updater's update2/json check have no off switch: send them
    # to a closed local port, on the machine
    "--gaia-url=http://127.0.0.1:9",
    "--gcm-checkin-url=http://127.0.0.1:9/checkin",
    "--gcm-registration-url=http://127.0.0.1:9/register",
    "--gcm-mcs-endpoint=http://127.0.0.1:9",
    "--component-updater=url-source=http://127.0.0.1:9/update",
]


class RecordingProxy:
    """An HTTP proxy that records the first line of every connection (CONNECT host:443 / GET http://...)
    and answers 403: Chromium sends every non-loopback request here, so one that reaches it would have
    left the machine."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    first = conn.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace")
                except OSError:
                    first = "<no request line>"
                self.seen.append(first)
                try:
                    conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@dataclass
class Rendered:
    png: bytes
    images: list[dict]  # {"alt", "complete", "naturalWidth", "src_scheme"}
    requests: list[str] = field(default_factory=list)  # URLs the page requested
    failed: list[str] = field(default_factory=list)  # URLs whose loading failed
    proxied: list[str] = field(default_factory=list)  # connections that reached the recording proxy
    console: list[str] = field(default_factory=list)
    title: str = ""


class _CDP:
    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        end = time.monotonic() + timeout
        for ev in self.events:
            if ev.get("method") == method:
                return ev
        while time.monotonic() < end:
            ev = json.loads(self.ws.recv())
            self.events.append(ev)
            if ev.get("method") == method:
                return ev
        raise TimeoutError(method)


def render(html: Path, width: int = 1280, max_height: int = 16000) -> Rendered:
    """Load `html` from disk in headless Chromium; images, requests and a full-page screenshot."""
    proxy = RecordingProxy()
    profile = Path(tempfile.mkdtemp(prefix="chromium-"))
    proc = subprocess.Popen(
        [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            f"--proxy-server=http://127.0.0.1:{proxy.port}",  # loopback stays direct: it is the machine
            f"--window-size={width},900",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        end = time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"chromium did not start (exit {proc.poll()})")
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        cdp = _CDP(f"ws://127.0.0.1:{port}{path}")
        target = cdp.send("Target.createTarget", url="about:blank")["targetId"]
        sid = cdp.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        cdp.send("Network.enable", sid)
        cdp.send("Page.enable", sid)
        cdp.send("Runtime.enable", sid)
        cdp.send("Page.navigate", sid, url=html.resolve().as_uri())
        cdp.wait_for("Page.loadEventFired")
        images = cdp.send(
            "Runtime.evaluate",
            sid,
            expression="JSON.stringify(Array.from(document.images).map(i => ({alt: i.alt, "
            "complete: i.complete, naturalWidth: i.naturalWidth, src_scheme: i.src.split(':')[0]})))",
            returnByValue=True,
        )["result"]["value"]
        title = cdp.send("Runtime.evaluate", sid, expression="document.title", returnByValue=True)["result"]
        height = cdp.send("Page.getLayoutMetrics", sid)["cssContentSize"]["height"]
        height = min(int(height) + 1, max_height)
        cdp.send(
            "Emulation.setDeviceMetricsOverride",
            sid,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        shot = cdp.send("Page.captureScreenshot", sid, format="png", captureBeyondViewport=True)
        time.sleep(0.5)  # let late requests (if any) arrive at the proxy
        events = cdp.events
        import base64

        return Rendered(
            png=base64.b64decode(shot["data"]),
            images=json.loads(images),
            requests=[
                e["params"]["request"]["url"]
                for e in events
                if e.get("method") == "Network.requestWillBeSent"
            ],
            failed=[
                e["params"].get("errorText", "") for e in events if e.get("method") == "Network.loadingFailed"
            ],
            proxied=list(proxy.seen),
            console=[
                json.dumps(e["params"].get("args", []))
                for e in events
                if e.get("method") == "Runtime.consoleAPICalled"
            ],
            title=title.get("value", ""),
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proxy.close()
        shutil.rmtree(profile, ignore_errors=True)

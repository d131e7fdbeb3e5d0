"""A headless Chromium driven over the DevTools protocol on a pipe (no extra package).

Chromium reads protocol messages from fd 3 and writes them to fd 4, each a JSON object
ended by a NUL byte (``--remote-debugging-pipe``). The page's own events come on its
session, apart from whatever the browser itself fetches.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-default-apps", "--disable-extensions",
)  # fmt: skip


@dataclass
class PageRun:
    """What a page did: requests other than its own document, console messages and
    uncaught exceptions, error log entries, evaluated values, the screenshot (PNG bytes)."""

    requests: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    screenshot: bytes = b""


class _Pipe:
    def __init__(self, profile: Path) -> None:
        to_child, self._w = os.pipe()
        self._r, from_child = os.pipe()

        def fds() -> None:  # runs in the child: the protocol's fds are 3 and 4
            a, b = os.dup(to_child), os.dup(from_child)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}",
             "about:blank"],
            preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_child)
        os.close(from_child)
        self.queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self._id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while chunk := os.read(self._r, 1 << 16):
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for m in messages:
                self.queue.put(json.loads(m))
        self.queue.put(None)

    def _next(self, deadline: float) -> dict[str, Any]:
        m = self.queue.get(timeout=max(0.05, deadline - time.monotonic()))
        if m is None:
            raise RuntimeError("Chromium closed the DevTools pipe")
        return m

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + 60
        while True:
            m = self._next(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m["result"]
            self.events.append(m)

    def wait_for(self, method: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._next(deadline))

    def settle(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                m = self.queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if m is None:
                return
            self.events.append(m)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, queue.Empty):
            self.call("Browser.close")
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)


def open_page(
    page: Path, profile: Path, *, width: int = 1200, height: int = 1500,
    evaluate: dict[str, str] | None = None,
) -> PageRun:  # fmt: skip
    """Load ``page`` (a file) in a fresh headless Chromium profile, evaluate the
    ``evaluate`` expressions (name -> JavaScript, results by value) and take a screenshot."""
    if CHROMIUM is None:
        raise RuntimeError("Chromium is not installed")
    pipe = _Pipe(profile)
    run = PageRun()
    try:
        target = pipe.call("Target.createTarget", url="about:blank")["targetId"]
        s = pipe.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Network", "Runtime", "Log", "Page"):
            pipe.call(f"{domain}.enable", session=s)
        pipe.call("Emulation.setDeviceMetricsOverride", session=s, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)  # fmt: skip
        url = page.resolve().as_uri()
        pipe.call("Page.navigate", session=s, url=url)
        pipe.wait_for("Page.loadEventFired")
        pipe.settle(0.5)
        for name, expression in (evaluate or {}).items():
            out = pipe.call("Runtime.evaluate", session=s, expression=expression,
                            returnByValue=True)  # fmt: skip
            if "exceptionDetails" in out:
                raise RuntimeError(f"{name}: {out['exceptionDetails']}")
            run.values[name] = out["result"].get("value")
        shot = pipe.call("Page.captureScreenshot", session=s, format="png")
        run.screenshot = base64.b64decode(shot["data"])
        pipe.settle(0.2)
    finally:
        pipe.close()
    for e in pipe.events:
        if e.get("sessionId") != s:
            continue
        method, p = e.get("method"), e.get("params", {})
        if method == "Network.requestWillBeSent" and p["request"]["url"] != url:
            run.requests.append(p["request"]["url"])
        elif method == "Runtime.consoleAPICalled":
            run.console.append(f"console.{p['type']}: {p.get('args')}")
        elif method == "Runtime.exceptionThrown":
            run.console.append(f"exception: {p['exceptionDetails']}")
        elif method == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
            run.console.append(f"log {p['entry']['level']}: {p['entry']['text']}")
    return run

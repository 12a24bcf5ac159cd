"""A headless Chromium for the page tests, driven over the DevTools protocol through a pipe
(`--remote-debugging-pipe`: JSON messages ended by NUL bytes on file descriptors 3 and 4), so
neither a websocket library nor a port is needed. `find_browser()` is None where no Chromium
or Chrome is installed (Debian: `apt-get install chromium`; or set SRT_TEST_BROWSER)."""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

# Puts the pipe ends argv[1] and argv[2] on fds 3 and 4, then becomes the browser (argv[3:]).
_LAUNCHER = (
    "import os, sys; r, w = int(sys.argv[1]), int(sys.argv[2]); os.dup2(r, 3); os.dup2(w, 4); "
    "os.close(r); os.close(w); os.execv(sys.argv[3], sys.argv[3:])"
)
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


class BrowserError(RuntimeError):
    pass


def find_browser() -> str | None:
    given = os.environ.get("SRT_TEST_BROWSER")
    if given:
        return shutil.which(given)
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _above_9(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Browser:
    """One headless browser process; `open(url)` gives a Page (a tab) in it."""

    def __init__(self, executable: str, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="srt-browser-")
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        self._buffer = b""
        cmd_read, self._cmd_write = os.pipe()  # the browser reads commands on its fd 3
        self._out_read, out_write = os.pipe()  # and writes answers and events on its fd 4
        # NOTE: Popen cannot place a pipe on a given fd number, so a small Python launcher
        # moves them onto 3 and 4; first above 9, so neither lands on the other's target.
        cmd_read, out_write = _above_9(cmd_read), _above_9(out_write)
        args = [
            "--headless",
            "--no-sandbox",  # tests run as root in containers, where the sandbox cannot start
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--remote-debugging-pipe",
            f"--user-data-dir={self.profile}",
            "about:blank",
        ]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, str(cmd_read), str(out_write), executable, *args],
            pass_fds=(cmd_read, out_write),
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
            start_new_session=True,  # its helper processes in one group, to end together
        )
        os.close(cmd_read)
        os.close(out_write)
        try:
            self.call("Browser.getVersion")
        except BaseException:
            self.close()
            raise

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> Any:
        """Sends one command and waits for its answer; events that arrive meanwhile are kept
        in `events`."""
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            msg["sessionId"] = session
        os.write(self._cmd_write, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out_read], [], [], left)[0]:
                raise BrowserError(
                    f"the browser did not answer in {self.timeout:g} s{self._tail()}"
                )
            chunk = os.read(self._out_read, 1 << 16)
            if not chunk:
                raise BrowserError(f"the browser exited ({self.proc.poll()}){self._tail()}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def _tail(self) -> str:
        self.log.seek(0)
        text = self.log.read().decode(errors="replace")[-2000:]
        return f":\n{text}" if text else ""

    def open(self, url: str, width: int = 1280, height: int = 900) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        page = Page(self, session["sessionId"])
        page.call("Network.enable")
        page.call("Runtime.enable")
        page.resize(width, height)
        page.goto(url)
        return page

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.write(self._cmd_write, json.dumps({"id": 0, "method": "Browser.close"}).encode())
                os.write(self._cmd_write, b"\0")
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        for fd in (self._cmd_write, self._out_read):
            try:
                os.close(fd)
            except OSError:
                pass
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """A tab: JavaScript runs in it with `js`; `wait` polls an expression until it is truthy."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser, self.session = browser, session

    def call(self, method: str, params: dict | None = None) -> Any:
        return self.browser.call(method, params, self.session)

    def resize(self, width: int, height: int, mobile: bool = False) -> None:
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
        )

    def goto(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})
        self.wait("document.readyState === 'complete' && location.href !== 'about:blank'")

    def js(self, expression: str) -> Any:
        """The value of `expression` (awaited when it is a promise)."""
        res = self.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
        )
        if "exceptionDetails" in res:
            details = res["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{expression!r} threw: {text}")
        return res["result"].get("value")

    def wait(self, expression: str, timeout: float = 30.0) -> None:
        """Returns once `expression` is truthy in the page (an element counts)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.js(f"!!({expression})"):
                return
            if time.monotonic() > deadline:
                raise BrowserError(f"still false after {timeout:g} s: {expression}")
            time.sleep(0.05)

    def requested_urls(self) -> list[str]:
        """Every URL this tab has asked the network for so far."""
        return [
            e["params"]["request"]["url"]
            for e in self.browser.events
            if e.get("sessionId") == self.session and e["method"] == "Network.requestWillBeSent"
        ]

    def screenshot(self, path: str) -> None:
        import base64

        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

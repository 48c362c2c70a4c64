"""A real headless Chromium for the tests, on loopback only, driven over the DevTools protocol.

:class:`Browser` starts, inside one network namespace that has nothing but
``lo`` (:func:`tests.raycluster.loopback_only`: we run as root in CI), a
:class:`LoggingServer` (``http.server`` bound to 127.0.0.1, port 0, serving one
folder and logging every request: client address, method, path, status) and
Debian's Chromium (``--headless=new``, WebGL 2 on the CPU through SwiftShader,
device scale factor 1, a throw-away profile). Both stay in that namespace when
the calling thread leaves it, so the page can reach the server and nothing
else: a request to any other address has no interface to leave by.

Chromium is driven by the Chrome DevTools Protocol over ``--remote-debugging-pipe``
(it reads commands from fd 3 and writes replies and events to fd 4, one
NUL-terminated JSON message each): plain Python, no WebSocket, no extra
dependency, and no debugging port that anything else could connect to.
:meth:`Page.evaluate` runs an expression (awaiting a promise when asked) and
returns its value; the Network domain's ``requestWillBeSent`` events are kept in
:attr:`Page.requests`, so a test sees every URL the page tried, also those that
never reached the server.

Where Chromium is not installed, or the namespace cannot be made (not root),
:func:`require_browser` skips the calling test with the reason.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import json
import os
import select
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: where Debian's chromium package puts the browser itself (/usr/bin/chromium is a shell wrapper that adds
#: flags of its own: extensions, Google API keys)
CHROMIUM_PATHS = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")

CHROMIUM_FLAGS = (
    "--headless=new", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
    "--disable-background-networking", "--no-first-run", "--force-device-scale-factor=1",
    # quieter still: nothing of these has anything to do in a test (and none can reach out from the namespace)
    "--disable-component-update", "--disable-default-apps", "--disable-sync", "--disable-extensions",
    "--no-default-browser-check", "--disable-breakpad", "--metrics-recording-only", "--mute-audio",
    "--password-store=basic", "--use-mock-keychain", "--disable-features=Translate,MediaRouter,OptimizationHints",
    "--autoplay-policy=no-user-gesture-required",
    "--disable-dev-shm-usage",  # containers give /dev/shm 64 MB: shared memory goes to /tmp instead
)


class BrowserError(RuntimeError):
    """The browser failed (did not start, an expression threw, a timeout): carries its log's tail."""


class BrowserUnavailable(BrowserError):
    """No Chromium here, or no network namespace to run it in: the test is skipped with this reason."""


def find_chromium() -> str | None:
    """The Chromium binary: ``$TWINSTUDIO_CHROMIUM``, else Debian's, else None."""
    env = os.environ.get("TWINSTUDIO_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for p in CHROMIUM_PATHS:
        if os.access(p, os.X_OK):
            return p
    return shutil.which("chromium")


def require_browser() -> str:
    """The Chromium binary, or skip the test (pytest.skip) saying why it cannot run here."""
    import pytest

    from tests.raycluster import loopback_only

    exe = find_chromium()
    if exe is None:
        pytest.skip("Chromium is not installed (make test installs Debian's 'chromium'; or set TWINSTUDIO_CHROMIUM)")
    if os.geteuid() != 0:
        pytest.skip("the browser tests run Chromium in a loopback-only network namespace, which needs root")
    with loopback_only() as isolated:
        if not isolated:
            pytest.skip("cannot make a loopback-only network namespace here (unshare(CLONE_NEWNET) refused)")
    return exe


# ----------------------------------------------------------------------------- the server


@dataclass(frozen=True)
class Request:
    client: str   # the client's address (127.0.0.1)
    method: str
    path: str     # as requested, with the query string
    status: int


class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".js": "text/javascript", ".mjs": "text/javascript", ".json": "application/json",
                      ".wasm": "application/wasm", ".ply": "application/octet-stream",
                      ".glb": "model/gltf-binary", ".mp4": "video/mp4", ".md": "text/plain; charset=utf-8"}

    def log_request(self, code="-", size="-") -> None:  # noqa: ARG002 - http.server's signature
        self.server.log.append(Request(self.client_address[0], self.command, self.path,
                                       int(code) if str(code).isdigit() else 0))

    def log_message(self, format, *args) -> None:  # noqa: A002 - http.server's signature
        pass

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


class LoggingServer(http.server.ThreadingHTTPServer):
    """Serves ``root`` on 127.0.0.1 (a free port) and logs every request in :attr:`log`."""

    daemon_threads = True

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.log: list[Request] = []
        super().__init__(("127.0.0.1", 0), functools.partial(_Handler, directory=str(self.root)))
        self.thread = threading.Thread(target=self.serve_forever, name="test-http", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # the browser dropped a download: its right
            super().handle_error(request, client_address)

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


# ----------------------------------------------------------------------------- the protocol


class _Pipe:
    """The DevTools protocol over a pair of pipes: one NUL-terminated JSON message each way."""

    def __init__(self, to_browser: int, from_browser: int, log: Path) -> None:
        self.wfd, self.rfd, self.log = to_browser, from_browser, log
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []
        self.lock = threading.Lock()

    def call(self, method: str, params: dict | None = None, *, session: str | None = None,
             timeout: float = 30.0) -> dict:
        with self.lock:
            self.next_id += 1
            msg = {"id": self.next_id, "method": method, "params": params or {}}
            if session is not None:
                msg["sessionId"] = session
            data = json.dumps(msg).encode() + b"\0"
            while data:
                data = data[os.write(self.wfd, data):]
            want = self.next_id
            deadline = time.monotonic() + timeout
            while True:
                m = self._read(deadline, method)
                if m.get("id") == want:
                    if "error" in m:
                        raise BrowserError(f"{method}: {m['error'].get('message')} {m['error'].get('data', '')}")
                    return m.get("result", {})
                if "method" in m:
                    self.events.append(m)

    def pump(self) -> None:
        """Read the events waiting in the pipe (without blocking)."""
        with self.lock:
            while True:
                r, _, _ = select.select([self.rfd], [], [], 0)
                if not r and b"\0" not in self.buf:
                    return
                m = self._read(time.monotonic() + 5.0, "events")
                if "method" in m:
                    self.events.append(m)

    def _read(self, deadline: float, what: str) -> dict:
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"{what}: no answer from Chromium in time\n{_tail(self.log)}")
            r, _, _ = select.select([self.rfd], [], [], left)
            if r:
                chunk = os.read(self.rfd, 1 << 20)
                if not chunk:
                    raise BrowserError(f"{what}: Chromium closed the DevTools pipe\n{_tail(self.log)}")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\0", 1)
        return json.loads(line)


def _tail(log: Path, n: int = 3000) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    return "chromium's log (tail):\n" + text[-n:]


class Page:
    """One tab: navigate, evaluate, capture; :attr:`requests` are the URLs it asked for (Network domain)."""

    def __init__(self, browser: Browser, target: str, session: str) -> None:
        self.browser, self.target, self.session = browser, target, session

    def call(self, method: str, params: dict | None = None, *, timeout: float = 30.0) -> dict:
        return self.browser.cdp.call(method, params, session=self.session, timeout=timeout)

    def navigate(self, url: str, *, timeout: float = 30.0) -> None:
        """Go to ``url`` and wait for its load event."""
        self.browser.cdp.pump()
        start = len(self.browser.cdp.events)
        r = self.call("Page.navigate", {"url": url}, timeout=timeout)
        if r.get("errorText"):
            raise BrowserError(f"cannot open {url}: {r['errorText']}")
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" and e.get("sessionId") == self.session
                      for e in self.browser.cdp.events[start:]):
            if time.monotonic() > deadline:
                raise BrowserError(f"{url}: no load event in {timeout} s\n{_tail(self.browser.log)}")
            time.sleep(0.02)
            self.browser.cdp.pump()

    def evaluate(self, expression: str, *, await_promise: bool = True, timeout: float = 60.0) -> Any:
        """The value of a JavaScript expression in the page (a promise's value when ``await_promise``)."""
        r = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": await_promise,
                                           "returnByValue": True, "timeout": int(timeout * 1000)},
                      timeout=timeout + 5)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            text = (d.get("exception") or {}).get("description") or d.get("text")
            raise BrowserError(f"{expression[:120]!r} threw: {text}")
        return r["result"].get("value")

    def screenshot(self, clip: dict | None = None) -> bytes:
        """PNG bytes of the viewport (or of ``clip``: x, y, width, height in CSS pixels, scale 1)."""
        params: dict = {"format": "png", "captureBeyondViewport": False}
        if clip is not None:
            params["clip"] = {**clip, "scale": 1}
        return base64.b64decode(self.call("Page.captureScreenshot", params)["data"])

    @property
    def requests(self) -> list[str]:
        """URLs of every request the page sent (or tried to send), in order."""
        self.browser.cdp.pump()
        return [e["params"]["request"]["url"] for e in self.browser.cdp.events
                if e.get("method") == "Network.requestWillBeSent" and e.get("sessionId") == self.session]

    def console(self) -> list[str]:
        """The page's console messages and uncaught exceptions so far."""
        self.browser.cdp.pump()
        out = []
        for e in self.browser.cdp.events:
            if e.get("sessionId") != self.session:
                continue
            if e.get("method") == "Runtime.consoleAPICalled":
                p = e["params"]
                out.append(f"{p['type']}: " + " ".join(str(a.get("value", a.get("description", "")))
                                                        for a in p["args"]))
            elif e.get("method") == "Runtime.exceptionThrown":
                d = e["params"]["exceptionDetails"]
                out.append("exception: " + str((d.get("exception") or {}).get("description") or d.get("text")))
        return out

    def close(self) -> None:
        with contextlib.suppress(BrowserError):
            self.browser.cdp.call("Target.closeTarget", {"targetId": self.target}, timeout=10)


class Browser:
    """Headless Chromium and a logging HTTP server for ``root``, both in a loopback-only network namespace.

    ``width`` x ``height`` is the window (CSS pixels = device pixels). Use as a context manager.
    """

    def __init__(self, root: Path | str, *, width: int = 1280, height: int = 960, file_access: bool = False,
                 chromium: str | None = None) -> None:
        self.root = Path(root)
        self.width, self.height = int(width), int(height)
        self.file_access = file_access
        self.exe = chromium or find_chromium()
        self.pid: int | None = None
        self.server: LoggingServer | None = None
        self.interfaces: list[str] = []

    def __enter__(self) -> Browser:
        from tests.raycluster import interfaces, loopback_only

        if self.exe is None:
            raise BrowserUnavailable("Chromium is not installed")
        self.tmp = Path(tempfile.mkdtemp(prefix="twinstudio-chromium-"))
        self.log = self.tmp / "chromium.log"
        flags = [*CHROMIUM_FLAGS, f"--user-data-dir={self.tmp / 'profile'}",
                 f"--window-size={self.width},{self.height}", "--remote-debugging-pipe"]
        if self.file_access:
            flags.append("--allow-file-access-from-files")
        try:
            with loopback_only() as isolated:
                if not isolated:
                    raise BrowserUnavailable("cannot make a loopback-only network namespace (needs root)")
                self.interfaces = interfaces()
                self.server = LoggingServer(self.root)  # its socket lives in the namespace
                self.pid = self._spawn([self.exe, *flags, "about:blank"])
        except BaseException:
            self._cleanup()
            raise
        try:
            self.version = self.cdp.call("Browser.getVersion", timeout=60)["product"]
        except BaseException:
            self._cleanup()
            raise
        return self

    def _spawn(self, argv: list[str]) -> int:
        # fds 3 and 4 of the child: its end of each pipe (posix_spawn, not fork: the server thread runs)
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        logfd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        nullfd = os.open(os.devnull, os.O_RDONLY)
        high = [_dup_above(fd, 4) for fd in (cmd_r, res_w)]  # above 4: safe to dup2 onto 3 and 4
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("GOOGLE_", "http_", "https_",
                                                                             "HTTP_", "HTTPS_"))}
            env["HOME"] = str(self.tmp)
            pid = os.posix_spawn(argv[0], argv, env, file_actions=[
                (os.POSIX_SPAWN_DUP2, nullfd, 0), (os.POSIX_SPAWN_DUP2, logfd, 1),
                (os.POSIX_SPAWN_DUP2, logfd, 2), (os.POSIX_SPAWN_DUP2, high[0], 3),
                (os.POSIX_SPAWN_DUP2, high[1], 4)], setsid=True)
        finally:
            for fd in (cmd_r, res_w, logfd, nullfd, *high):
                os.close(fd)
        self.cdp = _Pipe(cmd_w, res_r, self.log)
        self._fds = (cmd_w, res_r)
        return pid

    def page(self) -> Page:
        """A new tab of the window's size, device scale 1, with Page, Runtime and Network events on."""
        target = self.cdp.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        p = Page(self, target, session)
        for domain in ("Page", "Runtime", "Network"):
            p.call(f"{domain}.enable")
        p.call("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": self.height,
                                                     "deviceScaleFactor": 1, "mobile": False})
        return p

    def __exit__(self, *exc) -> None:
        self._cleanup()

    def _cleanup(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(BrowserError, OSError):
                self.cdp.call("Browser.close", timeout=5)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                done, _ = os.waitpid(self.pid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.05)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)  # its own session: the renderer and GPU processes too
                os.waitpid(self.pid, 0)
            self.pid = None
            for fd in self._fds:
                os.close(fd)
        if self.server is not None:
            self.server.stop()
            self.server = None
        if getattr(self, "tmp", None) is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def _dup_above(fd: int, floor: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor + 1)


def decode_png(data: bytes):
    """RGB uint8 [H, W, 3] of PNG bytes (a screenshot, or a data URL's payload)."""
    import cv2
    import numpy as np

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise BrowserError("not a PNG image")
    if img.ndim == 2:
        img = img[..., None].repeat(3, axis=2)
    return img[..., 2::-1] if img.shape[2] == 3 else img[..., [2, 1, 0]]


def data_url_png(url: str):
    """RGB uint8 [H, W, 3] of a ``data:image/png;base64,...`` URL."""
    head, _, payload = url.partition(",")
    if head != "data:image/png;base64":
        raise BrowserError(f"not a PNG data URL: {head[:40]!r}")
    return decode_png(base64.b64decode(payload))

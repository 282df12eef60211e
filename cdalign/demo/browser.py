"""A headless Chromium that opens a page, lets it run and screenshots it (the demo's
``demo/screenshot.py`` and its browser test): driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``), so nothing but the Debian ``chromium`` package is needed (no
browser-automation library, no download)."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Images loaded (naturalWidth > 0) in each gallery named by element id, and error toasts shown.
RENDERED_JS = """((ids) => {
  const count = id => [...document.querySelectorAll('#' + id + ' img')].filter(i => i.complete && i.naturalWidth > 0).length;
  const out = {errors: document.querySelectorAll('.toast-body.error').length};
  for (const id of ids) out[id] = count(id);
  return out;
})(%s)"""
# Opening the Composition tab and pressing Compose, once the page has mounted (what a visitor clicks).
COMPOSE_JS = """(() => {
  const tab = [...document.querySelectorAll('button[role="tab"]')].find(b => b.textContent.trim() === 'Composition');
  if (tab && tab.getAttribute('aria-selected') !== 'true') { tab.click(); return false; }  // the tab renders on opening
  const run = document.querySelector('#compose-run');
  if (!run) return false;
  run.click();
  return true;
})()"""
VIEWS = {  # what to show -> (query, clicks to make, galleries that must show images)
    "aligned": ("?example={example}", None, ("base-gallery", "aligned-gallery")),
    "composition": ("", COMPOSE_JS, ("composed-gallery",)),
}


def find_chromium() -> str | None:
    """The path of a Chromium (or Chrome) binary on PATH, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class DevToolsPipe:
    """A headless Chromium and its DevTools protocol over file descriptors 3 (commands in)
    and 4 (replies out): JSON messages, each ended by a NUL byte."""

    def __init__(self, binary: str, width: int = 1280, height: int = 1000):
        self.profile = tempfile.mkdtemp(prefix="cdalign-chromium-")
        cmd_read, self._cmd_write = os.pipe()
        self._out_read, out_write = os.pipe()

        def wire_fds():  # in the child: the protocol's fds 3 and 4 (dup first, so no number collides)
            a, b = os.dup(cmd_read), os.dup(out_write)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.process = subprocess.Popen(
            [binary, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--no-first-run", "--hide-scrollbars", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "about:blank"],
            preexec_fn=wire_fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(cmd_read)
        os.close(out_write)
        self._buffer, self._next_id, self.session = b"", 0, None
        self.width, self.height = width, height

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out_read], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._out_read, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe (it exited)")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, timeout: float = 30.0, session: bool = True) -> dict:
        """Send one command (to the attached page unless ``session`` is False); its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._cmd_write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"DevTools {method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})
        self.send("Page.enable")
        self.send("Page.navigate", {"url": url})

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return result.get("result", {}).get("value")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False, timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._cmd_write, self._out_read):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


@dataclass
class PageShot:
    png: bytes  # the screenshot
    dom: str  # the page's HTML when it was taken
    rendered: dict  # images loaded per gallery and error toasts shown (RENDERED_JS)
    seconds: float  # from opening the page to the images being there


def capture(url: str, binary: str | None = None, timeout: float = 240.0, width: int = 1280, height: int = 1000,
            click: str | None = None, galleries: tuple[str, ...] = ("base-gallery", "aligned-gallery")) -> PageShot:
    """Open ``url``, run the ``click`` script once the page has mounted (None: nothing to
    click, e.g. ``?example=K`` generates by itself), wait until every gallery in
    ``galleries`` shows images (or an error toast appears, or ``timeout`` seconds pass),
    and screenshot the page."""
    binary = binary or find_chromium()
    if binary is None:
        raise FileNotFoundError("no Chromium found on PATH; install the Debian package `chromium`")
    browser = DevToolsPipe(binary, width, height)
    check = RENDERED_JS % json.dumps(list(galleries))
    try:
        t0 = time.monotonic()
        browser.open(url)
        clicked, rendered = click is None, {}
        while time.monotonic() - t0 < timeout:
            if not clicked:
                clicked = bool(browser.evaluate(click))
            rendered = browser.evaluate(check) or {}
            if rendered.get("errors") or all(rendered.get(g, 0) > 0 for g in galleries):
                break
            time.sleep(0.5)
        seconds = time.monotonic() - t0
        time.sleep(1.0)  # let the last images and the plot paint
        return PageShot(browser.screenshot(), browser.evaluate("document.documentElement.outerHTML") or "", rendered, seconds)
    finally:
        browser.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

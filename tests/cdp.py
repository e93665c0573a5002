"""Headless Chromium driven over the DevTools protocol, for the browser tests: open a page,
wait until a condition holds in it (a JavaScript expression, polled), then read its DOM or
take a screenshot. Waiting on what the page shows, not on a time budget, keeps the test
right on a slow or busy machine. The protocol speaks over a websocket: aiohttp's client
(installed with ray[default]) is enough."""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import subprocess
import time
import urllib.request
from pathlib import Path

import aiohttp


class PageTimeout(AssertionError):
    """The condition did not hold in time; the message holds the page's text."""


class Chromium:
    """One headless browser (its own profile folder), a fresh tab per visit."""

    def __init__(self, binary: str, profile: Path, flags: list[str]):
        profile.mkdir(parents=True, exist_ok=True)
        (profile / "DevToolsActivePort").unlink(missing_ok=True)
        self.proc = subprocess.Popen([binary, *flags, f"--user-data-dir={profile}",
                                      "--remote-debugging-port=0", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, deadline = profile / "DevToolsActivePort", time.time() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"chromium did not start its DevTools server ({self.proc.poll()=})")
            time.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])
        self.ids = itertools.count(1)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)

    def visit(self, url: str, width: int, height: int, ready: str, timeout: float = 180,
              screenshot: Path | None = None) -> str:
        """Open `url` in a width x height viewport, wait until the JavaScript expression
        `ready` is true (PageTimeout after `timeout` s), optionally save a PNG, and return
        the DOM (document.documentElement.outerHTML, what --dump-dom prints)."""
        return asyncio.run(self._visit(url, width, height, ready, timeout, screenshot))

    def _new_tab(self) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    async def _visit(self, url: str, width: int, height: int, ready: str, timeout: float,
                     screenshot: Path | None) -> str:
        tab = self._new_tab()
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                async def call(method: str, **params: object) -> dict:
                    n = next(self.ids)
                    await ws.send_json({"id": n, "method": method, "params": params})
                    async for msg in ws:
                        data = json.loads(msg.data)
                        if data.get("id") == n:
                            if "error" in data:
                                raise RuntimeError(f"{method}: {data['error']}")
                            return data.get("result", {})
                    raise RuntimeError(f"the DevTools connection closed during {method}")

                async def value(expression: str) -> object:
                    r = await call("Runtime.evaluate", expression=expression, returnByValue=True)
                    return r.get("result", {}).get("value")

                await call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                           deviceScaleFactor=1, mobile=False)
                await call("Page.navigate", url=url)
                deadline = time.time() + timeout
                while not await value(f"Boolean({ready})"):
                    if time.time() > deadline:
                        text = await value("document.body ? document.body.innerText : ''")
                        raise PageTimeout(f"{url}: not ready after {timeout:.0f} s ({ready}); "
                                          f"the page reads: {str(text)[-2000:]}")
                    await asyncio.sleep(0.5)
                await asyncio.sleep(1.0)  # let the last frame paint before a screenshot
                if screenshot is not None:
                    shot = await call("Page.captureScreenshot", format="png")
                    screenshot.write_bytes(base64.b64decode(shot["data"]))
                html = await value("document.documentElement.outerHTML")
        urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/close/{tab['id']}", timeout=30).close()
        return str(html)

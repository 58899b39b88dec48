"""End to end in headless Chromium: load the explorer, upload an image, click a patch, see the heat map.

Chromium is driven through chromedriver's W3C WebDriver HTTP API with urllib (no selenium). Where
``chromium``/``chromedriver`` are missing, the set-up runs ``scripts/install_browser.sh`` (Debian
packages; needs root) unless ``DINOLAB_BROWSER_INSTALL=0``; the test is skipped, with the reason,
when they still cannot be found.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinolab.viz.explorer import ExplorerConfig
from dinolab.viz.serve import ServeConfig, make_server

INSTALL_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install_browser.sh"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,900",
]
ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"  # W3C WebDriver's key for element references
HEAT_RAMP_TOP = [252, 255, 164]  # app.js colour of the highest similarity


def find_browser() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


@pytest.fixture(scope="module")
def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver) paths, installing them where missing; skips the test when impossible."""
    found = find_browser()
    if found is None and os.environ.get("DINOLAB_BROWSER_INSTALL", "1") != "0":
        try:
            subprocess.run(["bash", str(INSTALL_SCRIPT)], check=True, capture_output=True, timeout=900)
        except subprocess.CalledProcessError as err:
            last = err.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            pytest.skip(f"chromium/chromedriver missing and scripts/install_browser.sh failed: {last[0]}")
        except (subprocess.TimeoutExpired, OSError) as err:
            pytest.skip(f"chromium/chromedriver missing and scripts/install_browser.sh could not run: {err}")
        found = find_browser()
    if found is None:
        pytest.skip("chromium and chromedriver not on PATH (install them with scripts/install_browser.sh)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriver:
    """The few W3C WebDriver commands the test needs, over HTTP with urllib."""

    def __init__(self, chromium: str, chromedriver: str, user_data_dir: Path) -> None:
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [chromedriver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.session = ""
        wait_for(self._ready, timeout=30, what="chromedriver to start")
        options = {"binary": chromium, "args": [*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}"]}
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _ready(self) -> bool:
        try:
            return bool(self._call("GET", "/status")["ready"])
        except OSError:
            return False

    def _call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as err:
            raise AssertionError(f"WebDriver {method} {path}: {err.read().decode(errors='replace')[:500]}") from None

    def command(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, url: str) -> None:
        self.command("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        return self.command("POST", "/element", {"using": "css selector", "value": css})[ELEMENT_KEY]

    def send_keys(self, element: str, text: str) -> None:
        self.command("POST", f"/element/{element}/value", {"text": text})

    def click(self, element: str) -> None:
        self.command("POST", f"/element/{element}/click", {})

    def run_js(self, script: str):
        return self.command("POST", "/execute/sync", {"script": script, "args": []})

    def quit(self) -> None:
        try:
            if self.session:
                self.command("DELETE", "")
        finally:
            self.process.terminate()
            self.process.wait(timeout=30)


def wait_for(check, timeout: float, what: str):
    """Poll ``check()`` until it returns something truthy; fails naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def explorer_url(tmp_path, tiny_model):
    root = tmp_path / "root"
    root.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "folder_image.png")
    cfg = ServeConfig(root=str(root), port=0, quiet=True, explorer=ExplorerConfig(size=40))
    srv = make_server(cfg, model=tiny_model)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.url
    srv.shutdown()
    srv.server_close()


HEATMAP_STATE = """
const c = document.querySelector('.card[data-id^="upload:"] canvas.heatmap');
if (!c || c.dataset.ready !== '1') return null;
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let painted = 0;
for (let i = 3; i < d.length; i += 4) if (d[i] > 0) painted++;
const centre = 4 * (2 * c.width + 2);
return {painted, cells: c.width * c.height, centre: [d[centre], d[centre + 1], d[centre + 2]],
        status: document.getElementById('status').textContent};
"""


def test_upload_click_patch_shows_heat_map(browser_paths, explorer_url, tmp_path):
    chromium, chromedriver = browser_paths
    upload_file = tmp_path / "upload.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(upload_file)
    driver = WebDriver(chromium, chromedriver, tmp_path / "chromium-profile")
    try:
        driver.open(explorer_url)
        status = "return document.getElementById('status').textContent"
        wait_for(lambda: "images in the folder" in driver.run_js(status), timeout=30, what="the folder list")
        assert driver.run_js("return document.querySelectorAll('#folder li').length") == 1

        driver.send_keys(driver.find("#upload"), str(upload_file))
        photo = '.card[data-id^="upload:"] img.photo'
        wait_for(lambda: driver.run_js(
            f"const i = document.querySelector('{photo}'); return !!i && i.complete && i.naturalWidth === 40;"),
            timeout=60, what="the uploaded image's card")

        # The photo is shown 224 px wide over a 5x5 patch grid (odd, so the centre is inside a patch): (2, 2).
        driver.click(driver.find('.card[data-id^="upload:"] .stack'))
        state = wait_for(lambda: driver.run_js(HEATMAP_STATE), timeout=60, what="the heat map")
    finally:
        driver.quit()
    assert state["cells"] == 25 and state["painted"] == 25, "every patch of the heat map is painted"
    assert "patch (2, 2)" in state["status"]
    # A patch is most similar to itself (cosine 1): the clicked cell has the top colour of the ramp.
    assert state["centre"] == HEAT_RAMP_TOP

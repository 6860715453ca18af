"""``voxbus up`` as a user runs it (a real subprocess), and headless Chromium to open its page."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from voxbus.natsd import free_port

CHROMIUM = os.environ.get("VOXBUS_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
HAVE_CHROMIUM = os.path.exists(CHROMIUM)


@pytest.fixture
def voxbus_up(nats_server, llm_endpoint, prefix, tmp_path):
    """The page's URL of a running ``voxbus up`` (sharing the session's NATS and LLM endpoint)."""
    env = dict(os.environ, VOXBUS_NATS_URL=nats_server.url, OPENAI_BASE_URL=llm_endpoint,
               VOXBUS_LLM_MODEL="smollm2", VOXBUS_PREFIX=prefix,
               VOXBUS_CONTROL_ADDRESS="127.0.0.1:0",
               VOXBUS_CONTROL_FILE=str(tmp_path / "control.json"))
    proc = subprocess.Popen([sys.executable, "-m", "voxbus.cli", "up", "--http-port",
                             str(free_port())], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()
    url: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"voxbus ready: open (http://\S+)", line)
            if m:
                url.append(m.group(1))
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(120):
            pytest.fail("voxbus up never became ready:\n" + "".join(lines[-40:]))
        yield url[0]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        time.sleep(0.1)


@pytest.fixture
async def chromium_with_mic(tmp_path):
    """A factory: headless Chromium whose microphone plays the given WAV once."""
    if not HAVE_CHROMIUM:
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's chromium (see .ci/run)")
    from playwright.async_api import async_playwright

    browsers = []
    async with async_playwright() as p:

        async def launch(wav: str):
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}%noloop",
                "--autoplay-policy=no-user-gesture-required",
            ])
            browsers.append(browser)
            context = await browser.new_context(permissions=["microphone"])
            return await context.new_page()

        yield launch
        for browser in browsers:
            await browser.close()


PIPECAT_CLIENT = Path(__file__).parent / "pipecat_client"
"""Pipecat's JS client SDK from npm, bundled with esbuild into a page (``page.js``)."""


def _newer(target: Path, *sources: Path) -> bool:
    return target.exists() and all(target.stat().st_mtime >= s.stat().st_mtime for s in sources)


@pytest.fixture(scope="session")
def pipecat_client_page() -> Path:
    """The folder of the bundled Pipecat client page (``index.html``, ``bundle.js``): ``npm ci``
    when ``node_modules`` is missing or older than the lock file, esbuild when the bundle is."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("no npm: install Debian's nodejs and npm (see .ci/run)")
    lock, installed = PIPECAT_CLIENT / "package-lock.json", PIPECAT_CLIENT / "node_modules"
    if not _newer(installed / ".package-lock.json", lock):
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=PIPECAT_CLIENT,
                              capture_output=True, text=True, timeout=600)
        if done.returncode:
            pytest.fail(f"npm ci failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    bundle = PIPECAT_CLIENT / "dist" / "bundle.js"
    if not _newer(bundle, PIPECAT_CLIENT / "page.js", lock, installed / ".package-lock.json"):
        done = subprocess.run([npm, "run", "--silent", "build"], cwd=PIPECAT_CLIENT,
                              capture_output=True, text=True, timeout=300)
        if done.returncode:
            pytest.fail(f"esbuild failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return bundle.parent

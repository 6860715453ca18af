"""Pipecat's own JS client SDK (from npm, unchanged) holds a conversation with ``voxbus up``.

``@pipecat-ai/client-js`` with ``@pipecat-ai/small-webrtc-transport``, bundled with esbuild,
runs in headless Chromium with a fake microphone and calls ``startBotAndConnect({endpoint:
"/start", requestData: {agent: "chat"}})``: SmallWebRTC signaling (``/start``,
``/sessions/{id}/api/offer``, trickled ICE) and RTVI on the data channel, against the gateway.
"""

from __future__ import annotations

import time
from urllib.parse import urljoin

import pytest

from tests.browser.conftest import PIPECAT_CLIENT

pytestmark = pytest.mark.slow


def _of(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["type"] == kind]


async def test_pipecat_js_client_talks_to_voxbus(voxbus_up, chromium_with_mic, speak,
                                                 pipecat_client_page):
    wav = speak("What is the capital of France?", lead_s=3.0, tail_s=12.0)
    page = await chromium_with_mic(wav)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    signaling: list[tuple[str, str, int]] = []
    page.on("response", lambda r: signaling.append((r.request.method, r.url, r.status)))

    # The page is the test's, served at the gateway's origin (as an app's page would be
    # served beside it), so the SDK's relative "/start" reaches the gateway.
    home = urljoin(voxbus_up, "/pipecat-client/")
    html = (PIPECAT_CLIENT / "index.html").read_text()
    bundle = (pipecat_client_page / "bundle.js").read_bytes()
    await page.route(home, lambda route: route.fulfill(body=html, content_type="text/html"))
    await page.route(home + "bundle.js", lambda route: route.fulfill(
        body=bundle, content_type="application/javascript"))
    await page.goto(home)
    await page.evaluate("() => { window.__start('chat'); }")

    async def events() -> list[dict]:
        return await page.evaluate("() => window.__events")

    await page.wait_for_function(
        "() => window.__events.some(e => ['start-resolved', 'start-failed'].includes(e.type))",
        timeout=30_000)
    seen = await events()
    assert not _of(seen, "start-failed"), seen
    ready = _of(seen, "bot-ready")
    assert ready and ready[0]["data"]["about"]["library"] == "voxbus", seen
    assert ready[0]["data"]["about"]["agent"] == "chat"

    # The user's final transcript, the agent's text and speaking events, then its audio.
    await page.wait_for_function(
        "() => window.__events.some(e => e.type === 'user-transcription' && e.data.final"
        " && /france/i.test(e.data.text))", timeout=40_000)
    await page.wait_for_function(
        "() => window.__events.some(e => e.type === 'bot-stopped-speaking')", timeout=60_000)
    energy, stats = 0.0, None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = await page.evaluate("() => window.__inboundAudio()")
        energy = stats["energy"] if stats else 0.0
        if energy > 1e-3:
            break
        await page.wait_for_timeout(100)
    seen = await events()
    kinds = [e["type"] for e in seen]
    assert stats and stats["packets"] > 50, stats
    assert energy > 1e-3, f"the agent's audio reached the browser silent: {stats}"

    assert "user-started-speaking" in kinds and "user-stopped-speaking" in kinds, kinds
    started, stopped = kinds.index("bot-started-speaking"), kinds.index("bot-stopped-speaking")
    assert started < stopped, kinds
    heard = next(i for i, e in enumerate(seen) if e["type"] == "user-transcription"
                 and e["data"]["final"] and "france" in e["data"]["text"].lower())
    assert heard < started, kinds
    said = " ".join(e["data"]["text"] for e in _of(seen, "bot-llm-text")).strip()
    assert said, kinds
    assert " ".join(e["data"]["text"] for e in _of(seen, "bot-tts-text")).strip() == said
    names = {m["processor"] for e in _of(seen, "metrics") for ms in e["data"].values()
             for m in ms}
    assert {"stt_ttfs", "llm_ttft", "tts_ttfa", "e2e_latency"} <= names, names
    states = [e["data"]["state"] for e in _of(seen, "server-message")
              if e["data"].get("voxbus") == "state"]
    assert "thinking" in states and "speaking" in states, states
    assert any(e["type"] == "track-started" and e["data"] == {"kind": "audio", "local": False}
               for e in seen), seen
    assert not _of(seen, "error"), _of(seen, "error")
    assert not errors, errors

    # It went over Pipecat's signaling: /start, then the session's offer (and trickled ICE).
    calls = [(method, url.removeprefix(voxbus_up.rstrip("/")), status)
             for method, url, status in signaling if "/pipecat-client/" not in url]
    assert calls[0] == ("POST", "/start", 200), calls
    assert any(m == "POST" and u.startswith("/sessions/") and u.endswith("/api/offer")
               and s == 200 for m, u, s in calls), calls
    assert any(m == "PATCH" and u.startswith("/sessions/") for m, u, _ in calls), calls
    assert all(s == 200 for _, _, s in calls), calls

    await page.evaluate("() => window.__client.disconnect()")
    await page.wait_for_function("() => window.__events.some(e => e.type === 'disconnected')")

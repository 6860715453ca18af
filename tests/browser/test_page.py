"""The page in a real browser: connect, speak through a fake microphone, hear the agent."""

from __future__ import annotations

import time

import pytest

from voxbus import recording
from voxbus.recording import Recorder
from voxbus.timeline import write_timeline
from voxbus.turns import SessionView

pytestmark = pytest.mark.slow

INBOUND_AUDIO = """async () => {
  const pc = window.voxbus.pc;
  if (!pc) return null;
  for (const s of (await pc.getStats()).values()) {
    if (s.type === "inbound-rtp" && s.kind === "audio")
      return {packets: s.packetsReceived, energy: s.totalAudioEnergy || 0,
              level: s.audioLevel || 0};
  }
  return null;
}"""


async def test_talk_to_the_agent_in_chromium(voxbus_up, chromium_with_mic, speak, tmp_path,
                                             nats_server, prefix):
    # Silence first: the fake microphone starts before the peer connection is up.
    wav = speak("What is the capital of France?", lead_s=3.0, tail_s=12.0)
    page = await chromium_with_mic(wav)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(voxbus_up)
    await page.get_by_test_id("connect").click()

    user = page.locator('[data-testid="transcript"] [data-role="user"]')
    bot = page.locator('[data-testid="transcript"] [data-role="bot"]')
    await user.first.wait_for(timeout=30_000)
    await page.wait_for_function(
        "() => [...document.querySelectorAll('[data-role=user]')]"
        ".some(li => /france/i.test(li.textContent))", timeout=30_000)
    await bot.first.wait_for(timeout=40_000)

    states, energy = set(), 0.0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states.add(await page.get_by_test_id("state").get_attribute("data-state"))
        stats = await page.evaluate(INBOUND_AUDIO)
        energy = stats["energy"] if stats else 0.0
        if energy > 1e-3 and "speaking" in states:
            break
        await page.wait_for_timeout(100)
    assert stats and stats["packets"] > 50, stats
    assert energy > 1e-3, f"agent audio reached the browser silent: {stats}"
    assert "speaking" in states, states
    assert (await bot.first.text_content()).strip()
    assert await page.locator('[data-testid="latency"] td[data-figure="e2e_latency"]').count()
    assert not errors, errors
    await page.screenshot(path=str(tmp_path / "page.png"))  # kept by pytest for a look

    await page.get_by_test_id("connect").click()  # hang up
    await page.wait_for_function(
        "() => document.querySelector('[data-testid=state]').dataset.state === 'idle'")

    # `voxbus up` recorded the browser's session: it exports, and its timeline draws.
    async with Recorder(nats_server.url, prefix) as recorder:
        sessions = await recorder.sessions()
        assert len(sessions) == 1 and sessions[0].agent == "chat", sessions
        exported = await recorder.export(sessions[0].session)
    path = recording.write(tmp_path / "browser.vxrec", exported)
    view = SessionView(recording.read(path))
    assert any("france" in t.user_text.lower() for t in view.turns), view.turns
    assert view.audio_out
    timeline = write_timeline(recording.read(path), tmp_path / "browser.html")
    assert "France" in timeline.read_text()

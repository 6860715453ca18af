"""A whole turn through the WebRTC gateway with a Python aiortc peer standing in for a browser."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from services.media_gateway.client import GatewayClient
from voxbus.audio import read_wav

pytestmark = pytest.mark.slow


def _played_e2e() -> float:
    """Turns whose first agent audio the gateway played (its ``e2e_latency`` samples)."""
    return REGISTRY.get_sample_value("voxbus_e2e_latency_seconds_count",
                                     {"stage": "gateway"}) or 0.0


async def test_turn_over_webrtc(gateway, stages, speech_wav):
    played = _played_e2e()
    client = GatewayClient(gateway.url)
    try:
        session = await client.connect()
        assert session in gateway.sessions()
        assert await client.wait_for(lambda c: any(e["type"] == "state" for e in c.events), 10)
        client.mic.say(read_wav(speech_wav))
        heard = await client.wait_for(lambda c: "france" in c.texts("user").lower(), 20)
        assert heard, client.events
        replied = await client.wait_for(lambda c: c.texts("bot") and c.loud_frames > 10, 30)
        assert replied, (client.events, client.loud_frames)
        states = [e["state"] for e in client.events if e["type"] == "state"]
        assert "thinking" in states and "speaking" in states, states
        names = {e["name"] for e in client.events if e["type"] == "metric"}
        assert {"stt_ttfs", "llm_ttft", "tts_ttfa", "e2e_latency"} <= names, names
        assert _played_e2e() >= played + 1  # and counted for the operator's dashboard
    finally:
        await client.close()
    # Hanging up ends the session in every stage.
    for _ in range(50):
        if not (gateway.sessions() or stages.orchestrator.sessions() or stages.stt.sessions()):
            break
        await asyncio.sleep(0.1)
    assert gateway.sessions() == []
    assert stages.orchestrator.sessions() == []
    assert stages.stt.sessions() == []

"""Recording on for the test's own prefix, and a gateway for sessions that come over WebRTC."""

from __future__ import annotations

from dataclasses import replace

import pytest

from voxbus.recording import Recorder


@pytest.fixture
async def recorder(system):
    """The recording stream of the test's prefix, as ``voxbus up`` turns it on."""
    async with Recorder(system.nats_url, system.prefix) as rec:
        await rec.enable(max_age_s=600, max_bytes=256 * 2**20)
        yield rec
        await rec.js.delete_stream(rec.stream)


@pytest.fixture
async def webrtc_gateway(stages):
    from services.media_gateway.worker import GatewayWorker

    gw = GatewayWorker(replace(stages.settings, http_port=0, gateway_idle_s=2.0))
    await gw.start()
    yield gw
    await gw.stop()

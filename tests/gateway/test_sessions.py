"""Many peers on one gateway: each hears and is heard only in its own session; vanishing peers
release everything they held."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from services.media_gateway.client import GatewayClient
from voxbus.audio import WIRE_RATE
from voxbus.bus import Bus
from voxbus.subjects import Subjects
from voxbus.wire import AudioFlush, AudioIn, AudioOut

pytestmark = pytest.mark.slow

PEERS = 8


def tone(hz: float, seconds: float, amplitude: int = 8000) -> bytes:
    t = np.arange(int(WIRE_RATE * seconds)) / WIRE_RATE
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()


def dominant_hz(pcm: bytes) -> float:
    x = np.frombuffer(pcm, "<i2").astype(np.float32)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.fft.rfftfreq(x.size, 1 / WIRE_RATE)[np.argmax(spectrum)])


async def _released(gateway, stages, timeout: float) -> bool:
    for _ in range(int(timeout / 0.1)):
        if not (gateway.sessions() or stages.orchestrator.sessions() or stages.stt.sessions()):
            return True
        await asyncio.sleep(0.1)
    return False


async def test_concurrent_sessions_are_isolated(gateway, stages):
    clients = [GatewayClient(gateway.url) for _ in range(PEERS)]
    bus = await Bus.connect(stages.settings.nats_url, Subjects(stages.settings.prefix), "probe")
    heard: dict[str, bytearray] = {}
    try:
        sessions = await asyncio.gather(*(c.connect() for c in clients))
        assert sorted(sessions) == gateway.sessions() == stages.orchestrator.sessions()

        for s in sessions:
            heard[s] = bytearray()

            async def on_in(frame, _msg, s=s):
                if isinstance(frame, AudioIn):
                    heard[s].extend(frame.pcm)

            await bus.subscribe(bus.subjects.audio_in(s), on_in)
        # Each peer speaks its own pitch; each session's audio.in carries only that pitch.
        pitches = [300 + 150 * i for i in range(PEERS)]
        for client, hz in zip(clients, pitches, strict=True):
            client.mic.say(tone(hz, 1.0))
        for _ in range(200):  # until every session has 1.5 s of audio (tone, then silence)
            if all(len(heard[s]) >= 3 * WIRE_RATE for s in sessions):
                break
            await asyncio.sleep(0.1)
        for s, hz in zip(sessions, pitches, strict=True):
            assert len(heard[s]) >= 3 * WIRE_RATE, (s, len(heard[s]))
            assert abs(dominant_hz(bytes(heard[s])) - hz) < 20, (s, hz)
        # Agent audio published for one session reaches that peer and no other.
        target = clients[3]
        for seq, i in enumerate(range(0, 32000, 640)):
            await bus.publish(bus.subjects.audio_out(sessions[3]), AudioOut(
                turn=1, seq=seq, sample_rate=WIRE_RATE, pcm=tone(440, 1.0)[i:i + 640]))
        assert await target.wait_for(lambda c: c.loud_frames > 20, 5)
        await asyncio.sleep(0.3)
        assert [c.loud_frames for c in clients if c is not target] == [0] * (PEERS - 1)
    finally:
        await asyncio.gather(*(c.close() for c in clients))
        await bus.close()
    assert await _released(gateway, stages, 10)


PEER_SCRIPT = """
import asyncio, sys
from services.media_gateway.client import GatewayClient
from voxbus.audio import read_wav

async def main():
    client = GatewayClient(sys.argv[1])
    print("session", await client.connect(), flush=True)
    client.mic.say(read_wav(sys.argv[2]))
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_peer_vanishing_mid_turn_releases_its_session(gateway, stages, speech_wav):
    """A browser killed mid-sentence sends no goodbye; the gateway notices and cleans up."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PEER_SCRIPT, gateway.url, speech_wav,
        stdout=asyncio.subprocess.PIPE, cwd=str(Path(__file__).parents[2]))
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().split()
        assert line[0] == "session", line
        session = line[1]
        assert session in stages.orchestrator.sessions() and session in stages.stt.sessions()
        await asyncio.sleep(1.0)  # mid-utterance
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
    assert await _released(gateway, stages, 15), (gateway.sessions(),
                                                  stages.orchestrator.sessions())
    # The gateway goes on serving.
    client = GatewayClient(gateway.url)
    try:
        assert await client.connect()
    finally:
        await client.close()


async def test_flush_drops_queued_agent_audio_at_once(gateway, stages):
    """Barge-in: AudioFlush empties the peer's jitter buffer; what was queued is never played."""
    client = GatewayClient(gateway.url)
    bus = await Bus.connect(stages.settings.nats_url, Subjects(stages.settings.prefix), "probe")
    try:
        session = await client.connect()
        await client.wait_for(lambda c: any(e["type"] == "state" for e in c.events), 10)
        pcm = tone(440, 3.0)  # three seconds queued in one burst, as a fast TTS would
        for seq, i in enumerate(range(0, len(pcm), 640)):
            await bus.publish(bus.subjects.audio_out(session), AudioOut(
                turn=1, seq=seq, sample_rate=WIRE_RATE, pcm=pcm[i:i + 640]))
        assert await client.wait_for(lambda c: c.loud_frames > 10, 5)
        await bus.publish(bus.subjects.audio_out(session), AudioFlush(turn=1))
        await asyncio.sleep(0.3)
        after_flush = client.loud_frames
        await asyncio.sleep(1.0)
        assert client.loud_frames - after_flush < 5, (after_flush, client.loud_frames)
        assert after_flush < 3.0 / 0.02 / 2  # most of the three seconds were dropped
        states = [e["state"] for e in client.events if e["type"] == "state"]
        assert states[-1] == "listening", states
    finally:
        await client.close()
        await bus.close()


async def test_a_full_gateway_refuses_with_503(stages):
    from dataclasses import replace

    from services.media_gateway.client import GatewayError
    from services.media_gateway.worker import GatewayWorker

    gw = GatewayWorker(replace(stages.settings, http_port=0, gateway_max_sessions=1))
    await gw.start()
    first, second = GatewayClient(gw.url), GatewayClient(gw.url)
    try:
        await first.connect()
        with pytest.raises(GatewayError) as err:
            await second.connect()
        assert err.value.status == 503 and "full" in err.value.message
    finally:
        await first.close()
        await second.close()
        await gw.stop()

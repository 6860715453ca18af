"""A Python WebRTC peer for the gateway: what a browser does, for tests, benchmarks and scripts.

It fetches a token, offers one audio track (fed from PCM you queue with :meth:`say`, silence
otherwise, paced in real time) and the "events" data channel, and collects what comes back: the
page's JSON events and the agent's audio, decoded. For timing, the mic notes when each 20 ms
frame of queued speech left for the encoder (``MicTrack.sent``) and the receiver when each 20 ms
of the agent's audio arrived decoded, with its loudness (``GatewayClient.heard``); times are
``time.monotonic()`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import aiohttp
import av
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from services.media_gateway.audio_tracks import FRAME_BYTES, PacedTrack
from voxbus.audio import WIRE_RATE, rms

LOUD_RMS = 200.0
"""Agent audio louder than this (PCM16 RMS) is the agent heard talking, not silence."""


class GatewayError(RuntimeError):
    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class MicTrack(PacedTrack):
    """A microphone stand-in: queued PCM16 mono at the wire rate, silence when there is none."""

    def __init__(self):
        super().__init__()
        self._queue = bytearray()
        self.sent: list[tuple[float, float]] = []
        """(when it left for the encoder, its RMS) for each 20 ms frame of queued PCM; the
        silence sent while nothing is queued is not listed."""

    def say(self, pcm: bytes) -> float:
        """Queue speech; returns how long until it has all been sent, in seconds."""
        self._queue += pcm
        return len(self._queue) / 2 / WIRE_RATE

    @property
    def pending_s(self) -> float:
        return len(self._queue) / 2 / WIRE_RATE

    async def recv(self) -> av.AudioFrame:
        pts = await self._wait_for_slot()
        queued = bool(self._queue)
        chunk = bytes(self._queue[:FRAME_BYTES]).ljust(FRAME_BYTES, b"\0")
        del self._queue[:FRAME_BYTES]
        if queued:
            self.sent.append((time.monotonic(), rms(chunk)))
        return self._pcm_frame(chunk, pts)


class GatewayClient:
    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")
        self.pc = RTCPeerConnection()
        self.mic = MicTrack()
        self.session: str | None = None
        self.events: list[dict] = []
        self.event_arrived = asyncio.Event()
        self.agent_audio = bytearray()
        self.loud_frames = 0
        self.first_loud_at: float | None = None
        self.heard: list[tuple[float, float]] = []
        """(when it arrived, its RMS) for each 20 ms of the agent's audio, decoded."""
        self._heard_pending = bytearray()
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=WIRE_RATE)
        self._tasks: list[asyncio.Task] = []
        self._http = aiohttp.ClientSession()

    async def post(self, path: str, body: dict | str) -> dict:
        data = body if isinstance(body, str) else json.dumps(body)
        async with self._http.post(self.base_url + path, data=data,
                                   headers={"Content-Type": "application/json"}) as res:
            payload = await res.json(content_type=None)
            if res.status != 200:
                raise GatewayError(res.status, payload.get("error", ""))
            return payload

    async def token(self, agent: str = "chat") -> str:
        return (await self.post("/api/token", {"agent": agent}))["token"]

    async def connect(self, agent: str = "chat", token: str | None = None) -> str:
        token = token or await self.token(agent)
        channel = self.pc.createDataChannel("events")

        @channel.on("message")
        def _on_message(message):
            self.events.append(json.loads(message))
            self.event_arrived.set()

        @self.pc.on("track")
        def _on_track(track):
            self._tasks.append(asyncio.create_task(self._receive(track)))

        self.pc.addTrack(self.mic)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        answer = await self.post("/api/offer", {"sdp": self.pc.localDescription.sdp,
                                                "type": "offer", "token": token})
        await self.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        self.session = answer["session"]
        return self.session

    async def _receive(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            now = time.monotonic()
            for out in self._resampler.resample(frame):
                pcm = bytes(out.planes[0])[: out.samples * 2]
                self.agent_audio += pcm
                if rms(pcm) > LOUD_RMS:
                    self.loud_frames += 1
                    if self.first_loud_at is None:
                        self.first_loud_at = now
                self._heard_pending += pcm
                while len(self._heard_pending) >= FRAME_BYTES:
                    self.heard.append((now, rms(self._heard_pending[:FRAME_BYTES])))
                    del self._heard_pending[:FRAME_BYTES]

    def texts(self, role: str) -> str:
        return " ".join(e["text"] for e in self.events
                        if e.get("type") == "transcript" and e.get("role") == role
                        and (role == "bot" or e.get("final"))).strip()

    async def wait_for(self, predicate, timeout: float) -> bool:
        """Wait until ``predicate(self)`` holds, re-checking as events and audio arrive."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.event_arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.event_arrived.wait(), min(left, 0.1))
        return True

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await self.pc.close()
        await self._http.close()

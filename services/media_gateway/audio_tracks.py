"""Audio between a WebRTC peer and the bus: the browser's Opus in, the agent's voice out.

Inbound, aiortc hands us decoded frames (48 kHz, usually stereo); they are resampled to the wire
format and cut into exact 20 ms frames. Outbound, the agent's audio arrives paced roughly in real
time from the orchestrator; :class:`AgentAudioTrack` plays it out on a strict 20 ms clock from a
small jitter buffer, fills gaps with silence, and drops everything queued on a flush (barge-in).
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections.abc import Iterator

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from voxbus.audio import WIRE_RATE

FRAME_S = 0.02
FRAME_SAMPLES = int(WIRE_RATE * FRAME_S)
FRAME_BYTES = FRAME_SAMPLES * 2
SILENCE = bytes(FRAME_BYTES)


class InboundResampler:
    """Browser frames (any rate/layout) → 20 ms PCM16 mono frames at the wire rate."""

    def __init__(self):
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=WIRE_RATE)
        self._pending = bytearray()

    def push(self, frame: av.AudioFrame) -> Iterator[bytes]:
        for out in self._resampler.resample(frame):
            self._pending += bytes(out.planes[0])[: out.samples * 2]
        while len(self._pending) >= FRAME_BYTES:
            chunk = bytes(self._pending[:FRAME_BYTES])
            del self._pending[:FRAME_BYTES]
            yield chunk


class PacedTrack(MediaStreamTrack):
    """An audio track that releases one 20 ms frame per 20 ms of wall time."""

    kind = "audio"

    def __init__(self):
        super().__init__()
        self._start: float | None = None
        self._pts = 0

    async def _wait_for_slot(self) -> int:
        """Sleep until the next frame is due; returns its pts (in wire-rate samples)."""
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        else:
            self._pts += FRAME_SAMPLES
            wait = self._start + self._pts / WIRE_RATE - now
            if wait > 0:
                await asyncio.sleep(wait)
            elif wait < -0.2:  # the loop stalled: resynchronise instead of bursting
                self._start = now - self._pts / WIRE_RATE
        return self._pts

    @staticmethod
    def _pcm_frame(pcm: bytes, pts: int) -> av.AudioFrame:
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(pcm)
        frame.pts = pts
        frame.sample_rate = WIRE_RATE
        frame.time_base = fractions.Fraction(1, WIRE_RATE)
        return frame


class AgentAudioTrack(PacedTrack):
    """The agent's voice as a WebRTC track: a jitter buffer drained on a 20 ms clock."""

    def __init__(self, prebuffer_s: float = 0.06, on_playing=None, on_drained=None):
        super().__init__()
        self._buffer = bytearray()
        self._prebuffer = int(prebuffer_s / FRAME_S) * FRAME_BYTES
        self._playing = False
        self._on_playing = on_playing
        self._on_drained = on_drained
        self.frames_played = 0
        self.underruns = 0

    @property
    def queued_s(self) -> float:
        return len(self._buffer) / 2 / WIRE_RATE

    def handover(self) -> AgentAudioTrack:
        """A new track for a new peer connection, with what this one had left to play (aiortc
        stops a track when the sender it was on stops, so a track is never moved)."""
        track = AgentAudioTrack(on_playing=self._on_playing, on_drained=self._on_drained)
        track._prebuffer, track._playing = self._prebuffer, self._playing
        track._buffer, self._buffer = self._buffer, bytearray()
        track.frames_played, track.underruns = self.frames_played, self.underruns
        return track

    def write(self, pcm: bytes) -> None:
        self._buffer += pcm

    def flush(self) -> None:
        """Barge-in: whatever the agent had left to say is dropped now."""
        self._buffer.clear()
        if self._playing:
            self._playing = False
            if self._on_drained:
                self._on_drained(True)

    def _next_chunk(self) -> bytes:
        if not self._playing:
            if len(self._buffer) < self._prebuffer or not self._buffer:
                return SILENCE
            self._playing = True
            if self._on_playing:
                self._on_playing()
        if len(self._buffer) >= FRAME_BYTES:
            chunk = bytes(self._buffer[:FRAME_BYTES])
            del self._buffer[:FRAME_BYTES]
            self.frames_played += 1
            return chunk
        if self._buffer:  # the tail of an utterance
            chunk = bytes(self._buffer) + bytes(FRAME_BYTES - len(self._buffer))
            self._buffer.clear()
            self.frames_played += 1
            return chunk
        # Ran dry: either the reply ended or the network is late; both sound like silence.
        self.underruns += 1
        self._playing = False
        if self._on_drained:
            self._on_drained(False)
        return SILENCE

    async def recv(self) -> av.AudioFrame:
        pts = await self._wait_for_slot()
        return self._pcm_frame(self._next_chunk(), pts)

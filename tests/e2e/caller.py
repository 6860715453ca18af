"""A caller on the bus with a real-time microphone: speech when told, silence otherwise, and
optionally the agent's own voice leaking back in (a speakerphone without echo cancellation)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from dataclasses import dataclass

import numpy as np

from voxbus.audio import WIRE_RATE, frames
from voxbus.bus import Bus, now_us
from voxbus.stage_call import ask
from voxbus.subjects import Stage, Subjects
from voxbus.wire import (
    AudioFlush,
    AudioIn,
    AudioOut,
    BotText,
    Cancel,
    ErrorEvent,
    Frame,
    SessionStart,
    Transcript,
    TurnEvent,
    VadEvent,
)

FRAME_BYTES = 640
SAID = (Transcript, BotText, TurnEvent, VadEvent, ErrorEvent, AudioFlush, Cancel)


@dataclass
class Heard:
    at: float
    frame: Frame


class Caller:
    def __init__(self, settings, agent: str, *, echo_gain: float = 0.0, echo_delay_s: float = 0.15):
        self.settings = settings
        self.agent = agent
        self.session = uuid.uuid4().hex[:12]
        self.echo_gain = echo_gain
        self.echo_delay_frames = round(echo_delay_s / 0.02)
        self.heard: list[Heard] = []
        self._speech: deque[bytes] = deque()
        self._echo: deque[bytes] = deque()
        self._mic: asyncio.Task | None = None
        self.bus: Bus | None = None

    async def __aenter__(self) -> Caller:
        s = self.settings
        self.bus = await Bus.connect(s.nats_url, Subjects(s.prefix), "caller")
        subjects = self.bus.subjects
        for subject in (subjects.audio_out(self.session), subjects.events(self.session),
                        subjects.ctl(self.session)):
            await self.bus.subscribe(subject, self._on_frame)
        await ask(self.bus, Stage.ORCHESTRATOR, SessionStart(
            session=self.session, sample_rate=WIRE_RATE, agent=self.agent), timeout_s=15)
        self._mic = asyncio.create_task(self._microphone())
        return self

    async def __aexit__(self, *exc) -> None:
        self._mic.cancel()
        await asyncio.gather(self._mic, return_exceptions=True)
        await self.bus.close()

    async def _on_frame(self, frame: Frame, _msg) -> None:
        self.heard.append(Heard(time.monotonic(), frame))
        if isinstance(frame, AudioOut) and self.echo_gain:
            self._echo.append(frame.pcm)
        elif isinstance(frame, AudioFlush):
            self._echo.clear()  # the loudspeaker stopped

    def say(self, pcm: bytes) -> float:
        """Queue speech into the microphone; returns how long it takes to say."""
        chunks = list(frames(pcm))
        self._speech.extend(chunks)
        return len(chunks) * 0.02

    async def _microphone(self) -> None:
        seq, t0 = 0, time.monotonic()
        delay_line: deque[np.ndarray] = deque([np.zeros(320)] * self.echo_delay_frames)
        while True:
            mic = np.zeros(320)
            if self._speech:
                mic += np.frombuffer(self._speech.popleft(), "<i2")
            echo = np.zeros(320)
            if self._echo:
                chunk = np.frombuffer(self._echo.popleft(), "<i2").astype(np.float64)
                echo[: chunk.size] = chunk[:320] * self.echo_gain
            delay_line.append(echo)
            mic += delay_line.popleft()
            pcm = np.clip(mic, -32768, 32767).astype("<i2").tobytes()
            await self.bus.publish(self.bus.subjects.audio_in(self.session), AudioIn(
                seq=seq, ts_us=now_us(), sample_rate=WIRE_RATE, pcm=pcm))
            seq += 1
            await asyncio.sleep(max(0.0, t0 + seq * 0.02 - time.monotonic()))

    def frames_of(self, kind: type, since: float = 0.0) -> list[Heard]:
        return [h for h in self.heard if isinstance(h.frame, kind) and h.at >= since]

    async def wait_for(self, predicate, timeout: float, what: str, since: float = 0.0) -> Heard:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for h in self.heard:
                if h.at >= since and predicate(h.frame):
                    return h
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; heard "
                             f"{sorted({type(h.frame).__name__ for h in self.heard})}; "
                             f"said: {self.said()}")

    def said(self) -> list[str]:
        """What was said and decided, in order: the first thing to read when a wait times out."""
        t0 = self.heard[0].at if self.heard else 0.0
        return [f"{h.at - t0:.1f}s {type(h.frame).__name__} {h.frame.model_dump(exclude={'pcm'})}"
                for h in self.heard if isinstance(h.frame, SAID)]

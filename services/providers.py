"""Any Pipecat provider as a stage: one table from a name to a Pipecat class and its settings.

``VOXBUS_STT_SERVICE`` / ``VOXBUS_TTS_SERVICE`` / ``VOXBUS_LLM_SERVICE`` name a row (``local``,
the default, is our own engine and never comes here). A row says which class to import, which
pip extra provides it, and which environment variables become which constructor arguments;
everything is checked at the worker's start so a bad setup stops it with one line, not at the
first user's turn. The class is imported only when chosen: an extra that is not installed costs
nothing until someone asks for it.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from voxbus.config import setting_error

LOCAL = "local"
"""The stage's own engine (Whisper, Piper, the OpenAI-compatible endpoint)."""

_STAGE_VAR = {"stt": "VOXBUS_STT_SERVICE", "tts": "VOXBUS_TTS_SERVICE",
              "llm": "VOXBUS_LLM_SERVICE"}


@dataclass(frozen=True)
class Option:
    """One constructor argument taken from the environment: the first variable set wins."""

    arg: str
    """Keyword of the class's ``__init__`` (or of its ``Settings``, when ``setting``)."""
    env: tuple[str, ...]
    required: bool = False
    secret: bool = False
    """Never echoed in an error."""
    setting: bool = False
    """Goes into the class's ``Settings(...)`` (model, voice, language) rather than ``__init__``."""
    number: bool = False


@dataclass(frozen=True)
class Provider:
    name: str
    stage: str
    class_path: str
    """``module:Class``: a constant of this table, never anything from the bus."""
    extra: str
    """The pipecat-ai extra that installs the class's dependencies."""
    options: tuple[Option, ...] = ()
    sample_rate: int | None = None
    """TTS: the rate the provider produces; the worker resamples it to the bus's 16 kHz."""
    keyless_with_base_url: bool = False
    """An OpenAI-compatible server of one's own (a base URL given) needs no real key."""
    fixed: dict[str, Any] = field(default_factory=dict)
    """Constructor arguments voxbus sets itself."""

    @property
    def stage_var(self) -> str:
        return _STAGE_VAR[self.stage]


def _stage_opts(stage: str, *, key: tuple[str, ...], base_url: tuple[str, ...] = (),
                model: bool = True, voice: bool = False, language: bool = False,
                key_required: bool = True, extra: tuple[Option, ...] = ()) -> tuple[Option, ...]:
    """The options every provider of a stage has, under the stage's own variable names first
    (``VOXBUS_STT_API_KEY``) so two stages can use one provider with two accounts, then the
    provider's conventional ones (``DEEPGRAM_API_KEY``)."""
    up = stage.upper()
    opts = [Option("api_key", (f"VOXBUS_{up}_API_KEY", *key), required=key_required,
                   secret=True)]
    if base_url:
        opts.append(Option("base_url", (f"VOXBUS_{up}_BASE_URL", *base_url)))
    if model:
        opts.append(Option("model", (f"VOXBUS_{up}_PROVIDER_MODEL",), setting=True))
    if voice:
        opts.append(Option("voice", ("VOXBUS_TTS_PROVIDER_VOICE",), setting=True))
    if language:
        opts.append(Option("language", (f"VOXBUS_{up}_LANGUAGE",), setting=True))
    return (*opts, *extra)


_AZURE_REGION = Option("region", ("VOXBUS_AZURE_REGION", "AZURE_SPEECH_REGION"), required=True)

PROVIDERS: dict[tuple[str, str], Provider] = {(p.stage, p.name): p for p in (
    # --- STT ----------------------------------------------------------------------------
    Provider("openai", "stt", "pipecat.services.openai.stt:OpenAISTTService", "openai",
             _stage_opts("stt", key=("OPENAI_API_KEY",), base_url=("OPENAI_BASE_URL",),
                         language=True), keyless_with_base_url=True),
    Provider("openai-realtime", "stt",
             "pipecat.services.openai.stt:OpenAIRealtimeSTTService", "openai",
             # A WebSocket URL (wss://api.openai.com/v1/realtime): never OPENAI_BASE_URL.
             _stage_opts("stt", key=("OPENAI_API_KEY",), base_url=("OPENAI_REALTIME_URL",),
                         language=True), keyless_with_base_url=True),
    Provider("groq", "stt", "pipecat.services.groq.stt:GroqSTTService", "groq",
             _stage_opts("stt", key=("GROQ_API_KEY",), language=True)),
    Provider("deepgram", "stt", "pipecat.services.deepgram.stt:DeepgramSTTService", "deepgram",
             _stage_opts("stt", key=("DEEPGRAM_API_KEY",), base_url=("DEEPGRAM_BASE_URL",),
                         language=True)),
    Provider("cartesia", "stt", "pipecat.services.cartesia.stt:CartesiaSTTService", "cartesia",
             _stage_opts("stt", key=("CARTESIA_API_KEY",), language=True)),
    Provider("azure", "stt", "pipecat.services.azure.stt:AzureSTTService", "azure",
             _stage_opts("stt", key=("AZURE_SPEECH_KEY", "AZURE_SPEECH_API_KEY"), model=False,
                         language=True, extra=(_AZURE_REGION,))),
    # --- TTS ----------------------------------------------------------------------------
    Provider("openai", "tts", "pipecat.services.openai.tts:OpenAITTSService", "openai",
             _stage_opts("tts", key=("OPENAI_API_KEY",), base_url=("OPENAI_BASE_URL",),
                         voice=True), sample_rate=24000, keyless_with_base_url=True),
    Provider("cartesia", "tts", "pipecat.services.cartesia.tts:CartesiaTTSService", "cartesia",
             _stage_opts("tts", key=("CARTESIA_API_KEY",), voice=True), sample_rate=24000),
    Provider("elevenlabs", "tts", "pipecat.services.elevenlabs.tts:ElevenLabsTTSService",
             "elevenlabs", _stage_opts("tts", key=("ELEVENLABS_API_KEY",), voice=True),
             sample_rate=24000),
    Provider("deepgram", "tts", "pipecat.services.deepgram.tts:DeepgramTTSService", "deepgram",
             _stage_opts("tts", key=("DEEPGRAM_API_KEY",), voice=True), sample_rate=24000),
    Provider("azure", "tts", "pipecat.services.azure.tts:AzureTTSService", "azure",
             _stage_opts("tts", key=("AZURE_SPEECH_KEY", "AZURE_SPEECH_API_KEY"), model=False,
                         voice=True, extra=(_AZURE_REGION,)), sample_rate=24000),
    # --- LLM: Pipecat's OpenAI-compatible services (the worker relays their stream) --------
    *(Provider(name, "llm", f"pipecat.services.{module}.llm:{cls}", extra,
               _stage_opts("llm", key=(key,), base_url=("VOXBUS_LLM_BASE_URL",), model=False,
                           extra=(Option("model", ("VOXBUS_LLM_MODEL",), setting=True),)))
      for name, module, cls, extra, key in (
          ("groq", "groq", "GroqLLMService", "groq", "GROQ_API_KEY"),
          ("together", "together", "TogetherLLMService", "together", "TOGETHER_API_KEY"),
          ("openrouter", "openrouter", "OpenRouterLLMService", "openrouter",
           "OPENROUTER_API_KEY"),
          ("deepseek", "deepseek", "DeepSeekLLMService", "deepseek", "DEEPSEEK_API_KEY"),
          ("fireworks", "fireworks", "FireworksLLMService", "fireworks", "FIREWORKS_API_KEY"),
          ("cerebras", "cerebras", "CerebrasLLMService", "cerebras", "CEREBRAS_API_KEY"),
          ("mistral", "mistral", "MistralLLMService", "mistral", "MISTRAL_API_KEY"),
      )),
)}


def provider_names(stage: str) -> list[str]:
    return sorted([LOCAL] + [name for (s, name) in PROVIDERS if s == stage])


def chosen(stage: str, name: str) -> Provider | None:
    """The provider ``name`` (the stage's ``VOXBUS_*_SERVICE``) is; None for ``local``. An
    unknown name stops the worker with the list of names it could have been."""
    var = _STAGE_VAR[stage]
    name = name.strip().lower() or LOCAL
    if name == LOCAL:
        return None
    provider = PROVIDERS.get((stage, name))
    if provider is None:
        raise setting_error(f"{var}={name!r} is not a {stage.upper()} service voxbus "
                            f"knows: use one of {', '.join(provider_names(stage))} (see the "
                            "README's 'Any Pipecat service as a stage' to add one)")
    return provider


@dataclass(frozen=True)
class Built:
    """A provider's class and the arguments read from the environment, checked: calling
    :meth:`make` gives one more service instance (one per session or per sentence)."""

    provider: Provider
    cls: type
    kwargs: dict[str, Any]
    settings: dict[str, Any]

    def make(self, **overrides: Any) -> Any:
        """``overrides``: settings for this instance (a TTS request's voice)."""
        values = {**self.settings, **{k: v for k, v in overrides.items() if v is not None}}
        kwargs = dict(self.kwargs)
        if values:
            kwargs["settings"] = self.cls.Settings(**values)
        return self.cls(**kwargs)


def load(provider: Provider, *, adjust: Callable[[dict], None] | None = None) -> Built:
    """Read and check the provider's variables, import its class, and build one instance to
    prove the arguments are accepted: all at start."""
    what = f"{provider.stage_var}={provider.name}"
    cls = import_class(provider)  # first: without its extra nothing else matters
    kwargs: dict[str, Any] = dict(provider.fixed)
    settings: dict[str, Any] = {}
    # The key last: whether one is needed depends on the base URL.
    for opt in sorted(provider.options, key=lambda o: o.arg == "api_key"):
        var, value = next(((v, os.environ[v].strip()) for v in opt.env
                           if os.environ.get(v, "").strip()), (opt.env[0], None))
        if value is None:
            if opt.arg == "api_key" and provider.keyless_with_base_url and kwargs.get("base_url"):
                value = "sk-local"
            elif opt.required:
                raise setting_error(f"{what} needs {' or '.join(opt.env)} set")
            else:
                continue
        if opt.number:
            try:
                value = float(value)
            except ValueError:
                raise setting_error(f"{var}={value!r} is not a number") from None
        if opt.setting and opt.arg == "language":
            value = _language(var, value)
        (settings if opt.setting else kwargs)[opt.arg] = value
    if provider.sample_rate and "sample_rate" not in kwargs:
        kwargs["sample_rate"] = provider.sample_rate
    if adjust is not None:
        adjust(kwargs)
    built = Built(provider, cls, kwargs, settings)
    try:
        built.make()
    except (TypeError, ValueError) as e:
        raise setting_error(f"{what}: {provider.class_path.replace(':', '.')} refused its "
                            f"settings: {e}") from e
    return built


def import_class(provider: Provider) -> type:
    """The class, imported now; a missing optional dependency says which extra to install."""
    module, _, name = provider.class_path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise setting_error(
            f"{provider.stage_var}={provider.name} needs Pipecat's {provider.extra!r} extra: "
            f'pip install "pipecat-ai[{provider.extra}]" ({module}: {e})') from e


_LANGUAGE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")


def _language(var: str, value: str):
    from pipecat.transcriptions.language import Language

    try:
        return Language(value)
    except ValueError:
        if not _LANGUAGE.match(value):
            raise setting_error(f"{var}={value!r} is not a language code (e.g. en, en-US, "
                                "de)") from None
        raise setting_error(f"{var}={value!r} is not a language Pipecat knows") from None


def openai_client_options(service: Any, timeout_s: float) -> None:
    """OpenAI-SDK services (OpenAI, Groq, ...): no silent retries (the stage has its own, on
    another replica) and a deadline per request, so an endpoint that hangs becomes an error
    the session hears about instead of a wait of the SDK's ten minutes."""
    client = getattr(service, "_client", None)
    if client is not None and hasattr(client, "with_options"):
        service._client = client.with_options(max_retries=0, timeout=timeout_s)

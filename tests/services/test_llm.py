"""LLM worker over real NATS: the real local model streams; cancel stops it; errors are reported."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from services.llm.worker import LlmWorker
from voxbus.llm_server import MODEL_ALIAS
from voxbus.subjects import Stage
from voxbus.wire import Cancel, LlmDelta, LlmDone, LlmRequest

pytestmark = pytest.mark.slow


async def _collect(bus, session: str, turn: int, request: LlmRequest, *, cancel_after: int = 0):
    subjects = bus.subjects
    reply = subjects.reply(session, Stage.LLM, turn)
    got: asyncio.Queue = asyncio.Queue()

    async def on(frame, _msg):
        await got.put(frame)

    await bus.subscribe(reply, on)
    await bus.publish(subjects.work(Stage.LLM), request, reply=reply)
    deltas = []
    while True:
        frame = await asyncio.wait_for(got.get(), 60)
        if isinstance(frame, LlmDelta):
            deltas.append(frame)
            if cancel_after and len(deltas) == cancel_after:
                await bus.publish(subjects.ctl(session), Cancel(session=session, turn=turn))
        elif isinstance(frame, LlmDone):
            return deltas, frame


async def test_streams_from_local_model(settings, bus, llm_endpoint):
    s = replace(settings, llm_model=MODEL_ALIAS, llm_max_tokens=40)
    async with LlmWorker(s, base_url=llm_endpoint):
        req = LlmRequest(session="s1", turn=1, messages=[
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Say hello to Paris."}])
        deltas, done = await _collect(bus, "s1", 1, req)
    assert done.error is None and done.count == len(deltas) > 1
    assert [d.index for d in deltas] == list(range(len(deltas)))
    assert "".join(d.text for d in deltas).strip()


async def test_cancel_stops_stream(settings, bus, llm_endpoint):
    s = replace(settings, llm_model=MODEL_ALIAS, llm_max_tokens=400)
    async with LlmWorker(s, base_url=llm_endpoint) as worker:
        req = LlmRequest(session="s2", turn=3, messages=[
            {"role": "user", "content": "Write a very long story about a dragon."}])
        deltas, done = await _collect(bus, "s2", 3, req, cancel_after=2)
        assert done.error == "cancelled"
        assert len(deltas) < 100
        assert worker.inflight == 0


async def test_unreachable_endpoint_is_reported_not_fatal(settings, bus):
    s = replace(settings, llm_model=MODEL_ALIAS)
    async with LlmWorker(s, base_url="http://127.0.0.1:9/v1") as worker:
        req = LlmRequest(session="s3", turn=1, messages=[{"role": "user", "content": "hi"}])
        _, done = await _collect(bus, "s3", 1, req)
        assert done.error and "Connection" in done.error
        assert worker.bus.nc.is_connected

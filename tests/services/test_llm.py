"""LLM worker over real NATS: the real local model streams; cancel stops it; errors are reported."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.llm.worker import LlmWorker
from voxbus.errors import StageFailed
from voxbus.llm_server import MODEL_ALIAS
from voxbus.stage_call import CallPolicy, StageCall
from voxbus.subjects import Stage
from voxbus.wire import Cancel, LlmDelta, LlmDone, LlmRequest

pytestmark = pytest.mark.slow


async def _collect(bus, session: str, turn: int, request: LlmRequest, *, cancel_after: int = 0):
    """One completion through the stage caller every voxbus client uses (one attempt: these
    tests are about what a single worker does)."""
    deltas = []
    async with StageCall(bus, Stage.LLM, request, policy=CallPolicy(
            attempts=1, first_frame_s=60, give_up_s=60, stall_s=60)) as call:
        async for frame in call:
            if isinstance(frame, LlmDelta):
                deltas.append(frame)
                if cancel_after and len(deltas) == cancel_after:
                    await bus.publish(bus.subjects.ctl(session), Cancel(session=session,
                                                                        turn=turn))
    assert isinstance(call.done, LlmDone)
    return deltas, call.done


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
        with pytest.raises(StageFailed, match="Connection"):
            await _collect(bus, "s3", 1, req)
        assert worker.bus.nc.is_connected


async def test_developer_messages_reach_an_endpoint_that_refuses_the_role(settings, bus,
                                                                          llm_endpoint):
    """llama-cpp-python's server answers 500 to role "developer" (which Pipecat's empty-turn
    recovery and idle prompts write): the worker learns that on the first refusal and sends
    them as user messages, so the turn is still answered."""
    s = replace(settings, llm_model=MODEL_ALIAS, llm_max_tokens=20)
    async with LlmWorker(s, base_url=llm_endpoint) as worker:
        assert worker.developer_role
        for turn in (1, 2):
            req = LlmRequest(session="s4", turn=turn, messages=[
                {"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "Hello."},
                {"role": "assistant", "content": "Hi! How can I help?"},
                {"role": "developer", "content": "The user is silent. Ask if they are there."}])
            deltas, done = await _collect(bus, "s4", turn, req)
            assert done.error is None, done
            assert "".join(d.text for d in deltas).strip()
        assert worker.developer_role is False

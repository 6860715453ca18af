"""Placement by load over a real nats-server with real STT and orchestrator replicas: a new
session goes to the least-loaded replica that is not draining, and a full replica refuses (an
``ErrorEvent`` with code ``full``) instead of taking one more."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace

import pytest

from services.orchestrator.worker import OrchestratorWorker
from services.stt.worker import SttWorker
from voxbus.errors import VoxbusError
from voxbus.liveness import Liveness
from voxbus.stage_call import ask
from voxbus.subjects import Stage
from voxbus.wire import SessionStart, SttClaim, SttClaimed


def claim(session: str) -> SttClaim:
    return SttClaim(session=session, sample_rate=16000)


def new_session() -> str:
    return uuid.uuid4().hex[:12]


async def heard(liveness: Liveness, stage: Stage, n: int, *, loads=None) -> None:
    """Wait until ``n`` replicas of ``stage`` have heartbeated (with ``loads``, once each has
    reported those loads, lowest first)."""
    for _ in range(100):
        seen = sorted(s.load for s in liveness.seen.values() if s.stage == stage.value)
        if len(seen) == n and (loads is None or seen == sorted(loads)):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"heartbeats of {n} {stage} replicas (loads {loads}) not heard")


@pytest.fixture
async def two_stt(settings):
    workers = [SttWorker(replace(settings, worker_id=w, capacity=2)) for w in ("a", "b")]
    for w in workers:
        await w.start()
    yield workers
    for w in workers:
        await w.stop()


async def test_a_new_session_goes_to_the_idle_replica(bus, two_stt):
    a, b = two_stt
    liveness = await Liveness(bus, 3.0).watch(Stage.STT)
    try:
        await heard(liveness, Stage.STT, 2)
        # One session on a, asked for by name: a is now half loaded, b idle.
        first = await bus.request(bus.subjects.work_direct(Stage.STT, a.worker_id),
                                  claim(new_session()))
        assert isinstance(first, SttClaimed) and first.worker == a.worker_id
        await heard(liveness, Stage.STT, 2, loads=[0.0, 0.5])
        placed = await ask(bus, Stage.STT, claim(new_session()), placement=liveness)
        assert placed.worker == b.worker_id
        # Both half loaded now; two more sessions started at once spread, one each, although
        # no heartbeat has reported the first of them yet.
        await heard(liveness, Stage.STT, 2, loads=[0.5, 0.5])
        more = await asyncio.gather(*(ask(bus, Stage.STT, claim(new_session()),
                                          placement=liveness) for _ in range(2)))
        assert sorted(m.worker for m in more) == sorted([a.worker_id, b.worker_id])
        assert len(a.streams) == len(b.streams) == 2
    finally:
        await liveness.close()


async def test_a_full_replica_refuses_and_the_caller_finds_the_one_with_room(bus, two_stt):
    a, b = two_stt
    for _ in range(2):
        await bus.request(bus.subjects.work_direct(Stage.STT, a.worker_id), claim(new_session()))
    # Asked directly, a full replica says so, with a code a caller can act on.
    with pytest.raises(VoxbusError) as refused:
        await bus.request(bus.subjects.work_direct(Stage.STT, a.worker_id), claim(new_session()))
    assert refused.value.code == "full" and "full (2 of 2)" in str(refused.value)
    assert len(a.streams) == 2
    # Through placement, the session lands on b even before a's heartbeat says it is full.
    liveness = await Liveness(bus, 3.0).watch(Stage.STT)
    try:
        await heard(liveness, Stage.STT, 2)
        for s in liveness.seen.values():
            s.load = 0.0  # as a stale heartbeat would have it
        placed = await ask(bus, Stage.STT, claim(new_session()), placement=liveness)
        assert placed.worker == b.worker_id
    finally:
        await liveness.close()


async def test_a_full_orchestrator_refuses_a_new_session(settings, bus):
    stt = SttWorker(settings)
    orchestrator = OrchestratorWorker(replace(settings, capacity=1))
    await stt.start()
    await orchestrator.start()
    try:
        start = SessionStart(session=new_session(), sample_rate=16000, agent="chat")
        await ask(bus, Stage.ORCHESTRATOR, start, timeout_s=15.0)
        with pytest.raises(VoxbusError) as refused:
            await ask(bus, Stage.ORCHESTRATOR, start.model_copy(update={"session": new_session()}),
                      timeout_s=15.0)
        assert refused.value.code == "full"
        assert orchestrator.sessions() == [start.session]
        # The session it holds is not disturbed by the refusal: starting it again is fine.
        await ask(bus, Stage.ORCHESTRATOR, start, timeout_s=15.0)
    finally:
        await orchestrator.stop()
        await stt.stop()

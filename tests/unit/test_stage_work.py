"""The bounded admission of per-request stages, with real asyncio tasks and a real Prometheus
gauge (in a registry of its own): who runs, who waits in what order, who is refused, and that
a cancelled request gives back what it held whenever it is cancelled."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, Gauge

from voxbus.errors import Full
from voxbus.stage_work import Admission, TurnTasks


def depth_gauge():
    registry = CollectorRegistry()
    gauge = Gauge("queue_depth", "waiting", ["stage"], registry=registry)
    return gauge.labels("llm"), lambda: registry.get_sample_value("queue_depth",
                                                                  {"stage": "llm"})


class Work:
    """Requests that record when they ran and finish when the test says so."""

    def __init__(self, admission: Admission, tasks: TurnTasks):
        self.admission = admission
        self.tasks = tasks
        self.ran: list[str] = []
        self.finish: dict[str, asyncio.Event] = {}

    def start(self, name: str, turn: int = 1) -> asyncio.Task:
        ticket = self.admission.admit(name)
        self.finish[name] = asyncio.Event()

        async def run() -> None:
            async with ticket:
                self.ran.append(name)
                await self.finish[name].wait()

        return self.tasks.start(name, turn, run(), on_done=ticket.release)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_runs_capacity_queues_in_order_and_refuses_beyond_the_queue():
    depth, read = depth_gauge()
    work = Work(Admission(2, 2, name="llm-1", depth=depth), TurnTasks())
    tasks = [work.start(n) for n in ("a", "b", "c", "d")]
    await settle()
    assert work.ran == ["a", "b"] and work.admission.queued == 2 and read() == 2
    with pytest.raises(Full, match="llm-1 is full .2 running, 2 waiting"):
        work.start("e")
    work.finish["b"].set()
    await settle()
    assert work.ran == ["a", "b", "c"] and read() == 1  # the oldest waiting one, first
    work.finish["a"].set()
    await settle()
    assert work.ran == ["a", "b", "c", "d"] and read() == 0 and work.admission.running == 2
    for name in ("c", "d"):
        work.finish[name].set()
    await asyncio.gather(*tasks)
    await settle()
    assert work.admission.running == 0 and work.admission.queued == 0


async def test_a_cancelled_waiting_request_leaves_the_queue_without_running():
    depth, read = depth_gauge()
    tasks = TurnTasks()
    work = Work(Admission(1, 3, depth=depth), tasks)
    running = work.start("a")
    waiting = [work.start(n) for n in ("b", "c")]
    await settle()
    assert read() == 2
    assert tasks.cancel("b", 1) == 1  # a barge-in on b's session
    await asyncio.gather(waiting[0], return_exceptions=True)
    assert waiting[0].cancelled() and read() == 1 and work.admission.queued == 1
    work.finish["a"].set()
    await running
    await settle()
    assert work.ran == ["a", "c"], "the cancelled request ran, or c did not get the slot"
    work.finish["c"].set()
    await waiting[1]


async def test_a_request_cancelled_before_its_task_ever_ran_gives_its_slot_back():
    """Cancelled in the same loop step it was admitted (its coroutine never started, so no
    ``finally`` of its own runs): the task's end still releases the ticket."""
    work = Work(Admission(1, 0), TurnTasks())
    task = work.start("a")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await settle()
    assert work.ran == [] and work.admission.running == 0
    again = work.start("b")  # would be refused if "a" still held the only slot
    await settle()
    assert work.ran == ["b"]
    work.finish["b"].set()
    await again


async def test_a_slot_granted_to_a_request_being_cancelled_passes_to_the_next():
    admission = Admission(1, 2)
    a = admission.admit("a")
    b, c = admission.admit("b"), admission.admit("c")
    waiting_b, waiting_c = asyncio.create_task(b.wait()), asyncio.create_task(c.wait())
    await settle()
    a.release()  # b has the slot now, but its task has not resumed yet...
    assert b.state == "running" and not waiting_b.done()
    waiting_b.cancel()  # ...and is cancelled before it does
    await asyncio.gather(waiting_b, return_exceptions=True)
    await asyncio.wait_for(waiting_c, 1)
    assert waiting_b.cancelled() and c.state == "running" and admission.running == 1
    c.release()
    assert admission.running == 0


async def test_capacity_zero_bounds_nothing():
    work = Work(Admission(0, 0), TurnTasks())
    tasks = [work.start(str(i)) for i in range(20)]
    await settle()
    assert len(work.ran) == 20 and work.admission.queued == 0
    for event in work.finish.values():
        event.set()
    await asyncio.gather(*tasks)


def test_one_environment_gives_each_stage_its_own_capacity(monkeypatch):
    """``voxbus up`` hands every replica the same environment: the per-stage variables are how
    LLM and TTS get capacities of their own there, over ``VOXBUS_CAPACITY``."""
    from voxbus.config import Settings, SettingsError
    from voxbus.runner import Service
    from voxbus.subjects import Stage

    def replica(stage: Stage) -> Service:
        return type(f"{stage.value}Replica", (Service,), {"stage": stage})(Settings())

    monkeypatch.setenv("VOXBUS_CAPACITY", "8")
    monkeypatch.setenv("VOXBUS_TTS_CAPACITY", "2")
    monkeypatch.setenv("VOXBUS_QUEUE_MAX", "0")
    assert replica(Stage.TTS).declared_capacity == 2
    assert replica(Stage.LLM).declared_capacity == 8
    assert replica(Stage.STT).declared_capacity == 8
    assert Settings().queue_max == 0
    monkeypatch.setenv("VOXBUS_QUEUE_MAX", "-1")
    with pytest.raises(SettingsError, match="VOXBUS_QUEUE_MAX"):
        Settings()

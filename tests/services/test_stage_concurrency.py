"""LLM and TTS replicas serve several requests at once up to their capacity, queue a few more in
order and refuse the rest (``full``) so the stage caller lands on another replica; a cancelled
waiting request never runs. Real nats-server, real replicas, the scripted OpenAI-compatible
endpoint and the real Piper voice."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
from prometheus_client import REGISTRY

from services.llm.worker import LlmWorker
from services.tts.worker import TtsWorker
from tests.scripted_openai import ScriptedOpenAI, Step
from voxbus.stage_call import CallPolicy, StageCall
from voxbus.subjects import Stage
from voxbus.wire import Cancel, LlmDelta, LlmDone, LlmRequest, TtsAudio, TtsDone, TtsRequest


class HoldingOpenAI(ScriptedOpenAI):
    """The scripted endpoint, answering "answer to <text>"; a request saying "hold" is held
    until the test releases it (a slot kept busy for as long as a test needs, whatever the
    box's speed)."""

    def __init__(self):
        super().__init__(lambda body: Step(text=f"answer to {_text(body)}"))
        self.released = asyncio.Event()
        self.asked: list[str] = []
        """What each request said, as it arrived."""

    async def _complete(self, request):
        text = _text(await request.json())  # (aiohttp keeps the body for the next read)
        self.asked.append(text)
        if text == "hold":
            await self.released.wait()
        return await super()._complete(request)


def _text(body: dict) -> str:
    return body["messages"][-1]["content"]


@pytest.fixture
async def endpoint():
    server = await HoldingOpenAI().start()
    yield server
    server.released.set()
    await server.stop()


@pytest.fixture
async def llm_replica(settings, endpoint):
    """``await llm_replica(worker_id=..., **settings)``: a started LLM replica on the endpoint,
    stopped after the test with the endpoint's held requests let go first (a replica stopping
    finishes its work, which a held request never would)."""
    started: list[LlmWorker] = []

    async def start(**changes) -> LlmWorker:
        started.append(await LlmWorker(replace(settings, **changes),
                                       base_url=endpoint.base_url).start())
        return started[-1]

    yield start
    endpoint.released.set()
    for worker in started:
        await worker.stop()


def sample(name: str, stage: str) -> float:
    return REGISTRY.get_sample_value(name, {"stage": stage}) or 0.0


async def until(check, what: str, timeout_s: float = 15.0) -> None:
    """Poll until ``check()``; past the bound, fail saying ``what`` (a hang, not a timing)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} (waited {timeout_s:.0f} s)")
        await asyncio.sleep(0.01)


class Replies:
    """Every reply frame of the requests a test sends, in one log in arrival order."""

    def __init__(self, bus):
        self.bus = bus
        self.log: list[tuple[str, object]] = []
        self.subjects: dict[str, str] = {}

    async def send(self, name: str, request, *, to: str = "") -> str:
        stage = Stage.LLM if isinstance(request, LlmRequest) else Stage.TTS
        reply = self.bus.subjects.reply(request.session, stage, request.turn)
        self.subjects[name] = reply

        async def on(frame, _msg) -> None:
            self.log.append((name, frame))

        await self.bus.subscribe(reply, on)
        await self.bus.publish(to or self.bus.subjects.work(stage), request, reply=reply)
        return reply

    def of(self, name: str) -> list:
        return [f for n, f in self.log if n == name]

    def done(self, name: str):
        return next((f for f in self.of(name) if isinstance(f, LlmDone | TtsDone)), None)

    def at(self, name: str, kind) -> int:
        """Where in the log ``name``'s first frame of ``kind`` came."""
        return next(i for i, (n, f) in enumerate(self.log) if n == name and isinstance(f, kind))

    async def wait_done(self, *names: str) -> None:
        await until(lambda: all(self.done(n) for n in names), f"{names} answered")


def llm(session: str, text: str, turn: int = 1) -> LlmRequest:
    return LlmRequest(session=session, turn=turn, messages=[{"role": "user", "content": text}])


async def test_llm_runs_capacity_queues_the_next_and_refuses_beyond(bus, endpoint, llm_replica):
    depth0 = sample("voxbus_queue_depth", "llm")
    ttft0 = sample("voxbus_llm_ttft_seconds_count", "llm")
    worker = await llm_replica(llm_capacity=2, queue_max=1)
    replies = Replies(bus)
    for name in ("a", "b"):
        await replies.send(name, llm(name, "hold"))
    await replies.send("c", llm("c", "next"))
    await until(lambda: len(endpoint.asked) == 2 and worker.admission.queued == 1,
                "two running, one waiting")
    assert sample("voxbus_queue_depth", "llm") - depth0 == 1
    beat = worker.heartbeat()
    assert (beat.inflight, beat.load, beat.capacity) == (2, 1.0, 2)

    await replies.send("d", llm("d", "one too many"))
    await replies.wait_done("d")
    [refusal] = replies.of("d")
    assert refusal.count == 0 and refusal.error.startswith("full: "), refusal

    # c ran only once a slot was free: a's end (a barge-in) lets it in.
    await bus.publish(bus.subjects.ctl("a"), Cancel(session="a", turn=1))
    await replies.wait_done("a", "c")
    assert replies.done("a").error == "cancelled"
    assert replies.done("c").error is None
    assert "".join(f.text for f in replies.of("c") if isinstance(f, LlmDelta)) == \
        "answer to next"
    assert replies.at("a", LlmDone) < replies.at("c", LlmDelta)
    assert endpoint.asked == ["hold", "hold", "next"], "the refused one reached the endpoint"
    assert sample("voxbus_queue_depth", "llm") == depth0
    assert sample("voxbus_llm_ttft_seconds_count", "llm") - ttft0 == 1  # c's
    await bus.publish(bus.subjects.ctl("b"), Cancel(session="b", turn=1))
    await replies.wait_done("b")
    assert worker.inflight == 0 and worker.admission.running == 0


async def test_a_cancel_takes_a_waiting_request_out_of_the_queue(bus, endpoint, llm_replica):
    depth0 = sample("voxbus_queue_depth", "llm")
    worker = await llm_replica(llm_capacity=1, queue_max=2)
    replies = Replies(bus)
    await replies.send("a", llm("a", "hold"))
    b = await replies.send("b", llm("b", "second"))
    await replies.send("c", llm("c", "third"))
    await until(lambda: worker.admission.queued == 2, "b and c waiting")
    assert sample("voxbus_queue_depth", "llm") - depth0 == 2

    # The caller gave up on b (its hedge won elsewhere): cancelled by its reply subject.
    await bus.publish(bus.subjects.ctl("b"), Cancel(session="b", turn=1, reply=b))
    await replies.wait_done("b")
    assert replies.of("b") == [LlmDone(turn=1, count=0, error="cancelled")]
    assert worker.admission.queued == 1 and sample("voxbus_queue_depth", "llm") - depth0 == 1

    await bus.publish(bus.subjects.ctl("a"), Cancel(session="a", turn=1))
    await replies.wait_done("a", "c")
    assert replies.done("c").error is None
    assert endpoint.asked == ["hold", "third"], "the cancelled request still ran"
    assert sample("voxbus_queue_depth", "llm") == depth0


async def test_a_full_replicas_refusal_sends_the_call_to_another(bus, endpoint, llm_replica):
    """The stage caller every client uses: the full replica answers ``full`` at once and the
    retry goes to the replica the caller names (the orchestrator: the least loaded). Which
    replica the queue group gives a call first is NATS's choice, so calls are made until one
    lands on the full replica; each must be answered, that one on its second attempt."""
    full, free = [await llm_replica(worker_id=w, llm_capacity=1, queue_max=0)
                  for w in ("full", "free")]
    replies = Replies(bus)
    await replies.send("busy", llm("busy", "hold"),
                       to=bus.subjects.work_direct(Stage.LLM, full.worker_id))
    await until(lambda: full.admission.running == 1, "the full replica busy")
    policy = CallPolicy(first_frame_s=30, give_up_s=30, stall_s=30)
    refused = None
    for turn in range(1, 41):
        request = llm("s1", f"question {turn}", turn)
        async with StageCall(bus, Stage.LLM, request, policy=policy,
                             retry_to=lambda: free.worker_id) as call:
            text = "".join([f.text async for f in call if isinstance(f, LlmDelta)])
        assert call.done.error is None and text == f"answer to question {turn}", call.errors
        if call.errors:
            refused = call
            break
    assert refused is not None, "40 calls and the queue group never chose the full replica"
    assert refused.errors[0].startswith(f"full: {full.worker_id} is full")
    assert refused.winner == 1 and len(refused.errors) == 1
    assert endpoint.asked.count("hold") == 1
    await bus.publish(bus.subjects.ctl("busy"), Cancel(session="busy", turn=1))
    await replies.wait_done("busy")


LONG = ("When you arrive at the station tomorrow morning, take the second exit on the left, walk "
        "past the bakery and the old library, and you will find our office on the corner. "
        "If you come by car instead, there is a large car park behind the building, and the "
        "entrance is on the north side, next to the little café with the green awning. "
        "Please bring your booking number and a photo identity document with you.")


@pytest.mark.slow
async def test_tts_a_short_sentence_does_not_wait_behind_a_long_one(settings, bus):
    ttfa0 = sample("voxbus_tts_ttfa_seconds_count", "tts")
    async with TtsWorker(settings) as worker:
        assert worker.declared_capacity >= 2
        replies = Replies(bus)
        await replies.send("long", TtsRequest(session="long", turn=1, index=0, text=LONG))
        await replies.send("short", TtsRequest(session="short", turn=1, index=0,
                                               text="Sure, no problem."))
        await replies.wait_done("long", "short")
    assert replies.done("long").error is None and replies.done("short").error is None
    long_chunks = [f for f in replies.of("long") if isinstance(f, TtsAudio)]
    assert len(long_chunks) >= 3  # one per sentence: the long one streams for a while
    # Behind one lock the short one's audio came after all of the long one's.
    assert replies.at("short", TtsAudio) < replies.at("long", TtsDone), replies.log
    assert sample("voxbus_tts_ttfa_seconds_count", "tts") - ttfa0 == 2

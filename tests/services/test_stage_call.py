"""The stage caller over a real nats-server, against scripted replicas: subscribers on the TTS
work subject in the queue group that answer slowly, never, with an error, or part-way, so each
of the caller's rules is exercised deterministically."""

from __future__ import annotations

import asyncio

import pytest

from voxbus.errors import StageFailed, StageUnavailable
from voxbus.stage_call import CallPolicy, StageCall, ask
from voxbus.subjects import Stage
from voxbus.wire import Cancel, SessionStart, TtsAudio, TtsDone, TtsRequest

FAST = CallPolicy(first_frame_s=0.3, give_up_s=1.5, stall_s=0.5, unavailable_wait_s=0.05)


class ScriptedReplica:
    """Takes TTS requests from the queue group and answers each by ``script(attempt)``: a list
    of (delay_s, frame-or-None); None ends without a TtsDone (a replica that died)."""

    def __init__(self, bus, script):
        self.bus = bus
        self.script = script
        self.seen: list[TtsRequest] = []
        self.cancels: list[Cancel] = []
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> ScriptedReplica:
        subjects = self.bus.subjects
        await self.bus.subscribe(subjects.work(Stage.TTS), self._on_request,
                                 queue=subjects.queue_group(Stage.TTS))
        await self.bus.subscribe(subjects.all_ctl(), self._on_ctl)
        await self.bus.sync()
        return self

    async def _on_request(self, frame, msg) -> None:
        self.seen.append(frame)
        task = asyncio.create_task(self._answer(frame, msg.reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_ctl(self, frame, _msg) -> None:
        if isinstance(frame, Cancel):
            self.cancels.append(frame)

    async def _answer(self, req: TtsRequest, reply: str) -> None:
        for delay, frame in self.script(req.attempt):
            await asyncio.sleep(delay)
            if frame is None:
                return
            await self.bus.publish(reply, frame)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def audio(seq: int, marker: int = 0) -> TtsAudio:
    return TtsAudio(turn=1, index=0, seq=seq, sample_rate=16000, pcm=bytes([marker]) * 640)


def done(count: int, error: str | None = None) -> TtsDone:
    return TtsDone(turn=1, index=0, count=count, error=error)


REQUEST = TtsRequest(session="call1", turn=1, index=0, text="Hello.")


async def run(bus, policy=FAST) -> tuple[list[TtsAudio], StageCall]:
    async with StageCall(bus, Stage.TTS, REQUEST, policy=policy) as call:
        frames = [f async for f in call]
    return frames, call


@pytest.fixture
async def replica(bus):
    made: list[ScriptedReplica] = []

    async def make(script) -> ScriptedReplica:
        made.append(await ScriptedReplica(bus, script).start())
        return made[-1]

    yield make
    for r in made:
        await r.stop()


async def test_a_silent_first_attempt_is_hedged_and_its_late_frames_dropped(bus, replica):
    # Attempt 0 answers only after the hedge has won; its frames (marker 9) must not mix in.
    r = await replica(lambda attempt: [(1.0, audio(0, 9)), (0, done(1))] if attempt == 0
                      else [(0.05, audio(0, 1)), (0.01, audio(1, 1)), (0, done(2))])
    frames, call = await run(bus)
    assert [f.pcm[0] for f in frames] == [1, 1]
    assert call.retried and call.winner == 1 and call.done.count == 2
    await asyncio.sleep(0.2)
    attempt0 = bus.subjects.reply("call1", Stage.TTS, 1, 0, 0)
    assert any(c.reply == attempt0 for c in r.cancels), "the loser was not cancelled"


async def test_the_first_attempt_can_still_win_after_the_hedge(bus, replica):
    await replica(lambda attempt: [(0.4, audio(0, 7)), (0, done(1))] if attempt == 0
                  else [(5.0, audio(0, 8))])
    frames, call = await run(bus)
    assert [f.pcm[0] for f in frames] == [7] and call.winner == 0 and call.retried


async def test_an_error_before_any_audio_moves_to_the_next_attempt_at_once(bus, replica):
    await replica(lambda attempt: [(0, done(0, "voice crashed"))] if attempt == 0
                  else [(0, audio(0, 2)), (0, done(1))])
    frames, call = await run(bus, CallPolicy(first_frame_s=5, give_up_s=10, stall_s=5))
    assert [f.pcm[0] for f in frames] == [2] and call.errors == ["voice crashed"]


async def test_every_attempt_failing_is_a_stage_failure_naming_why(bus, replica):
    await replica(lambda attempt: [(0, done(0, f"broken {attempt}"))])
    with pytest.raises(StageFailed, match="broken 0; broken 1"):
        await run(bus)


async def test_nobody_answering_at_all_gives_up_in_time(bus, replica):
    await replica(lambda attempt: [(30, None)])
    started = asyncio.get_running_loop().time()
    with pytest.raises(StageUnavailable, match="2 replica"):
        await run(bus)
    assert asyncio.get_running_loop().time() - started < FAST.give_up_s + 1


async def test_no_replica_listening_is_unavailable(bus):
    with pytest.raises(StageUnavailable, match="no tts replica is listening"):
        await run(bus)


async def test_a_reply_that_stops_part_way_has_stalled(bus, replica):
    await replica(lambda attempt: [(0, audio(0)), (0, None)])  # died after one chunk
    with pytest.raises(StageFailed, match="stalled"):
        await run(bus)


async def test_ask_retries_no_responders_but_not_a_refusal(bus):
    with pytest.raises(StageUnavailable) as gone:
        await ask(bus, Stage.ORCHESTRATOR, SessionStart(session="nobody"), timeout_s=1)
    assert gone.value.reason == "no_responders"

"""Barge-in: the user talks over the agent; in-flight work is cancelled and the sink flushed."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from prometheus_client import REGISTRY

from voxbus.audio import WIRE_RATE, frames, read_wav
from voxbus.bus import Bus, now_us
from voxbus.stage_call import ask
from voxbus.subjects import Stage, Subjects
from voxbus.wire import AudioFlush, AudioIn, AudioOut, Cancel, SessionEnd, SessionStart, TurnEvent

pytestmark = pytest.mark.slow


async def test_user_speech_while_agent_speaks_interrupts_it(system, speak):
    question = read_wav(speak("Tell me a long story about a brave little dragon."))
    interruption = read_wav(speak("Wait, stop, stop. Let me ask something else."))
    subjects = Subjects(system.prefix)
    bus = await Bus.connect(system.nats_url, subjects, "barge-in-test")
    session = uuid.uuid4().hex[:12]
    seen: list[tuple[float, object]] = []

    async def collect(frame, _msg):
        seen.append((time.monotonic(), frame))

    seq = 0

    async def say(pcm: bytes, until=None) -> None:
        nonlocal seq
        t0 = time.monotonic()
        for i, chunk in enumerate(frames(pcm)):
            await bus.publish(subjects.audio_in(session), AudioIn(
                seq=seq, ts_us=now_us(), sample_rate=WIRE_RATE, pcm=chunk))
            seq += 1
            await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.02 - time.monotonic()))
            if until and until():
                return

    def agent_audio(turn: int) -> list[float]:
        return [t for t, f in seen if isinstance(f, AudioOut) and f.turn == turn]

    try:
        for subject in (subjects.audio_out(session), subjects.events(session),
                        subjects.ctl(session)):
            await bus.subscribe(subject, collect)
        await ask(bus, Stage.ORCHESTRATOR, SessionStart(session=session, sample_rate=WIRE_RATE),
                  timeout_s=15)
        interruptions = REGISTRY.get_sample_value("voxbus_interruptions_total") or 0.0
        await say(question)
        # Silence until the agent is speaking, then a second of it before the user cuts in.
        await say(bytes(640 * 1500), until=lambda: len(agent_audio(1)) > 50)
        assert agent_audio(1), "the agent never started speaking"
        # The question itself (a turn start with the agent idle) is no interruption.
        assert REGISTRY.get_sample_value("voxbus_interruptions_total") == interruptions
        cut_in = time.monotonic()
        await say(interruption)
        await say(bytes(640 * 25))

        flushes = [t for t, f in seen if isinstance(f, AudioFlush) and t > cut_in]
        assert flushes, "no AudioFlush after the user cut in"
        assert any(isinstance(f, TurnEvent) and f.state == "interrupted" and t > cut_in
                   for t, f in seen)
        assert any(isinstance(f, Cancel) and f.turn == 1 and t > cut_in for t, f in seen), \
            "in-flight work of the interrupted turn was not cancelled"
        # Counted for the operator (a pause inside "Wait, stop, stop. Let me ask something
        # else." can end a turn and let the agent start again: a second barge-in, also real).
        assert REGISTRY.get_sample_value("voxbus_interruptions_total") >= interruptions + 1
        # The interrupted turn's audio stops at the flush (a frame or two may be on the wire).
        late = [t for t in agent_audio(1) if t > flushes[0] + 0.1]
        assert len(late) <= 2, f"{len(late)} frames of turn 1 after the flush"
        # The story was long: without the interruption far more audio would have come.
        assert len(agent_audio(1)) * 0.02 < 10
    finally:
        await bus.publish(subjects.ctl(session), SessionEnd(session=session))
        await bus.close()

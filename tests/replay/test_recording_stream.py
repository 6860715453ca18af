"""The recording stream over real NATS: what it captures, and what it must not change."""

from __future__ import annotations

import asyncio

import pytest

from voxbus.bus import REPLY_HEADER
from voxbus.errors import StageUnavailable
from voxbus.recording import Recorder, RecordingError
from voxbus.subjects import Event, Stage
from voxbus.wire import AudioIn, LlmRequest, SessionStart, TurnEvent


async def test_work_requests_are_recorded_and_absent_stages_still_say_so(settings, bus):
    subjects = bus.subjects
    async with Recorder(settings.nats_url, settings.prefix) as rec:
        await rec.enable(max_age_s=60, max_bytes=2**20)
        await rec.enable(max_age_s=120, max_bytes=2**21)  # idempotent; retention updated
        info = await rec.js.stream_info(rec.stream)
        assert (info.config.max_age, info.config.max_bytes, info.config.no_ack) == (
            120, 2**21, True)
        try:
            # No orchestrator runs: NATS must still answer "no responders" at once, which a
            # stream over the work subjects would prevent.
            with pytest.raises(StageUnavailable, match="no replica is listening") as refused:
                await bus.request(subjects.work(Stage.ORCHESTRATOR),
                                  SessionStart(session="s1", agent="chat"), timeout=5.0)
            assert refused.value.reason == "no_responders"
            await bus.publish(subjects.audio_in("s1"),
                              AudioIn(seq=0, ts_us=1, sample_rate=16000, pcm=bytes(640)))
            reply = subjects.reply("s1", Stage.LLM, 1, 0)
            await bus.publish(subjects.work(Stage.LLM), LlmRequest(
                session="s1", turn=1, messages=[{"role": "user", "content": "hi"}]), reply=reply)
            await bus.publish(subjects.event("s1", Event.TURN),
                              TurnEvent(turn=1, state="user_ended", ts_us=1))
            # A frame whose session is not a valid id (built unchecked, as a stranger's client
            # could) is not copied, and nothing breaks.
            await bus.publish(subjects.work(Stage.LLM), LlmRequest.model_construct(
                session="a.b", turn=1, messages=[], tools=[], settings={}, attempt=0))
            await bus.nc.flush()

            # The stream stores without acknowledging: give a loaded server a moment.
            for _ in range(50):
                exported = await rec.export("s1")
                if len(exported.messages) >= 4:
                    break
                await asyncio.sleep(0.1)
            assert [m.subject for m in exported.messages] == [
                subjects.work_copy("s1", Stage.ORCHESTRATOR), subjects.audio_in("s1"),
                subjects.work_copy("s1", Stage.LLM), subjects.event("s1", Event.TURN)]
            assert exported.header.agent == "chat"
            assert exported.messages[2].headers[REPLY_HEADER] == reply
            assert isinstance(exported.messages[2].frame(), LlmRequest)
            assert [s.session for s in await rec.sessions()] == ["s1"]
            with pytest.raises(RecordingError, match="not in the recording stream"):
                await rec.export("nope")
        finally:
            await rec.js.delete_stream(rec.stream)
        with pytest.raises(RecordingError, match="nothing is recorded"):
            await rec.sessions()

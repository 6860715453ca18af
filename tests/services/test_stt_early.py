"""Early transcription (services/stt/early.py) on a real STT worker over a real nats-server:
the transcript made at the user's first pause is the one published at the VAD's stop, and a
user who goes on talking after that pause loses no words to it."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from services.stt.worker import SttWorker
from tests.services.test_tts_stt import next_final
from voxbus.audio import frames, read_wav
from voxbus.bus import now_us
from voxbus.subjects import Event, Stage
from voxbus.turns import normalize, word_errors
from voxbus.wire import AudioIn, SttClaim, SttClaimed, VadEvent, VadState

pytestmark = pytest.mark.slow

SILENCE = bytes(640)
VAD_STOP_FRAMES = 10  # the orchestrator's VAD: 0.2 s of silence before it says "stopped"


async def talk(bus, session: str, pcm: bytes) -> None:
    """``pcm`` in real time, 20 ms frames, with VAD events where the orchestrator's would be:
    started at the first frame, stopped after 0.2 s of trailing silence."""
    body = [*[SILENCE] * 5, *frames(pcm), *[SILENCE] * (VAD_STOP_FRAMES + 15)]
    stop_at = 5 + len(list(frames(pcm))) + VAD_STOP_FRAMES
    for seq, chunk in enumerate(body):
        await bus.publish(bus.subjects.audio_in(session),
                          AudioIn(seq=seq, ts_us=now_us(), sample_rate=16000, pcm=chunk))
        if seq in (5, stop_at):
            state = VadState.STARTED if seq == 5 else VadState.STOPPED
            await bus.publish(bus.subjects.event(session, Event.VAD),
                              VadEvent(state=state, seq=seq, ts_us=now_us()))
        await asyncio.sleep(0.02)


async def transcribe(settings, bus, pcm: bytes, session: str):
    async with SttWorker(settings) as worker:
        claimed = await bus.request(bus.subjects.work(Stage.STT), SttClaim(session=session))
        assert isinstance(claimed, SttClaimed)
        waiter = asyncio.create_task(next_final(bus, session))
        await asyncio.sleep(0.05)
        await talk(bus, session, pcm)
        transcript = await waiter
        return transcript.text, worker.streams[session].stt.early


async def test_the_pause_transcript_is_the_segments(settings, bus, speak):
    said = "What is the capital of France?"
    text, early = await transcribe(settings, bus, read_wav(speak(said, lead_s=0.0)), "e1")
    assert early.used == 1, (early.used, early.wasted)
    wrong, words = word_errors(said, text)
    assert wrong <= 1, text


async def test_speech_after_the_pause_is_not_lost(settings, bus, speak):
    """A 0.15 s pause: long enough for an early run, too short for the VAD to stop. The run
    made on the first half must not stand for the whole segment."""
    first, second = "I would like to book a table", "for four people tomorrow evening."
    pcm = (read_wav(speak(first, lead_s=0.0)) + SILENCE * 8
           + read_wav(speak(second, lead_s=0.0)))
    text, early = await transcribe(settings, bus, pcm, "e2")
    heard = normalize(text)
    assert early.wasted >= 1, (early.used, early.wasted, text)
    for word in ("table", "people", "tomorrow", "evening"):
        assert word in heard, text


async def test_off_transcribes_at_the_stop(settings, bus, speak):
    off = replace(settings, stt_early=False)
    text, early = await transcribe(off, bus, read_wav(speak("Why is the sky blue?", lead_s=0.0)),
                                   "e3")
    assert early is None and "sky" in normalize(text), text

"""Ending the user's turn on the words as well as the audio (services/orchestrator/turn_end.py).

A pause inside a sentence (spoken whole, then parted: voxbus.caller.pause_inside) does not cut
the person off, and an answer speculated during the pause is never played; a turn that ends
the way it was speculated is answered by the held reply, without asking the LLM twice.
Speech, VAD, Whisper, Smart Turn and Piper are real; the LLM is scripted so a reply shows
which words it answered.
"""

from __future__ import annotations

import time
from dataclasses import replace
from types import SimpleNamespace

import pytest

from services.llm.worker import LlmWorker
from services.orchestrator.worker import OrchestratorWorker
from services.stt.engine import load_model
from services.stt.worker import SttWorker
from services.tts.worker import TtsWorker
from tests.e2e.caller import Caller
from tests.scripted_openai import ScriptedOpenAI, Step
from voxbus.audio import WIRE_RATE, read_wav
from voxbus.caller import pause_inside
from voxbus.subjects import Stage
from voxbus.wire import AudioOut, BotText, TtsRequest, TurnEvent

pytestmark = pytest.mark.slow


@pytest.fixture
async def system(settings, tmp_path):
    asked: list[tuple[float, str]] = []

    def echo(body: dict) -> Step:
        said = str(body["messages"][-1].get("content", ""))
        asked.append((time.monotonic(), said))
        return Step(text=f"You said: {said}")

    endpoint = await ScriptedOpenAI(echo).start()
    # An agent that waits 1.2 s whatever the words say: the wait (and so the speculation)
    # does not hang on how Whisper happens to punctuate a segment.
    (tmp_path / "patient.yaml").write_text(
        "system_prompt: You are a restaurant host.\n"
        "turn: {question_stop_s: 1.2, statement_stop_s: 1.2}\n")
    s = replace(settings, llm_model="scripted", agents_dir=str(tmp_path))
    services = [SttWorker(s), TtsWorker(s), LlmWorker(s, base_url=endpoint.base_url),
                OrchestratorWorker(s)]
    for svc in services:
        await svc.start()
    yield SimpleNamespace(settings=s, asked=asked)
    for svc in reversed(services):
        await svc.stop()
    await endpoint.stop()


def silence(seconds: float) -> bytes:
    return bytes(int(seconds * WIRE_RATE) * 2)


@pytest.mark.parametrize("sentence, after", [
    ("I'd like to book a table for four people tonight.", "table"),
    ("I would like to book a table for four people tonight.", "for"),
])
async def test_a_pause_inside_a_sentence_does_not_end_the_turn(system, speak, sentence, after):
    whisper = load_model(system.settings)
    paused = pause_inside(read_wav(speak(sentence)), after, 0.8, whisper)
    async with Caller(system.settings, "chat") as caller:
        said_for = caller.say(paused)
        all_said = time.monotonic() + said_for
        reply = await caller.wait_for(lambda f: isinstance(f, AudioOut), 40, "the reply")
        assert reply.at > all_said, f"answered before the user had finished: {caller.said()}"
        ended = [h for h in caller.frames_of(TurnEvent) if h.frame.state == "user_ended"]
        assert len(ended) == 1 and ended[0].at > all_said - 0.1, "\n".join(caller.said())
        await caller.wait_for(lambda f: isinstance(f, BotText), 10, "the reply's words")
        spoken = " ".join(h.frame.text for h in caller.frames_of(BotText)).lower()
        # Whatever was speculated on the words before the pause was never said.
        assert "four" in spoken and "people" in spoken, "\n".join([spoken, *caller.said()])


async def test_a_turn_that_ends_as_speculated_is_answered_once(system, speak):
    # A question, then silence: the patient agent speculates while it waits out its 1.2 s,
    # and the turn then ends with the same words.
    question = read_wav(speak("Could you book me a table for tonight?", tail_s=0.0))
    async with Caller(system.settings, "patient") as caller:
        synthesis: list[tuple[float, TtsRequest]] = []

        async def tts_work(frame, _msg):
            if isinstance(frame, TtsRequest):
                synthesis.append((time.monotonic(), frame))

        await caller.bus.subscribe(caller.bus.subjects.work_copy(caller.session, Stage.TTS),
                                   tts_work)
        caller.say(question + silence(3.0))
        await caller.wait_for(lambda f: isinstance(f, AudioOut), 40, "the reply")
        ended = next(h for h in caller.frames_of(TurnEvent) if h.frame.state == "user_ended")
        assert len(system.asked) == 1, f"the LLM was asked {len(system.asked)} times"
        asked_at, words = system.asked[0]
        assert "table" in words.lower(), words
        assert asked_at < ended.at, "the answer was not started before the turn ended"
        spoken = " ".join(h.frame.text for h in caller.frames_of(BotText)).lower()
        assert "table" in spoken, spoken
        # The reply's first words were synthesized while it was held, and only then.
        first = [(t, r) for t, r in synthesis if r.turn == ended.frame.turn]
        assert first and first[0][0] < ended.at, "the first words waited for the turn end"
        texts = [r.text for _, r in first]
        assert len(texts) == len(set(texts)), f"a sentence was synthesized twice: {texts}"

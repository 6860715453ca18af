"""Turn-taking with timed audio over the bus: the agent's own echo does not interrupt it, a word
minimum keeps "okay" from cutting it off, and a silent user is prompted, then hung up on.

The LLM is scripted (so replies have a known length); speech, VAD, Whisper, Smart Turn, Pipecat's
turn strategies and Piper are real.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from services.llm.worker import LlmWorker
from services.orchestrator.worker import OrchestratorWorker
from services.stt.worker import SttWorker
from services.tts.worker import TtsWorker
from tests.e2e.caller import Caller
from tests.scripted_openai import ScriptedOpenAI, Step
from voxbus.audio import duration_s, read_wav
from voxbus.wire import AudioFlush, AudioOut, BotText, SessionEnd, Transcript, TurnEvent

pytestmark = pytest.mark.slow

LONG = ("Our menu changes with the seasons. Tonight we have a mushroom risotto with parmesan. "
        "There is also a grilled sea bass with lemon and fennel. For dessert there is a dark "
        "chocolate tart. And the wine list has a lovely Burgundy by the glass.")
SHORT = "Paris is the capital of France."
STILL_THERE = "Are you still there?"

AGENTS = {
    "speaker": "turn: {echo_gate: true}",
    "speaker_no_gate": "turn: {echo_gate: false}",
    "eager": "turn: {interruption_min_words: 0}",
    "patient": "turn: {interruption_min_words: 3}",
    "idler": "turn: {idle_timeout_s: 1.5, idle_prompts: 1}",
    "stoic": "turn: {false_interruption_prompt: null}",
}
RESUMED = "As I was saying, the wine list has a lovely Burgundy."


def host(body: dict) -> Step:
    system = body["messages"][0]["content"]
    last = str(body["messages"][-1].get("content", ""))
    if "silent for a while" in last:
        return Step(text=STILL_THERE)
    if "cut you off" in last:
        return Step(text=RESUMED)
    return Step(text=SHORT if "IDLER" in system else LONG)


@pytest.fixture
async def system(settings, tmp_path):
    for name, turn in AGENTS.items():
        (tmp_path / f"{name}.yaml").write_text(
            f"system_prompt: You are {name.upper()}, a restaurant host.\n{turn}\n")
    endpoint = await ScriptedOpenAI(host).start()
    s = replace(settings, llm_model="scripted", agents_dir=str(tmp_path))
    orchestrator = OrchestratorWorker(s)
    services = [SttWorker(s), TtsWorker(s), LlmWorker(s, base_url=endpoint.base_url),
                orchestrator]
    for svc in services:
        await svc.start()
    yield SimpleNamespace(settings=s, orchestrator=orchestrator, endpoint=endpoint)
    for svc in reversed(services):
        await svc.stop()
    await endpoint.stop()


def flushed_after(caller: Caller, since: float) -> bool:
    return bool(caller.frames_of(AudioFlush, since))


async def reply_started(caller: Caller) -> float:
    first = await caller.wait_for(lambda f: isinstance(f, AudioOut), 40, "the agent's reply")
    return first.at


@pytest.mark.parametrize("gate", [True, False], ids=["gated", "ungated"])
async def test_agents_echo_does_not_interrupt_it(system, speak, gate):
    s, orchestrator = system.settings, system.orchestrator
    question = read_wav(speak("What is on the menu tonight?"))
    agent = "speaker" if gate else "speaker_no_gate"
    async with Caller(s, agent, echo_gain=0.5, echo_delay_s=0.12) as caller:
        caller.say(question)
        started = await reply_started(caller)
        if gate:
            await caller.wait_for(lambda f: isinstance(f, TurnEvent) and f.state == "bot_stopped",
                                  60, "the end of the reply")
            audio = b"".join(h.frame.pcm for h in caller.frames_of(AudioOut))
            assert not flushed_after(caller, started), "the agent interrupted itself"
            assert duration_s(audio) > 10  # the whole reply was played
            assert orchestrator.runners[caller.session].echo_gate.gated > 100
        else:
            # The control: the same echo without the gate cuts the agent off.
            await caller.wait_for(lambda f: isinstance(f, AudioFlush), 30, "a self-interruption")


@pytest.mark.parametrize("agent", ["eager", "patient"])
async def test_word_minimum_for_interruptions(system, speak, agent):
    s = system.settings
    question, okay = read_wav(speak("What is on the menu tonight?")), read_wav(speak("Okay."))
    stop = read_wav(speak("Wait, please stop, I have another question."))
    async with Caller(s, agent) as caller:
        caller.say(question)
        await reply_started(caller)
        await asyncio.sleep(1.0)
        said_okay = time.monotonic()
        caller.say(okay)
        if agent == "eager":  # any speech interrupts
            await caller.wait_for(lambda f: isinstance(f, AudioFlush), 8, "the interruption")
            return
        await asyncio.sleep(3.0)  # "okay" has been heard and transcribed by now
        assert not flushed_after(caller, said_okay), "one word interrupted the agent"
        assert not caller.frames_of(TurnEvent, said_okay) or all(
            h.frame.state != "bot_stopped" for h in caller.frames_of(TurnEvent, said_okay))
        caller.say(stop)
        await caller.wait_for(lambda f: isinstance(f, AudioFlush), 10, "the interruption")


async def test_silent_user_is_prompted_then_hung_up_on(system, speak):
    s = system.settings
    async with Caller(s, "idler") as caller:
        caller.say(read_wav(speak("What is the capital of France?")))
        done = await caller.wait_for(
            lambda f: isinstance(f, TurnEvent) and f.state == "bot_stopped", 40, "the answer")
        prompt = await caller.wait_for(
            lambda f: isinstance(f, BotText) and f.text == STILL_THERE, 20, "an idle prompt")
        assert prompt.at - done.at >= 1.5  # not before the idle timeout
        end = await caller.wait_for(lambda f: isinstance(f, SessionEnd), 30, "the hang-up")
        assert end.frame.reason == "user idle"
        said = [h.frame.text for h in caller.frames_of(BotText)]
        assert said[0] == SHORT and said[1] == STILL_THERE and "Goodbye" in said[-1], said
        assert len(caller.frames_of(AudioOut, prompt.at)) > 50  # the goodbye was spoken


def humming(speech: bytes) -> bytes:
    """A hum with the rhythm of speech: Silero hears a voice, Whisper hears no words.

    A voiced-like tone (150 Hz and four overtones) under the speech's envelope. Measured over
    150 pauses before it, Silero starts on it every time (a pure tone missed 1 in 10, as its
    state after the question varied); Whisper's no-speech probability stays at 0.92 or more
    on any slice of it, far above the 0.6 that keeps words.
    """
    x = np.frombuffer(speech, "<i2").astype(np.float64)
    envelope = np.sqrt(np.convolve(x ** 2, np.ones(160) / 160, "same"))[:32000]
    phase = 2 * np.pi * 150 * np.arange(envelope.size) / 16000
    tone = sum(np.sin(k * phase) / k for k in range(1, 6))
    tone /= np.sqrt(2 * np.mean(tone ** 2))  # a pure sine's loudness
    return np.clip(tone * envelope * 2.4, -32768, 32767).astype("<i2").tobytes()


@pytest.mark.parametrize("agent", ["eager", "stoic"])
async def test_false_interruption_recovery(system, speak, agent):
    s = system.settings
    question = read_wav(speak("What is on the menu tonight?"))
    hum = humming(read_wav(speak("Well, I was thinking about maybe having something different.",
                                 lead_s=0)))
    async with Caller(s, agent) as caller:
        caller.say(question)
        await reply_started(caller)
        await asyncio.sleep(1.5)
        hummed = time.monotonic()
        caller.say(hum)
        await caller.wait_for(lambda f: isinstance(f, AudioFlush), 10, "the interruption",
                              since=hummed)
        if agent == "eager":  # the default: the agent picks up where it was cut off
            # Its first clause ("As I was saying,") is spoken alone, then the rest.
            rest = RESUMED.split(", ", 1)[1]
            await caller.wait_for(lambda f: isinstance(f, BotText) and f.text == rest, 20,
                                  "the agent resuming")
        else:  # recovery off: it stays quiet and waits for the user
            await asyncio.sleep(6)
            assert not caller.frames_of(BotText, hummed + 0.5)
        # It really was no speech: the STT stage heard no words in the hum.
        assert not [h for h in caller.frames_of(Transcript, hummed) if h.frame.text]


"""A turn the stages complete without an answer in it still gets one: an LLM that replies with
nothing (a small model that stops at once, or only whitespace) is an error event and the agent's
fallback line, not silence."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from services.llm.worker import LlmWorker
from services.orchestrator.worker import OrchestratorWorker
from services.stt.worker import SttWorker
from services.tts.worker import TtsWorker
from tests.e2e.caller import Caller
from tests.faults.test_replica_loss import errors
from tests.scripted_openai import ScriptedOpenAI, Step
from voxbus.audio import read_wav
from voxbus.wire import AudioOut, BotText

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("reply", ["", " \n "])
async def test_empty_llm_reply_gets_the_fallback_line(settings, speech_wav, reply):
    endpoint = await ScriptedOpenAI(lambda _b: Step(text=reply)).start()
    s = replace(settings, llm_model="scripted")
    services = [SttWorker(s), TtsWorker(s), LlmWorker(s, base_url=endpoint.base_url),
                OrchestratorWorker(s)]
    for svc in services:
        await svc.start()
    try:
        async with Caller(s, "chat") as caller:
            start = time.monotonic()
            caller.say(read_wav(speech_wav))
            said = await caller.wait_for(lambda f: isinstance(f, BotText) and f.text.strip(),
                                         40, "the agent saying something")
            assert "having trouble" in said.frame.text, said.frame
            await caller.wait_for(lambda f: isinstance(f, AudioOut), 20, "its audio")
            assert caller.frames_of(AudioOut, start)
            assert any("empty" in e.message for e in errors(caller)), errors(caller)
    finally:
        for svc in reversed(services):
            await svc.stop()
        await endpoint.stop()

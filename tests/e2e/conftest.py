"""The restaurant booking as a scripted waiter: a real OpenAI-compatible HTTP server that answers
by what the request offers, so each flow node's tool is called deterministically; everything
else (speech, Whisper, Smart Turn, Pipecat Flows, Piper) is real."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from services.llm.worker import LlmWorker
from services.stt.worker import SttWorker
from services.tts.worker import TtsWorker
from tests.scripted_openai import ScriptedOpenAI, Step

SAYS = {  # node (recognised by the tool it offers) → what the agent says there
    "record_party_size": "Welcome to Chez Voxbus. For how many people?",
    "record_date_time": "Lovely. For which day and time?",
    "confirm_booking": "A table for four on Friday at seven thirty. Shall I book it?",
    None: "You are booked. Thank you and goodbye!",
}
CALLS = {  # what the caller's answer at that node turns into
    "record_party_size": {"party_size": 4},
    "record_date_time": {"date": "Friday", "time": "7:30 pm"},
    "confirm_booking": {},
}
WALK = [  # (node after the turn, tool calls in the turn) for greeting + three answers
    ("greet", []),
    ("collect_date_time", ["record_party_size"]),
    ("confirm", ["record_date_time"]),
    ("goodbye", ["confirm_booking"]),
]


def waiter(body: dict) -> Step:
    offered = [t["function"]["name"] for t in body.get("tools", [])]
    node_tool = next((name for name in CALLS if name in offered), None)
    if body["messages"][-1]["role"] == "user" and node_tool:
        return Step(tool_calls=[{"name": node_tool, "arguments": CALLS[node_tool]}])
    return Step(text=SAYS[node_tool])


@pytest.fixture
def answers(speak) -> list[str]:
    """The caller's side of the booking; the fourth is never heard (the agent hangs up)."""
    return [speak("A table for four people, please."), speak("On Friday at seven thirty."),
            speak("Yes, that is right."), speak("Hello? Are you still there?")]


@pytest.fixture
async def waiter_stages(settings):
    """STT, TTS and an LLM stage on the scripted waiter; the test brings its orchestrators."""
    endpoint = await ScriptedOpenAI(waiter).start()
    s = replace(settings, llm_model="scripted")
    services = [SttWorker(s), TtsWorker(s), LlmWorker(s, base_url=endpoint.base_url)]
    for svc in services:
        await svc.start()
    yield SimpleNamespace(settings=s, endpoint=endpoint)
    for svc in reversed(services):
        await svc.stop()
    await endpoint.stop()



@pytest.fixture(autouse=True)
async def _hang_report():
    """A whole conversation takes under a minute: past 150 s, print every task's stack (from a
    thread, so it works when the loop is stuck) so a hang in CI says where it is."""
    import asyncio
    import sys
    import threading
    import time

    loop = asyncio.get_running_loop()

    def dump():
        time.sleep(150)
        if loop.is_closed():
            return
        for task in asyncio.all_tasks(loop):
            print(f"--- {task!r}"[:300], file=sys.stderr)
            coro = task.get_coro()
            while coro is not None:
                frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
                if frame is None:
                    print(f"    awaiting {coro!r}"[:300], file=sys.stderr)
                    break
                print(f"    {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}",
                      file=sys.stderr)
                coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        sys.stderr.flush()

    threading.Thread(target=dump, daemon=True).start()
    yield

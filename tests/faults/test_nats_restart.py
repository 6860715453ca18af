"""nats-server restarted mid-session (same port, same JetStream folder): every service reconnects
by itself, the session goes on, and its recording and stored state survive."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
from prometheus_client import REGISTRY

from services.llm.worker import LlmWorker
from services.orchestrator.session_store import SessionStore
from services.orchestrator.worker import OrchestratorWorker
from services.stt.worker import SttWorker
from services.tts.worker import TtsWorker
from tests.conftest import bounded
from tests.e2e.caller import Caller
from tests.faults.test_replica_loss import ANSWER, answered, errors
from tests.scripted_openai import ScriptedOpenAI, Step
from voxbus.audio import read_wav
from voxbus.natsd import NatsServer
from voxbus.recording import Recorder
from voxbus.wire import BotText

pytestmark = pytest.mark.slow


@pytest.fixture
def own_nats(tmp_path):
    """A nats-server of the test's own, so the test can restart it."""
    server = NatsServer(store_dir=str(tmp_path / "js")).start()
    yield server
    server.stop()


async def test_session_survives_a_nats_server_restart(own_nats, settings, speak):
    s = replace(settings, nats_url=own_nats.url, heartbeat_s=0.25, lease_s=2.0,
                llm_model="scripted")
    endpoint = await ScriptedOpenAI(lambda _b: Step(text=ANSWER)).start()
    async with Recorder(s.nats_url, s.prefix) as recorder:
        await recorder.enable(max_age_s=3600, max_bytes=64 * 2**20)
    orchestrator = OrchestratorWorker(s)
    services = [SttWorker(s), TtsWorker(s), LlmWorker(s, base_url=endpoint.base_url),
                orchestrator]
    for svc in services:
        await svc.start()
    reconnects = REGISTRY.get_sample_value("voxbus_nats_reconnects_total") or 0.0
    try:
        async with Caller(s, "chat") as caller:
            start = time.monotonic()
            caller.say(read_wav(speak("Hello there.")))
            await bounded(answered(caller, start), 40, "the first answer")
            await asyncio.sleep(1.5)  # the agent finished; the state was saved

            await asyncio.to_thread(own_nats.stop)  # the store folder is the test's: it stays
            await asyncio.sleep(1.0)
            await asyncio.to_thread(own_nats.start)
            restarted = time.monotonic()

            second = time.monotonic()
            caller.say(read_wav(speak("What is the capital of France?")))
            await bounded(caller.wait_for(
                lambda f: isinstance(f, BotText) and f.text and caller.frames_of(
                    BotText, second), 60, "the answer after the restart"), 70, "second turn")
            assert caller.frames_of(BotText, second), "no answer after the restart"
            assert orchestrator.runners.get(caller.session), "the session was dropped"
            assert time.monotonic() - restarted < 60
            assert not [e for e in errors(caller) if not e.retryable], errors(caller)
            # Each of the four services (and the caller) counted its reconnect.
            assert REGISTRY.get_sample_value("voxbus_nats_reconnects_total") >= reconnects + 4
        # What JetStream held survived the restart: the session's recording (both turns) and
        # its stored state (the store still follows the bucket).
        async with Recorder(s.nats_url, s.prefix) as recorder:
            rec = await recorder.export(caller.session)
        said = [m for m in rec.messages if m.subject.endswith(".evt.bot")]
        assert len(said) >= 2, [m.subject for m in rec.messages][-20:]
        store = orchestrator.store
        assert isinstance(store, SessionStore)
    finally:
        for svc in reversed(services):
            await svc.stop()
        await endpoint.stop()

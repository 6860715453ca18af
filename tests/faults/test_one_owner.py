"""One owner per session, always: an orchestrator that was frozen long enough to be presumed dead
(SIGSTOP past its lease) comes back after another replica adopted its session, and stops at
once, from the session's KV entry, without waiting for its next save."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import replace

import pytest

from services.llm.worker import LlmWorker
from services.orchestrator.worker import OrchestratorWorker
from services.stt.worker import SttWorker
from services.tts.worker import TtsWorker
from tests.e2e.caller import Caller
from tests.faults.replicas import FAST_HEARTBEAT_S, FAST_LEASE_S, Replicas
from tests.faults.test_replica_loss import ANSWER, answered, errors
from tests.scripted_openai import ScriptedOpenAI, Step
from voxbus.audio import read_wav
from voxbus.bus import Bus
from voxbus.subjects import Stage, Subjects
from voxbus.wire import Heartbeat, TurnEvent

pytestmark = pytest.mark.slow


async def test_presumed_dead_owner_stops_when_it_wakes(settings, speech_wav):
    fast = replace(settings, heartbeat_s=FAST_HEARTBEAT_S, lease_s=FAST_LEASE_S,
                   llm_model="scripted")
    endpoint = await ScriptedOpenAI(lambda _b: Step(text=ANSWER)).start()
    replicas = Replicas(fast)
    services = [SttWorker(fast), TtsWorker(fast), LlmWorker(fast, base_url=endpoint.base_url)]
    for svc in services:
        await svc.start()
    frozen = await replicas.start("orchestrator", "frozen")
    standby = OrchestratorWorker(replace(fast, worker_id="standby"))
    beats: dict[str, tuple[float, Heartbeat]] = {}
    bus = await Bus.connect(fast.nats_url, Subjects(fast.prefix), "test")

    async def beat(frame, _msg):
        if isinstance(frame, Heartbeat):
            beats[frame.worker] = (time.monotonic(), frame)

    await bus.subscribe(bus.subjects.heartbeat(Stage.ORCHESTRATOR), beat)
    try:
        async with Caller(fast, "chat") as caller:  # only the frozen-to-be replica runs yet
            await standby.start()
            frozen.signal(signal.SIGSTOP)
            adopted = await caller.wait_for(lambda f: isinstance(f, TurnEvent) and
                                            f.state == "resumed", 15, "the adoption")
            assert caller.session in standby.runners
            start = time.monotonic()
            caller.say(read_wav(speech_wav))
            await answered(caller, start)

            woke = time.monotonic()
            frozen.signal(signal.SIGCONT)

            def let_go() -> bool:
                at, hb = beats.get(frozen.id, (0.0, None))
                return at > woke and hb is not None and caller.session not in hb.sessions

            while not let_go():
                assert time.monotonic() - woke < 5, frozen.output()
                await asyncio.sleep(0.05)
            assert "owned by orchestrator-standby now" in frozen.output(), frozen.output()
            assert caller.session in standby.runners, "the adopter lost the session"
            assert time.monotonic() - woke < 5
            assert adopted and not errors(caller), errors(caller)
    finally:
        frozen.signal(signal.SIGCONT)
        replicas.close()
        await standby.stop()
        for svc in reversed(services):
            await svc.stop()
        await bus.close()
        await endpoint.stop()

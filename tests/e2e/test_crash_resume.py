"""An orchestrator replica is SIGKILLed mid-booking; another adopts the session from JetStream KV
and the conversation carries on at the same flow node with the same context."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from services.orchestrator.worker import OrchestratorWorker
from tests.conftest import bounded
from tests.e2e.conftest import WALK
from voxbus.talk import talk

pytestmark = pytest.mark.slow

LEASE_S = 1.5


def start_replica(s, worker_id: str) -> subprocess.Popen:
    env = {**os.environ, "VOXBUS_NATS_URL": s.nats_url, "VOXBUS_PREFIX": s.prefix,
           "VOXBUS_WORKER_ID": worker_id, "VOXBUS_HEARTBEAT_S": "0.2",
           "VOXBUS_LEASE_S": str(LEASE_S), "VOXBUS_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "voxbus.cli", "orchestrator"], env=env,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stdout:  # "<worker> ready" once it takes sessions
        if line.rstrip().endswith(" ready"):
            return proc
    raise RuntimeError(f"orchestrator {worker_id} exited ({proc.wait()}) before it was ready")


async def test_killed_orchestrator_session_resumes_on_another(waiter_stages, answers):
    s = replace(waiter_stages.settings, lease_s=LEASE_S)
    endpoint = waiter_stages.endpoint
    doomed = await asyncio.to_thread(start_replica, s, "doomed")
    standby = OrchestratorWorker(replace(s, worker_id="standby"))
    takeover: dict[str, float] = {}

    async def between_turns(result) -> None:
        if result.node == "greet":  # the session is running on the doomed replica
            await standby.start()
        elif result.node == "collect_date_time":
            killed_at = time.monotonic()
            os.killpg(doomed.pid, signal.SIGKILL)
            while result.session not in standby.runners:
                assert time.monotonic() - killed_at < 15, "no replica adopted the session"
                await asyncio.sleep(0.05)
            takeover["s"] = time.monotonic() - killed_at

    try:
        turns = await bounded(talk(s.nats_url, answers, prefix=s.prefix, agent="restaurant",
                                   turn_timeout_s=30, on_turn=between_turns), 240, "the booking")
    finally:
        if doomed.poll() is None:
            os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait()
        await standby.stop()

    assert "s" in takeover, [(t.node, t.user_text, t.bot_text) for t in turns]
    print(f"session adopted {takeover['s']:.2f} s after the SIGKILL (lease {LEASE_S} s)")
    assert takeover["s"] < 3 * LEASE_S + 2
    # The same walk as without a crash: the adopted session went on at collect_date_time.
    assert [(t.node, t.tool_calls) for t in turns] == WALK, [
        (t.user_text, t.bot_text, t.errors) for t in turns]
    # Context carried over: the first request the standby made still holds turn 1's words and
    # the party size recorded before the crash; the flow state filled the goodbye prompt.
    after = [json.dumps(r["messages"]) for r in endpoint.requests
             if "record_date_time" in json.dumps(r.get("tools", []))][-1]
    assert "four" in after.lower() and '"party_size": 4' in after.replace('\\"', '"'), after
    goodbye = json.dumps(endpoint.requests[-1]["messages"])
    assert "table for 4 on Friday at 7:30 pm" in goodbye, goodbye[-600:]

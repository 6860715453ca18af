"""The control plane against real replicas on a real nats-server: a ControlService serving real
gRPC on a free port, LLM replicas on the scripted endpoint (no model), and `voxbus ctl` run as a
subprocess exactly as an operator runs it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from types import SimpleNamespace

import grpc
import pytest

from tests.scripted_openai import ScriptedOpenAI, Step
from voxbus.control.auth import bearer
from voxbus.control.protos import pb, rpc
from voxbus.control.service import ControlService

TOKEN = "test-token-" + "x" * 24
LEASE_S = 1.0
"""Replicas here heartbeat every 0.2 s; one silent for 1 s has left."""


def answer(_body: dict) -> Step:
    return Step(text="Paris is the capital of France.")


@pytest.fixture
async def endpoint():
    server = await ScriptedOpenAI(answer).start()
    yield server
    await server.stop()


@pytest.fixture
def fast(settings):
    """The test's settings with a short lease and a free control port."""
    return replace(settings, lease_s=LEASE_S, control_address="127.0.0.1:0",
                   control_token=TOKEN, llm_model="scripted")


@pytest.fixture
async def control(fast):
    service = await ControlService(replace(fast, worker_id="ctl")).start()
    yield service
    await service.stop()


@pytest.fixture
async def api(control):
    """A real gRPC client: ``api.stub`` and ``api.auth`` (the token's metadata)."""
    channel = grpc.aio.insecure_channel(control.address)
    yield SimpleNamespace(stub=rpc.ControlStub(channel), auth=bearer(TOKEN), channel=channel,
                          address=control.address)
    await channel.close()


@pytest.fixture
async def replicas():
    """Services a test started (append them), stopped at its end in reverse; stopping one the
    test already stopped is a no-op."""
    running: list = []
    yield running
    for svc in reversed(running):
        await svc.stop()


@pytest.fixture
def llm_worker(fast, endpoint, replicas):
    """``await llm_worker("a")``: a started LLM replica ``llm-a`` on the scripted endpoint."""
    from services.llm.worker import LlmWorker

    async def make(worker_id: str):
        worker = await LlmWorker(replace(fast, worker_id=worker_id),
                                 base_url=endpoint.base_url).start()
        replicas.append(worker)
        return worker

    return make


@dataclass
class Ctl:
    rc: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)

    def lines(self) -> list:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]


def ctl_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXBUS_CONTROL")}
    env["VOXBUS_CONTROL_FILE"] = str(tmp_path / "none.json")  # never the operator's own file
    return env


async def ctl(address: str, *args: str, token: str = TOKEN, env=None,
              timeout_s: float = 60.0) -> Ctl:
    """``voxbus ctl --address A --token T ARGS...`` as a subprocess."""
    argv = [sys.executable, "-m", "voxbus.cli", "ctl", "--address", address]
    if token:
        argv += ["--token", token]
    proc = await asyncio.create_subprocess_exec(
        *argv, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env)
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    return Ctl(proc.returncode, out.decode(), err.decode())


async def until(check, what: str, timeout_s: float = 15.0, every_s: float = 0.05):
    """Poll ``check()`` (sync or async) until it returns something truthy; fail after the
    bound with ``what``. A bound on a hang, not a timing assertion."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} (waited {timeout_s:.0f} s)")
        await asyncio.sleep(every_s)


async def workers(api) -> dict:
    reply = await api.stub.ListWorkers(pb.ListWorkersRequest(), metadata=api.auth)
    return {w.id: w for w in reply.workers}


class Events:
    """A WatchEvents stream read in the background, so a test can wait for an event."""

    def __init__(self, api, replay_current: bool = False):
        self.call = api.stub.WatchEvents(pb.WatchEventsRequest(replay_current=replay_current),
                                         metadata=api.auth)
        self.seen: list = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for event in self.call:
            self.seen.append(event)

    async def wait_for(self, kind, *, timeout_s: float = 15.0, **match):
        def found():
            for e in self.seen:
                if e.kind == kind and all(getattr(e, k) == v for k, v in match.items()):
                    return e
            return None

        saw = [(pb.Event.Kind.Name(e.kind), e.detail) for e in self.seen]
        return await until(found, f"no {pb.Event.Kind.Name(kind)} event matching {match}; "
                                  f"saw {saw}", timeout_s)

    async def close(self) -> None:
        self.call.cancel()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def events(api):
    stream = Events(api)
    yield stream
    await stream.close()

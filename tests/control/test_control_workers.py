"""ListWorkers, DrainWorker and replica events against real LLM replicas (scripted endpoint, no
model), through gRPC and through `voxbus ctl`."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import replace

import grpc
import pytest

from tests.control.conftest import ctl, ctl_env, until, workers
from tests.scripted_openai import ScriptedOpenAI, Step
from voxbus import __version__
from voxbus.config import Settings
from voxbus.control.protos import pb
from voxbus.errors import StageUnavailable
from voxbus.runner import DEFAULT_CAPACITY
from voxbus.subjects import Stage
from voxbus.supervisor import Child, Supervisor
from voxbus.wire import LlmDone, LlmRequest

Kind = pb.Event.Kind


def request(turn: int) -> LlmRequest:
    return LlmRequest(session="s1", turn=turn, messages=[{"role": "user", "content": "Hi"}])


async def test_list_workers_shows_load_capacity_and_version(fast, control, api, llm_worker,
                                                            tmp_path):
    slow = await ScriptedOpenAI(lambda _b: Step(text="slow answer", delay_s=3.0)).start()
    from services.llm.worker import LlmWorker

    busy = await LlmWorker(replace(fast, worker_id="busy"), base_url=slow.base_url).start()
    idle = await llm_worker("idle")
    try:
        seen = await until(lambda: _with(workers(api), "llm-busy", "llm-idle", "control-ctl"),
                           "every replica in ListWorkers")
        for w in seen.values():
            assert w.version == __version__
            assert 0.0 <= w.load <= 1.0 and not w.draining and w.last_seen_unix_ms > 0
        assert seen["llm-idle"].capacity == DEFAULT_CAPACITY[Stage.LLM]
        assert seen["control-ctl"].stage == "control"

        # One request in flight on the busy replica (its endpoint waits 3 s): load 1/capacity.
        bus = control.bus
        reply = bus.subjects.reply("s1", Stage.LLM, 1)
        done = asyncio.get_running_loop().create_future()

        async def on_reply(frame, _msg):
            if isinstance(frame, LlmDone) and not done.done():
                done.set_result(frame)

        sub = await bus.subscribe(reply, on_reply)
        await idle.drain()  # so the queue group can only hand it to the busy one,
        await idle.bus.nc.flush()  # once the server has its unsubscribe
        await bus.publish(bus.subjects.work(Stage.LLM), request(1), reply=reply)
        loaded = await until(lambda: _loaded(workers(api), "llm-busy"),
                             "the busy replica's heartbeat shows its request")
        assert loaded.inflight == 1
        assert loaded.load == pytest.approx(1 / DEFAULT_CAPACITY[Stage.LLM])

        # The same through voxbus ctl, as JSON and as a table.
        out = await ctl(api.address, "workers", "--stage", "llm", "--json",
                        env=ctl_env(tmp_path))
        assert out.rc == 0, out.err
        rows = {w["id"]: w for w in out.json()["workers"]}
        assert set(rows) == {"llm-busy", "llm-idle"}
        assert rows["llm-busy"]["inflight"] == 1 and rows["llm-busy"]["version"] == __version__
        assert rows["llm-busy"]["capacity"] == DEFAULT_CAPACITY[Stage.LLM]
        assert rows["llm-idle"]["draining"] is True
        table = await ctl(api.address, "workers", env=ctl_env(tmp_path))
        assert table.rc == 0, table.err
        line = next(r for r in table.out.splitlines() if r.startswith("llm-busy"))
        assert "0.25" in line and __version__ in line, table.out
        assert "draining" in next(r for r in table.out.splitlines() if r.startswith("llm-idle"))
        await asyncio.wait_for(done, 15)
        await sub.unsubscribe()
    finally:
        await busy.stop()
        await slow.stop()


async def _with(reply, *ids: str):
    found = await reply
    return found if all(i in found for i in ids) else None


async def _loaded(reply, worker: str):
    found = (await reply).get(worker)
    return found if found is not None and found.inflight > 0 else None


async def test_drain_worker_stops_it_taking_work_and_wait_returns_drained(
        fast, control, api, llm_worker, events):
    a = await llm_worker("a")
    b = await llm_worker("b")
    await until(lambda: _with(workers(api), "llm-a", "llm-b"), "both replicas listed")
    reply = await api.stub.DrainWorker(pb.DrainWorkerRequest(worker="llm-a", wait=True,
                                                             timeout_s=20), metadata=api.auth)
    assert reply.accepted and reply.drained, reply
    assert reply.worker.id == "llm-a" and reply.worker.draining
    await events.wait_for(Kind.WORKER_DRAINING, worker="llm-a")
    await until(lambda: a.drained.is_set(), "the replica marked itself drained")
    # It takes no work: with b gone, a request finds nobody at all.
    bus = control.bus
    await b.stop()
    with pytest.raises(StageUnavailable):
        await bus.request(bus.subjects.work(Stage.LLM), request(3), timeout=1.0)
    # A replica nobody knows is NOT_FOUND, not a silent success.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await api.stub.DrainWorker(pb.DrainWorkerRequest(worker="llm-nobody"),
                                   metadata=api.auth)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


async def test_watch_streams_a_replica_joining_and_leaving(control, api, llm_worker, events,
                                                          tmp_path):
    watcher = asyncio.create_task(ctl(api.address, "watch", "--json", "--count", "2",
                                      env=ctl_env(tmp_path)))
    # The subprocess's stream is open once it sees the control replica's own events: give it
    # the replay of current state to know it is connected.
    current = await ctl(api.address, "watch", "--current", "--json", "--count", "1",
                        env=ctl_env(tmp_path))
    assert current.rc == 0 and current.lines()[0]["kind"] == "WORKER_JOINED", current
    await asyncio.sleep(1.0)  # let the first watcher connect (not a timing assertion)
    worker = await llm_worker("w")
    joined = await events.wait_for(Kind.WORKER_JOINED, worker="llm-w")
    assert joined.stage == "llm"
    await worker.stop()
    left = await events.wait_for(Kind.WORKER_LEFT, worker="llm-w")
    assert "left" in left.detail
    out = await asyncio.wait_for(watcher, 30)
    assert out.rc == 0, out.err
    kinds = [(e["kind"], e["worker"]) for e in out.lines()]
    assert kinds == [("WORKER_JOINED", "llm-w"), ("WORKER_LEFT", "llm-w")], out.out
    assert "llm-w" not in await workers(api)


async def test_a_drained_child_of_voxbus_up_exits_0_and_is_not_restarted(fast, control, api,
                                                                        endpoint, tmp_path):
    """The supervisor `voxbus up` uses, with a real `voxbus llm` process: `voxbus ctl drain
    --wait` makes it exit 0, and that is one line, not a restart."""
    lines: list[str] = []
    sup = Supervisor(emit=lines.append)
    env = dict(os.environ, VOXBUS_NATS_URL=fast.nats_url, VOXBUS_PREFIX=fast.prefix,
               VOXBUS_WORKER_ID="child", VOXBUS_HEARTBEAT_S="0.2", VOXBUS_LEASE_S="1",
               OPENAI_BASE_URL=endpoint.base_url, VOXBUS_LLM_MODEL="scripted")
    child = await sup.start(Child("llm-1", [sys.executable, "-m", "voxbus.cli", "llm"], env=env,
                                  ready_suffix=" ready", drained_suffix=" drained", tier=2,
                                  emit=lines.append))
    try:
        await sup.guard(asyncio.wait_for(child.until_ready(), 60))
        await until(lambda: _with(workers(api), "llm-child"), "the child replica listed")
        out = await ctl(api.address, "drain", "llm-child", "--wait", "--timeout", "30",
                        env=ctl_env(tmp_path))
        assert out.rc == 0, out.err
        assert "llm-child drained" in out.out, out.out
        await asyncio.wait_for(child.exited.wait(), 30)
        assert child.returncode == 0, lines
        await until(lambda: any("drained and exited (code 0)" in line for line in lines),
                    f"the supervisor's line; got {lines}")
        pid = child.proc.pid
        await until(lambda: "llm-child" not in _sync_ids(control),
                    "the drained replica leaves ListWorkers")
        # Not restarted: still the same, exited process, and no restart line.
        assert child.proc.pid == pid and child.proc.returncode == 0
        assert not any("restarting" in line for line in lines), lines
        assert not sup.failed.done()
    finally:
        await sup.stop()


def _sync_ids(control) -> set[str]:
    return set(control.state.workers)


async def test_workers_rejects_an_unknown_stage(api, tmp_path):
    out = await ctl(api.address, "workers", "--stage", "nope", env=ctl_env(tmp_path))
    assert out.rc == 1 and "unknown stage 'nope'" in out.err, out


def test_settings_reject_half_a_tls_pair(monkeypatch, tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    monkeypatch.setenv("VOXBUS_CONTROL_TLS_CERT", str(cert))
    with pytest.raises(SystemExit):
        Settings()

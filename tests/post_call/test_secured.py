"""The post-call stage on a nats-server that requires credentials, connected as its own
``post_call`` role with the permissions ``voxbus up`` generates: it binds its durable consumer,
reads the transcript, calls the LLM stage (``llm`` role), writes its results bucket and
delivers; the CLI's ``client`` user lists the result and prints the transcript."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from dataclasses import replace

import pytest

from services.llm.worker import LlmWorker
from services.post_call.stage import PostCallStage
from tests.conftest import without_nats_credentials
from tests.post_call.conftest import FIELDS, played_session, until
from voxbus.bus import Bus
from voxbus.config import NatsAuth
from voxbus.nats_auth import new_passwords, role_env, server_config
from voxbus.natsd import NatsServer
from voxbus.recording import Recorder
from voxbus.subjects import Subjects
from voxbus.wire import PostCallResult, decode


@pytest.fixture
def secured_prefix() -> str:
    return "spc" + uuid.uuid4().hex[:8]


@pytest.fixture
def secured(secured_prefix):
    passwords = new_passwords()
    with NatsServer(authorization=server_config(passwords, secured_prefix)) as server:
        server.passwords = passwords
        yield server


async def test_post_call_works_with_only_its_own_permissions(
        secured, secured_prefix, pc_settings, endpoint, receiver, monkeypatch, tmp_path):
    without_nats_credentials(monkeypatch, tmp_path)

    def as_role(role: str):
        return replace(pc_settings, nats_url=secured.url, prefix=secured_prefix,
                       worker_id=role, nats_auth=NatsAuth.as_user(role,
                                                                  secured.passwords[role]))

    admin = as_role("admin")
    async with Recorder(secured.url, secured_prefix, auth=admin.nats_auth) as rec:
        await rec.enable(max_age_s=600, max_bytes=64 * 2**20)
    publisher = await Bus.connect(secured.url, Subjects(secured_prefix), "as-admin",
                                  auth=admin.nats_auth)
    client = await Bus.connect(secured.url, Subjects(secured_prefix), "as-client",
                               auth=NatsAuth.as_user("client", secured.passwords["client"]))
    got: list[PostCallResult] = []

    async def on(msg):
        got.append(decode(msg.data))

    await client.nc.subscribe(client.subjects.post_call_delivery("crm"), cb=on)
    await client.sync()
    llm = await LlmWorker(as_role("llm"), base_url=endpoint.base_url).start()
    stage = await PostCallStage(as_role("post_call")).start()
    hooked, topic = "sp" + uuid.uuid4().hex[:8], "sq" + uuid.uuid4().hex[:8]
    try:
        await played_session(publisher, hooked, "booking")
        await played_session(publisher, topic, "booking_nats")
        await until(lambda: receiver.delivered and got, 20, "both deliveries")
        assert receiver.delivered[0]["body"]["fields"] == FIELDS and receiver.delivered[0][
            "valid"]
        assert got[0].session == topic and got[0].fields == FIELDS
        # Nothing the roles tried was refused.
        for bus in (stage.bus, llm.bus, client):
            assert "permissions violation" not in (bus._events.last_error or "").lower()
    finally:
        await stage.stop()
        await llm.stop()
        await client.close()
        await publisher.close()

    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXBUS_NATS_")}
    env.update(VOXBUS_PREFIX=secured_prefix, VOXBUS_CONTROL_FILE=str(tmp_path / "none.json"),
               **role_env("client", secured.passwords["client"]))

    async def cli(*args: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "voxbus.cli", *args, "--nats", secured.url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, out.decode(), err.decode()

    rc, out, err = await cli("sessions", "--json")
    assert rc == 0, err
    listed = {x["session"]: x for x in map(json.loads, out.splitlines())}
    assert listed[hooked]["post_call"]["status"] == "delivered"
    assert listed[topic]["post_call"]["target"].startswith("nats ")
    rc, out, err = await cli("transcript", hooked, "--json")
    assert rc == 0, err
    assert [x["role"] for x in json.loads(out)["lines"]] == ["user", "agent"]

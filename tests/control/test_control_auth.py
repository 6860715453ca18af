"""No token, no answer: every Control RPC, the event stream and reflection refuse a call without
the bearer token or with another one; the health service answers probes without it; TLS."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import replace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.control.conftest import TOKEN, ctl, ctl_env
from voxbus.control.auth import bearer
from voxbus.control.protos import SERVICE_NAME, pb, rpc
from voxbus.control.service import ControlService

CALLS = [("ListSessions", pb.ListSessionsRequest()),
         ("GetSession", pb.GetSessionRequest(session="x")),
         ("EndSession", pb.EndSessionRequest(session="x")),
         ("ListWorkers", pb.ListWorkersRequest()),
         ("DrainWorker", pb.DrainWorkerRequest(worker="x"))]


@pytest.mark.parametrize("metadata", [(), bearer("not-the-token-at-all-000"),
                                      (("authorization", TOKEN),)],
                         ids=["none", "wrong", "not-bearer"])
async def test_every_call_without_the_token_is_refused(api, metadata):
    for method, request in CALLS:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await getattr(api.stub, method)(request, metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
    stream = api.stub.WatchEvents(pb.WatchEventsRequest(replay_current=True), metadata=metadata)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in stream:
            pass
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # With it, the same call answers.
    reply = await api.stub.ListWorkers(pb.ListWorkersRequest(), metadata=api.auth)
    assert isinstance(reply, pb.ListWorkersResponse)


async def test_health_answers_without_a_token_and_reflection_needs_it(api):
    health = health_pb2_grpc.HealthStub(api.channel)
    for service in ("", SERVICE_NAME):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING

    reflect = reflection_pb2_grpc.ServerReflectionStub(api.channel)

    async def services(metadata) -> list[str]:
        call = reflect.ServerReflectionInfo(metadata=metadata)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        answer = await call.read()
        await call.done_writing()
        return [s.name for s in answer.list_services_response.service]

    assert SERVICE_NAME in await services(api.auth)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await services(())
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_ctl_says_one_line_and_exits_2_when_refused_or_unreachable(api, tmp_path):
    wrong = await ctl(api.address, "sessions", token="wrong-token-wrong-token",
                      env=ctl_env(tmp_path))
    assert wrong.rc == 2 and wrong.out == ""
    assert wrong.err.strip().count("\n") == 0 and "refused the token" in wrong.err, wrong.err
    missing = await ctl(api.address, "workers", token="", env=ctl_env(tmp_path))
    assert missing.rc == 2 and "no control token" in missing.err, missing.err
    gone = await ctl("127.0.0.1:1", "workers", env=ctl_env(tmp_path))
    assert gone.rc == 2 and "cannot reach the control service at 127.0.0.1:1" in gone.err
    assert gone.err.strip().count("\n") == 0


async def test_ctl_finds_address_and_token_in_the_control_file(api, tmp_path):
    from voxbus.control.auth import write_control_file

    path = write_control_file(tmp_path / "control.json", address=api.address, token=TOKEN,
                              prefix="p")
    assert path.stat().st_mode & 0o777 == 0o600
    env = dict(ctl_env(tmp_path), VOXBUS_CONTROL_FILE=str(path))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voxbus.cli", "ctl", "workers", "--json", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert b'"stage": "control"' in out


@pytest.fixture
def self_signed(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_tls_when_configured(fast, tmp_path, self_signed):
    cert, key = self_signed
    service = await ControlService(replace(fast, worker_id="tls", control_tls_cert=str(cert),
                                           control_tls_key=str(key))).start()
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        async with grpc.aio.secure_channel(service.address, creds) as channel:
            reply = await rpc.ControlStub(channel).ListSessions(pb.ListSessionsRequest(),
                                                                metadata=bearer(TOKEN))
            assert list(reply.sessions) == []
        async with grpc.aio.insecure_channel(service.address) as plain:
            with pytest.raises(grpc.aio.AioRpcError):
                await rpc.ControlStub(plain).ListSessions(pb.ListSessionsRequest(),
                                                          metadata=bearer(TOKEN), timeout=3)
        env = dict(ctl_env(tmp_path), VOXBUS_CONTROL_TLS_CERT=str(cert),
                   VOXBUS_CONTROL_TLS_KEY=str(key))
        out = await ctl(service.address, "sessions", "--json", env=env)
        assert out.rc == 0 and out.json() == {"sessions": []}, out
    finally:
        await service.stop()

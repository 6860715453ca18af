"""The gRPC side of the control plane: each RPC of proto/voxbus_control.proto, answered from
:class:`~voxbus.control.state.ControlState`, plus health, reflection and the token check.

Commands (end a session, drain a replica) go out as ordinary frames on the bus, exactly as any
other client would send them: the control plane holds no privilege the bus does not give it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from voxbus.control.auth import BearerAuth
from voxbus.control.protos import SERVICE_NAME, pb, rpc
from voxbus.errors import VoxbusError
from voxbus.subjects import Stage
from voxbus.wire import Drain, Heartbeat, SessionEnd

if TYPE_CHECKING:
    from voxbus.control.service import ControlService

log = logging.getLogger("voxbus.control.server")

END_WAIT_S = 5.0
"""How long EndSession waits for the session's state to leave the bucket."""
DRAIN_WAIT_S = 60.0
"""DrainWorker's default ``timeout_s`` with ``wait``."""
POLL_S = 0.1


class ControlServicer(rpc.ControlServicer):
    """One method per RPC; they read the state and publish commands, nothing else."""

    def __init__(self, control: ControlService):
        self.control = control
        self.state = control.state

    async def ListSessions(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        views = sorted(self.state.sessions.values(), key=lambda v: v.started_ms)
        return pb.ListSessionsResponse(
            sessions=[self.state.session_pb(v) for v in views if v.record is not None])

    async def GetSession(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        view = self.state.sessions.get(request.session) or self.state.ended.get(request.session)
        post_call = await self.control.post_call_result(request.session)
        if view is None and post_call is None:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no session {request.session!r} (live or recently ended)")
        if view is None:  # ended before this control replica knew it: its result only
            detail = pb.SessionDetail(session=pb.Session(id=request.session, state="ended",
                                                         agent=post_call.agent))
        else:
            detail = self.state.detail_pb(view)
        if post_call is not None:
            detail.post_call.CopyFrom(post_call_pb(post_call))
        return detail

    async def EndSession(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        session = request.session
        if session not in self.state.sessions:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no live session {session!r}")
        reason = request.reason or "ended by operator"
        await self.control.bus.publish(self.control.subjects.ctl(session),
                                       SessionEnd(session=session, reason=reason))
        if not await self.state.wait_ended(session, END_WAIT_S):
            return pb.EndSessionResponse(ended=False, detail=(
                f"SessionEnd sent; its state was still stored after {END_WAIT_S:.0f} s"))
        return pb.EndSessionResponse(ended=True, detail=f"session {session} ended ({reason})")

    async def ListWorkers(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        stage = request.stage
        if stage and stage not in {s.value for s in Stage}:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"unknown stage {stage!r}: one of "
                                f"{', '.join(s.value for s in Stage)}")
        views = sorted(self.state.workers.values(), key=lambda v: (v.hb.stage, v.hb.worker))
        return pb.ListWorkersResponse(workers=[self.state.worker_pb(v) for v in views
                                               if not stage or v.hb.stage == stage])

    async def DrainWorker(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        worker = request.worker
        if worker not in self.state.workers:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no replica {worker!r} is heartbeating (see ListWorkers)")
        asked = time.monotonic()
        try:
            ack = await self.control.bus.request(self.control.subjects.worker_ctl(worker),
                                                 Drain(worker=worker), timeout=2.0)
        except VoxbusError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{worker} did not answer: {e}")
        if isinstance(ack, Heartbeat):
            self.state.on_heartbeat(ack)
        if not request.wait:
            return pb.DrainWorkerResponse(accepted=True, worker=self._worker(worker))
        timeout = request.timeout_s if request.timeout_s > 0 else DRAIN_WAIT_S
        while time.monotonic() - asked < timeout:
            view = self.state.workers.get(worker)
            if view is None:
                return pb.DrainWorkerResponse(accepted=True, drained=True, left=True,
                                              waited_s=time.monotonic() - asked)
            hb = view.hb
            if (view.last_seen > asked and hb.draining and not hb.sessions
                    and hb.inflight <= 0):
                return pb.DrainWorkerResponse(accepted=True, drained=True,
                                              waited_s=time.monotonic() - asked,
                                              worker=self.state.worker_pb(view))
            await asyncio.sleep(POLL_S)
        return pb.DrainWorkerResponse(accepted=True, drained=False,
                                      waited_s=time.monotonic() - asked,
                                      worker=self._worker(worker))

    def _worker(self, worker: str) -> Any:
        view = self.state.workers.get(worker)
        return self.state.worker_pb(view) if view else None

    async def WatchEvents(self, request: Any, context: grpc.aio.ServicerContext):
        queue = self.state.watchers.open()
        try:
            if request.replay_current:
                for event in self.state.current_events():
                    yield event
            while True:
                yield await queue.get()
        finally:
            self.state.watchers.close(queue)


def post_call_pb(record: Any) -> Any:
    """A ``PostCallRecord`` (voxbus/post_call_results.py) as the proto's ``PostCall``."""
    return pb.PostCall(
        status=record.status, error=record.error or "", target=record.target,
        fields_json=json.dumps(record.fields, ensure_ascii=False) if record.fields is not None
        else "", attempts=record.attempts, last_failure=record.last_failure,
        updated_unix_ms=record.updated_us // 1000)


def _tls(cert: str, key: str) -> grpc.ServerCredentials:
    """Once at start, a few KB: read in place rather than through a thread."""
    with open(cert, "rb") as f_cert, open(key, "rb") as f_key:
        return grpc.ssl_server_credentials([(f_key.read(), f_cert.read())])


class ControlServer:
    """The grpc.aio server: Control (token required), health (open), reflection (token)."""

    def __init__(self, control: ControlService, token: str):
        self.server = grpc.aio.server(interceptors=[BearerAuth(token)])
        rpc.add_ControlServicer_to_server(ControlServicer(control), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.address = ""

    async def start(self, address: str, *, tls_cert: str = "", tls_key: str = "") -> str:
        """Listen on ``address`` (port 0: a free one); returns the address actually bound."""
        host, _, _ = address.rpartition(":")
        if tls_cert:
            port = self.server.add_secure_port(address, _tls(tls_cert, tls_key))
        else:
            port = self.server.add_insecure_port(address)
        await self.server.start()
        self.address = f"{host}:{port}"
        await self.set_serving(True)
        return self.address

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace_s: float = 1.0) -> None:
        await self.server.stop(grace_s)

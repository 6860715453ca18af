"""``voxbus control``: the control plane as one more replica on the bus (same lifecycle,
heartbeats, /metrics and /healthz as every stage), serving gRPC to operators.

It listens to what the bus already carries (every heartbeat, the sessions bucket, each
session's metric, turn and error events, and ``<p>.err``) and keeps no state of its own, so any
number of control replicas can run side by side and a restarted one knows everything again
within one heartbeat and one bucket read.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg

from voxbus.config import setting_error
from voxbus.control.auth import read_control_file
from voxbus.control.server import ControlServer
from voxbus.control.state import ControlState
from voxbus.post_call_results import PostCallRecord, ResultStore
from voxbus.runner import Service
from voxbus.subjects import Event, Stage, Subjects
from voxbus.wire import ErrorEvent, Frame, Heartbeat, Metric, TurnEvent

log = logging.getLogger("voxbus.control")

SWEEP_S = 0.2
"""How often silent replicas and deleted sessions are looked for."""


class ControlService(Service):
    stage = Stage.CONTROL
    capacity = 0

    def __init__(self, settings=None):
        super().__init__(settings)
        self.token = (self.settings.control_token
                      or read_control_file(self.settings.control_file).get("token", ""))
        if not self.token:
            raise setting_error("voxbus control needs a token: set VOXBUS_CONTROL_TOKEN (voxbus "
                                "up generates one and writes it to "
                                f"{self.settings.control_file})")
        self.state = ControlState(self.settings.lease_s)
        self.store = None
        self.grpc: ControlServer | None = None
        self.address = ""
        self.post_call: ResultStore | None = None

    async def on_start(self) -> None:
        # Imported here: the orchestrator's store is the one reader of the bucket's format.
        from services.orchestrator.session_store import SessionStore

        self.store = await SessionStore(self.bus.nc, self.settings.prefix,
                                        replicas=self.settings.js_replicas,
                                        on_change=self.state.on_record).open()
        self.bus.on_reconnected(self.store.resync)
        s = self.subjects
        await self.subscribe(s.all_heartbeats(), self._on_heartbeat, expect=Heartbeat)
        await self.subscribe(s.all_events(Event.METRIC), self._on_event, expect=Metric)
        await self.subscribe(s.all_events(Event.TURN), self._on_event, expect=TurnEvent)
        await self.subscribe(s.all_events(Event.ERROR), self._on_event, expect=ErrorEvent)
        await self.subscribe(s.errors(), self._on_event, expect=ErrorEvent)
        self.spawn(self._sweep(), name=f"{self.worker_id}-sweep")
        self.grpc = ControlServer(self, self.token)
        st = self.settings
        self.address = await self.grpc.start(st.control_address, tls_cert=st.control_tls_cert,
                                             tls_key=st.control_tls_key)
        log.info("%s: control plane on %s (%s)", self.worker_id, self.address,
                 "TLS" if st.control_tls_cert else "plaintext")

    async def post_call_result(self, session: str) -> PostCallRecord | None:
        """The session's post-call record, read when asked (the bucket appears once a
        post-call stage has run)."""
        try:
            if self.post_call is None:
                self.post_call = await ResultStore(self.bus.nc.jetstream(),
                                                   self.settings.prefix).open()
            return await self.post_call.get(session) if self.post_call else None
        except Exception as e:  # GetSession still answers with what the bus told us
            log.warning("%s: post-call result of %s not read: %s", self.worker_id, session, e)
            return None

    async def _on_heartbeat(self, frame: Frame, _msg: Msg) -> None:
        assert isinstance(frame, Heartbeat)
        self.state.on_heartbeat(frame)

    async def _on_event(self, frame: Frame, msg: Msg) -> None:
        session = Subjects.session_of(msg.subject)
        if isinstance(frame, ErrorEvent):
            self.state.on_error(session, frame)
        elif session is None:
            return
        elif isinstance(frame, Metric):
            self.state.on_metric(session, frame)
        elif isinstance(frame, TurnEvent):
            self.state.on_turn(session, frame)

    async def _sweep(self) -> None:
        await self.store.synced.wait()
        while True:
            self.state.sweep_workers()
            self.state.sweep_sessions(set(self.store.entries))
            await asyncio.sleep(SWEEP_S)

    async def on_drain(self) -> None:
        if self.grpc:
            await self.grpc.set_serving(False)

    async def on_stop(self) -> None:
        if self.grpc:
            await self.grpc.stop()
        if self.store:
            await self.store.close()

"""The one service runner: NATS wiring, heartbeats, health/metrics, drain and stop.

A stage subclasses :class:`Service` and implements ``on_start`` (subscribe, load models) and
optionally ``on_drain``/``on_stop``; everything else every service needs lives here once,
including the replica's own control subject: an operator's ``Drain`` makes it finish its work
and exit 0 (``voxbus up`` then does not restart it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import ClassVar

from aiohttp import web
from nats.aio.subscription import Subscription
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from voxbus import __version__
from voxbus.bus import Bus, TraceLogFilter
from voxbus.config import Settings
from voxbus.errors import Full
from voxbus.metrics import INFLIGHT, LOAD, SESSIONS
from voxbus.subjects import Stage, Subjects
from voxbus.wire import Drain, Frame, Heartbeat

log = logging.getLogger("voxbus.runner")

DEFAULT_CAPACITY: dict[Stage, int] = {
    Stage.STT: 16, Stage.LLM: 4, Stage.TTS: 4, Stage.ORCHESTRATOR: 16, Stage.CONTROL: 0,
}
"""Work items a replica of each stage declares by default (``VOXBUS_CAPACITY`` overrides it;
the gateway declares ``VOXBUS_GATEWAY_MAX_SESSIONS``): sessions for STT and orchestrator (a
session costs them only while its user speaks or pauses), requests in flight for LLM and TTS.
A first guess for this 2-core class of machine, to be measured per deployment
(``bench/soak.py``); 0 declares none (load stays 0, nothing is refused). A full STT or
orchestrator replica refuses new sessions."""

DRAINED_SUFFIX = " drained"
"""The stdout line a replica prints when it drained on command and is about to exit 0."""


class Service:
    """Base of every voxbus stage. Lifecycle: ``start`` → (``drain``) → ``stop``; idempotent."""

    stage: ClassVar[Stage]
    capacity: ClassVar[int | None] = None
    """A stage's own declared capacity; None: ``DEFAULT_CAPACITY``."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.subjects = Subjects(self.settings.prefix)
        self.worker_id = f"{self.stage.value}-{self.settings.worker_id}"
        self.bus: Bus | None = None
        self.draining = False
        self.inflight = 0
        self._subs: list[Subscription] = []
        self._work_subs: list[Subscription] = []
        self._tasks: set[asyncio.Task] = set()
        self._hb_task: asyncio.Task | None = None
        self._http: web.AppRunner | None = None
        self.metrics_port: int | None = None
        self._stopped = asyncio.Event()
        self.drained = asyncio.Event()
        """Set once a ``Drain`` command's work is done: the process may exit (0)."""
        self._drain_task: asyncio.Task | None = None

    # --- for subclasses -------------------------------------------------------------

    async def on_start(self) -> None:
        """Load models and subscribe. Called once NATS is connected."""

    async def on_drain(self) -> None:
        """Finish owned work; new work is already refused."""

    async def on_stop(self) -> None:
        """Release resources. Cancelled tasks are already awaited."""

    def sessions(self) -> list[str]:
        return []

    def work_in_progress(self) -> int:
        """What ``load`` measures against capacity: sessions held or requests in flight."""
        return max(len(self.sessions()), self.inflight)

    def refuse_if_full(self, what: str) -> None:
        """A full replica says so (``Full``, an ``ErrorEvent`` reply with code ``full``) rather
        than take one more and slow every session it holds; the caller asks another."""
        capacity = self.declared_capacity
        if capacity and self.work_in_progress() >= capacity:
            raise Full(f"{self.worker_id} is full ({self.work_in_progress()} of {capacity}); "
                       f"not taking {what}")

    @property
    def declared_capacity(self) -> int:
        """The stage's own variable (``VOXBUS_LLM_CAPACITY``, ``VOXBUS_TTS_CAPACITY``), then
        ``VOXBUS_CAPACITY``, then the stage's class or default."""
        own = {Stage.LLM: self.settings.llm_capacity,
               Stage.TTS: self.settings.tts_capacity}.get(self.stage, 0)
        if own:
            return own
        if self.settings.capacity:
            return self.settings.capacity
        if self.capacity is not None:
            return self.capacity
        if self.stage is Stage.GATEWAY:
            return self.settings.gateway_max_sessions
        return DEFAULT_CAPACITY.get(self.stage, 0)

    async def subscribe(self, subject: str, handler, *, work: bool = False,
                        expect=None) -> Subscription:
        """Subscribe; ``work=True`` joins the stage's queue group and stops at drain;
        ``expect``: the frame kinds the subject carries (others are reported, see Bus)."""
        assert self.bus is not None
        queue = self.subjects.queue_group(self.stage) if work else ""
        sub = await self.bus.subscribe(subject, handler, queue=queue, expect=expect)
        (self._work_subs if work else self._subs).append(sub)
        if work and subject == self.subjects.work(self.stage):
            # This replica's own work subject too: callers retry here, by name.
            self._work_subs.append(await self.bus.subscribe(
                self.subjects.work_direct(self.stage, self.worker_id), handler, expect=expect))
        return sub

    def spawn(self, coro, *, name: str | None = None) -> asyncio.Task:
        """Start a task this service owns: tracked, cancelled and awaited at stop."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- lifecycle ------------------------------------------------------------------

    async def start(self, bus: Bus | None = None) -> Service:
        self.bus = bus or await Bus.connect(self.settings.nats_url, self.subjects, self.worker_id,
                                            auth=self.settings.nats_auth)
        await self.on_start()
        await self.subscribe(self.subjects.worker_ctl(self.worker_id), self._on_control,
                             expect=Drain)
        # Subscriptions are registered with the server before start returns: a request sent
        # the moment we are "started" must find us, not get "no responders".
        await self.bus.sync()
        self._hb_task = asyncio.create_task(self._heartbeats(), name=f"{self.worker_id}-hb")
        log.info("%s started on %s", self.worker_id, self.settings.nats_url)
        return self

    async def drain(self) -> None:
        """Take no new work, finish what is owned."""
        if self.draining:
            return
        self.draining = True
        for sub in self._work_subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._work_subs.clear()
        await self.on_drain()

    async def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.drain()
        tasks = [t for t in (self._hb_task, *self._tasks) if t]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.on_stop()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self.bus:
            with contextlib.suppress(Exception):
                await self.bus.close()
        if self._http:
            await self._http.cleanup()
        log.info("%s stopped", self.worker_id)

    async def __aenter__(self) -> Service:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def heartbeat(self) -> Heartbeat:
        """This replica as its heartbeat says it: sessions, work, load against capacity."""
        sessions = self.sessions()
        capacity = self.declared_capacity
        load = min(1.0, self.work_in_progress() / capacity) if capacity else 0.0
        INFLIGHT.labels(self.stage.value).set(self.inflight)
        SESSIONS.labels(self.stage.value).set(len(sessions))
        LOAD.labels(self.stage.value).set(load)
        return Heartbeat(
            worker=self.worker_id, stage=self.stage.value, sessions=sessions,
            inflight=self.inflight, draining=self.draining or self._drain_task is not None,
            interval_s=self.settings.heartbeat_s, version=__version__, capacity=capacity,
            load=float(load),
        )

    async def _beat(self) -> None:
        assert self.bus is not None
        try:
            await self.bus.publish(self.subjects.heartbeat(self.stage), self.heartbeat())
        except Exception as e:  # a reconnecting client: try again next beat
            log.debug("heartbeat not sent: %s", e)

    async def _heartbeats(self) -> None:
        while True:
            await self._beat()
            await asyncio.sleep(self.settings.heartbeat_s)

    # --- operator commands ------------------------------------------------------------

    async def _on_control(self, frame: Frame, msg) -> None:
        """A ``Drain`` on our own control subject: answer with our heartbeat (now draining),
        then drain in a task of our own, so the operator's request is not held up."""
        assert isinstance(frame, Drain)
        if frame.worker != self.worker_id:
            raise ValueError(f"Drain for {frame.worker!r} reached {self.worker_id}")
        if self._drain_task is None and not self._stopped.is_set():
            log.warning("%s: drain requested (%s)", self.worker_id, frame.reason)
            self._drain_task = self.spawn(self._drain_on_command(),
                                          name=f"{self.worker_id}-drain")
        if msg.reply:
            await self.bus.publish(msg.reply, self.heartbeat())

    async def _drain_on_command(self) -> None:
        """Drain, then wait (up to ``VOXBUS_DRAIN_GRACE_S``) for the last work to finish, say
        so in a heartbeat at once, and mark the replica drained: ``run_forever`` exits 0."""
        await self.drain()
        deadline = time.monotonic() + self.settings.drain_grace_s
        while time.monotonic() < deadline:  # work ends in the stages' own tasks: poll it
            if not self.work_in_progress():
                break
            await asyncio.sleep(0.05)
        if self.work_in_progress():
            log.warning("%s: %d work items still running after %.0f s of draining; leaving "
                        "anyway", self.worker_id, self.work_in_progress(),
                        self.settings.drain_grace_s)
        await self._beat()
        self.drained.set()

    # --- health and metrics ---------------------------------------------------------

    async def serve_http(self, port: int) -> int:
        async def metrics(_: web.Request) -> web.Response:
            return web.Response(
                body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )

        async def healthz(_: web.Request) -> web.Response:
            # Ready means "send me work": not while NATS is away, nor while draining (a load
            # balancer or Kubernetes then stops routing here; the process is still alive).
            connected = self.bus is not None and self.bus.nc.is_connected
            draining = self.draining or self._drain_task is not None
            ready = connected and not draining
            body = {"worker": self.worker_id, "ready": ready, "nats": connected,
                    "draining": draining, "inflight": self.inflight,
                    "sessions": len(self.sessions())}
            return web.json_response(body, status=200 if ready else 503)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        self._http = web.AppRunner(app, access_log=None)
        await self._http.setup()
        site = web.TCPSite(self._http, "0.0.0.0", port)
        await site.start()
        return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(trace)s]: %(message)s"
"""``trace``: the turn being worked on (``Voxbus-Trace``), so one turn greps across services."""


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.addFilter(TraceLogFilter())
    # Pipecat logs through loguru at DEBUG by default; keep services readable.
    with contextlib.suppress(Exception):
        import sys

        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level="WARNING")


async def run_forever(service: Service) -> None:
    """Run a service until SIGINT/SIGTERM, then drain and stop it."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await service.start()
    port = await service.serve_http(service.settings.metrics_port)
    log.info("%s metrics and health on :%d", service.worker_id, port)
    print(f"{service.worker_id} ready", flush=True)
    signalled = asyncio.create_task(stop.wait())
    drained = asyncio.create_task(service.drained.wait())
    try:
        await asyncio.wait([signalled, drained], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (signalled, drained):
            t.cancel()
        await asyncio.gather(signalled, drained, return_exceptions=True)
    await service.stop()
    if service.drained.is_set():
        # The supervisor reads this line: an exit 0 after it is a clean stop, not a crash.
        print(f"{service.worker_id}{DRAINED_SUFFIX}", flush=True)

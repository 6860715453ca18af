"""The one service runner: NATS wiring, heartbeats, health/metrics, drain and stop.

A stage subclasses :class:`Service` and implements ``on_start`` (subscribe, load models) and
optionally ``on_drain``/``on_stop``; everything else every service needs lives here once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import ClassVar

from aiohttp import web
from nats.aio.subscription import Subscription
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest

from voxbus.bus import Bus
from voxbus.config import Settings
from voxbus.subjects import Stage, Subjects
from voxbus.wire import Heartbeat

log = logging.getLogger("voxbus.runner")

INFLIGHT = Gauge("voxbus_inflight", "Work items in progress", ["stage"])
SESSIONS = Gauge("voxbus_sessions", "Sessions owned by this replica", ["stage"])


class Service:
    """Base of every voxbus stage. Lifecycle: ``start`` → (``drain``) → ``stop``; idempotent."""

    stage: ClassVar[Stage]

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

    # --- for subclasses -------------------------------------------------------------

    async def on_start(self) -> None:
        """Load models and subscribe. Called once NATS is connected."""

    async def on_drain(self) -> None:
        """Finish owned work; new work is already refused."""

    async def on_stop(self) -> None:
        """Release resources. Cancelled tasks are already awaited."""

    def sessions(self) -> list[str]:
        return []

    async def subscribe(self, subject: str, handler, *, work: bool = False,
                        expect=None) -> Subscription:
        """Subscribe; ``work=True`` joins the stage's queue group and stops at drain;
        ``expect``: the frame kinds the subject carries (others are reported, see Bus)."""
        assert self.bus is not None
        queue = self.subjects.queue_group(self.stage) if work else ""
        sub = await self.bus.subscribe(subject, handler, queue=queue, expect=expect)
        (self._work_subs if work else self._subs).append(sub)
        return sub

    def spawn(self, coro, *, name: str | None = None) -> asyncio.Task:
        """Start a task this service owns: tracked, cancelled and awaited at stop."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- lifecycle ------------------------------------------------------------------

    async def start(self, bus: Bus | None = None) -> Service:
        self.bus = bus or await Bus.connect(self.settings.nats_url, self.subjects, self.worker_id)
        await self.on_start()
        # Subscriptions are registered with the server before start returns: a request sent
        # the moment we are "started" must find us, not get "no responders".
        await self.bus.nc.flush()
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

    async def _heartbeats(self) -> None:
        assert self.bus is not None
        subject = self.subjects.heartbeat(self.stage)
        while True:
            sessions = self.sessions()
            INFLIGHT.labels(self.stage.value).set(self.inflight)
            SESSIONS.labels(self.stage.value).set(len(sessions))
            hb = Heartbeat(
                worker=self.worker_id, stage=self.stage.value, sessions=sessions,
                inflight=self.inflight, draining=self.draining,
                interval_s=self.settings.heartbeat_s,
            )
            try:
                await self.bus.publish(subject, hb)
            except Exception as e:  # a reconnecting client: try again next beat
                log.debug("heartbeat not sent: %s", e)
            await asyncio.sleep(self.settings.heartbeat_s)

    # --- health and metrics ---------------------------------------------------------

    async def serve_http(self, port: int) -> int:
        async def metrics(_: web.Request) -> web.Response:
            return web.Response(
                body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )

        async def healthz(_: web.Request) -> web.Response:
            ok = self.bus is not None and self.bus.nc.is_connected
            body = {"worker": self.worker_id, "nats": ok, "draining": self.draining,
                    "inflight": self.inflight, "sessions": len(self.sessions())}
            return web.json_response(body, status=200 if ok else 503)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        self._http = web.AppRunner(app, access_log=None)
        await self._http.setup()
        site = web.TCPSite(self._http, "0.0.0.0", port)
        await site.start()
        return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    await stop.wait()
    await service.stop()

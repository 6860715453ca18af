"""The NATS connection every voxbus process uses: typed publish/subscribe and the error boundary.

Bad frames stop here: a handler never sees bytes, only validated frames; a frame that fails to
decode, or a handler that raises, is logged with its subject and reported as an ``ErrorEvent``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import replace

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError, SlowConsumerError
from nats.errors import TimeoutError as NatsTimeout

from voxbus import nats_auth
from voxbus.config import NatsAuth
from voxbus.errors import StageUnavailable, VoxbusError
from voxbus.metrics import (
    BUS_HOP,
    ERRORS_REPORTED,
    NATS_DISCONNECTS,
    NATS_RECONNECTS,
    SLOW_CONSUMERS,
)
from voxbus.subjects import Event, Stage, Subjects
from voxbus.wire import ErrorEvent, Frame, WireError, decode, encode

log = logging.getLogger("voxbus.bus")

TRACE_HEADER = "Voxbus-Trace"
SESSION_HEADER = "Voxbus-Session"
SENT_HEADER = "Voxbus-Sent-Us"
"""Publish time in µs, so receivers can measure the bus hop."""
REPLY_HEADER = "Voxbus-Reply"
"""On a work request's session copy: the reply subject the original asked for."""

Handler = Callable[[Frame, Msg], Awaitable[None]]

TRACE: ContextVar[str | None] = ContextVar("voxbus_trace", default=None)
"""The trace of the message being handled. Set around every handler call from the message's
``Voxbus-Trace`` header and inherited by the tasks the handler starts, so what a replica
publishes (and logs) while doing a turn's work carries that turn's trace without passing it."""


def new_trace() -> str:
    return uuid.uuid4().hex[:16]


class TraceLogFilter(logging.Filter):
    """Puts the current trace on every log record (``%(trace)s``; ``-`` outside any)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.trace = TRACE.get() or "-"
        return True


def now_us() -> int:
    return time.time_ns() // 1000


def nats_servers(url: str) -> list[str]:
    """``VOXBUS_NATS_URL``'s servers: one URL, or several comma-separated (a cluster)."""
    return [part.strip() for part in url.split(",") if part.strip()]


class _ConnectionLog:
    """nats-py's connection callbacks as one quiet line per change (its default error callback
    logs a traceback per failed attempt: ~1,600 lines for a few seconds without a server)."""

    def __init__(self, nc: Client, service: str, url: str, auth: NatsAuth | None = None):
        self.nc = nc
        self.service = service
        self.url = url
        self.connected = False
        self.last_error = ""
        self.last_server = ""
        self.refused = asyncio.Event()
        self.refusal = ""
        """Set when the server refused who we are (Authorization Violation) before we were
        ever connected: retrying with the same credentials cannot help."""
        self.tls_failure = ""
        """Set (with ``refused``) when TLS failed for a reason a retry cannot change (a
        certificate): :func:`voxbus.nats_auth.tls_failure`."""
        self.auth = auth
        self.slow_sids: set[int] = set()
        self.on_reconnected: list[Callable[[], None]] = []
        """Told when the connection is back (see :meth:`Bus.on_reconnected`)."""

    def _server(self) -> str:
        """The server we are (or were last) on, e.g. one node of a cluster."""
        current = self.nc.connected_url
        if current is not None:
            self.last_server = current.geturl()
        return self.last_server or self.url

    async def error(self, e: Exception) -> None:
        if isinstance(e, SlowConsumerError):
            # Per dropped message: counted, and logged once per subscription, not per message.
            SLOW_CONSUMERS.inc()
            if e.sid not in self.slow_sids:
                self.slow_sids.add(e.sid)
                log.warning("%s: NATS dropped messages on %s: its handler falls behind",
                            self.service, e.subject)
            return
        text = _describe(e)
        if not self.connected and not self.refused.is_set():
            if isinstance(e, ssl.SSLError) and self.auth is not None:
                self.tls_failure = nats_auth.tls_failure(e, self.auth) or ""
            if self.tls_failure or _refusal(text):
                self.refusal = text
                self.refused.set()
        if text != self.last_error and self.connected:  # the first connection raises instead
            log.warning("%s: NATS at %s: %s", self.service, self._server(), text)
        self.last_error = text

    async def disconnected(self) -> None:
        if self.connected and not self.nc.is_closed:  # closed: we hung up ourselves
            NATS_DISCONNECTS.inc()
            log.warning("%s: lost NATS at %s; reconnecting", self.service, self._server())

    async def reconnected(self) -> None:
        self.last_error = ""
        NATS_RECONNECTS.inc()
        log.info("%s: reconnected to NATS at %s", self.service, self._server())
        for callback in list(self.on_reconnected):
            try:
                callback()
            except Exception:  # one listener's bug must not keep the news from the others
                log.exception("%s: reconnect callback %r failed", self.service, callback)


def _describe(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    return str(e) or type(e).__name__


def _refusal(text: str) -> bool:
    lowered = text.lower()
    return "authorization violation" in lowered or "authentication" in lowered


class NatsRefused(ConnectionError):
    """The server answered and refused the connection's credentials (or their absence)."""


class NatsTLSError(NatsRefused):
    """TLS with the server cannot work as configured: its certificate is not trusted, it wants
    a client certificate or refuses ours, or it offers no TLS while we were told to use it."""


CREDENTIALS_HINT = ("run it as the user who ran `voxbus up` (it leaves the CLI's credentials "
                    "in VOXBUS_CONTROL_FILE), or set VOXBUS_NATS_USER and VOXBUS_NATS_PASSWORD "
                    "(or VOXBUS_NATS_TOKEN, VOXBUS_NATS_CREDS, VOXBUS_NATS_NKEY)")


def connection_auth(url: str, auth: NatsAuth | None = None) -> NatsAuth:
    """The credentials a connection to ``url`` uses: ``auth``, else the environment's
    (``VOXBUS_NATS_*``), else, with none there either, what ``voxbus up`` wrote for the CLI
    when it is that ``voxbus up``'s NATS (same URL)."""
    if auth is not None:
        return auth
    auth = NatsAuth()
    if not auth.anonymous:
        return auth
    from voxbus.config import Settings
    from voxbus.control.auth import read_control_file

    try:
        path = Settings().control_file
    except SystemExit:
        return auth
    cli = read_control_file(path).get("nats")
    if not isinstance(cli, dict) or not cli.get("user") or not cli.get("password"):
        return auth
    if _same_servers(str(cli.get("url", "")), url):
        return replace(auth, user=str(cli["user"]), password=str(cli["password"]))
    return auth


def _same_servers(a: str, b: str) -> bool:
    def norm(url: str) -> set[str]:
        out = set()
        for server in nats_servers(url):
            rest = server.partition("://")[2] or server
            host, _, port = rest.rstrip("/").rpartition(":")
            host = "127.0.0.1" if host in ("localhost", "") else host
            out.add(f"{host}:{port or '4222'}")
        return out

    return bool(a) and norm(a) == norm(b)


async def _abandon(nc: Client) -> None:
    """Close a client whose first connection failed, so none of its tasks outlive it."""
    try:
        await nc.close()
    except (NatsError, OSError) as e:
        log.debug("closing an unconnected NATS client: %s", e)


class Bus:
    """One NATS connection plus the voxbus conventions on top of it."""

    def __init__(self, nc: Client, subjects: Subjects, service: str,
                 events: _ConnectionLog | None = None):
        self.nc = nc
        self.subjects = subjects
        self.service = service
        self.bad_frames = 0
        self._work_stages = {subjects.work(stage): stage for stage in Stage}
        self._events = events
        self._traces: dict[str, str] = {}

    def on_reconnected(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on the event loop; it must not block) each time the connection
        comes back after being lost: what was learnt from silence during the outage (a replica
        not heard from, a JetStream consumer on a server that went away) is not to be trusted."""
        if self._events is None:
            raise RuntimeError("on_reconnected needs a Bus made by Bus.connect")
        self._events.on_reconnected.append(callback)

    @classmethod
    async def connect(
        cls, url: str, subjects: Subjects, service: str, *, attempts: int = 20,
        auth: NatsAuth | None = None,
    ) -> Bus:
        """Connect, retrying while the server comes up (``voxbus up`` starts both at once).

        ``url`` is one server or several comma-separated (the nodes of a cluster): the first
        that answers, in the order given, is used; nats-py also learns the cluster's other
        nodes from the server's INFO, and a lost connection moves to any of them.

        The first connection makes ``attempts`` tries per server 0.5 s apart, quietly, and then
        raises one ``ConnectionError``; once connected the client reconnects forever, and every
        change (lost, back, an error) is one log line naming the service, never a traceback.

        ``auth`` (default: :func:`connection_auth`) is passed to nats-py as its own options
        (user/password, token, ``.creds`` file, NKey seed, TLS). A server that refuses them is
        :class:`NatsRefused` at once, not after every attempt; a certificate problem, or a
        server without TLS while ``auth`` asks for it, is :class:`NatsTLSError`, also at once.
        """
        servers = nats_servers(url)
        if not servers:
            raise ConnectionError(f"no NATS server in {url!r}")
        auth = connection_auth(url, auth)
        nc = Client()
        events = _ConnectionLog(nc, service, ",".join(servers), auth)
        connecting = asyncio.ensure_future(asyncio.wait_for(nc.connect(
            servers=servers,
            name=f"voxbus-{service}",
            error_cb=events.error,
            disconnected_cb=events.disconnected,
            reconnected_cb=events.reconnected,
            # The order is the operator's: the first URL is the preferred node.
            dont_randomize=True,
            # Bounded for the first connection only; lifted below once connected.
            max_reconnect_attempts=max(attempts - 1, 1),
            reconnect_time_wait=0.5,
            connect_timeout=2,
            **nats_auth.connect_options(auth),
        ), timeout=attempts * 2.5 * len(servers) + 1))
        refused = asyncio.ensure_future(events.refused.wait())
        try:
            await asyncio.wait({connecting, refused}, return_when=asyncio.FIRST_COMPLETED)
            if events.refused.is_set():
                connecting.cancel()
                with contextlib.suppress(BaseException):
                    await connecting
                if events.tls_failure:
                    raise NatsTLSError(f"TLS to NATS at {events.url} failed: "
                                       f"{events.tls_failure}")
                reason = events.refusal.removeprefix("nats: ").strip("'")
                hint = f": {CREDENTIALS_HINT}" if auth.anonymous else ""
                raise NatsRefused(f"NATS at {events.url} refused the connection "
                                  f"{nats_auth.describe(auth)} ({reason}){hint}")
            connecting.result()
            if auth.tls and not nc._server_info.get("tls_required"):  # INFO: nats-py keeps it
                # nats-py only upgrades when the server asks: never run plaintext by mistake.
                raise NatsTLSError(f"NATS at {events.url} does not use TLS, but "
                                   "VOXBUS_NATS_TLS_CA / VOXBUS_NATS_TLS_CERT is set: refusing "
                                   "a plaintext connection (point VOXBUS_NATS_URL at its TLS "
                                   "port)")
        except NatsRefused:
            await _abandon(nc)
            raise
        except (OSError, TimeoutError, NatsError) as e:
            await _abandon(nc)
            raise ConnectionError(f"cannot reach NATS at {events.url}: "
                                  f"{events.last_error or e}") from None
        except BaseException:
            connecting.cancel()
            await _abandon(nc)
            raise
        finally:
            refused.cancel()
        nc.options["max_reconnect_attempts"] = -1  # read on every reconnect: never give up now
        events.connected = True
        events._server()  # remembered, for the line that says we lost it
        return cls(nc, subjects, service, events)

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()

    async def sync(self) -> None:
        """Return once the server has processed everything sent so far (a subscription just
        made is registered: a request sent now finds it).

        One ``flush`` does not promise that in nats-py 2.16: its PING is written to the socket
        at once, ahead of commands still queued for its writer task (the SUB just made), so the
        PONG can come back first (measured: 43 of 3,000 requests right after subscribe and
        flush got "no responders"). The first flush's PONG means the writer ran, so the queued
        commands are on the wire before the second PING.
        """
        await self.nc.flush()
        await self.nc.flush()

    # --- traces -----------------------------------------------------------------------

    def set_trace(self, session: str, trace: str | None) -> None:
        """What this process publishes for ``session`` from now on carries ``trace`` (the
        session's owner sets one per turn); None forgets the session."""
        if trace is None:
            self._traces.pop(session, None)
        else:
            self._traces[session] = trace

    def _headers(self, session: str | None, frame: Frame, *, trace: str | None = None,
                 reply: str = "") -> dict[str, str]:
        """What every message carries: when it was sent (the receiver's bus hop), its
        subject's session, its trace (given; else the session's current one, else the handled
        message's) and, on a work request's recording copy, the reply the original asked for."""
        headers = {SENT_HEADER: str(now_us())}
        if session:  # from a subject: a checked id (a frame's own field may be anything)
            headers[SESSION_HEADER] = session
        owner = session or getattr(frame, "session", None)
        trace = trace or (self._traces.get(owner) if isinstance(owner, str) else None) \
            or TRACE.get()
        if trace:
            headers[TRACE_HEADER] = trace
        if reply:
            headers[REPLY_HEADER] = reply
        return headers

    # --- publish ----------------------------------------------------------------------

    async def publish(
        self, subject: str, frame: Frame, *, trace: str | None = None, reply: str = ""
    ) -> None:
        """``trace``: default, the session's current one (``set_trace``), else the trace of
        the message being handled."""
        headers = self._headers(Subjects.session_of(subject), frame, trace=trace)
        data = encode(frame)
        await self.nc.publish(subject, data, reply=reply, headers=headers)
        await self._copy_work(subject, frame, data, reply)

    async def _copy_work(self, subject: str, frame: Frame, data: bytes, reply: str) -> None:
        """Copy a work request onto its session's ``work.<stage>`` subject, for the recording.

        Work subjects carry no session, and a stream over them would answer for absent stages
        (NATS then never says "no responders"); the copy has no reply subject and nobody acts
        on it, so only the session's recording sees it.
        """
        stage = self._work_stages.get(subject) or self._work_stages.get(subject.rsplit(".", 1)[0])
        session = getattr(frame, "session", None)
        if stage is None or not isinstance(session, str):
            return
        try:
            copy = self.subjects.work_copy(session, stage)
        except ValueError:
            return  # not a session id: the stage refuses the request and reports it
        try:
            await self.nc.publish(copy, data, headers=self._headers(session, frame, reply=reply))
        except Exception as e:  # the recording's copy must never fail the request itself
            log.warning("%s: work request not copied to %s: %s", self.service, copy, e)

    async def request(self, subject: str, frame: Frame, *, timeout: float = 2.0) -> Frame:
        """Request-reply to a queue group; a missing stage is ``StageUnavailable``."""
        data = encode(frame)
        await self._copy_work(subject, frame, data, "")
        try:
            msg = await self.nc.request(subject, data, timeout=timeout,
                                        headers=self._headers(None, frame))
        except NoRespondersError:
            raise StageUnavailable(f"no replica is listening on {subject}",
                                   reason="no_responders") from None
        except NatsTimeout:
            raise StageUnavailable(f"no reply on {subject} within {timeout:g} s") from None
        reply = decode(msg.data)
        if isinstance(reply, ErrorEvent):
            error = VoxbusError(f"{reply.service}: {reply.code}: {reply.message}")
            error.code = reply.code  # the replier's reason, for callers that map it
            raise error
        return reply

    async def report(
        self, code: str, message: str, *, subject: str = "", retryable: bool = False
    ) -> None:
        """Publish an ``ErrorEvent`` on the session's error subject (or the global one)."""
        session = Subjects.session_of(subject) if subject else None
        target = self.subjects.event(session, Event.ERROR) if session else self.subjects.errors()
        event = ErrorEvent(
            service=self.service, code=code, message=message, subject=subject, retryable=retryable
        )
        ERRORS_REPORTED.labels(code).inc()
        try:
            await self.nc.publish(target, encode(event), headers=self._headers(session, event))
        except Exception as e:  # reporting must never take the service down
            log.warning("could not publish error event: %s", e)

    # --- subscribe --------------------------------------------------------------------

    async def subscribe(self, subject: str, handler: Handler, *, queue: str = "",
                        expect: type[Frame] | tuple[type[Frame], ...] | None = None
                        ) -> Subscription:
        """Subscribe with decoding and the error boundary around ``handler``; ``expect`` names
        the frame kinds the subject carries: any other kind is reported, not handled."""

        async def on_msg(msg: Msg) -> None:
            if msg.headers and msg.headers.get("Status") == "503" and not msg.data:
                # NATS "no responders" on a reply subject: nobody took the request.
                target = msg.headers.get("Nats-Subject", msg.subject)
                log.warning("%s: no replica is listening on %s", self.service, target)
                await self.report("unavailable", f"no replica is listening on {target}",
                                  subject=msg.subject, retryable=True)
                return
            try:
                frame = decode(msg.data)
            except WireError as e:
                self.bad_frames += 1
                log.error("%s: rejected frame on %s (%d bytes, headers %s): %s", self.service,
                          msg.subject, len(msg.data), msg.headers, e)
                await self.report(e.code, e.message, subject=msg.subject)
                if msg.reply:
                    await self._reply_error(msg, e.code, e.message)
                return
            if expect is not None and not isinstance(frame, expect):
                self.bad_frames += 1
                message = f"{type(frame).__name__} does not belong on {msg.subject}"
                log.error("%s: %s", self.service, message)
                await self.report("wrong_kind", message, subject=msg.subject)
                return
            headers = msg.headers or {}
            hop = self.hop_ms(msg)
            if hop is not None:
                BUS_HOP.labels(type(frame).__name__).observe(max(hop, 0.0) / 1000)
            token = TRACE.set(headers.get(TRACE_HEADER) or None)
            try:
                await handler(frame, msg)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                code = getattr(e, "code", "internal")
                log.exception("%s: handler failed on %s", self.service, msg.subject)
                await self.report(
                    code, f"{type(e).__name__}: {e}", subject=msg.subject,
                    retryable=getattr(e, "retryable", False),
                )
                if msg.reply:
                    await self._reply_error(msg, code, str(e))
            finally:
                TRACE.reset(token)
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Unsubscribing cancels this subscription's task; a handler (or library code
                # under it) that swallowed that cancel must not keep the task alive forever.
                raise asyncio.CancelledError

        return await self.nc.subscribe(subject, queue=queue, cb=on_msg)

    async def _reply_error(self, msg: Msg, code: str, message: str) -> None:
        try:
            await msg.respond(encode(ErrorEvent(service=self.service, code=code, message=message)))
        except Exception as e:
            log.warning("could not reply with error: %s", e)

    @staticmethod
    def hop_ms(msg: Msg) -> float | None:
        sent = (msg.headers or {}).get(SENT_HEADER)
        return (now_us() - int(sent)) / 1000 if sent and sent.isdigit() else None

"""Session recordings: the JetStream stream that captures them and the file they export to.

Every frame on a session's subjects (``<p>.sess.<session>.>``: audio in and out, events, control,
streamed stage replies, and the bus's copies of the session's work requests) is stored by one
stream per deployment prefix. The stream is ``no_ack``: the server stores what it sees and
answers nobody, so capture adds nothing to the live path. ``docs/recording.md`` documents the
file format.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import msgpack
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from voxbus.bus import Bus, now_us
from voxbus.config import NatsAuth
from voxbus.errors import VoxbusError
from voxbus.subjects import Stage, Subjects
from voxbus.wire import (
    MAX_FRAME_BYTES,
    SCHEMA_VERSION,
    Frame,
    SessionEnd,
    SessionStart,
    WireError,
    decode,
)

FORMAT = "voxbus-recording"
FORMAT_VERSION = 1
SUFFIX = ".vxrec"
"""The file extension ``voxbus replay DIR/`` looks for."""


class RecordingError(VoxbusError):
    """A recording that cannot be read or exported: the message says which and why."""

    code = "bad_recording"


# --- the recording, in memory ------------------------------------------------------------


@dataclass(frozen=True)
class RecordedMessage:
    """One NATS message of the session, exactly as it was on the wire."""

    t_us: int
    """When it reached the server (or the capturing client), µs after the recording starts."""
    subject: str
    headers: dict[str, str]
    data: bytes
    """The frame's bytes (``docs/wire.md``), undecoded: a bad frame is kept as it was."""

    def frame(self) -> Frame | None:
        """The decoded frame, or None for bytes that were not a valid frame."""
        try:
            return decode(self.data)
        except WireError:
            return None


@dataclass(frozen=True)
class RecordingHeader:
    session: str
    prefix: str
    agent: str | None
    started_at_us: int
    """Wall-clock time (µs since the Unix epoch) of ``t_us == 0``."""
    source: str
    """Where it was taken from: ``jetstream:<stream>`` or ``capture``."""
    exported_at_us: int = 0


@dataclass
class Recording:
    header: RecordingHeader
    messages: list[RecordedMessage] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return self.messages[-1].t_us / 1e6 if self.messages else 0.0


# --- the file format ---------------------------------------------------------------------


def write(path: str | Path, recording: Recording) -> Path:
    """Write ``recording`` to ``path`` atomically: the file is whole or not there."""
    path = Path(path)
    h = recording.header
    head = {
        "format": FORMAT, "version": FORMAT_VERSION, "wire_version": SCHEMA_VERSION,
        "session": h.session, "prefix": h.prefix, "agent": h.agent,
        "started_at_us": h.started_at_us, "exported_at_us": h.exported_at_us or now_us(),
        "source": h.source, "count": len(recording.messages),
    }
    digest = hashlib.sha256()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            def put(obj) -> None:
                data = msgpack.packb(obj, use_bin_type=True)
                digest.update(data)
                f.write(data)

            put(head)
            for m in recording.messages:
                put([m.t_us, m.subject, m.headers, m.data])
            f.write(msgpack.packb({"end": len(recording.messages),
                                   "sha256": digest.hexdigest()}, use_bin_type=True))
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def read(path: str | Path) -> Recording:
    """Read a recording file, or raise :class:`RecordingError` naming the file and the fault."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RecordingError(f"{path}: cannot read: {e.strerror or e}") from None
    if not raw:
        raise RecordingError(f"{path}: empty file, not a voxbus recording")
    # Limits (derived from the buffer size) that every real message fits, so that bytes which
    # end early read as truncated rather than as an oversized object.
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True,
                                max_buffer_size=max(len(raw), 4 * MAX_FRAME_BYTES))
    unpacker.feed(raw)

    def fail(what: str) -> RecordingError:
        return RecordingError(f"{path}: {what}")

    def next_obj(where: str):
        try:
            return unpacker.unpack()
        except msgpack.OutOfData:
            raise _Truncated() from None
        except Exception as e:  # msgpack raises several unrelated types for bad bytes
            raise fail(f"corrupted {where}: {type(e).__name__}: {e}") from None

    try:
        head = next_obj("header")
    except _Truncated:
        raise fail("truncated inside the header") from None
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        raise fail(f"not a voxbus recording (expected a {FORMAT!r} header)")
    if head.get("version") != FORMAT_VERSION:
        raise fail(f"recording format version {head.get('version')!r}; "
                   f"this voxbus reads version {FORMAT_VERSION}")
    count = head.get("count")
    session, prefix = head.get("session"), head.get("prefix")
    if not (isinstance(count, int) and count >= 0 and isinstance(session, str)
            and isinstance(prefix, str) and isinstance(head.get("started_at_us"), int)):
        raise fail("corrupted header: count, session, prefix or started_at_us is missing")
    messages: list[RecordedMessage] = []
    for i in range(count):
        try:
            item = next_obj(f"at message {i + 1} of {count}")
        except _Truncated:
            raise fail(f"truncated after {i} of {count} messages") from None
        if not (isinstance(item, list) and len(item) == 4 and isinstance(item[0], int)
                and isinstance(item[1], str) and isinstance(item[2], dict)
                and isinstance(item[3], bytes)
                and all(isinstance(v, str) for v in item[2].values())):
            raise fail(f"corrupted at message {i + 1} of {count}: "
                       "expected [t_us, subject, headers, data]")
        messages.append(RecordedMessage(item[0], item[1], item[2], item[3]))
    body_end = unpacker.tell()
    try:
        trailer = next_obj("end marker")
    except _Truncated:
        raise fail(f"truncated after {count} of {count} messages: the end marker is missing"
                   ) from None
    if not isinstance(trailer, dict) or trailer.get("end") != count:
        raise fail(f"corrupted end marker after {count} messages")
    if trailer.get("sha256") != hashlib.sha256(raw[:body_end]).hexdigest():
        raise fail("corrupted: the checksum does not match (bytes changed after export)")
    if unpacker.tell() != len(raw):
        raise fail(f"corrupted: {len(raw) - unpacker.tell()} stray bytes after the end marker")
    header = RecordingHeader(
        session=session, prefix=prefix, agent=head.get("agent"),
        started_at_us=head["started_at_us"], source=str(head.get("source", "")),
        exported_at_us=int(head.get("exported_at_us") or 0))
    return Recording(header, messages)


class _Truncated(Exception):
    """The bytes ended inside an object."""




# --- the stream --------------------------------------------------------------------------




@dataclass(frozen=True)
class SessionInfo:
    """A recorded session, as ``voxbus sessions`` lists it."""

    session: str
    started_at_us: int
    duration_s: float
    messages: int
    agent: str | None
    ended: str | None
    """The ``SessionEnd`` reason, or None while the recording has no end."""


class Recorder:
    """The recording stream of one prefix on one NATS: turn it on, list and export sessions."""

    def __init__(self, nats_url: str, prefix: str, *, auth: NatsAuth | None = None):
        self.nats_url = nats_url
        self.subjects = Subjects(prefix)
        self.stream = self.subjects.recording_stream()
        self.bus: Bus | None = None
        self.auth = auth
        """NATS credentials; None: the environment's, or the CLI's from ``voxbus up``."""

    async def start(self) -> Recorder:
        self.bus = await Bus.connect(self.nats_url, self.subjects, "recorder", attempts=3,
                                     auth=self.auth)
        self.js = self.bus.nc.jetstream()
        return self

    async def stop(self) -> None:
        if self.bus:
            await self.bus.close()
            self.bus = None

    async def __aenter__(self) -> Recorder:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def enable(self, *, max_age_s: float, max_bytes: int, replicas: int = 1) -> None:
        """Create the stream, or bring its retention and replicas up to date; idempotent.

        ``replicas`` (``VOXBUS_JS_REPLICAS``) copies on a cluster's nodes: with 3, losing one
        node loses nothing already stored.
        """
        config = StreamConfig(
            name=self.stream, subjects=[self.subjects.all_sessions()], no_ack=True,
            storage=StorageType.FILE, max_age=max_age_s if max_age_s > 0 else None,
            max_bytes=max_bytes if max_bytes > 0 else -1, allow_direct=True,
            num_replicas=replicas,
            description="voxbus session recordings (voxbus record / replay)")
        try:
            await self.js.stream_info(self.stream)
        except NotFoundError:
            await self.js.add_stream(config)
        else:
            await self.js.update_stream(config)

    async def _info(self, subjects_filter: str):
        try:
            return await self.js.stream_info(self.stream, subjects_filter=subjects_filter)
        except NotFoundError:
            raise RecordingError(
                f"nothing is recorded on {self.nats_url} for prefix {self.subjects.prefix!r}: "
                f"no stream {self.stream} (voxbus up records by default; VOXBUS_RECORD=0 turns "
                "it off; `voxbus record --enable` turns it on for a deployment)") from None

    async def sessions(self) -> list[SessionInfo]:
        info = await self._info(self.subjects.all_sessions())
        counts: dict[str, int] = {}
        for subject, n in (info.state.subjects or {}).items():
            session = Subjects.session_of(subject)
            if session:
                counts[session] = counts.get(session, 0) + n
        found = [await self._describe(s, n) for s, n in counts.items()]
        return sorted(found, key=lambda s: s.started_at_us)

    async def _describe(self, session: str, count: int) -> SessionInfo:
        every = self.subjects.session_all(session)
        first = await self.js.get_msg(self.stream, seq=1, subject=every, next=True)
        last = await self.js.get_last_msg(self.stream, every)
        start = await self._last_frame(self.subjects.work_copy(session, Stage.ORCHESTRATOR))
        end = await self._last_frame(self.subjects.ctl(session))
        return SessionInfo(
            session=session, started_at_us=_us(first.time), messages=count,
            duration_s=(_us(last.time) - _us(first.time)) / 1e6,
            agent=start.agent if isinstance(start, SessionStart) else None,
            ended=end.reason if isinstance(end, SessionEnd) else None)

    async def _last_frame(self, subject: str) -> Frame | None:
        try:
            msg = await self.js.get_last_msg(self.stream, subject)
        except NotFoundError:
            return None
        try:
            return decode(msg.data or b"")
        except WireError:
            return None

    async def export(self, session: str, *, timeout_s: float = 10.0) -> Recording:
        """Every recorded message of ``session``, in the order the server stored them."""
        every = self.subjects.session_all(session)  # raises ValueError for a bad session id
        info = await self._info(every)
        total = sum((info.state.subjects or {}).values())
        if total == 0:
            raise RecordingError(f"session {session} is not in the recording stream "
                                 f"{self.stream} (see `voxbus sessions`)")
        sub = await self.js.pull_subscribe(every, stream=self.stream, config=ConsumerConfig(
            ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL,
            inactive_threshold=30.0, mem_storage=True))
        messages: list[RecordedMessage] = []
        start_us: int | None = None
        deadline = time.monotonic() + timeout_s
        try:
            while len(messages) < total and time.monotonic() < deadline:
                try:
                    batch = await sub.fetch(min(1000, total - len(messages)), timeout=2.0)
                except NatsTimeout:
                    break  # retention removed some since we counted: take what is there
                for msg in batch:
                    t = _us(msg.metadata.timestamp)
                    start_us = t if start_us is None else start_us
                    messages.append(_recorded(msg, t - start_us))
                if batch and batch[-1].metadata.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if not messages:
            raise RecordingError(f"session {session}: its messages left the stream while "
                                 "exporting (retention)")
        agent = next((f.agent for f in (m.frame() for m in messages)
                      if isinstance(f, SessionStart)), None)
        header = RecordingHeader(session=session, prefix=self.subjects.prefix, agent=agent,
                                 started_at_us=start_us or 0, source=f"jetstream:{self.stream}",
                                 exported_at_us=now_us())
        return Recording(header, messages)


def _us(when: datetime) -> int:
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1_000_000)


def _recorded(msg: Msg, t_us: int) -> RecordedMessage:
    headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
    return RecordedMessage(t_us=t_us, subject=msg.subject, headers=headers, data=msg.data)


# --- client-side capture -----------------------------------------------------------------


class SessionCapture:
    """Records one session from a client's own subscription (replay compares with it; it works
    whether or not the deployment records). Explicit ``start``/``stop``."""

    def __init__(self, bus: Bus, session: str, agent: str | None = None):
        self.bus = bus
        self.session = session
        self.agent = agent
        self.messages: list[RecordedMessage] = []
        self.started_at_us = now_us()
        self.changed = asyncio.Event()
        self._sub = None

    async def start(self) -> SessionCapture:
        self.started_at_us = now_us()
        self._sub = await self.bus.nc.subscribe(self.bus.subjects.session_all(self.session),
                                                cb=self._on)
        await self.bus.sync()
        return self

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                await self.bus.nc.flush()
                await sub.unsubscribe()

    async def _on(self, msg: Msg) -> None:
        self.messages.append(_recorded(msg, now_us() - self.started_at_us))
        self.changed.set()

    def recording(self) -> Recording:
        return Recording(RecordingHeader(
            session=self.session, prefix=self.bus.subjects.prefix, agent=self.agent,
            started_at_us=self.started_at_us, source="capture"), list(self.messages))

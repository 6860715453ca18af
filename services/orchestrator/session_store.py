"""Where a session outlives its orchestrator: one JetStream KV entry per live session.

The entry holds what a replica needs to carry a conversation on (agent, context messages, flow
node and flow state, turn counter) and who owns it. Ownership changes only by compare-and-set
on the entry's revision, so of several replicas racing to adopt an orphan exactly one wins, and
an owner that was presumed dead finds out at its next save (the revision moved) and steps down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoStreamResponseError,
    NotFoundError,
    ServiceUnavailableError,
)
from pydantic import BaseModel, ConfigDict, Field

from voxbus.bus import now_us
from voxbus.subjects import Subjects

log = logging.getLogger("voxbus.orchestrator.store")

RECORD_VERSION = 1
SAVE_ATTEMPTS = 6
SAVE_RETRY_S = 0.5
"""A save waits out a JetStream leader election (about 5 s) before it gives up."""
OPEN_WAIT_S = 30.0
"""How long ``open`` waits for JetStream to answer (a cluster electing leaders)."""
WATCH_CHECK_S = 5.0
"""How often the watcher's consumer is checked for (besides at once after a reconnect)."""
WATCH_RETRY_S = (0.5, 5.0)
"""First and longest pause between attempts to watch the bucket again."""


class SessionRecord(BaseModel):
    """A session's resumable state. JSON in the bucket, so ``nats kv get`` shows it plainly."""

    model_config = ConfigDict(extra="ignore")
    v: int = RECORD_VERSION
    session: str
    agent: str
    sample_rate: int
    owner: str
    """Worker id of the replica running the session; empty while it is being handed over."""
    turn: int = 0
    node: str | None = None
    flow_state: dict[str, Any] = Field(default_factory=dict)
    messages: list[dict[str, Any]] = Field(default_factory=list)
    stt_worker: str | None = None
    updated_us: int = Field(default_factory=now_us)


class Fenced(RuntimeError):
    """Another replica owns the session now: this one must stop running it."""


class SessionStore:
    """The sessions bucket of one deployment prefix, with a live local mirror of its entries."""

    def __init__(self, nc: Client, prefix: str, *, max_age_s: float = 24 * 3600,
                 replicas: int = 1, on_change: Callable[[SessionRecord], None] | None = None):
        self.bucket = Subjects(prefix).sessions_bucket()
        self._js = nc.jetstream()
        self._max_age_s = max_age_s
        self._replicas = replicas
        """JetStream copies of the bucket (``VOXBUS_JS_REPLICAS``): 3 survives a lost node."""
        self.kv = None
        self.entries: dict[str, SessionRecord] = {}
        """Every live session's record, kept current by a watcher."""
        self._watcher = None
        self._watch_task: asyncio.Task | None = None
        self._rewatch = asyncio.Event()
        self.synced = asyncio.Event()
        self._on_change = on_change
        """Told of every record written (by any replica), as soon as the bucket says so."""

    async def open(self) -> SessionStore:
        """Bind (or create) the bucket and follow it. While a cluster elects the bucket's new
        leader (a node was lost: a few seconds) JetStream does not answer; that is waited out
        for up to ``OPEN_WAIT_S``."""
        deadline = time.monotonic() + OPEN_WAIT_S
        while True:
            try:
                await self._bind()
                self._watcher = await self.kv.watchall()
                break
            except (NatsTimeout, ServiceUnavailableError, NoStreamResponseError) as e:
                if time.monotonic() > deadline:
                    raise
                log.warning("sessions bucket %s: JetStream not answering (%s); retrying",
                            self.bucket, e or type(e).__name__)
                await asyncio.sleep(1.0)
        self._watch_task = asyncio.create_task(self._follow(), name=f"{self.bucket}-watch")
        return self

    async def _bind(self) -> None:
        try:
            self.kv = await self._js.key_value(self.bucket)
        except BucketNotFoundError:
            # Several replicas may create it at once; creating an identical bucket is a no-op.
            self.kv = await self._js.create_key_value(bucket=self.bucket, history=1,
                                                      ttl=self._max_age_s,
                                                      replicas=self._replicas)
        else:
            await self._match_replicas()

    async def _match_replicas(self) -> None:
        """A bucket made with another replica count (VOXBUS_JS_REPLICAS changed) is scaled."""
        try:
            info = (await self.kv.status()).stream_info
            if info.config.num_replicas == self._replicas:
                return
            config = info.config
            was, config.num_replicas = config.num_replicas, self._replicas
            await self._js.update_stream(config)
            log.info("sessions bucket %s: %s replicas, was %s", self.bucket, self._replicas, was)
        except Exception as e:  # the bucket works as it is; say so and carry on
            log.warning("sessions bucket %s: not scaled to %d replicas: %s", self.bucket,
                        self._replicas, e)

    def resync(self) -> None:
        """The connection came back (``Bus.on_reconnected``): watch the bucket afresh."""
        self._rewatch.set()

    async def close(self) -> None:
        if self._watch_task:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task
            self._watch_task = None
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
            self._watcher = None

    async def _follow(self) -> None:
        """Mirror the bucket into ``entries`` for the store's whole life.

        nats-py's watcher is an ordered consumer living on one server. When that server goes
        away the watcher stalls (nothing stops or raises) until nats-py misses two of its
        5 s idle heartbeats and re-creates it: measured on a three-node cluster, a write 50 ms
        after the kill reached the watcher 19.5 s later, a long time to miss that another
        replica took a session over. So the watcher is replaced at once after a reconnect,
        when a check finds its consumer gone, or if it ever stops.
        """
        retry = WATCH_RETRY_S[0]
        while True:
            if self._watcher is None:
                self._rewatch.clear()  # a reconnect from here on is one the new watcher missed
                try:
                    self._watcher = await self.kv.watchall()
                except Exception as e:  # no quorum yet, or still reconnecting
                    log.warning("sessions bucket %s: cannot watch it (%s); again in %.1f s",
                                self.bucket, e or type(e).__name__, retry)
                    await asyncio.sleep(retry)
                    retry = min(retry * 2, WATCH_RETRY_S[1])
                    continue
                log.info("sessions bucket %s: watching it again", self.bucket)
            retry = WATCH_RETRY_S[0]
            why = await self._mirror(self._watcher)
            log.warning("sessions bucket %s: %s; re-creating its watcher", self.bucket, why)
            watcher, self._watcher = self._watcher, None
            with contextlib.suppress(Exception):
                await watcher.stop()

    async def _mirror(self, watcher) -> str:
        """Apply what ``watcher`` delivers until it must be replaced; returns why."""
        tasks = [asyncio.create_task(self._apply(watcher)),
                 asyncio.create_task(self._check(watcher))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            return done.pop().result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _apply(self, watcher) -> str:
        # A new watcher first delivers every live entry: what it did not deliver by its
        # end-of-initial-values marker was deleted while we were not watching.
        current: set[str] | None = set()
        async for entry in watcher:
            if entry is None:  # the initial values have all been delivered
                if current is not None:
                    for key in set(self.entries) - current:
                        self.entries.pop(key, None)
                    current = None
                self.synced.set()
                continue
            if current is not None:
                current.add(entry.key)
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                self.entries.pop(entry.key, None)
                continue
            try:
                record = SessionRecord.model_validate_json(entry.value)
            except ValueError as e:
                log.error("session entry %s is unreadable, ignored: %s", entry.key, e)
                continue
            self.entries[entry.key] = record
            if self._on_change is not None:
                self._on_change(record)
        return "the watcher stopped"

    async def _check(self, watcher) -> str:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rewatch.wait(), WATCH_CHECK_S)
            if self._rewatch.is_set():
                return "reconnected to NATS"
            try:
                await watcher._sub.consumer_info()  # as nats-py's own kv.keys() does
            except NotFoundError:
                return "its consumer is gone (the server it lived on went away)"
            except Exception as e:  # disconnected, or no JetStream quorum for the moment
                log.debug("sessions bucket %s: watcher not checked: %s", self.bucket, e)

    async def create(self, record: SessionRecord) -> int:
        return await self.kv.create(record.session, record.model_dump_json().encode())

    async def save(self, record: SessionRecord, revision: int) -> int:
        """Write if nobody else has since ``revision``; :class:`Fenced` otherwise."""
        record = record.model_copy(update={"updated_us": now_us()})
        for attempt in range(SAVE_ATTEMPTS):
            try:
                return await self.kv.update(record.session, record.model_dump_json().encode(),
                                            last=revision)
            except KeyWrongLastSequenceError:
                raise Fenced(f"session {record.session} was taken over") from None
            except NoStreamResponseError:
                # No stream leader (a node was lost and JetStream is electing one): nothing
                # was stored, so the same compare-and-set still holds; try it again shortly.
                if attempt + 1 == SAVE_ATTEMPTS:
                    raise
                await asyncio.sleep(SAVE_RETRY_S * (attempt + 1))
        raise AssertionError("unreachable")

    async def adopt(self, session: str, owner: str) -> tuple[SessionRecord, int] | None:
        """Make ``owner`` the owner of an orphaned session; None if another replica won."""
        try:
            entry = await self.kv.get(session)
        except KeyNotFoundError:  # ended meanwhile
            return None
        if not entry.value:
            return None
        record = SessionRecord.model_validate_json(entry.value)
        record = record.model_copy(update={"owner": owner})
        try:
            return record, await self.save(record, entry.revision)
        except Fenced:
            return None

    async def delete(self, session: str, owner: str) -> bool:
        """Forget a finished session, only if ``owner`` still owns it (compare-and-set on the
        revision read: an adopter's newer write wins). False if it was not deleted."""
        try:
            entry = await self.kv.get(session)
            record = SessionRecord.model_validate_json(entry.value or b"{}")
        except KeyNotFoundError:
            return True
        except ValueError:
            record = None  # unreadable: whoever ends it may delete it
        if record is not None and record.owner not in (owner, ""):
            log.warning("session %s belongs to %s: not deleting it", session, record.owner)
            return False
        try:
            await self.kv.delete(session, last=entry.revision)
            return True
        except KeyWrongLastSequenceError:
            log.warning("session %s changed while being deleted: left for its owner", session)
            return False
        except Exception as e:  # reconnecting: the record expires with the bucket's TTL
            log.warning("session %s not deleted: %s", session, e)
            return False

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
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from pydantic import BaseModel, ConfigDict, Field

from voxbus.bus import now_us
from voxbus.subjects import Subjects

log = logging.getLogger("voxbus.orchestrator.store")

RECORD_VERSION = 1


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
                 on_change: Callable[[SessionRecord], None] | None = None):
        self.bucket = Subjects(prefix).sessions_bucket()
        self._js = nc.jetstream()
        self._max_age_s = max_age_s
        self.kv = None
        self.entries: dict[str, SessionRecord] = {}
        """Every live session's record, kept current by a watcher."""
        self._watcher = None
        self._watch_task: asyncio.Task | None = None
        self.synced = asyncio.Event()
        self._on_change = on_change
        """Told of every record written (by any replica), as soon as the bucket says so."""

    async def open(self) -> SessionStore:
        try:
            self.kv = await self._js.key_value(self.bucket)
        except BucketNotFoundError:
            # Several replicas may create it at once; creating an identical bucket is a no-op.
            self.kv = await self._js.create_key_value(bucket=self.bucket, history=1,
                                                      ttl=self._max_age_s)
        self._watcher = await self.kv.watchall()
        self._watch_task = asyncio.create_task(self._follow(), name=f"{self.bucket}-watch")
        return self

    async def close(self) -> None:
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
        if self._watch_task:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task

    async def _follow(self) -> None:
        async for entry in self._watcher:
            if entry is None:  # the initial values have all been delivered
                self.synced.set()
                continue
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

    async def create(self, record: SessionRecord) -> int:
        return await self.kv.create(record.session, record.model_dump_json().encode())

    async def save(self, record: SessionRecord, revision: int) -> int:
        """Write if nobody else has since ``revision``; :class:`Fenced` otherwise."""
        record = record.model_copy(update={"updated_us": now_us()})
        try:
            return await self.kv.update(record.session, record.model_dump_json().encode(),
                                        last=revision)
        except KeyWrongLastSequenceError:
            raise Fenced(f"session {record.session} was taken over") from None

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

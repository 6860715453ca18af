"""Each ended session's post-call state in JetStream KV: what was extracted, where it went.

The record is written before delivery, so a redelivered session end (the stage died, or the
webhook failed) delivers the same fields again without asking the model a second time, and
``voxbus sessions`` / the control plane read the outcome from here.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoKeysError
from pydantic import BaseModel, Field

from voxbus.bus import now_us
from voxbus.subjects import Subjects

Status = Literal["extracting", "extracted", "delivered", "failed"]
FINISHED = ("delivered", "failed")


class PostCallRecord(BaseModel):
    session: str
    agent: str
    status: Status
    """``extracting``: a replica claimed the work; ``extracted``: fields (or an extraction
    error) stored, not yet delivered."""
    end_seq: int = 0
    """The recording stream sequence of the ``SessionEnd`` whose work this is: a second end
    of the same session finds another's claim here and leaves the work to it."""
    fields: dict[str, Any] | None = None
    error: str | None = None
    """Why ``fields`` is empty (the extraction's own failure); still delivered."""
    target: str = ""
    """Where it goes: ``webhook <url>`` or ``nats <subject>``."""
    attempts: int = 0
    """Deliveries of the session's end so far (JetStream's count)."""
    last_failure: str = ""
    """Why the last delivery attempt failed (a ``failed`` record: why it gave up)."""
    ended_reason: str = ""
    ended_at_us: int = 0
    updated_us: int = Field(default_factory=now_us)


class ResultStore:
    """The results bucket of one prefix: the post-call stage (services/post_call/) writes it;
    ``voxbus sessions`` and the control plane read it."""

    def __init__(self, js, prefix: str):
        self.js = js
        self.bucket = Subjects(prefix).post_call_bucket()
        self.kv = None

    async def open(self, *, create: bool = False, ttl_s: float = 0, replicas: int = 1
                   ) -> ResultStore | None:
        """Bind the bucket; ``create`` makes it if missing, else None when there is none."""
        try:
            self.kv = await self.js.key_value(self.bucket)
        except BucketNotFoundError:
            if not create:
                return None
            self.kv = await self.js.create_key_value(bucket=self.bucket, history=1,
                                                     ttl=ttl_s or None, replicas=replicas)
        return self

    async def get(self, session: str) -> PostCallRecord | None:
        try:
            entry = await self.kv.get(session)
        except KeyNotFoundError:
            return None
        if not entry or not entry.value:
            return None
        return PostCallRecord.model_validate_json(entry.value)

    async def put(self, record: PostCallRecord) -> None:
        record = record.model_copy(update={"updated_us": now_us()})
        await self.kv.put(record.session, record.model_dump_json().encode())

    async def claim(self, record: PostCallRecord) -> bool:
        """Store ``record`` only if the session has none yet (compare-and-set): False when
        another replica got there first."""
        from nats.js.errors import KeyWrongLastSequenceError

        record = record.model_copy(update={"updated_us": now_us()})
        try:
            await self.kv.create(record.session, record.model_dump_json().encode())
        except KeyWrongLastSequenceError:
            return False
        return True

    async def all(self) -> dict[str, PostCallRecord]:
        """Every stored result (``voxbus sessions``)."""
        out: dict[str, PostCallRecord] = {}
        try:
            keys = await self.kv.keys()
        except NoKeysError:  # nats-py's answer for an empty bucket
            return out
        for key in keys:
            if (record := await self.get(key)) is not None:
                out[key] = record
        return out


def summary(record: PostCallRecord | None) -> dict[str, Any] | None:
    """The record as ``voxbus sessions --json`` shows it."""
    if record is None:
        return None
    return json.loads(record.model_dump_json(include={
        "status", "fields", "error", "target", "attempts", "last_failure", "updated_us"}))


def describe_result(record: PostCallRecord) -> str:
    """One line for ``voxbus sessions``: the outcome and the fields (or why none)."""
    if record.status == "failed":
        return f"failed after {record.attempts} attempts: {record.last_failure}"
    what = (json.dumps(record.fields, ensure_ascii=False) if record.fields is not None
            else f"error: {record.error}")
    if record.status == "extracting":
        return f"extracting ({record.attempts} attempts so far)"
    if record.status == "extracted":
        return f"pending delivery ({record.attempts} attempts) {what}"
    return f"delivered to {record.target} {what}"

"""``voxbus post_call``: extract and deliver each ended session's post-call result.

Fed by one durable JetStream pull consumer on the recording stream, filtered to every session's
``ctl`` subject: the replicas fetch from the same consumer, so each session end goes to one of
them (the stage's queue group), and one that ends while no replica runs waits in the consumer
until one does. A session end is acked only once its result was delivered; a failed attempt is
nak'ed with the next backoff wait; the last allowed delivery that fails gives up: the record
says ``failed``, an ``ErrorEvent`` goes on the session's error subject and a metric counts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError, NotFoundError

from services.orchestrator.agent import AgentConfig, AgentError, load_agent
from services.post_call.deliver import DeliveryFailed, deliver
from services.post_call.extract import extract
from services.post_call.metrics import DELAY, SESSIONS
from voxbus.errors import VoxbusError
from voxbus.post_call_results import FINISHED, PostCallRecord, ResultStore
from voxbus.runner import Service
from voxbus.stage_call import CallPolicy
from voxbus.subjects import Stage
from voxbus.transcript import read_transcript, us_of
from voxbus.wire import PostCallResult, SessionEnd, SessionStart, WireError, decode

log = logging.getLogger("voxbus.post_call")

ACK_WAIT_S = 30.0
"""A replica that dies mid-session has its session end redelivered after this long; a live
one says it is still working every ``PROGRESS_S``."""
PROGRESS_S = 10.0
REPLAY_END = "replay done"
"""The ``SessionEnd`` reason of a session ``voxbus replay`` fed (voxbus/replay.py)."""
RETRY_BIND_S = 2.0
"""Pause before looking again for a recording stream that is not there yet."""


class PostCallStage(Service):
    stage = Stage.POST_CALL
    capacity = 2
    """Sessions worked on at once by one replica (each mostly waits on the LLM stage)."""

    def __init__(self, settings=None):
        super().__init__(settings)
        self.max_deliver = len(self.settings.post_call_backoff_s) + 1
        self.results: ResultStore | None = None
        self.http: aiohttp.ClientSession | None = None
        self._loops: list[asyncio.Task] = []
        self._working: set[str] = set()

    def sessions(self) -> list[str]:
        return sorted(self._working)

    async def on_start(self) -> None:
        self.js = self.bus.nc.jetstream()
        st = self.settings
        self.results = await ResultStore(self.js, st.prefix).open(
            create=True, ttl_s=st.record_max_age_s, replicas=st.js_replicas)
        self.http = aiohttp.ClientSession()
        self._loops = [self.spawn(self._consume(i), name=f"{self.worker_id}-consume-{i}")
                       for i in range(self.declared_capacity or 1)]

    def consumer_config(self) -> ConsumerConfig:
        """Every session end in the recording stream (``DeliverPolicy.ALL``: a deployment whose
        stage starts after its first sessions still gets them), acked one by one."""
        name = self.subjects.post_call_consumer()
        return ConsumerConfig(
            name=name, durable_name=name, filter_subject=self.subjects.all_ctl(),
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT_S, max_deliver=self.max_deliver, max_ack_pending=256,
            description="voxbus post-call stage: session ends not yet processed")

    async def _subscription(self):
        """Bind to the durable (made on first use, by whichever replica is first); waits for
        the recording stream, which ``voxbus up`` (or ``voxbus record --enable``) creates."""
        stream = self.subjects.recording_stream()
        name = self.subjects.post_call_consumer()
        said = False
        while not self.draining:
            try:
                # Create, or bring an existing one's retries up to this replica's settings.
                info = await self.js.add_consumer(stream, self.consumer_config())
                self.max_deliver = info.config.max_deliver or self.max_deliver
                return await self.js.pull_subscribe_bind(durable=name, stream=stream)
            except NotFoundError:
                if not said:
                    said = True
                    message = (f"no recording stream {stream}: post-call work reads session "
                               "ends and transcripts from it (VOXBUS_RECORD=1, or voxbus "
                               "record --enable); waiting for it")
                    log.warning("%s: %s", self.worker_id, message)
                    await self.bus.report("no_recording", message, retryable=True)
                await asyncio.sleep(RETRY_BIND_S)
            except BadRequestError as e:  # made otherwise (an older config): use it as it is
                log.warning("%s: consumer %s not updated (%s); using it as it is",
                            self.worker_id, name, e)
                info = await self.js.consumer_info(stream, name)
                self.max_deliver = info.config.max_deliver or self.max_deliver
                return await self.js.pull_subscribe_bind(durable=name, stream=stream)
        return None  # drained while waiting

    async def _consume(self, n: int) -> None:
        """Fetch and work one session end at a time until drained; a broken subscription (the
        connection lost, the stream recreated) is bound again."""
        while not self.draining:
            sub = await self._subscription()
            if sub is None:
                return
            try:
                while not self.draining:
                    try:
                        batch = await sub.fetch(1, timeout=1.0)
                    except NatsTimeout:
                        continue
                    for msg in batch:
                        await self._handle(msg)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("%s: consumer %d: %s: %s; binding again", self.worker_id, n,
                            type(e).__name__, e)
                await asyncio.sleep(RETRY_BIND_S)
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _handle(self, msg) -> None:
        try:
            frame = decode(msg.data)
        except WireError:
            await msg.term()  # the bus already reported it when it was published
            return
        if not isinstance(frame, SessionEnd):
            await msg.ack()  # a Cancel, or an STT claim: nothing to do after a session
            return
        session = self.subjects.session_of(msg.subject) or ""
        self._working.add(session)
        self.inflight += 1
        progress = self.spawn(self._in_progress(msg), name=f"{session}-progress")
        try:
            await self._session(msg, session, frame)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # reported, and the session end comes back later
            log.exception("%s: post-call work failed", session)
            await self._failed(msg, session, None, f"{type(e).__name__}: {e}")
        finally:
            progress.cancel()
            self.inflight -= 1
            self._working.discard(session)

    async def _in_progress(self, msg) -> None:
        while True:
            await asyncio.sleep(PROGRESS_S)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _session(self, msg, session: str, end: SessionEnd) -> None:
        meta = msg.metadata
        seq = meta.sequence.stream
        record = await self.results.get(session)
        if record is not None and (record.status in FINISHED or record.end_seq != seq):
            # A second SessionEnd of the same session (the agent hung up, then an operator):
            # the first one's work is done, or is owned by its own unacked delivery.
            await msg.ack()
            return
        if end.reason == REPLAY_END:
            # A recorded call replayed into the live system must not post to a real CRM.
            SESSIONS.labels("skipped").inc()
            await msg.ack()
            return
        agent = await self._agent(session)
        if agent is None or agent.post_call is None:
            SESSIONS.labels("skipped").inc()
            await msg.ack()
            return
        config = agent.post_call
        ended_us = us_of(meta.timestamp)
        if record is None:
            record = PostCallRecord(session=session, agent=agent.name, status="extracting",
                                    end_seq=seq, target=config.deliver.describe(),
                                    ended_reason=end.reason, ended_at_us=ended_us)
            if not await self.results.claim(record):
                await msg.ack()  # another replica took this session a moment ago
                return
        lines = await read_transcript(self.js, self.subjects, session, until_seq=seq)
        if record.status != "extracted":
            st = self.settings
            done = await extract(self.bus, session, config, lines, policy=CallPolicy(
                first_frame_s=st.post_call_llm_s, give_up_s=st.post_call_llm_s * 2,
                stall_s=max(st.stage_stall_s, 10.0)))
            record = record.model_copy(update={"status": "extracted", "fields": done.fields,
                                               "error": done.error})
            await self.results.put(record)
        record = record.model_copy(update={"attempts": meta.num_delivered})
        result = PostCallResult(
            id=f"post_call-{session}", session=session, agent=agent.name,
            ended_reason=record.ended_reason, ended_at_us=record.ended_at_us,
            fields=record.fields, error=record.error,
            transcript=[{"turn": line.turn, "role": line.role, "text": line.text,
                         "at_us": line.at_us} for line in lines])
        try:
            where = await deliver(self.bus, self.http, config.deliver, result,
                                  secret=self.settings.post_call_secret,
                                  timeout_s=self.settings.post_call_webhook_timeout_s)
        except DeliveryFailed as e:
            await self._failed(msg, session, record, str(e))
            return
        await self.results.put(record.model_copy(update={"status": "delivered",
                                                         "target": where,
                                                         "last_failure": ""}))
        await msg.ack()
        SESSIONS.labels("delivered").inc()
        DELAY.observe(max(0.0, time.time() - ended_us / 1e6))
        log.info("%s: post-call result delivered to %s (%s)", session, where,
                 "fields" if record.fields is not None else f"error: {record.error}")

    async def _agent(self, session: str) -> AgentConfig | None:
        """The session's agent, as its recorded ``SessionStart`` named it; None for a session
        that never started one (a stage replay's)."""
        try:
            start = await self.js.get_last_msg(self.subjects.recording_stream(),
                                               self.subjects.work_copy(session,
                                                                       Stage.ORCHESTRATOR))
        except NotFoundError:
            return None
        try:
            frame = decode(start.data or b"")
        except WireError:
            return None
        if not isinstance(frame, SessionStart):
            return None
        try:
            return load_agent(frame.agent, self.settings.agents_dir)
        except AgentError as e:
            raise VoxbusError(f"agent {frame.agent!r}: {e}") from None

    async def _failed(self, msg, session: str, record: PostCallRecord | None,
                      why: str) -> None:
        """One attempt failed: try again after the next backoff wait, or give up if this was
        the last delivery JetStream allows."""
        delivered = msg.metadata.num_delivered
        last = delivered >= self.max_deliver
        if record is None:  # failed before it had one in hand: the claim, if it got that far
            with contextlib.suppress(Exception):
                record = await self.results.get(session)
        if record is None and last:  # nothing stored at all: the record still says it failed
            record = PostCallRecord(session=session, agent="", status="failed")
        if record is not None:
            record = record.model_copy(update={"attempts": delivered, "last_failure": why,
                                               "status": "failed" if last else record.status})
            try:
                await self.results.put(record)
            except Exception as e:  # the redelivery (or the ErrorEvent) still says it
                log.warning("%s: post-call record not saved: %s", session, e)
        subject = self.subjects.ctl(session) if session else ""
        if last:
            message = (f"post-call result of session {session} given up after {delivered} "
                       f"attempts: {why}")
            log.error("%s: %s", session, message)
            SESSIONS.labels("given_up").inc()
            await self.bus.report("post_call_failed", message, subject=subject)
            await msg.term()
            return
        wait = self.settings.post_call_backoff_s[delivered - 1]
        log.warning("%s: post-call attempt %d of %d failed (%s); again in %g s", session,
                    delivered, self.max_deliver, why, wait)
        await self.bus.report("post_call_retry", f"attempt {delivered} of {self.max_deliver} "
                              f"failed: {why}; again in {wait:g} s", subject=subject,
                              retryable=True)
        await msg.nak(delay=wait)

    async def on_drain(self) -> None:
        # The loops stop fetching; what they hold finishes (bounded by the drain grace).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._loops, return_exceptions=True),
                                   self.settings.drain_grace_s)

    async def on_stop(self) -> None:
        if self.http is not None:
            await self.http.close()

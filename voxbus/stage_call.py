"""The one way to call a stage over the bus, for every caller (orchestrator, talk, replay, tests).

Streamed work (an LLM completion, a TTS sentence) gets a deadline for its first frame, after
which the same request also goes to another replica (a hedge: whichever attempt answers first
is used, the other is cancelled, and since each attempt replies on a subject of its own its late
frames are dropped by construction); "no responders" and an error before any frame move on to
the next attempt at once; a reply that starts and then stalls fails; a caller that stops
listening early cancels the stage's work. One-shot requests (an STT claim, a session start) go
through :func:`ask`, which retries only what is safe to retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from voxbus.bus import Bus
from voxbus.errors import Full, StageFailed, StageUnavailable, VoxbusError
from voxbus.liveness import Liveness
from voxbus.metrics import RETRIES
from voxbus.subjects import Stage
from voxbus.wire import Cancel, Frame, LlmDone, TtsDone, WireError, decode

log = logging.getLogger("voxbus.stage_call")

TERMINAL = (LlmDone, TtsDone)
PLACEMENT_TRIES = 3
"""Least-loaded replicas a session start tries by name before the queue group."""
"""Frames that end a streamed reply (exactly one per attempt, error or not)."""


@dataclass(frozen=True)
class CallPolicy:
    first_frame_s: float = 1.5
    """No first frame by then: the request goes to another replica too."""
    give_up_s: float = 5.0
    """No first frame from any attempt by then (from the start of the call): failed."""
    stall_s: float = 6.0
    """A reply that started, then sent nothing for this long, has stalled."""
    attempts: int = 2
    """Replicas tried at most (the first plus one retry)."""
    unavailable_wait_s: float = 0.3
    """Pause before retrying after "no responders" (a replica may be restarting)."""


class _NoResponders:
    """NATS said nobody listens on the work subject (a 503 status on the reply subject)."""


NO_RESPONDERS = _NoResponders()


class StageCall:
    """One streamed request: ``async with StageCall(...) as call: async for frame in call``.

    Iteration yields the winning attempt's data frames and stops at its terminal frame, kept in
    ``done`` (its ``error`` tells a reply that failed part-way). A call that gets no answer at
    all raises :class:`StageUnavailable`; one whose every attempt failed or that stalled raises
    :class:`StageFailed`. Leaving the ``async with`` early cancels what is still running.
    """

    def __init__(self, bus: Bus, stage: Stage, request: Frame, *,
                 policy: CallPolicy | None = None, reply: Callable[[int], str] | None = None,
                 first_attempt: int = 0, retry_to: Callable[[], str | None] | None = None,
                 can_hedge: Callable[[], bool] | None = None):
        self.bus = bus
        self.stage = Stage(stage)
        self.request = request
        self.policy = policy or CallPolicy()
        self.session: str = request.session  # type: ignore[attr-defined]
        self.turn: int = request.turn  # type: ignore[attr-defined]
        index = getattr(request, "index", 0)
        self._reply = reply or (lambda attempt: bus.subjects.reply(
            self.session, self.stage, self.turn, index, attempt))
        self._queue: asyncio.Queue[tuple[int, Frame | _NoResponders | str]] = asyncio.Queue()
        self._subs: dict[int, Subscription] = {}
        self._running: set[int] = set()
        """Attempts a replica may still be working on (no terminal frame seen)."""
        self.sent = 0
        self._retry_to = retry_to
        """Names the replica a retry goes to (the one heard from last); None: the queue group,
        which may pick the very replica that did not answer."""
        self._can_hedge = can_hedge
        """Whether a slow first attempt is worth a second one now (False with one replica:
        the copy would queue behind the original at the same replica, doubling its load)."""
        self._base = first_attempt
        """Attempt numbers start here: a caller that calls again for the same request (to
        resume a reply that broke part-way) gets reply subjects the first call never used."""
        self.winner: int | None = None
        self.done: Frame | None = None
        self.errors: list[str] = []
        """Why each failed attempt failed, in order."""
        self._unavailable: list[bool] = []
        self.started = time.monotonic()
        self.first_frame_at: float | None = None
        self._last_frame_at = self.started
        self._closed = False

    @property
    def retried(self) -> bool:
        return self.sent > 1

    @property
    def reply_subject(self) -> str:
        """Where the answer that was used came (the first attempt's, if none answered)."""
        return self._reply(self.winner if self.winner is not None else self._base)

    async def __aenter__(self) -> StageCall:
        await self._send()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def __aiter__(self) -> StageCall:
        return self

    async def __anext__(self) -> Frame:
        while self.done is None:
            try:
                attempt, item = await asyncio.wait_for(self._queue.get(), self._budget())
            except TimeoutError:
                await self._deadline()
                continue
            if self.winner is not None and attempt != self.winner:
                continue  # the abandoned attempt's late frame
            if isinstance(item, _NoResponders):
                await self._failed(attempt, f"no {self.stage} replica is listening",
                                   unavailable=True)
            elif isinstance(item, str):
                await self._failed(attempt, item)
            elif isinstance(item, TERMINAL):
                self._running.discard(attempt)
                error = getattr(item, "error", None)
                if self.winner is None and error and error != "cancelled":
                    # (cancelled: the session stopped this turn's work itself, a barge-in)
                    await self._failed(attempt, error)
                    continue
                if self.winner is None and not error and not item.count and self._running:
                    # An empty answer while another attempt may still give a real one (an
                    # endpoint that cut this stream off for the other request): wait for it.
                    await self._failed(attempt, f"attempt {attempt} answered nothing")
                    continue
                await self._win(attempt)
                self.done = item
            else:
                if self.winner is None:
                    self.first_frame_at = time.monotonic()
                    await self._win(attempt)
                self._last_frame_at = time.monotonic()
                return item
        raise StopAsyncIteration

    async def close(self) -> None:
        """Stop listening; whatever a replica is still doing for this call is cancelled."""
        if self._closed:
            return
        self._closed = True
        for attempt in list(self._subs):
            await self._drop(attempt)

    # --- attempts ---------------------------------------------------------------------

    async def _send(self) -> None:
        attempt = self._base + self.sent
        self.sent += 1
        subject = self._reply(attempt)

        async def on(msg: Msg) -> None:
            if msg.headers and msg.headers.get("Status") == "503" and not msg.data:
                await self._queue.put((attempt, NO_RESPONDERS))
                return
            try:
                await self._queue.put((attempt, decode(msg.data)))
            except WireError as e:
                await self.bus.report(e.code, e.message, subject=msg.subject)
                await self._queue.put((attempt, f"bad reply frame: {e}"))

        self._subs[attempt] = await self.bus.nc.subscribe(subject, cb=on)
        self._running.add(attempt)
        request = self.request
        if "attempt" in type(request).model_fields:
            request = request.model_copy(update={"attempt": attempt})
        target = self.bus.subjects.work(self.stage)
        worker = self._retry_to() if self._retry_to and self.sent > 1 else None
        if worker:
            target = self.bus.subjects.work_direct(self.stage, worker)
        await self.bus.publish(target, request, reply=subject)

    def _budget(self) -> float:
        now = time.monotonic()
        p = self.policy
        if self.winner is not None:
            return max(0.0, self._last_frame_at + p.stall_s - now)
        if self.sent < p.attempts and self._hedging():
            return max(0.0, self.started + p.first_frame_s - now)
        return max(0.0, self.started + p.give_up_s - now)

    async def _deadline(self) -> None:
        p = self.policy
        if self.winner is not None:
            raise StageFailed(f"{self.stage} reply stalled: nothing for {p.stall_s:g} s "
                              f"(session {self.session} turn {self.turn})")
        if self.sent < p.attempts and self._hedging():
            log.warning("%s turn %d: no %s frame within %.1f s; asking another replica",
                        self.session, self.turn, self.stage, p.first_frame_s)
            RETRIES.labels(self.stage.value, "deadline").inc()
            await self._send()
            return
        raise StageUnavailable(f"no {self.stage} reply within {p.give_up_s:g} s from "
                               f"{self.sent} replica(s) (session {self.session} turn {self.turn})")

    def _hedging(self) -> bool:
        return self._can_hedge is None or self._can_hedge()

    async def _failed(self, attempt: int, reason: str, *, unavailable: bool = False) -> None:
        """One attempt is over without an answer; try the next, or fail if none is left."""
        self.errors.append(reason)
        self._unavailable.append(unavailable)
        self._running.discard(attempt)
        await self._drop(attempt)
        if self._running:
            return  # the other attempt may still answer
        if self.sent < self.policy.attempts:
            log.warning("%s turn %d: %s attempt %d failed (%s); retrying", self.session,
                        self.turn, self.stage, attempt, reason)
            if unavailable:
                await asyncio.sleep(self.policy.unavailable_wait_s)
            RETRIES.labels(self.stage.value, "unavailable" if unavailable else "error").inc()
            await self._send()
            return
        raise (StageUnavailable if all(self._unavailable) else StageFailed)(
            f"{self.stage}: {'; '.join(dict.fromkeys(self.errors))} "
            f"(session {self.session} turn {self.turn}, {self.sent} attempt(s))")

    async def _win(self, attempt: int) -> None:
        self.winner = attempt
        for other in [a for a in self._subs if a != attempt]:
            await self._drop(other)

    async def _drop(self, attempt: int) -> None:
        sub = self._subs.pop(attempt, None)
        if sub is not None:
            with contextlib.suppress(Exception):  # the connection may be closing
                await sub.unsubscribe()
        if attempt in self._running:
            self._running.discard(attempt)
            try:
                await self.bus.publish(self.bus.subjects.ctl(self.session), Cancel(
                    session=self.session, turn=self.turn, reply=self._reply(attempt)))
            except Exception as e:  # reconnecting: the replica's work ends on its own
                log.warning("%s: cancel of %s attempt %d not sent: %s", self.session,
                            self.stage, attempt, e)


async def ask(bus: Bus, stage: Stage, frame: Frame, *, timeout_s: float = 5.0,
              attempts: int = 2, idempotent: bool = False,
              placement: Liveness | None = None) -> Frame:
    """A one-shot request to a stage: to its least-loaded replicas first when ``placement``
    knows them, else (or when they are all full) to its queue group.

    "No responders" (nobody got it) is always retried, after a short pause for a replica that
    is restarting; a timeout is retried only for ``idempotent`` requests, since the replica that
    timed out may have acted on it. A replica that is full is passed over for the next one; any
    other refusal (an ``ErrorEvent`` reply) is raised as is.
    """
    for worker in (placement.least_loaded(stage) if placement else [])[:PLACEMENT_TRIES]:
        try:
            reply = await bus.request(bus.subjects.work_direct(stage, worker), frame,
                                      timeout=timeout_s)
        except StageUnavailable as e:
            if e.reason != "no_responders" and not idempotent:
                raise
            continue  # gone since its last heartbeat
        except VoxbusError as e:
            if e.code != Full.code:
                raise
            continue
        placement.note_work(worker)
        return reply
    last: StageUnavailable | None = None
    for attempt in range(attempts):
        try:
            return await bus.request(bus.subjects.work(stage), frame, timeout=timeout_s)
        except StageUnavailable as e:
            last = e
            if e.reason != "no_responders" and not idempotent:
                break
            if attempt + 1 < attempts:
                await asyncio.sleep(CallPolicy.unavailable_wait_s)
    assert last is not None
    raise last

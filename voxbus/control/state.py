"""What the control plane knows, built only from what the bus already says: replicas from their
heartbeats, sessions from the sessions bucket, turns and errors from session events.

Nothing here talks to NATS: :mod:`voxbus.control.service` feeds it frames and records, and the
gRPC servicer reads it. Every per-session window and the list of ended sessions is bounded, so a
long-running control service holds a fixed amount of memory per live session.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from voxbus.control.protos import pb
from voxbus.wire import ErrorEvent, Heartbeat, Metric, TurnEvent

log = logging.getLogger("voxbus.control.state")

MAX_TURNS = 50
"""Turns kept per session (the most recent)."""
MAX_ERRORS = 50
"""Errors kept per session (the most recent)."""
MAX_ENDED = 200
"""Ended sessions still answered by GetSession (the most recent)."""
WATCH_QUEUE = 1000
"""Events a slow watcher may fall behind by; past it the oldest are dropped (and counted)."""

Kind = pb.Event.Kind


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class WorkerView:
    hb: Heartbeat
    first_seen_ms: int
    last_seen_ms: int
    last_seen: float
    """Monotonic time of the last heartbeat."""


@dataclass
class SessionView:
    id: str
    started_ms: int
    record: Any = None
    """The latest ``SessionRecord`` from the bucket (None: seen only in events)."""
    ended_ms: int = 0
    turns: collections.OrderedDict[int, dict[str, Any]] = field(
        default_factory=collections.OrderedDict)
    pending: dict[str, float] = field(default_factory=dict)
    """Figures sent without a turn number (the STT stage's): they belong to the next turn."""
    errors: collections.deque = field(default_factory=lambda: collections.deque(maxlen=MAX_ERRORS))


class Watchers:
    """Fan-out of events to every ``WatchEvents`` stream, each with a bounded queue."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue] = set()
        self.dropped = 0

    def open(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=WATCH_QUEUE)
        self._queues.add(queue)
        return queue

    def close(self, queue: asyncio.Queue) -> None:
        self._queues.discard(queue)

    def publish(self, event: Any) -> None:
        for queue in self._queues:
            if queue.full():  # a watcher that does not read: it loses the oldest, not us
                queue.get_nowait()
                self.dropped += 1
            queue.put_nowait(event)


class ControlState:
    """Replicas and sessions as the bus tells them, and the events their changes make."""

    def __init__(self, lease_s: float):
        self.lease_s = lease_s
        self.workers: dict[str, WorkerView] = {}
        self.sessions: dict[str, SessionView] = {}
        self.ended: collections.OrderedDict[str, SessionView] = collections.OrderedDict()
        self.watchers = Watchers()
        self._ending: dict[str, asyncio.Event] = {}
        """Sessions someone waits to see end (EndSession)."""

    def _emit(self, kind: int, **fields: Any) -> None:
        self.watchers.publish(pb.Event(kind=kind, at_unix_ms=now_ms(), **fields))

    # --- replicas -------------------------------------------------------------------------

    def on_heartbeat(self, hb: Heartbeat) -> None:
        seen = self.workers.get(hb.worker)
        now = now_ms()
        if seen is None:
            self.workers[hb.worker] = WorkerView(hb, now, now, time.monotonic())
            self._emit(Kind.WORKER_JOINED, worker=hb.worker, stage=hb.stage,
                       detail=f"{hb.worker} joined ({hb.stage}, version {hb.version or '?'}, "
                              f"capacity {hb.capacity})")
            if hb.draining:
                self._emit(Kind.WORKER_DRAINING, worker=hb.worker, stage=hb.stage,
                           detail=f"{hb.worker} is draining")
            return
        was_draining = seen.hb.draining
        seen.hb, seen.last_seen_ms, seen.last_seen = hb, now, time.monotonic()
        if hb.draining and not was_draining:
            self._emit(Kind.WORKER_DRAINING, worker=hb.worker, stage=hb.stage,
                       detail=f"{hb.worker} is draining ({len(hb.sessions)} sessions, "
                              f"{hb.inflight} in flight)")

    def lease_of(self, view: WorkerView) -> float:
        """Silence after which a replica has left: the lease, or 3 of its own heartbeats."""
        return max(self.lease_s, 3 * view.hb.interval_s)

    def sweep_workers(self) -> None:
        now = time.monotonic()
        for worker, view in list(self.workers.items()):
            silent = now - view.last_seen
            if silent >= self.lease_of(view):
                del self.workers[worker]
                self._emit(Kind.WORKER_LEFT, worker=worker, stage=view.hb.stage,
                           detail=f"{worker} left (no heartbeat for {silent:.1f} s)")

    def alive(self, worker: str) -> bool:
        return worker in self.workers

    def worker_pb(self, view: WorkerView) -> Any:
        hb = view.hb
        return pb.Worker(id=hb.worker, stage=hb.stage, version=hb.version,
                         sessions=hb.sessions, inflight=max(hb.inflight, 0), load=hb.load,
                         capacity=hb.capacity, draining=hb.draining,
                         last_seen_unix_ms=view.last_seen_ms,
                         first_seen_unix_ms=view.first_seen_ms)

    # --- sessions -------------------------------------------------------------------------

    def _view(self, session: str) -> SessionView | None:
        """The live session's view, made on first sight; None once it has ended here."""
        if session in self.ended:
            return None
        view = self.sessions.get(session)
        if view is None:
            view = self.sessions[session] = SessionView(session, now_ms())
        return view

    def on_record(self, record: Any) -> None:
        """A session's stored state was written (by any orchestrator replica)."""
        view = self._view(record.session)
        if view is None:
            return
        before, view.record = view.record, record
        if before is None:
            self._emit(Kind.SESSION_STARTED, session=record.session, worker=record.owner,
                       stage="orchestrator",
                       detail=f"session {record.session} ({record.agent}) on "
                              f"{record.owner or '-'}")
        elif record.owner and record.owner != before.owner:
            self._emit(Kind.SESSION_ADOPTED, session=record.session, worker=record.owner,
                       stage="orchestrator",
                       detail=f"session {record.session} adopted by {record.owner} from "
                              f"{before.owner or '(handed over)'} at turn {record.turn}")

    def sweep_sessions(self, live: set[str]) -> None:
        """``live``: the bucket's keys now. A session we knew that is gone from it ended."""
        for session, view in list(self.sessions.items()):
            if view.record is not None and session not in live:
                self.end(session, "its state was deleted (the session ended)")

    def end(self, session: str, why: str) -> None:
        view = self.sessions.pop(session, None)
        if view is None:
            return
        view.ended_ms = now_ms()
        self.ended[session] = view
        while len(self.ended) > MAX_ENDED:
            self.ended.popitem(last=False)
        if (waiting := self._ending.get(session)) is not None:
            waiting.set()
        self._emit(Kind.SESSION_ENDED, session=session,
                   worker=view.record.owner if view.record else "", stage="orchestrator",
                   detail=f"session {session} ended: {why}")

    async def wait_ended(self, session: str, timeout_s: float) -> bool:
        """Until ``session`` ends (True) or ``timeout_s`` passes (False, if still live)."""
        if session not in self.sessions:
            return True
        event = self._ending.setdefault(session, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            return session not in self.sessions
        finally:
            self._ending.pop(session, None)
        return True

    def _turn(self, view: SessionView, turn: int) -> dict[str, Any]:
        entry = view.turns.get(turn)
        if entry is None:
            entry = view.turns[turn] = {"latency_ms": dict(view.pending), "state": "",
                                        "node": "", "tool_calls": []}
            view.pending.clear()
            while len(view.turns) > MAX_TURNS:
                view.turns.popitem(last=False)
        return entry

    def on_metric(self, session: str, metric: Metric) -> None:
        view = self._view(session)
        if view is None:
            return
        if metric.turn <= 0:
            view.pending[metric.name] = metric.value_ms
        else:
            self._turn(view, metric.turn)["latency_ms"][metric.name] = metric.value_ms

    def on_turn(self, session: str, event: TurnEvent) -> None:
        view = self._view(session)
        if view is None:
            return
        if event.turn > 0:
            entry = self._turn(view, event.turn)
            entry["state"] = event.state
            if event.node:
                entry["node"] = event.node
            if event.tool_calls:
                entry["tool_calls"] = list(event.tool_calls)
        if event.state == "resumed":
            owner = view.record.owner if view.record else ""
            self._emit(Kind.SESSION_RESUMED, session=session, worker=owner,
                       stage="orchestrator",
                       detail=f"session {session} resumed at turn {event.turn}"
                              + (f", node {event.node}" if event.node else ""))

    def on_error(self, session: str | None, error: ErrorEvent) -> None:
        item = pb.SessionError(at_unix_ms=now_ms(), service=error.service, code=error.code,
                               message=error.message, retryable=error.retryable)
        if session:
            view = self._view(session) or self.ended.get(session)
            if view is not None:
                view.errors.append(item)
        self._emit(Kind.ERROR, session=session or "", worker=error.service,
                   detail=f"{error.service}: {error.code}: {error.message}", error=item)

    def state_of(self, view: SessionView) -> str:
        if view.ended_ms:
            return "ended"
        owner = view.record.owner if view.record else ""
        if not owner:
            return "handing_over"
        return "running" if self.alive(owner) else "orphaned"

    def session_pb(self, view: SessionView) -> Any:
        r = view.record
        return pb.Session(
            id=view.id, agent=r.agent if r else "", node=(r.node or "") if r else "",
            turns=max(r.turn, 0) if r else 0, orchestrator=r.owner if r else "",
            stt_worker=(r.stt_worker or "") if r else "", started_unix_ms=view.started_ms,
            state=self.state_of(view), updated_unix_ms=r.updated_us // 1000 if r else 0,
            ended_unix_ms=view.ended_ms)

    def detail_pb(self, view: SessionView) -> Any:
        turns = [pb.Turn(turn=n, latency_ms=t["latency_ms"], state=t["state"], node=t["node"],
                         tool_calls=t["tool_calls"]) for n, t in view.turns.items()]
        return pb.SessionDetail(session=self.session_pb(view), turns=turns,
                                errors=list(view.errors))

    def current_events(self) -> list[Any]:
        """One event per live session and replica, for a watcher that asks for them first."""
        events = [pb.Event(kind=Kind.WORKER_JOINED, at_unix_ms=v.first_seen_ms, worker=w,
                           stage=v.hb.stage, detail=f"{w} is up ({v.hb.stage})")
                  for w, v in self.workers.items()]
        events += [pb.Event(kind=Kind.SESSION_STARTED, at_unix_ms=v.started_ms, session=s,
                            worker=v.record.owner if v.record else "", stage="orchestrator",
                            detail=f"session {s} is live")
                   for s, v in self.sessions.items() if v.record is not None]
        return events

"""Who is alive, from the heartbeats every replica publishes (see ``Service._heartbeats``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from nats.aio.msg import Msg

from voxbus.bus import Bus
from voxbus.subjects import Stage
from voxbus.wire import Frame, Heartbeat


@dataclass
class Seen:
    at: float
    sessions: set[str] = field(default_factory=set)
    draining: bool = False
    stage: str = ""
    load: float = 0.0
    """Work in progress over declared capacity, 0-1, as the replica last reported it."""
    capacity: int = 0


class Liveness:
    """Last heartbeat of every replica of some stages; a replica silent for ``lease_s`` is gone."""

    def __init__(self, bus: Bus, lease_s: float):
        self.bus = bus
        self.lease_s = lease_s
        self.seen: dict[str, Seen] = {}
        self.since = time.monotonic()
        self._subs = []

    async def watch(self, *stages: Stage) -> Liveness:
        for stage in stages:
            self._subs.append(await self.bus.subscribe(self.bus.subjects.heartbeat(stage),
                                                       self._on_heartbeat))
        self.since = time.monotonic()
        self.bus.on_reconnected(self.reconnected)
        return self

    def reconnected(self) -> None:
        """Our own connection was down: the heartbeats we missed say nothing about the others.
        Not warm again until we have listened for a whole lease, so nothing is adopted or
        re-claimed because of our outage."""
        self.since = time.monotonic()

    async def close(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection is already closing
                pass
        self._subs = []

    async def _on_heartbeat(self, frame: Frame, _msg: Msg) -> None:
        if isinstance(frame, Heartbeat):
            self.seen[frame.worker] = Seen(time.monotonic(), set(frame.sessions), frame.draining,
                                           frame.stage, frame.load, frame.capacity)

    @property
    def warm(self) -> bool:
        """Listened long enough that a replica we have not heard from is really silent."""
        return time.monotonic() - self.since >= self.lease_s

    def alive(self, worker: str) -> bool:
        seen = self.seen.get(worker)
        return seen is not None and time.monotonic() - seen.at < self.lease_s

    def replicas(self, stage: Stage) -> int:
        """Live replicas of ``stage`` that take work (heard within a lease, not draining)."""
        now = time.monotonic()
        return sum(1 for s in self.seen.values() if s.stage == Stage(stage).value
                   and not s.draining and now - s.at < self.lease_s)

    def freshest(self, stage: Stage, *, room: bool = False) -> str | None:
        """The replica of ``stage`` heard from most recently (not draining): a frozen or dead
        replica stops heartbeating at once, so it is never this one for long. ``room``: only
        one that is not full (a retry after a ``full`` refusal must not land there again)."""
        now = time.monotonic()
        live = [(s.at, w) for w, s in self.seen.items()
                if s.stage == Stage(stage).value and not s.draining and now - s.at < self.lease_s
                and not (room and s.load >= 1.0)]
        return max(live)[1] if live else None

    def least_loaded(self, stage: Stage) -> list[str]:
        """Replicas of ``stage`` that take new work, least loaded first (the freshest first
        among equals); a full one (load 1) is left out: it would refuse."""
        now = time.monotonic()
        live = [(s.load, -s.at, w) for w, s in self.seen.items()
                if s.stage == Stage(stage).value and not s.draining and now - s.at < self.lease_s
                and s.load < 1.0]
        return [w for _load, _at, w in sorted(live)]

    def note_work(self, worker: str) -> None:
        """We just gave ``worker`` a session: count it until its next heartbeat says so, so
        sessions started within one heartbeat do not all pick the same replica."""
        seen = self.seen.get(worker)
        if seen is not None and seen.capacity:
            seen.load = min(1.0, seen.load + 1 / seen.capacity)

    def serving(self, worker: str, session: str) -> bool:
        seen = self.seen.get(worker)
        return self.alive(worker) and seen is not None and session in seen.sessions

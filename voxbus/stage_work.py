"""Per-request work of a stage replica: tasks cancellable by (session, turn) or by reply subject,
and the admission that bounds how many run at once and how many may wait for a turn."""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from voxbus.errors import Full


@dataclass(frozen=True)
class _Owned:
    turn: int
    reply: str


class TurnTasks:
    """Owns the tasks doing work for session turns.

    ``cancel`` stops a turn and every older one (barge-in), or, given a reply subject, only the
    one request answering there (a caller that gave up on one attempt of a retried call).
    """

    def __init__(self):
        self._tasks: dict[str, dict[asyncio.Task, _Owned]] = defaultdict(dict)

    def start(self, session: str, turn: int, coro, *, reply: str = "",
              on_done: Callable[[], None] | None = None) -> asyncio.Task:
        """``on_done`` runs when the task ends however it ends, even cancelled before its
        coroutine ever ran (where no ``finally`` of the coroutine's would): a
        :class:`Ticket`'s ``release``, so a cancelled request never keeps its slot."""
        task = asyncio.create_task(coro, name=f"{session}/{turn}")
        self._tasks[session][task] = _Owned(turn, reply)

        def forget(t: asyncio.Task) -> None:
            owned = self._tasks.get(session)
            if owned is not None:
                owned.pop(t, None)
                if not owned:
                    self._tasks.pop(session, None)
            if on_done is not None:
                on_done()

        task.add_done_callback(forget)
        return task

    def cancel(self, session: str, turn: int, reply: str = "") -> int:
        cancelled = 0
        for task, owned in list(self._tasks.get(session, {}).items()):
            hit = owned.reply == reply if reply else owned.turn <= turn
            if hit and not task.done():
                task.cancel()
                cancelled += 1
        return cancelled

    def __len__(self) -> int:
        return sum(len(v) for v in self._tasks.values())

    async def wait_idle(self) -> None:
        pending = [t for owned in self._tasks.values() for t in owned]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def cancel_all(self) -> None:
        pending = [t for owned in self._tasks.values() for t in owned]
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


class _Depth(Protocol):
    """What the queue's depth is counted on: a Prometheus gauge (child)."""

    def inc(self, amount: float = 1) -> None: ...

    def dec(self, amount: float = 1) -> None: ...


class Admission:
    """At most ``capacity`` requests run at once; up to ``queue_max`` more wait, first come
    first served; one more is refused with :class:`Full`, so its caller asks another replica
    rather than wait behind work it cannot see. ``capacity`` 0: no bound, nothing waits.

    A waiting request sends nothing: its caller's first-frame deadline runs through the
    wait, and a caller that gives up (a hedge won elsewhere, a barge-in) cancels it, which
    takes it out of the queue without it ever running. ``depth`` counts the waiting requests
    up and down (never ``set``: replicas sharing a process, as in tests, add up).
    """

    def __init__(self, capacity: int, queue_max: int, *, name: str = "replica",
                 depth: _Depth | None = None):
        self.capacity = capacity
        self.queue_max = queue_max
        self.name = name
        self.running = 0
        self._waiting: deque[Ticket] = deque()
        self._depth = depth

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def admit(self, what: str) -> Ticket:
        """A ticket that runs now or waits its turn; decided at once, in arrival order."""
        if not self.capacity or (self.running < self.capacity and not self._waiting):
            self.running += 1
            return Ticket(self, queued=False)
        if len(self._waiting) >= self.queue_max:
            raise Full(f"{self.name} is full ({self.running} running, {len(self._waiting)} "
                       f"waiting, {self.queue_max} may wait); not taking {what}")
        ticket = Ticket(self, queued=True)
        self._waiting.append(ticket)
        if self._depth is not None:
            self._depth.inc()
        return ticket

    def _leave_queue(self, ticket: Ticket) -> None:
        self._waiting.remove(ticket)
        if self._depth is not None:
            self._depth.dec()

    def _free(self) -> None:
        """A running request ended: its slot goes to the oldest waiting one, if any."""
        if self._waiting:
            nxt = self._waiting[0]
            self._leave_queue(nxt)
            nxt._grant()
        else:
            self.running -= 1


class Ticket:
    """One request's place: ``async with ticket:`` waits for its turn, then holds a slot until
    the block ends; ``release`` (idempotent) gives back whatever it holds."""

    def __init__(self, admission: Admission, *, queued: bool):
        self._admission = admission
        self._turn = asyncio.Event()
        self.state = "queued" if queued else "running"
        if not queued:
            self._turn.set()

    def _grant(self) -> None:
        self.state = "running"
        self._turn.set()

    async def wait(self) -> None:
        try:
            await self._turn.wait()
        except BaseException:  # cancelled while waiting: out of the queue, or pass the slot on
            self.release()
            raise

    def release(self) -> None:
        if self.state == "queued":
            self._admission._leave_queue(self)
        elif self.state == "running":
            self._admission._free()
        self.state = "done"

    async def __aenter__(self) -> Ticket:
        await self.wait()
        return self

    async def __aexit__(self, *exc) -> None:
        self.release()

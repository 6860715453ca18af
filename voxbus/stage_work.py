"""Per-request work tasks of a stage replica, cancellable by (session, turn) or by reply subject."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass


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

    def start(self, session: str, turn: int, coro, *, reply: str = "") -> asyncio.Task:
        task = asyncio.create_task(coro, name=f"{session}/{turn}")
        self._tasks[session][task] = _Owned(turn, reply)

        def forget(t: asyncio.Task) -> None:
            owned = self._tasks.get(session)
            if owned is not None:
                owned.pop(t, None)
                if not owned:
                    self._tasks.pop(session, None)

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

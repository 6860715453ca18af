"""Per-turn work tasks of a stage replica, cancellable by (session, turn)."""

from __future__ import annotations

import asyncio
from collections import defaultdict


class TurnTasks:
    """Owns the tasks doing work for session turns; ``cancel`` stops a turn and older ones."""

    def __init__(self):
        self._tasks: dict[str, dict[asyncio.Task, int]] = defaultdict(dict)

    def start(self, session: str, turn: int, coro) -> asyncio.Task:
        task = asyncio.create_task(coro, name=f"{session}/{turn}")
        self._tasks[session][task] = turn

        def forget(t: asyncio.Task) -> None:
            owned = self._tasks.get(session)
            if owned is not None:
                owned.pop(t, None)
                if not owned:
                    self._tasks.pop(session, None)

        task.add_done_callback(forget)
        return task

    def cancel(self, session: str, turn: int) -> int:
        cancelled = 0
        for task, t in list(self._tasks.get(session, {}).items()):
            if t <= turn and not task.done():
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

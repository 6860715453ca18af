"""Supervised child processes: every line they write read and shown under their name, a tail
kept for the death report, a restart with exponential backoff after each death, and a stop
when one keeps dying; a child that announced it drained (an operator's ``voxbus ctl drain``) and
then exits 0 has stopped cleanly and stays stopped. Generic: ``voxbus up`` composes its children
from these."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

Emit = Callable[[str], None]

LINE_LIMIT = 1 << 20
"""Longest line a child may write before it is cut (asyncio's default, 64 KiB, raises)."""


def say(line: str) -> None:
    print(line, flush=True)


def describe_exit(returncode: int) -> str:
    """``signal SIGKILL`` or ``code 1``: how a process ended, as a person reads it."""
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"code {returncode}"


@dataclass
class Backoff:
    """Restart delays: ``first_s`` doubling to ``max_s``; a child that stayed up
    ``reset_after_s`` starts again from ``first_s``."""

    first_s: float = 0.5
    max_s: float = 10.0
    reset_after_s: float = 30.0

    def delays(self):
        """A generator: send it each death's uptime, it yields the delay before the restart."""
        delay = 0.0
        uptime = yield 0.0
        while True:
            delay = self.first_s if (delay == 0 or uptime >= self.reset_after_s) else min(
                delay * 2, self.max_s)
            uptime = yield delay


class ChildFailed(Exception):
    """A child that cannot be kept running; ``report()`` is what the user reads."""

    def __init__(self, child: Child, reason: str):
        super().__init__(f"{child.name} {reason}")
        self.child = child
        self.reason = reason
        self.returncode = child.returncode
        self.tail = list(child.tail)

    def report(self) -> str:
        lines = [str(self)]
        if self.tail:
            lines.append(f"last {len(self.tail)} lines of {self.child.name}'s output:")
            lines += [f"  | {t}" for t in self.tail]
        return "\n".join(lines)


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    """Linux: the child gets SIGKILL if ``voxbus up`` itself is killed, so nothing is orphaned."""
    _PRCTL(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


class Child:
    """One supervised process. Ready when a stdout line ends with ``ready_suffix`` or when
    ``probe()`` (blocking, run in a thread) returns True; either may be omitted."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str] | None = None,
                 ready_suffix: str | None = None, probe: Callable[[], bool] | None = None,
                 drained_suffix: str | None = None, must_start: bool = False,
                 hint: Callable[[int], str | None] | None = None,
                 tier: int = 0, tail_lines: int = 20, emit: Emit = say):
        self.name = name
        self.argv = argv
        self.env = env
        self.ready_suffix = ready_suffix
        self.probe = probe
        self.drained_suffix = drained_suffix
        """A stdout line ending so says the child drained on command: its exit 0 is final."""
        self.drained = False
        self.must_start = must_start
        """A death before the first readiness is fatal at once (infrastructure, not a stage)."""
        self.hint = hint
        """Turns a return code into advice (None: nothing to add)."""
        self.tier = tier
        """Stopped after every child of a higher tier (stages before the servers they use)."""
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.emit = emit
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.ever_ready = False
        self.exited = asyncio.Event()
        self.returncode: int | None = None
        self.started_at = 0.0
        self.probe_error: BaseException | None = None
        self._tasks: list[asyncio.Task] = []

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_at

    async def start(self) -> None:
        self.ready.clear()
        self.exited.clear()
        self.returncode = None
        self.drained = False
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, env=self.env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True, limit=LINE_LIMIT,
            preexec_fn=_die_with_parent if _PRCTL else None,
        )
        self.started_at = time.monotonic()
        assert self.proc.stdout and self.proc.stderr
        self._tasks = [asyncio.create_task(self._read(self.proc.stdout), name=f"{self.name}-out"),
                       asyncio.create_task(self._read(self.proc.stderr), name=f"{self.name}-err")]
        if self.probe:
            self._tasks.append(asyncio.create_task(self._probe(), name=f"{self.name}-probe"))

    def _mark_ready(self) -> None:
        self.ever_ready = True
        self.ready.set()

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line past LINE_LIMIT: take what is buffered as one line
                raw = await stream.read(LINE_LIMIT)
            if not raw:
                return
            text = raw.decode(errors="replace").rstrip()
            self.tail.append(text)
            if (self.ready_suffix and stream is self.proc.stdout
                    and text.endswith(self.ready_suffix)):
                self._mark_ready()
            if (self.drained_suffix and stream is self.proc.stdout
                    and text.endswith(self.drained_suffix)):
                self.drained = True
            self.emit(f"[{self.name}] {text}")

    async def _probe(self) -> None:
        assert self.probe is not None
        while self.running:
            try:
                if await asyncio.to_thread(self.probe):
                    self._mark_ready()
                    return
            except Exception as e:  # the probe's verdict on who answers (e.g. a taken port)
                self.probe_error = e
                self.exited.set()
                return
            await asyncio.sleep(0.2)

    async def wait(self) -> int:
        """Until the process exits and its output is read to the end; its return code."""
        assert self.proc is not None
        rc = await self.proc.wait()
        await self._finish_readers()
        self.returncode = rc
        self.exited.set()
        return rc

    async def _finish_readers(self) -> None:
        # A grandchild holding the pipes open must not keep us waiting for EOF.
        readers = [t for t in self._tasks if not t.get_name().endswith("-probe")]
        _, pending = await asyncio.wait(readers, timeout=2.0) if readers else ((), ())
        for t in (*pending, *(t for t in self._tasks if t not in readers)):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def until_ready(self) -> None:
        """Ready, or :class:`ChildFailed` if it exits (or its probe refuses it) first."""
        ready = asyncio.create_task(self.ready.wait())
        exited = asyncio.create_task(self.exited.wait())
        try:
            await asyncio.wait([ready, exited], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (ready, exited):
                t.cancel()
            await asyncio.gather(ready, exited, return_exceptions=True)
        if self.probe_error is not None:
            raise self.probe_error
        if not self.ready.is_set():
            raise ChildFailed(self, f"exited ({describe_exit(self.proc.returncode)}) before it "
                                    "was ready")

    def signal(self, sig: int) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    async def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to its process group, SIGKILL after ``grace_s``; safe to call twice."""
        if self.proc is None:
            return
        self.signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), grace_s)
        except TimeoutError:
            self.signal(signal.SIGKILL)
            await self.proc.wait()
        await self._finish_readers()


class Supervisor:
    """Runs children and keeps them running: a death is one line and a restart after a backoff;
    ``max_deaths`` within ``window_s`` (or a ``must_start`` child dying before it was ready)
    fails the whole supervisor, which ``guard()`` raises in whoever is waiting on it."""

    def __init__(self, *, emit: Emit = say, backoff: Backoff | None = None,
                 max_deaths: int = 5, window_s: float = 120.0):
        self.emit = emit
        self.backoff = backoff or Backoff()
        self.max_deaths = max_deaths
        self.window_s = window_s
        self.children: list[Child] = []
        self.failed: asyncio.Future[ChildFailed] = asyncio.get_running_loop().create_future()
        self._watchers: list[asyncio.Task] = []
        self._stopping = False

    async def start(self, child: Child) -> Child:
        """Start ``child`` and watch it from now on."""
        await child.start()
        self.children.append(child)
        self.emit(f"{child.name} started (pid {child.proc.pid})")
        self._watchers.append(asyncio.create_task(self._watch(child), name=f"watch-{child.name}"))
        return child

    async def _watch(self, child: Child) -> None:
        deaths: collections.deque[float] = collections.deque()
        delays = self.backoff.delays()
        next(delays)
        while True:
            rc = await child.wait()
            if self._stopping:
                return
            uptime = child.uptime_s
            if rc == 0 and child.drained:
                self.emit(f"{child.name} drained and exited (code 0) after {uptime:.1f} s; "
                          "not restarted")
                return
            if child.must_start and not child.ever_ready:
                self._fail(ChildFailed(child, f"exited ({describe_exit(rc)}) after {uptime:.1f} s"
                                              " before it was ready"))
                return
            now = time.monotonic()
            deaths.append(now)
            while deaths and now - deaths[0] > self.window_s:
                deaths.popleft()
            if len(deaths) >= self.max_deaths:
                self._fail(ChildFailed(child, f"keeps dying ({len(deaths)} deaths in "
                                              f"{now - deaths[0]:.0f} s, the last "
                                              f"{describe_exit(rc)})"))
                return
            delay = delays.send(uptime)
            self.emit(f"{child.name} exited ({describe_exit(rc)}) after {uptime:.1f} s; "
                      f"restarting in {delay:.1f} s")
            if child.hint and (advice := child.hint(rc)):
                self.emit(f"{child.name}: {advice}")
            await asyncio.sleep(delay)
            await child.start()
            self.emit(f"{child.name} started (pid {child.proc.pid})")

    def _fail(self, failure: ChildFailed) -> None:
        if not self.failed.done():
            self.failed.set_result(failure)

    async def guard(self, awaitable: Awaitable):
        """Await ``awaitable`` unless a child fails first: then cancel it and raise the failure."""
        work = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait([work, self.failed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        if work.done() and not work.cancelled() and work.exception() is None:
            return work.result()
        if self.failed.done():
            raise self.failed.result()
        return work.result()  # raises the work's own exception

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop watching, then stop children tier by tier, highest first; safe to call twice."""
        self._stopping = True
        for w in self._watchers:
            w.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        self._watchers = []
        for tier in sorted({c.tier for c in self.children}, reverse=True):
            await asyncio.gather(*(c.stop(grace_s) for c in self.children if c.tier == tier))

    def kill_all(self) -> None:
        """SIGKILL every running child now (a second Ctrl-C while stopping)."""
        for c in self.children:
            c.signal(signal.SIGKILL)

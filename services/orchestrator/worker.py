"""Orchestrator stage: takes sessions from the queue group and runs one pipeline per session.

Each session's resumable state lives in JetStream KV (:mod:`session_store`). Replicas watch each
other's heartbeats; a session whose owner has been silent for ``VOXBUS_LEASE_S`` is adopted by
another replica, which carries the conversation on at the same flow node with the same context.
A draining replica hands its sessions over instead of ending them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from nats.aio.msg import Msg

from services.orchestrator.agent import AgentError, load_agent
from services.orchestrator.metrics import ADOPTIONS
from services.orchestrator.session import SessionRunner
from services.orchestrator.session_store import SessionRecord, SessionStore
from voxbus.bus import now_us
from voxbus.liveness import Liveness
from voxbus.runner import Service
from voxbus.stage_call import CallPolicy
from voxbus.subjects import Event, Stage
from voxbus.wire import Frame, SessionStart, SessionStarted, TurnEvent

log = logging.getLogger("voxbus.orchestrator")


class OrchestratorWorker(Service):
    stage = Stage.ORCHESTRATOR

    def __init__(self, settings=None):
        super().__init__(settings)
        self.runners: dict[str, SessionRunner] = {}
        self.on_session = None
        """Called with each new SessionRunner before it starts (to register functions, tools)."""
        self.store: SessionStore | None = None
        self.liveness: Liveness | None = None
        self._adopting: set[str] = set()
        self._ending: set[str] = set()
        """Sessions being closed here: their record is ours until it is deleted, not an orphan."""
        st = self.settings
        self.policy = CallPolicy(first_frame_s=st.stage_first_frame_s,
                                 give_up_s=st.stage_give_up_s, stall_s=st.stage_stall_s)
        """Deadlines and retries of this replica's LLM and TTS calls."""
        self.fallback_audio: dict[tuple[str | None, str], tuple[bytes, int]] = {}
        """Each agent's fallback line, synthesized once per (voice, text)."""

    def sessions(self) -> list[str]:
        return sorted(self.runners)

    async def on_start(self) -> None:
        self.store = await SessionStore(self.bus.nc, self.settings.prefix,
                                        replicas=self.settings.js_replicas,
                                        on_change=self._on_record).open()
        self.bus.on_reconnected(self.store.resync)  # its watcher may have been on a lost node
        # Liveness registers its own: after our outage it listens a lease before judging.
        self.liveness = await Liveness(self.bus, self.settings.lease_s).watch(
            Stage.ORCHESTRATOR, Stage.STT, Stage.LLM, Stage.TTS)
        await self.subscribe(self.subjects.work(self.stage), self._on_start_session, work=True)
        self.spawn(self._adopt_orphans(), name=f"{self.worker_id}-adopt")
        self.spawn(self._watch_stt(), name=f"{self.worker_id}-stt-watch")

    async def _on_start_session(self, frame: Frame, msg: Msg) -> None:
        if not isinstance(frame, SessionStart):
            raise TypeError(f"expected SessionStart, got {type(frame).__name__}")
        if frame.session not in self.runners:
            self.refuse_if_full(f"session {frame.session}")
            agent = load_agent(frame.agent, self.settings.agents_dir)  # AgentError says why not
            runner = SessionRunner(self, frame.session, frame.sample_rate, agent)
            # The STT stream is claimed first: without it the session cannot hear anything.
            await self._claim_stt(runner)
            self.runners[frame.session] = runner
            if self.on_session:
                self.on_session(runner)
            await runner.start()
            runner.revision = await self.store.create(runner.snapshot(self.worker_id))
            self.spawn(runner.prepare_fallback(), name=f"{frame.session}-fallback")
            log.info("%s runs session %s", self.worker_id, frame.session)
        if msg.reply:
            await self.bus.publish(msg.reply, SessionStarted(session=frame.session,
                                                             orchestrator=self.worker_id))

    async def _claim_stt(self, runner: SessionRunner) -> None:
        link = runner.stt_link
        if link.worker and self.liveness.serving(link.worker, runner.session):
            link.claimed_at = time.monotonic()
            return  # an adopted session whose STT replica is still transcribing it
        await link.claim()

    async def _watch_stt(self) -> None:
        """Every session keeps an STT replica: one that died or let go is replaced."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            for runner in list(self.runners.values()):
                try:
                    await runner.stt_link.check(self.liveness, self.settings.lease_s)
                except Exception:  # one session's trouble must not stop the others' watch
                    log.exception("%s: STT watch failed", runner.session)

    def _on_record(self, record: SessionRecord) -> None:
        """A session's stored record changed: if another replica owns it now, we stop at once
        (two agents must never speak in one session), not only at our next save."""
        runner = self.runners.get(record.session)
        if runner is None or not record.owner or record.owner == self.worker_id:
            return
        log.warning("%s: session %s is owned by %s now; stopping here", self.worker_id,
                    record.session, record.owner)
        runner.fenced = True
        self.spawn(self.end_session(record.session, forget=False))

    # --- crash resume -----------------------------------------------------------------

    def _orphaned(self, record: SessionRecord) -> bool:
        if record.session in self.runners or record.session in self._adopting \
                or record.session in self._ending:
            return False
        if record.owner and record.owner != self.worker_id:
            if self.liveness.alive(record.owner):
                return False
            # A record written moments ago belongs to a replica whose heartbeat may not have
            # reached us yet.
            if now_us() - record.updated_us < self.settings.lease_s * 1e6:
                return False
        return True

    async def _adopt_orphans(self) -> None:
        await self.store.synced.wait()
        while True:
            await asyncio.sleep(self.settings.heartbeat_s * (0.5 + random.random()))
            if self.draining or not self.liveness.warm:
                continue
            for record in list(self.store.entries.values()):
                if self._orphaned(record):
                    self._adopting.add(record.session)
                    try:
                        await self._adopt(record)
                    except Exception as e:
                        log.exception("%s: could not adopt %s", self.worker_id, record.session)
                        await self.bus.report("adopt_failed", f"{record.session}: {e}",
                                              subject=self.subjects.ctl(record.session),
                                              retryable=True)
                    finally:
                        self._adopting.discard(record.session)

    async def _adopt(self, seen: SessionRecord) -> None:
        silent_since = seen.updated_us
        adopted = await self.store.adopt(seen.session, self.worker_id)
        if adopted is None:
            return  # another replica was faster, or the session ended
        record, revision = adopted
        try:
            agent = load_agent(record.agent, self.settings.agents_dir)
        except AgentError as e:
            await self.store.delete(record.session, self.worker_id)
            raise AgentError(f"cannot resume: {e}") from None
        started = time.monotonic()
        runner = SessionRunner(self, record.session, record.sample_rate, agent, resume=record)
        runner.revision = revision
        await self._claim_stt(runner)
        self.runners[record.session] = runner
        if self.on_session:
            self.on_session(runner)
        await runner.start()
        runner.save_soon()
        self.spawn(runner.prepare_fallback(), name=f"{record.session}-fallback")
        ADOPTIONS.inc()
        log.warning("%s adopted session %s from %s at node %s, turn %d (state %.1f s old, "
                    "resumed in %.0f ms)", self.worker_id, record.session, seen.owner or "-",
                    record.node, record.turn, (now_us() - silent_since) / 1e6,
                    (time.monotonic() - started) * 1000)
        await runner.publish_event(Event.TURN, TurnEvent(
            turn=record.turn, state="resumed", ts_us=now_us(), node=record.node))

    # --- endings ----------------------------------------------------------------------

    async def end_session(self, session: str, *, forget: bool = True) -> None:
        """Stop running a session; ``forget`` also drops its stored state (it really ended)."""
        runner = self.runners.pop(session, None)
        if runner is None:
            return
        self._ending.add(session)
        try:
            await runner.close()
            if forget and self.store and runner.revision is not None and not runner.fenced:
                await self.store.delete(session, self.worker_id)
        finally:
            self._ending.discard(session)
        log.info("%s %s session %s", self.worker_id, "ended" if forget else "let go of",
                 session)

    async def on_drain(self) -> None:
        # Hand over rather than hang up: mark each session ownerless, another replica adopts it.
        for session, runner in list(self.runners.items()):
            await self.end_session(session, forget=False)
            if runner.revision is not None:
                try:
                    await self.store.save(runner.snapshot(owner=""), runner.revision)
                except Exception as e:
                    log.warning("%s: not handed over (%s); it will be adopted when our lease "
                                "runs out", session, e)

    async def on_stop(self) -> None:
        for session in list(self.runners):
            await self.end_session(session, forget=False)
        if self.liveness:
            await self.liveness.close()
        if self.store:
            await self.store.close()

"""Orchestrator stage: takes sessions from the queue group and runs one pipeline per session."""

from __future__ import annotations

import logging

from nats.aio.msg import Msg

from services.orchestrator.agent import load_agent
from services.orchestrator.session import SessionRunner
from voxbus.runner import Service
from voxbus.subjects import Stage
from voxbus.wire import Frame, SessionStart, SessionStarted, SttClaim

log = logging.getLogger("voxbus.orchestrator")


class OrchestratorWorker(Service):
    stage = Stage.ORCHESTRATOR

    def __init__(self, settings=None):
        super().__init__(settings)
        self.runners: dict[str, SessionRunner] = {}
        self.on_session = None
        """Called with each new SessionRunner before it starts (to register functions, tools)."""

    def sessions(self) -> list[str]:
        return sorted(self.runners)

    async def on_start(self) -> None:
        await self.subscribe(self.subjects.work(self.stage), self._on_start_session, work=True)

    async def _on_start_session(self, frame: Frame, msg: Msg) -> None:
        if not isinstance(frame, SessionStart):
            raise TypeError(f"expected SessionStart, got {type(frame).__name__}")
        if frame.session not in self.runners:
            agent = load_agent(frame.agent, self.settings.agents_dir)  # AgentError says why not
            # The STT stream is claimed first: without it the session cannot hear anything.
            await self.bus.request(self.subjects.work(Stage.STT),
                                   SttClaim(session=frame.session, sample_rate=frame.sample_rate),
                                   timeout=5.0)
            runner = SessionRunner(self, frame.session, frame.sample_rate, agent)
            self.runners[frame.session] = runner
            if self.on_session:
                self.on_session(runner)
            await runner.start()
            log.info("%s runs session %s", self.worker_id, frame.session)
        if msg.reply:
            await self.bus.publish(msg.reply, SessionStarted(session=frame.session,
                                                             orchestrator=self.worker_id))

    async def end_session(self, session: str) -> None:
        runner = self.runners.pop(session, None)
        if runner:
            await runner.close()
            log.info("%s ended session %s", self.worker_id, session)

    async def on_drain(self) -> None:
        for session in list(self.runners):
            await self.end_session(session)

    async def on_stop(self) -> None:
        for session in list(self.runners):
            await self.end_session(session)


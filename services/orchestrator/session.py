"""One session's conversation: the session pipeline (``pipeline.conversation``) with its stages
on the bus, its flow, its stored state, its fallback lines and its per-turn figures."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING

from nats.aio.msg import Msg
from pipecat.flows import Flow, FlowManager
from pipecat.frames.frames import (
    BotStoppedSpeakingFrame,
    EndFrame,
    InputAudioRawFrame,
    LLMMessagesAppendFrame,
    LLMRunFrame,
    TTSSpeakFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext

from services.orchestrator.agent import load_flow
from services.orchestrator.echo_gate import EchoGate
from services.orchestrator.first_clause import reply_aggregator
from services.orchestrator.metrics import FALLBACKS, INTERRUPTIONS, STAGE_ERRORS
from services.orchestrator.pipeline import conversation
from services.orchestrator.proxies import BusAudioOutput, RemoteSTT, RemoteTTS
from services.orchestrator.remote_llm import RemoteLLM
from services.orchestrator.session_store import Fenced, SessionRecord
from services.orchestrator.speech_prefetch import SpeechPrefetcher
from services.orchestrator.stt_link import SttLink
from voxbus.audio import WIRE_RATE
from voxbus.bus import new_trace, now_us
from voxbus.errors import StageUnavailable, VoxbusError
from voxbus.metrics import observe_turn
from voxbus.pipecat_host import FrameTap, HostedPipeline
from voxbus.stage_call import StageCall
from voxbus.subjects import Event, Stage
from voxbus.wire import (
    AudioFlush,
    AudioIn,
    AudioOut,
    Cancel,
    Frame,
    Metric,
    SessionEnd,
    Transcript,
    TtsAudio,
    TtsRequest,
    TurnEvent,
)

if TYPE_CHECKING:
    from services.orchestrator.agent import AgentConfig
    from services.orchestrator.worker import OrchestratorWorker

log = logging.getLogger("voxbus.orchestrator")

FALLBACK_INDEX = 1_000_000
"""Sentence index of the fallback line's synthesis ahead of need (no turn has that many)."""


class SessionRunner:
    """Owns one session's pipeline, its subscriptions and its per-turn latency bookkeeping."""

    def __init__(self, worker: OrchestratorWorker, session: str, sample_rate: int,
                 agent: AgentConfig, *, resume: SessionRecord | None = None):
        self.worker = worker
        self.bus = worker.bus
        self.subjects = worker.subjects
        self.session = session
        self.agent = agent
        self.sample_rate = sample_rate
        self.turn = 0
        self.tool_calls: list[str] = []
        self._speech_stopped_at: float | None = None
        self._answer_due_since: float | None = None
        self._agent_turn_open = False
        """Between the user's turn ending and the agent finishing its answer: speech now is
        an interruption (Pipecat interrupts at every user turn start, even an idle agent)."""
        """When the user stopped speaking, until the first audio of the agent's answer."""
        self.trace: str | None = None
        """This turn's trace id: what any service publishes or logs for the turn carries it."""
        self._subs = []
        settings = worker.settings

        self.resume = resume
        """The stored state this runner carries on from (another replica ran the session)."""
        self.revision: int | None = None
        self.stt_link = SttLink(self, resume.stt_worker if resume else None)
        self.fenced = False
        """Another replica owns the session now: this runner stops and must not delete it."""
        self._fallback_said_in: int | None = None
        self._fallback_played_in: int | None = None
        self._saving: asyncio.Task | None = None
        self._dirty = False
        self.context = context = LLMContext(messages=list(resume.messages) if resume else None)
        if resume:
            # One turn id past the stored one: the owner that died may have begun a turn it
            # never saved, and its replies must not share subjects with ours.
            self.turn = resume.turn + 1
        self._idle_prompted = 0
        self.end_reason = "agent ended the conversation"
        # The reference (audio.out) is at the wire rate; other input rates go ungated.
        self.echo_gate = (EchoGate() if agent.turn.echo_gate and sample_rate == WIRE_RATE
                          else None)
        self.prefetch = (SpeechPrefetcher(self, reply_aggregator(settings.tts_first_clause))
                         if settings.speculate else None)
        """The first words of a speculated answer, synthesized while it is held."""
        self.stt = RemoteSTT(self)
        self.llm = RemoteLLM(self, system_instruction=agent.system_prompt,
                             llm_settings=agent.llm_request_settings())
        talk = conversation(context=context, turn=agent.turn, settings=settings, stt=self.stt,
                            llm=self.llm, tts=RemoteTTS(self), output=BusAudioOutput(self),
                            taps=[FrameTap((BotStoppedSpeakingFrame,), self._on_bot_stopped)])
        talk.user.add_event_handler("on_user_turn_idle", self._on_user_idle)
        talk.turn_stop.add_event_handler("on_speculation_confirmed",
                                         self._on_speculation_confirmed)
        self.pipeline = HostedPipeline(talk.processors, name=f"orch-{session}",
                                       sample_rate=sample_rate, out_sample_rate=16000)
        aggregators = talk.aggregators
        self.flow_manager: FlowManager | None = None
        self._flow: Flow | None = None
        if agent.flow:
            self._flow = load_flow(agent)
            self.flow_manager = FlowManager(llm=self.llm, context_aggregator=aggregators,
                                            worker=self.pipeline.worker,
                                            global_functions=self._flow.global_functions)
        self._closing = False

        @self.pipeline.worker.event_handler("on_pipeline_finished")
        async def _finished(_worker, _frame):
            if not self._closing:  # the agent ended the conversation (end_conversation)
                self.worker.spawn(self.bus.publish(self.subjects.ctl(self.session), SessionEnd(
                    session=self.session, reason=self.end_reason)))

    async def start(self) -> None:
        await self.pipeline.start()
        if self.worker.settings.llm_warm and not self.resume:
            # (A resumed conversation was being answered a moment ago: nothing to warm.)
            self.worker.spawn(self.llm.warm(self.context), name=f"warm-{self.session}")
        if self.resume:
            self.llm.resumed(self.context)
            # Whatever the previous owner still had running for the session stops.
            await self.bus.publish(self.subjects.ctl(self.session),
                                   Cancel(session=self.session, turn=self.resume.turn))
        if self.flow_manager and self._flow:
            if self.resume and self.resume.node:
                # Carry on at the stored node: its state back, nothing said or done again.
                self.flow_manager.state.update(self.resume.flow_state)
                node = {**self._flow.node(self.resume.node), "respond_immediately": False}
                node.pop("pre_actions", None)
                await self.flow_manager.initialize(node)
            else:
                await self.flow_manager.initialize(self._flow.initial_node)
        if self.resume and self._unanswered():
            # The previous owner died (or drained) between the user's words and its answer.
            log.warning("%s: the user's last turn was not answered before the takeover; "
                        "answering it", self.session)
            await self.pipeline.queue(LLMRunFrame())
        sub = self.worker.subscribe
        self._subs = [
            await sub(self.subjects.audio_in(self.session), self._on_audio, expect=AudioIn),
            await sub(self.subjects.event(self.session, Event.TRANSCRIPT), self.stt.on_transcript,
                      expect=Transcript),
            await sub(self.subjects.ctl(self.session), self._on_ctl),
        ]

    async def close(self) -> None:
        self._closing = True
        self.stt_link.close()
        if self._saving:
            self._saving.cancel()
        for s in self._subs:
            try:
                await s.unsubscribe()
            except Exception as e:
                log.debug("unsubscribe: %s", e)
        self._subs = []
        await self.pipeline.stop()
        self.bus.set_trace(self.session, None)

    # --- inputs ---------------------------------------------------------------------

    async def _on_audio(self, frame: Frame, _msg: Msg) -> None:
        if isinstance(frame, AudioIn):
            self.stt_link.audio(frame.seq, frame.pcm)
            pcm = self.echo_gate.filter(frame.pcm) if self.echo_gate else frame.pcm
            audio = InputAudioRawFrame(audio=pcm, sample_rate=frame.sample_rate, num_channels=1)
            audio.metadata["seq"] = frame.seq
            await self.pipeline.queue(audio)

    async def _on_ctl(self, frame: Frame, _msg: Msg) -> None:
        if isinstance(frame, SessionEnd):
            # Not inline: closing unsubscribes the very subscription running this handler.
            self.worker.spawn(self.worker.end_session(self.session))

    # --- called by the proxies ------------------------------------------------------

    def note_vad(self, started: bool, frame) -> None:
        self.stt_link.vad(started)
        if started:
            self._speech_stopped_at = None
        else:
            # The VAD fires stop_secs after the last speech; date the speech end back.
            self._speech_stopped_at = time.monotonic() - (frame.stop_secs or 0.0)

    @property
    def node(self) -> str | None:
        return self.flow_manager.current_node if self.flow_manager else None

    # --- resumable state ------------------------------------------------------------

    def snapshot(self, owner: str) -> SessionRecord:
        messages = [m for m in self.context.get_messages() if isinstance(m, dict)]
        flow_state = dict(self.flow_manager.state) if self.flow_manager else {}
        return SessionRecord(
            session=self.session, agent=self.agent.name, sample_rate=self.sample_rate,
            owner=owner, turn=self.turn, node=self.node, stt_worker=self.stt_link.worker,
            # Whatever a handler or the context holds, stored as the JSON it would print as.
            flow_state=json.loads(json.dumps(flow_state, default=str)),
            messages=json.loads(json.dumps(messages, default=str)))

    def save_soon(self) -> None:
        """Store the state in the background; writes coalesce, the live path never waits."""
        self._dirty = True
        if self.revision is not None and (self._saving is None or self._saving.done()):
            self._saving = self.worker.spawn(self._save())

    async def _save(self) -> None:
        store = self.worker.store
        while self._dirty and not self._closing and store and self.revision is not None:
            self._dirty = False
            try:
                self.revision = await store.save(self.snapshot(self.worker.worker_id),
                                                 self.revision)
            except Fenced as e:
                log.warning("%s: %s; stopping here", self.session, e)
                self.worker.spawn(self.worker.end_session(self.session, forget=False))
                return
            except Exception as e:  # NATS reconnecting: the next turn's save retries
                log.warning("%s: state not saved: %s", self.session, e)
                return

    async def _on_bot_stopped(self, _frame) -> None:
        self._agent_turn_open = False
        self.save_soon()
        await self.publish_event(Event.TURN, TurnEvent(
            turn=self.turn, state="bot_stopped", ts_us=now_us(), node=self.node,
            tool_calls=list(self.tool_calls)))

    def note_tool_calls(self, names: list[str]) -> None:
        """Tool calls the LLM made in this turn (reported to clients with the turn)."""
        self.tool_calls.extend(n for n in names if n)

    def note_transcript(self, _t: Transcript) -> None:
        """The user said something: a silent spell that follows starts its count afresh."""
        self._idle_prompted = 0

    async def _on_user_idle(self, _aggregator) -> None:
        """The user stayed silent after the agent finished: prompt them, or at last hang up."""
        turn = self.agent.turn
        if self._idle_prompted < turn.idle_prompts:
            self._idle_prompted += 1
            await self.pipeline.queue(LLMMessagesAppendFrame(
                messages=[{"role": "developer", "content": turn.idle_prompt}], run_llm=True))
            return
        log.info("%s: user silent after %d prompts; hanging up", self.session, turn.idle_prompts)
        self.end_reason = "user idle"
        await self.pipeline.queue(TTSSpeakFrame(turn.idle_goodbye))
        await self.pipeline.queue(EndFrame())

    def _unanswered(self) -> bool:
        messages = [m for m in self.context.get_messages() if isinstance(m, dict)]
        return bool(messages) and messages[-1].get("role") == "user"

    def begin_bot_turn(self, *, speculative: bool = False) -> int:
        """The user's turn ended and the context goes to the LLM: a new turn id (saved, so a
        replica taking over knows the turn and the words it has to answer). A speculative
        answer (the user may not be done) gets its id now and its turn end when confirmed."""
        self.turn += 1
        self.trace = new_trace()
        self.bus.set_trace(self.session, self.trace)
        if not speculative:
            self.user_turn_ended()
        return self.turn

    def user_turn_ended(self) -> None:
        """The turn the LLM is answering is the user's, ended now: its figures start here."""
        self.save_soon()
        self.tool_calls: list[str] = []
        self._answer_due_since = self._speech_stopped_at
        self._agent_turn_open = True
        if self._speech_stopped_at is not None:
            eou = (time.monotonic() - self._speech_stopped_at) * 1000
            self.worker.spawn(self.metric("eou_delay", eou, self.turn))
        self.worker.spawn(self.publish_event(Event.TURN, TurnEvent(
            turn=self.turn, state="user_ended", ts_us=now_us())))

    async def _on_speculation_confirmed(self, _strategy) -> None:
        self.llm.speculation_confirmed()
        self.user_turn_ended()

    async def interrupted(self) -> None:
        # Whatever any replica still does for this turn (a queued sentence, the loser of a
        # hedged call) stops: the user is talking.
        if self._agent_turn_open:
            INTERRUPTIONS.inc()
            self._agent_turn_open = False
        self._answer_due_since = None
        await self.bus.publish(self.subjects.ctl(self.session),
                               Cancel(session=self.session, turn=self.turn))
        self.save_soon()
        await self.publish_event(Event.TURN, TurnEvent(turn=self.turn, state="interrupted",
                                                       ts_us=now_us()))

    async def publish_event(self, kind: Event, frame: Frame) -> None:
        await self.bus.publish(self.subjects.event(self.session, kind), frame)

    async def publish_audio(self, frame: Frame, play_at: float | None = None) -> None:
        if isinstance(frame, AudioOut) and self._answer_due_since is not None:
            e2e, self._answer_due_since = time.monotonic() - self._answer_due_since, None
            self.worker.spawn(self.metric("e2e_latency", e2e * 1000, frame.turn))
        if self.echo_gate:
            if isinstance(frame, AudioOut):
                self.echo_gate.reference(frame.pcm, play_at or time.monotonic())
            elif isinstance(frame, AudioFlush):
                self.echo_gate.flush()
        await self.bus.publish(self.subjects.audio_out(self.session), frame)

    # --- failures -------------------------------------------------------------------

    async def stage_failed(self, stage: Stage, error: Exception, turn: int) -> None:
        """A stage could not do its part of a turn: the session hears about it (an error event
        on ``evt.error``: clients, the page and the recording see it), logged and counted."""
        code = f"{stage}_{'unavailable' if isinstance(error, StageUnavailable) else 'failed'}"
        STAGE_ERRORS.labels(stage.value, code).inc()
        await self.report(code, f"turn {turn}: {error}")

    def retry_target(self, stage: Stage):
        """For a stage call's retry: the replica of ``stage`` heard from most recently that is
        not full (None: the queue group decides)."""
        liveness = self.worker.liveness
        return (lambda: liveness.freshest(stage, room=True)) if liveness else None

    def hedge_when(self, stage: Stage):
        """A slow call is hedged only when another replica of ``stage`` is alive to take it."""
        liveness = self.worker.liveness
        return (lambda: liveness.replicas(stage) > 1) if liveness else None

    def owes_fallback(self, turn: int) -> bool:
        """True once per turn: the turn failed and the user has not heard the fallback yet."""
        if self._fallback_said_in == turn:
            return False
        self._fallback_said_in = turn
        return True

    async def say_fallback(self, stage: Stage, turn: int) -> None:
        if self.owes_fallback(turn):
            FALLBACKS.labels(stage.value).inc()
            await self.pipeline.queue(TTSSpeakFrame(self.agent.fallback_line,
                                                    append_to_context=False))

    def fallback_audio(self, turn: int) -> tuple[bytes, int] | None:
        """The fallback line as audio, for a turn whose TTS failed (once per turn)."""
        if self._fallback_played_in == turn:
            return None
        self._fallback_played_in = turn
        FALLBACKS.labels(Stage.TTS.value).inc()
        return self.worker.fallback_audio.get((self.agent.voice, self.agent.fallback_line))

    async def prepare_fallback(self) -> None:
        """Synthesize the fallback line once per voice, ahead of need: when the TTS stage is
        what failed, it can no longer be asked."""
        key = (self.agent.voice, self.agent.fallback_line)
        if key in self.worker.fallback_audio:
            return
        request = TtsRequest(session=self.session, turn=0, index=FALLBACK_INDEX,
                             text=self.agent.fallback_line, voice=self.agent.voice)
        pcm, rate = bytearray(), WIRE_RATE
        try:
            async with StageCall(self.bus, Stage.TTS, request, policy=self.worker.policy,
                                 retry_to=self.retry_target(Stage.TTS)) as call:
                async for item in call:
                    if isinstance(item, TtsAudio):
                        pcm += item.pcm
                        rate = item.sample_rate
        except VoxbusError as e:
            log.warning("%s: fallback line not synthesized ahead (%s)", self.session, e)
            return
        if pcm:
            self.worker.fallback_audio[key] = (bytes(pcm), rate)

    async def metric(self, name: str, value_ms: float, turn: int) -> None:
        observe_turn(name, value_ms / 1000, Stage.ORCHESTRATOR.value)
        await self.publish_event(Event.METRIC, Metric(name=name, value_ms=value_ms, turn=turn))

    async def report(self, code: str, message: str) -> None:
        log.warning("%s: %s: %s", self.session, code, message)
        await self.bus.report(code, message, subject=self.subjects.ctl(self.session),
                              retryable=True)

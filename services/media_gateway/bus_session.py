"""The bus half of one gateway session, whatever carries its audio (WebRTC, a phone call).

A transport subclasses :class:`BusSession` and implements how the agent's audio is played
(``play``/``flush``/``queued_s``) and how the transport is closed; the session's start on the
bus, the caller's numbered ``AudioIn`` frames, the agent's audio and events, the state
(listening/thinking/speaking), the ``e2e_latency`` figure, the idle watch and the one
``SessionEnd`` live here once. It subscribes only to its own session's subjects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, ClassVar

from nats.aio.msg import Msg

from services.media_gateway.metrics import AUDIO_UNDERRUNS
from voxbus.audio import WIRE_RATE
from voxbus.bus import now_us
from voxbus.errors import VoxbusError
from voxbus.metrics import observe_turn
from voxbus.stage_call import ask
from voxbus.subjects import Stage
from voxbus.wire import (
    AudioFlush,
    AudioIn,
    AudioOut,
    BotText,
    ErrorEvent,
    Frame,
    Metric,
    SessionEnd,
    SessionStart,
    Transcript,
    TurnEvent,
    VadEvent,
    VadState,
)

if TYPE_CHECKING:
    from services.media_gateway.worker import GatewayWorker

log = logging.getLogger("voxbus.gateway")

CONNECT_GRACE_S = 20.0  # ICE + DTLS + first audio; a loaded machine can take seconds
SEQ_HISTORY = 1500  # 30 s of 20 ms frames: when each sent frame left, to date speech ends
LISTEN_AFTER_S = 0.4  # a drained buffer this long means the agent finished speaking
MAX_QUEUED_S = 60.0
"""Agent audio the outbound buffer may hold; the orchestrator paces it, so more is a fault."""
SESSION_EVENTS = (Transcript, BotText, VadEvent, TurnEvent, Metric, ErrorEvent)


class BadFrame(VoxbusError):
    """A frame this session cannot play or show; the bus reports it and the session carries on."""

    code = "bad_frame"


class BusSession:
    """One session on the bus; a transport fills in the hooks below the line."""

    caller: ClassVar[str] = "the caller"
    """Who sends the audio, as log lines and end reasons name it ("the browser", "the call")."""

    def __init__(self, gateway: GatewayWorker, session: str, agent: str):
        self.gateway = gateway
        self.bus = gateway.bus
        self.subjects = gateway.subjects
        self.session = session
        self.agent = agent
        self.state = "connecting"
        self.closed = asyncio.Event()
        self.end_reason: str | None = None
        self.ended_on_bus = False
        """The session was ended by the agent or an operator, not by this transport."""
        self.frames_in = 0
        self.last_audio_at: float | None = None
        self.turn = 0
        """The last user turn the orchestrator ended (``TurnEvent user_ended``)."""
        self._created_at = time.monotonic()
        self._sent_at: dict[int, float] = {}
        self._seq = 0
        self._speech_end_at: float | None = None
        self._awaiting_audio = False
        self._listen_timer: asyncio.TimerHandle | None = None
        self._subs = []
        self._tasks: set[asyncio.Task] = set()

    # --- the transport's hooks -------------------------------------------------------

    @property
    def queued_s(self) -> float:
        """Agent audio received but not yet played."""
        raise NotImplementedError

    def play(self, pcm: bytes) -> None:
        """Queue agent audio (PCM16 mono at the wire rate) for playing, paced by the transport."""
        raise NotImplementedError

    def flush(self) -> None:
        """Barge-in: drop what is queued; call ``drained(True)`` if it was playing."""
        raise NotImplementedError

    def show(self, frame: Frame) -> None:
        """A session event (transcript, bot text, VAD, turn, metric, error), already noted."""

    def state_changed(self, state: str) -> None:
        """The session's state moved (listening / thinking / speaking)."""

    def e2e_measured(self, turn: int, ms: float) -> None:
        """End of the user's speech to the agent's first audio leaving this gateway."""

    async def close_transport(self, reason: str) -> None:
        """Hang up the transport; the bus side is already closed."""

    # --- for the transport ----------------------------------------------------------

    async def start_on_bus(self, sample_rate: int = WIRE_RATE) -> None:
        """Subscribe to the session's audio, events and control, then have an orchestrator
        start it; raises VoxbusError when none can."""
        for subject, handler in ((self.subjects.audio_out(self.session), self._on_agent_audio),
                                 (self.subjects.events(self.session), self._on_event),
                                 (self.subjects.ctl(self.session), self._on_ctl)):
            self._subs.append(await self.bus.subscribe(subject, handler))
        await ask(self.bus, Stage.ORCHESTRATOR, SessionStart(
            session=self.session, sample_rate=sample_rate, agent=self.agent), timeout_s=15.0,
            placement=self.gateway.liveness)
        self.spawn(self._watch_idle())
        self.set_state("listening")

    async def send_audio(self, pcm: bytes) -> None:
        """One 20 ms PCM16 frame of the caller's audio at the wire rate, onto ``audio.in``."""
        now = time.monotonic()
        self.last_audio_at = now
        await self.bus.publish(self.subjects.audio_in(self.session), AudioIn(
            seq=self._seq, ts_us=now_us(), sample_rate=WIRE_RATE, pcm=pcm))
        self._sent_at[self._seq] = now
        self._sent_at.pop(self._seq - SEQ_HISTORY, None)
        self._seq += 1
        self.frames_in += 1

    def playing(self) -> None:
        """The transport started playing agent audio after silence."""
        if self._listen_timer:
            self._listen_timer.cancel()
            self._listen_timer = None
            if not self._awaiting_audio:
                AUDIO_UNDERRUNS.inc()  # the reply went on after a gap the user heard
        if self._awaiting_audio:
            self._awaiting_audio = False
            if self._speech_end_at is not None:
                e2e = (time.monotonic() - self._speech_end_at) * 1000
                observe_turn("e2e_latency", e2e / 1000, Stage.GATEWAY.value)
                self.e2e_measured(self.turn, e2e)
        self.set_state("speaking")

    def drained(self, flushed: bool) -> None:
        """The transport ran out of agent audio (``flushed``: a barge-in dropped it)."""
        if flushed:
            self.set_state("listening")
            return
        loop = asyncio.get_running_loop()
        if self._listen_timer:
            self._listen_timer.cancel()
        self._listen_timer = loop.call_later(LISTEN_AFTER_S, self.set_state, "listening")

    def set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.state_changed(state)

    def spawn(self, coro) -> asyncio.Task:
        """A task this session owns: cancelled when it closes."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self, reason: str = "hangup", *, announce: bool = True) -> None:
        """End the session everywhere (``announce``: tell every stage with a ``SessionEnd``;
        not when the end came from the bus); safe from any path, any number of times."""
        if self.closed.is_set():
            return
        self.closed.set()
        self.end_reason = reason
        self.ended_on_bus = not announce
        log.info("session %s ends: %s", self.session, reason)
        if self._listen_timer:
            self._listen_timer.cancel()
        self.gateway.forget(self)
        if announce:
            try:
                await self.bus.publish(self.subjects.ctl(self.session),
                                       SessionEnd(session=self.session, reason=reason))
            except Exception as e:  # NATS away: the stages' leases end the session instead
                log.warning("session %s: SessionEnd not sent: %s", self.session, e)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        await self.close_transport(reason)

    # --- bus → transport ------------------------------------------------------------

    async def _on_agent_audio(self, frame: Frame, _msg: Msg) -> None:
        if isinstance(frame, AudioOut):
            if frame.sample_rate != WIRE_RATE:
                raise BadFrame(f"agent audio at {frame.sample_rate} Hz; the gateway plays "
                               f"{WIRE_RATE} Hz")
            if len(frame.pcm) % 2:
                # One odd byte would shift every later sample and play the rest as noise.
                raise BadFrame(f"agent audio of {len(frame.pcm)} bytes is not PCM16")
            if self.queued_s + len(frame.pcm) / 2 / WIRE_RATE > MAX_QUEUED_S:
                raise BadFrame(f"agent audio would queue over {MAX_QUEUED_S:.0f} s; dropped")
            self.play(frame.pcm)
        elif isinstance(frame, AudioFlush):
            self.flush()
        else:
            raise BadFrame(f"{type(frame).__name__} on audio.out: expected AudioOut or "
                           "AudioFlush")

    async def _on_event(self, frame: Frame, _msg: Msg) -> None:
        if not isinstance(frame, SESSION_EVENTS):
            raise BadFrame(f"{type(frame).__name__} is not a session event")
        if isinstance(frame, VadEvent) and frame.state == VadState.STOPPED:
            # Date the end of speech by when the gateway sent the frame the VAD last heard.
            stop_frames = round(self.gateway.settings.vad_stop_s / 0.02)
            self._speech_end_at = self._sent_at.get(frame.seq - stop_frames, time.monotonic())
        elif isinstance(frame, TurnEvent):
            if frame.state == "user_ended":
                self.turn = frame.turn
                self._awaiting_audio = True
                self.set_state("thinking")
            elif frame.state == "interrupted":
                self._awaiting_audio = False
                self.set_state("listening")
        self.show(frame)

    async def _on_ctl(self, frame: Frame, _msg: Msg) -> None:
        # Cancel frames for the stages ride here too; only the session's end concerns us.
        if isinstance(frame, SessionEnd) and not self.closed.is_set():
            # Not inline: closing unsubscribes the very subscription running this handler.
            self.spawn(self.close(f"ended on the bus: {frame.reason}", announce=False))

    async def _watch_idle(self) -> None:
        idle_s = self.gateway.settings.gateway_idle_s
        while not self.closed.is_set():
            await asyncio.sleep(min(1.0, idle_s / 2))
            now = time.monotonic()
            if self.last_audio_at is None:
                if now - self._created_at > max(idle_s, CONNECT_GRACE_S):
                    await self.close(f"{self.caller} never sent audio")
                    return
            elif now - self.last_audio_at > idle_s:
                await self.close(f"no audio from {self.caller} for {idle_s:.0f} s")
                return

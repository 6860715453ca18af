"""One browser session: its RTCPeerConnection, its audio in both directions, its event channel.

A PeerSession subscribes only to its own session's subjects, so a peer can never hear or see
another session. It ends (and tells every stage to release the session) when the browser hangs
up, when ICE or DTLS fails, when no audio has arrived for ``idle_s``, or when the gateway stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from typing import TYPE_CHECKING

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.jitterbuffer import JitterBuffer
from aiortc.mediastreams import MediaStreamError
from nats.aio.msg import Msg

from services.media_gateway.audio_tracks import AgentAudioTrack, InboundResampler
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
    from services.media_gateway.tokens import Grant
    from services.media_gateway.worker import GatewayWorker

log = logging.getLogger("voxbus.gateway")

CONNECT_GRACE_S = 20.0  # ICE + DTLS + first audio; a loaded machine can take seconds
SEQ_HISTORY = 1500  # 30 s of 20 ms frames: when each sent frame left, to date speech ends
LISTEN_AFTER_S = 0.4  # a drained buffer this long means the agent finished speaking
MAX_QUEUED_S = 60.0
"""Agent audio the outbound buffer may hold; the orchestrator paces it, so more is a fault."""
MAX_TEXT = 4000
"""Characters of one text the page is sent (a TTS sentence's limit); longer ones are cut."""


class BadFrame(VoxbusError):
    """A frame this peer cannot play or show; the bus reports it and the session carries on."""

    code = "bad_frame"


def _tune_jitter_buffer(receiver, prefetch: int) -> None:
    """aiortc holds 4 audio packets (80 ms) before decoding and offers no setting for it; on a
    LAN or loopback one is plenty, and the user's voice reaches the VAD 60 ms sooner."""
    attr = "_RTCRtpReceiver__jitter_buffer"
    if receiver is None or not hasattr(receiver, attr) or receiver.track is None:
        return
    if receiver.track.kind == "audio":
        setattr(receiver, attr, JitterBuffer(capacity=16, prefetch=max(0, prefetch)))


class PeerSession:
    def __init__(self, gateway: GatewayWorker, grant: Grant):
        self.gateway = gateway
        self.bus = gateway.bus
        self.subjects = gateway.subjects
        self.session = grant.session
        self.agent = grant.agent
        self.pc = RTCPeerConnection(gateway.rtc_configuration())
        self.outbound = AgentAudioTrack(on_playing=self._on_playing, on_drained=self._on_drained)
        self.channel = None
        self.state = "connecting"
        self.closed = asyncio.Event()
        self.frames_in = 0
        self.last_audio_at: float | None = None
        self._created_at = time.monotonic()
        self._sent_at: dict[int, float] = {}
        self._seq = 0
        self._turn = 0
        self._speech_end_at: float | None = None
        self._awaiting_audio = False
        self._listen_timer: asyncio.TimerHandle | None = None
        self._subs = []
        self._tasks: set[asyncio.Task] = set()

    # --- setup ----------------------------------------------------------------------

    async def answer(self, sdp: str, kind: str) -> RTCSessionDescription:
        """Apply the browser's offer, start the session on the bus, return our answer."""
        pc = self.pc

        @pc.on("datachannel")
        def _on_channel(channel):
            self.channel = channel
            self.send({"type": "session", "session": self.session, "agent": self.agent})
            self.send({"type": "state", "state": self.state})

        @pc.on("track")
        def _on_track(track):
            if track.kind == "audio":
                self._spawn(self._pump_inbound(track))

        @pc.on("connectionstatechange")
        async def _on_state():
            if pc.connectionState in ("failed", "closed"):
                await self.close(f"connection {pc.connectionState}")

        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
        for transceiver in pc.getTransceivers():
            _tune_jitter_buffer(transceiver.receiver, self.gateway.settings.gateway_jitter_frames)
        if not any(t.kind == "audio" for t in
                   (tr.receiver.track for tr in pc.getTransceivers() if tr.receiver.track)):
            raise ValueError("the offer has no audio track: the agent needs a microphone")
        pc.addTrack(self.outbound)
        for sub_subject, handler in ((self.subjects.audio_out(self.session), self._on_agent_audio),
                                     (self.subjects.events(self.session), self._on_event)):
            self._subs.append(await self.bus.subscribe(sub_subject, handler))
        await ask(self.bus, Stage.ORCHESTRATOR, SessionStart(
            session=self.session, sample_rate=WIRE_RATE, agent=self.agent), timeout_s=15.0,
            placement=self.gateway.liveness)
        await pc.setLocalDescription(await pc.createAnswer())
        self._spawn(self._watch_idle())
        self._set_state("listening")
        return pc.localDescription

    # --- browser → bus ----------------------------------------------------------------

    async def _pump_inbound(self, track) -> None:
        resampler = InboundResampler()
        subject = self.subjects.audio_in(self.session)
        while not self.closed.is_set():
            try:
                frame = await track.recv()
            except MediaStreamError:
                await self.close("browser audio ended")
                return
            self.last_audio_at = time.monotonic()
            for pcm in resampler.push(frame):
                await self.bus.publish(subject, AudioIn(seq=self._seq, ts_us=now_us(),
                                                        sample_rate=WIRE_RATE, pcm=pcm))
                self._sent_at[self._seq] = time.monotonic()
                self._sent_at.pop(self._seq - SEQ_HISTORY, None)
                self._seq += 1
                self.frames_in += 1

    async def _watch_idle(self) -> None:
        idle_s = self.gateway.settings.gateway_idle_s
        while not self.closed.is_set():
            await asyncio.sleep(min(1.0, idle_s / 2))
            now = time.monotonic()
            if self.last_audio_at is None:
                if now - self._created_at > max(idle_s, CONNECT_GRACE_S):
                    await self.close("the browser never connected its audio")
                    return
            elif now - self.last_audio_at > idle_s:
                await self.close(f"no audio from the browser for {idle_s:.0f} s")
                return

    # --- bus → browser ----------------------------------------------------------------

    async def _on_agent_audio(self, frame: Frame, _msg: Msg) -> None:
        if isinstance(frame, AudioOut):
            if frame.sample_rate != WIRE_RATE:
                raise BadFrame(f"agent audio at {frame.sample_rate} Hz; the gateway plays "
                               f"{WIRE_RATE} Hz")
            if len(frame.pcm) % 2:
                # One odd byte would shift every later sample and play the rest as noise.
                raise BadFrame(f"agent audio of {len(frame.pcm)} bytes is not PCM16")
            if self.outbound.queued_s + len(frame.pcm) / 2 / WIRE_RATE > MAX_QUEUED_S:
                raise BadFrame(f"agent audio would queue over {MAX_QUEUED_S:.0f} s; dropped")
            self.outbound.write(frame.pcm)
        elif isinstance(frame, AudioFlush):
            self.outbound.flush()
        else:
            raise BadFrame(f"{type(frame).__name__} on audio.out: expected AudioOut or "
                           "AudioFlush")

    async def _on_event(self, frame: Frame, _msg: Msg) -> None:
        if isinstance(frame, Transcript):
            self.send({"type": "transcript", "role": "user", "text": _clip(frame.text),
                       "final": frame.final, "turn": self._turn + 1})
        elif isinstance(frame, BotText):
            self.send({"type": "transcript", "role": "bot", "text": _clip(frame.text),
                       "final": frame.final, "turn": frame.turn})
        elif isinstance(frame, VadEvent):
            if frame.state == VadState.STOPPED:
                # Date the end of speech by when the gateway sent the frame the VAD last heard.
                stop_frames = round(self.gateway.settings.vad_stop_s / 0.02)
                self._speech_end_at = self._sent_at.get(frame.seq - stop_frames,
                                                        time.monotonic())
            self.send({"type": "vad", "state": str(frame.state)})
        elif isinstance(frame, TurnEvent):
            if frame.state == "user_ended":
                self._turn = frame.turn
                self._awaiting_audio = True
                self._set_state("thinking")
            elif frame.state == "interrupted":
                self._awaiting_audio = False
                self._set_state("listening")
            self.send({"type": "turn", "turn": frame.turn, "state": _clip(frame.state)})
        elif isinstance(frame, Metric):
            if not math.isfinite(frame.value_ms):
                raise BadFrame(f"metric {_clip(frame.name)!r} is {frame.value_ms}: not a number "
                               "the page can show")
            # Stage figures without a turn (STT) belong to the user turn that is ending.
            self.send({"type": "metric", "turn": frame.turn or self._turn + 1,
                       "name": _clip(frame.name),
                       "ms": round(frame.value_ms, 1)})
        elif isinstance(frame, ErrorEvent):
            self.send({"type": "error", "service": frame.service, "code": frame.code,
                       "message": _clip(frame.message)})
        else:
            raise BadFrame(f"{type(frame).__name__} is not a session event")

    def _on_playing(self) -> None:
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
                self.send({"type": "metric", "turn": self._turn, "name": "e2e_latency",
                           "ms": round(e2e, 1)})
        self._set_state("speaking")

    def _on_drained(self, flushed: bool) -> None:
        if flushed:
            self._set_state("listening")
            return
        loop = asyncio.get_running_loop()
        if self._listen_timer:
            self._listen_timer.cancel()
        self._listen_timer = loop.call_later(LISTEN_AFTER_S, self._set_state, "listening")

    def _set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.send({"type": "state", "state": state})

    def send(self, event: dict) -> None:
        channel = self.channel
        if channel is not None and channel.readyState == "open":
            try:
                channel.send(json.dumps(event))
            except Exception as e:  # a channel closing under us: the session is ending
                log.debug("%s: event not sent: %s", self.session, e)

    # --- teardown ---------------------------------------------------------------------

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, reason: str = "hangup") -> None:
        """End the session everywhere; safe to call from any path, any number of times."""
        if self.closed.is_set():
            return
        self.closed.set()
        log.info("session %s ends: %s", self.session, reason)
        if self._listen_timer:
            self._listen_timer.cancel()
        self.gateway.forget(self)
        with contextlib.suppress(Exception):
            await self.bus.publish(self.subjects.ctl(self.session),
                                   SessionEnd(session=self.session, reason=reason))
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        self.outbound.stop()
        with contextlib.suppress(Exception):
            await self.pc.close()


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "…"

"""One browser session: its RTCPeerConnection, its audio in both directions, its event channel.

The bus side (session start, audio.in numbering, agent audio and events, the session's end) is
:class:`BusSession`'s; this module is the WebRTC half: the peer connection, the outbound track
and the page's JSON events. The session ends (and every stage releases it) when the browser
hangs up, when ICE or DTLS fails, when no audio has arrived for ``idle_s``, when the session is
ended on the bus (the agent's ``end_conversation``, an operator), or when the gateway stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from typing import TYPE_CHECKING

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.jitterbuffer import JitterBuffer
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription, candidate_from_sdp

from services.media_gateway.audio_tracks import AgentAudioTrack, InboundResampler
from services.media_gateway.bus_session import BadFrame, BusSession
from voxbus.wire import (
    BotText,
    ErrorEvent,
    Frame,
    Metric,
    Transcript,
    TurnEvent,
    VadEvent,
)

if TYPE_CHECKING:
    from services.media_gateway.tokens import Grant
    from services.media_gateway.worker import GatewayWorker

log = logging.getLogger("voxbus.gateway")

PLAY_OUT_MAX_S = 3.0
"""At most this long for the agent's last words to play once the session ended on the bus."""
MAX_TEXT = 4000
"""Characters of one text the page is sent (a TTS sentence's limit); longer ones are cut."""

__all__ = ["BadFrame", "PeerSession"]


def _tune_jitter_buffer(receiver, prefetch: int) -> None:
    """aiortc holds 4 audio packets (80 ms) before decoding and offers no setting for it; on a
    LAN or loopback one is plenty, and the user's voice reaches the VAD 60 ms sooner."""
    attr = "_RTCRtpReceiver__jitter_buffer"
    if receiver is None or not hasattr(receiver, attr) or receiver.track is None:
        return
    if receiver.track.kind == "audio":
        setattr(receiver, attr, JitterBuffer(capacity=16, prefetch=max(0, prefetch)))


class PeerSession(BusSession):
    caller = "the browser"

    def __init__(self, gateway: GatewayWorker, grant: Grant):
        super().__init__(gateway, grant.session, grant.agent)
        self.pc = RTCPeerConnection(gateway.rtc_configuration())
        self.outbound = AgentAudioTrack(on_playing=self.playing, on_drained=self.drained)
        self.channel = None

    # --- setup ----------------------------------------------------------------------

    async def answer(self, sdp: str, kind: str) -> RTCSessionDescription:
        """Apply the browser's offer, start the session on the bus, return our answer."""
        pc = self.pc

        self._wire(pc)
        await self._accept(pc, sdp, kind)
        pc.addTrack(self.outbound)
        await self.start_on_bus()
        await pc.setLocalDescription(await pc.createAnswer())
        return pc.localDescription

    def _wire(self, pc: RTCPeerConnection) -> None:
        """This session's handlers on one of its peer connections; an old one (replaced by a
        restart) closing is not the session's end."""

        @pc.on("datachannel")
        def _on_channel(channel):
            if pc is self.pc:
                self.channel = channel
                self.channel_opened(channel)

        @pc.on("track")
        def _on_track(track):
            if track.kind == "audio":
                self.spawn(self._pump_inbound(pc, track))

        @pc.on("connectionstatechange")
        async def _on_state():
            if pc is self.pc and pc.connectionState in ("failed", "closed"):
                await self.close(f"connection {pc.connectionState}")

    async def _accept(self, pc: RTCPeerConnection, sdp: str, kind: str) -> None:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
        for transceiver in pc.getTransceivers():
            _tune_jitter_buffer(transceiver.receiver, self.gateway.settings.gateway_jitter_frames)
        if not any(t.kind == "audio" for t in
                   (tr.receiver.track for tr in pc.getTransceivers() if tr.receiver.track)):
            raise ValueError("the offer has no audio track: the agent needs a microphone")

    async def restart(self, sdp: str, kind: str) -> RTCSessionDescription:
        """A new peer connection for this session (Pipecat's client reconnecting after its ICE
        failed): the bus session, its turn and the agent's queued audio carry over.

        The offer is checked before the old connection goes; once it has, a new one that
        cannot be set up ends the session (the caller answers 400)."""
        offered = SessionDescription.parse(sdp)
        if kind != "offer" or not any(m.kind == "audio" for m in offered.media):
            raise ValueError("the offer has no audio track: the agent needs a microphone")
        old, pc = self.pc, RTCPeerConnection(self.gateway.rtc_configuration())
        self.pc, self.channel = pc, None
        # The old connection's sender stops its track when it goes: a new one takes the audio.
        self.outbound = self.outbound.handover()
        with contextlib.suppress(Exception):
            await old.close()
        self._wire(pc)
        try:
            await self._accept(pc, sdp, kind)
            pc.addTrack(self.outbound)
            await pc.setLocalDescription(await pc.createAnswer())
        except Exception:
            await self.close("peer connection restart failed")
            raise
        return pc.localDescription

    async def renegotiate(self, sdp: str, kind: str) -> RTCSessionDescription:
        """A new offer on the same peer connection (the client added or changed a track).

        Checked first: aiortc takes an offer without the connection's media sections and then
        fails inside its own connect task, leaving a live peer broken."""
        current = self.pc.remoteDescription
        offered = SessionDescription.parse(sdp)
        kinds = [m.kind for m in SessionDescription.parse(current.sdp).media] if current else []
        if kind != "offer" or [m.kind for m in offered.media[:len(kinds)]] != kinds:
            raise ValueError(f"a new offer keeps this connection's media sections "
                             f"({', '.join(kinds) or 'none'}), in order")
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        return self.pc.localDescription

    async def add_ice_candidate(self, candidate: str, sdp_mid: str | None,
                                sdp_mline_index: int | None) -> None:
        """A trickled candidate of the browser's; an empty one is end-of-candidates."""
        if not candidate:
            await self.pc.addIceCandidate(None)
            return
        parsed = candidate_from_sdp(candidate.removeprefix("candidate:"))
        parsed.sdpMid = sdp_mid
        parsed.sdpMLineIndex = sdp_mline_index
        await self.pc.addIceCandidate(parsed)

    def channel_opened(self, channel) -> None:
        """The page's data channel: it first learns its session and state."""
        self.send({"type": "session", "session": self.session, "agent": self.agent})
        self.send({"type": "state", "state": self.state})

    # --- browser → bus ----------------------------------------------------------------

    async def _pump_inbound(self, pc: RTCPeerConnection, track) -> None:
        resampler = InboundResampler()
        while not self.closed.is_set():
            try:
                frame = await track.recv()
            except MediaStreamError:
                if pc is self.pc:  # not a connection a restart replaced
                    await self.close("browser audio ended")
                return
            for pcm in resampler.push(frame):
                await self.send_audio(pcm)

    # --- bus → browser (BusSession's hooks) ---------------------------------------------

    @property
    def queued_s(self) -> float:
        return self.outbound.queued_s

    def play(self, pcm: bytes) -> None:
        self.outbound.write(pcm)

    def flush(self) -> None:
        self.outbound.flush()

    def show(self, frame: Frame) -> None:
        if isinstance(frame, Transcript):
            self.send({"type": "transcript", "role": "user", "text": _clip(frame.text),
                       "final": frame.final, "turn": self.turn + 1})
        elif isinstance(frame, BotText):
            self.send({"type": "transcript", "role": "bot", "text": _clip(frame.text),
                       "final": frame.final, "turn": frame.turn})
        elif isinstance(frame, VadEvent):
            self.send({"type": "vad", "state": str(frame.state)})
        elif isinstance(frame, TurnEvent):
            self.send({"type": "turn", "turn": frame.turn, "state": _clip(frame.state)})
        elif isinstance(frame, Metric):
            if not math.isfinite(frame.value_ms):
                raise BadFrame(f"metric {_clip(frame.name)!r} is {frame.value_ms}: not a number "
                               "the page can show")
            # Stage figures without a turn (STT) belong to the user turn that is ending.
            self.send({"type": "metric", "turn": frame.turn or self.turn + 1,
                       "name": _clip(frame.name),
                       "ms": round(frame.value_ms, 1)})
        elif isinstance(frame, ErrorEvent):
            self.send({"type": "error", "service": frame.service, "code": frame.code,
                       "message": _clip(frame.message)})

    def state_changed(self, state: str) -> None:
        self.send({"type": "state", "state": state})

    def e2e_measured(self, turn: int, ms: float) -> None:
        self.send({"type": "metric", "turn": turn, "name": "e2e_latency", "ms": round(ms, 1)})

    def send(self, event: dict) -> None:
        channel = self.channel
        if channel is not None and channel.readyState == "open":
            try:
                channel.send(json.dumps(event))
            except Exception as e:  # a channel closing under us: the session is ending
                log.debug("%s: event not sent: %s", self.session, e)

    # --- teardown ---------------------------------------------------------------------

    async def close_transport(self, reason: str) -> None:
        if self.ended_on_bus and self.outbound.queued_s:
            # The agent hung up: its last words, still in the jitter buffer, play first.
            await asyncio.sleep(min(self.outbound.queued_s + 0.1, PLAY_OUT_MAX_S))
        self.outbound.stop()
        with contextlib.suppress(Exception):
            await self.pc.close()


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "…"

"""RTVI on the data channel: a Pipecat client's session, our bus events as Pipecat's messages.

A peer that came in through Pipecat's SmallWebRTC signaling (``pipecat_http.py``) speaks RTVI
(``pipecat.processors.frameworks.rtvi``): it sends ``client-ready`` and waits for ``bot-ready``,
then expects transcripts, bot text, speaking events and metrics as RTVI messages. The shapes
are Pipecat's own pydantic models, so a change in Pipecat's protocol shows up here, not on the
wire. Events RTVI has no message for (turn and state changes, the session's id) go as
``server-message`` with a ``voxbus`` key naming what they are.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from datetime import UTC, datetime

from pipecat import version as pipecat_version
from pipecat.processors.frameworks.rtvi import models as RTVI

from services.media_gateway.bus_session import BadFrame
from services.media_gateway.peer import PeerSession, _clip
from voxbus.wire import (
    BotText,
    ErrorEvent,
    Frame,
    Metric,
    Transcript,
    TurnEvent,
    VadEvent,
    VadState,
)

log = logging.getLogger("voxbus.gateway.rtvi")

SIGNALLING_TYPE = "signalling"
"""SmallWebRTC's own messages on the same channel (track status, renegotiate, peer left)."""
MAX_CLIENT_MESSAGE = 64 * 1024
"""A client message over this is refused unread (RTVI's are a few hundred bytes)."""

__all__ = ["RtviPeerSession"]


class RtviPeerSession(PeerSession):
    """A :class:`PeerSession` whose data channel carries RTVI instead of our page's JSON."""

    caller = "the Pipecat client"

    def __init__(self, gateway, grant, *, start_id: str | None = None):
        super().__init__(gateway, grant)
        self.pc_id = f"voxbus-{uuid.uuid4().hex}"
        """What the client names this peer connection by in later offers and ICE PATCHes."""
        self.start_id = start_id
        """The ``sessionId`` ``/start`` returned, when the client came through ``/start``."""
        self.client_ready = False
        self._speaking = False

    # --- the data channel ------------------------------------------------------------

    def channel_opened(self, channel) -> None:
        channel.on("message", self._on_message)

    def _on_message(self, raw) -> None:
        if isinstance(raw, bytes) or len(raw) > MAX_CLIENT_MESSAGE:
            return
        if raw.startswith("ping:"):  # the JS transport's keep-alive, once a second
            return
        try:
            message = json.loads(raw)
        except json.JSONDecodeError:
            log.debug("%s: not JSON on the data channel: %.80s", self.session, raw)
            return
        if not isinstance(message, dict) or message.get("type") == SIGNALLING_TYPE:
            return  # track status: our audio in is its own clock, nothing to do
        if message.get("label") != RTVI.MESSAGE_LABEL:
            return
        try:
            client = RTVI.ClientMessage(msg_id=str(message.get("id", "")),
                                        type=str(message.get("type", "")),
                                        data=message.get("data"))
        except ValueError:
            return
        self.spawn(self._handle(client))

    async def _handle(self, message: RTVI.ClientMessage) -> None:
        if message.type == "client-ready":
            self._bot_ready(message)
        elif message.type == "disconnect-bot":
            await self.close("the client disconnected the bot")
        else:
            self.send_model(RTVI.ErrorResponse(id=message.msg_id, data=RTVI.ErrorResponseData(
                error=f"voxbus does not handle the RTVI message {_clip(message.type)!r}")))

    def _bot_ready(self, message: RTVI.ClientMessage) -> None:
        data = message.data if isinstance(message.data, dict) else {}
        version = data.get("version") if isinstance(data.get("version"), str) else ""
        # As Pipecat's RTVIProcessor: a 1.x client is answered in its own version.
        if version.split(".")[0] == str(RTVI.LEGACY_SUPPORTED_MAJOR):
            answered = version
        else:
            answered = RTVI.PROTOCOL_VERSION
        self.client_ready = True
        self.send_model(RTVI.BotReady(id=message.msg_id, data=RTVI.BotReadyData(
            version=answered,
            about={"library": "voxbus", "pipecat_rtvi": RTVI.PROTOCOL_VERSION,
                   "pipecat_version": pipecat_version(), "session": self.session,
                   "agent": self.agent})))
        self._server_message("state", state=self.state)

    # --- bus → client (BusSession's hooks) ---------------------------------------------

    def show(self, frame: Frame) -> None:
        if isinstance(frame, Transcript):
            self.send_model(RTVI.UserTranscriptionMessage(data=RTVI.UserTranscriptionMessageData(
                text=_clip(frame.text), user_id=self.session, final=frame.final,
                timestamp=_timestamp())))
        elif isinstance(frame, BotText):
            text = RTVI.TextMessageData(text=_clip(frame.text))
            self.send_model(RTVI.BotLLMTextMessage(data=text))
            self.send_model(RTVI.BotTTSTextMessage(data=text))
            self.send_model(RTVI.BotTranscriptionMessage(data=text))
        elif isinstance(frame, VadEvent):
            if frame.state == VadState.STARTED:
                self.send_model(RTVI.UserStartedSpeakingMessage())
            else:
                self.send_model(RTVI.UserStoppedSpeakingMessage())
        elif isinstance(frame, TurnEvent):
            if frame.state == "interrupted":
                self.send_model(RTVI.BotInterruptedMessage())
            self._server_message("turn", turn=frame.turn, state=_clip(frame.state),
                                 node=frame.node, tool_calls=frame.tool_calls)
        elif isinstance(frame, Metric):
            if not math.isfinite(frame.value_ms):
                raise BadFrame(f"metric {_clip(frame.name)!r} is {frame.value_ms}: not a number "
                               "a client can show")
            self._metric(frame.name, frame.value_ms)
        elif isinstance(frame, ErrorEvent):
            self.send_model(RTVI.Error(data=RTVI.ErrorData(
                error=_clip(f"{frame.service}: {frame.code}: {frame.message}"), fatal=False)))

    def state_changed(self, state: str) -> None:
        speaking = state == "speaking"
        if speaking != self._speaking:
            self._speaking = speaking
            self.send_model(RTVI.BotStartedSpeakingMessage() if speaking
                            else RTVI.BotStoppedSpeakingMessage())
        self._server_message("state", state=state)

    def e2e_measured(self, turn: int, ms: float) -> None:
        self._metric("e2e_latency", ms)

    def _metric(self, name: str, ms: float) -> None:
        """Pipecat's ``metrics`` data: time-to-first figures as ``ttfb``, the rest as
        ``processing``, each ``{"processor", "value"}`` in seconds, as Pipecat reports them."""
        kind = "ttfb" if "_ttf" in name else "processing"
        self.send_model(RTVI.MetricsMessage(data={kind: [
            {"processor": _clip(name), "value": round(ms / 1000, 4)}]}))

    def _server_message(self, kind: str, **data) -> None:
        self.send_model(RTVI.ServerMessage(data={"voxbus": kind, **data}))

    def send_model(self, model) -> None:
        """An RTVI message: before the client is ready only its ``bot-ready`` may go."""
        if self.client_ready or isinstance(model, RTVI.BotReady):
            self.send(model.model_dump(exclude_none=True))


def _timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")

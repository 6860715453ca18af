"""One phone call over a provider's WebSocket media stream, bridged to its bus session.

The call's 8 kHz audio becomes numbered 20 ms ``AudioIn`` frames at the wire rate; the agent's
audio goes back as the provider's media messages, a little ahead of real time and no more (the
provider buffers what it is sent, and a barge-in's clear can only drop what it holds). A flush on
the bus sends the provider's clear; a mark after each reply says when it has played. The call's
hang-up ends the session everywhere; the session's end on the bus (the agent's
``end_conversation``, an operator) lets the last words play, then closes the socket.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import WSCloseCode, WSMsgType, web
from pipecat.frames.frames import InputAudioRawFrame

from services.media_gateway.bus_session import BusSession
from services.media_gateway.telephony import (
    CallStart,
    ProtocolError,
    Provider,
    clear_message,
    media_message,
)
from voxbus.audio import WIRE_RATE
from voxbus.errors import VoxbusError

if TYPE_CHECKING:
    from pipecat.serializers.base_serializer import FrameSerializer

    from services.media_gateway.tokens import Grant
    from services.media_gateway.worker import GatewayWorker

log = logging.getLogger("voxbus.gateway.phone")

FRAME_BYTES = WIRE_RATE * 2 // 50  # 20 ms of PCM16 at the wire rate
LEAD_S = 0.2
"""How far ahead of real time the agent's audio may be sent: enough to ride out the network,
little enough that a barge-in's clear leaves almost nothing said after it."""
DRY_AFTER_S = 0.1
"""No agent audio this long after the provider played the last of it: the reply is over."""
START_TIMEOUT_S = 10.0
"""A provider sends ``start`` right after connecting; a socket that does not is not a call."""
MAX_BAD_MESSAGES = 20
"""Messages the call may get wrong (each reported) before the gateway hangs it up."""
PLAY_OUT_MAX_S = 10.0
"""At most this long for the last words to play once the session ended on the bus."""
CLOSE_PROTOCOL = 4400  # application close codes (4000-4999): ours, with the reason as text
CLOSE_UNAVAILABLE = 4503


class PhoneCall(BusSession):
    caller = "the call"

    def __init__(self, gateway: GatewayWorker, ws: web.WebSocketResponse, provider: Provider,
                 grant: Grant):
        super().__init__(gateway, grant.session, grant.agent)
        self.ws = ws
        self.provider = provider
        self.start: CallStart | None = None
        self.serializer: FrameSerializer | None = None
        self.bad_messages = 0
        self.marks_played: list[str] = []
        self._buffer = bytearray()
        self._audio = asyncio.Event()
        self._ahead_until = 0.0  # when the provider will have played all it was sent
        self._sending = False
        self._sent_since_clear = False
        self._pending_in = bytearray()
        self._marks = 0
        self._ended_by: str | None = None

    # --- the call's side ----------------------------------------------------------------

    async def run(self) -> None:
        """Serve the socket until the call or the session ends."""
        try:
            if not await self._begin():
                return
            async for msg in self.ws:
                if self.closed.is_set():
                    continue  # the last words playing out: the socket closes after them
                if msg.type == WSMsgType.TEXT:
                    await self._on_message(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await self._bad("a binary message: the stream protocol is JSON text")
                elif msg.type == WSMsgType.ERROR:  # e.g. a message over MAX_MESSAGE (1009)
                    error = self.ws.exception()
                    self._ended_by = (f"the call's socket failed "
                                      f"({getattr(error, 'code', '?')}): {error}")
                    await self._bad(self._ended_by)
            code = self.ws.close_code
            await self.close(self._ended_by or f"the call hung up (socket closed, code {code})")
        finally:
            if not self.closed.is_set():  # cancelled (the gateway is stopping)
                await self.close("gateway stopping")

    async def _begin(self) -> bool:
        """Read up to the provider's ``start``, then start the session on the bus."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                msg = await self.ws.receive(timeout=max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                return await self._refuse(CLOSE_PROTOCOL, f"no start message within "
                                                          f"{START_TIMEOUT_S:.0f} s")
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED,
                            WSMsgType.ERROR):
                self.gateway.forget(self)
                log.info("session %s: %s socket closed before its start message",
                         self.session, self.provider.name)
                return False
            if msg.type != WSMsgType.TEXT:
                return await self._refuse(CLOSE_PROTOCOL, "binary message before start: the "
                                                          "stream protocol is JSON text")
            try:
                message = _parse(msg.data)
                event = message["event"]
                if event in self.provider.quiet_events:
                    continue
                if event != "start":
                    raise ProtocolError(f"{_shown(event)} before the start message")
                self.start = self.provider.parse_start(message)
            except ProtocolError as e:
                return await self._refuse(CLOSE_PROTOCOL, str(e))
            break
        self.serializer = await self.provider.ready(self.start)
        try:
            await self.start_on_bus()
        except VoxbusError as e:  # no orchestrator, or it refused the agent
            log.warning("session %s: call %s not started: %s", self.session,
                        self.start.call_id, e)
            await self._refuse(CLOSE_UNAVAILABLE, f"cannot start the session: {e.code}")
            await self.close("session not started")  # whatever half-started it, released
            return False
        log.info("session %s: %s call %s connected (agent %s)", self.session,
                 self.provider.name, self.start.call_id, self.agent)
        self.spawn(self._send_out())
        return True

    async def _on_message(self, data: str) -> None:
        try:
            message = _parse(data)
        except ProtocolError as e:
            await self._bad(str(e))
            return
        event = message["event"]
        if event == "media":
            await self._on_media(data, message)
        elif event in self.provider.stop_events:
            self._ended_by = "the call hung up"
            await self.close(self._ended_by)
        elif event == self.provider.mark_event:
            mark = message.get("mark")
            name = mark.get("name") if isinstance(mark, dict) else None
            self.marks_played.append(str(name)[:64])
            log.debug("session %s: mark %s played", self.session, name)
        elif event == "start":
            await self._bad("a second start message on one stream")
        elif event not in self.provider.quiet_events:
            await self._bad(f"unknown event {_shown(event)}")

    async def _on_media(self, data: str, message: dict) -> None:
        media = message.get("media")
        track = media.get("track", "inbound") if isinstance(media, dict) else None
        if not isinstance(media, dict) or not isinstance(media.get("payload"), str):
            await self._bad("media message without media.payload")
            return
        if track not in ("inbound", "inbound_track"):
            return  # an outbound track echoed back (Twilio's "both_tracks"): not the caller
        try:
            frame = await self.serializer.deserialize(data)
        except (binascii.Error, ValueError, TypeError) as e:
            await self._bad(f"media payload is not base64 audio: {e}")
            return
        if not isinstance(frame, InputAudioRawFrame):
            return  # an empty payload
        self._pending_in += frame.audio
        while len(self._pending_in) >= FRAME_BYTES:
            pcm = bytes(self._pending_in[:FRAME_BYTES])
            del self._pending_in[:FRAME_BYTES]
            await self.send_audio(pcm)

    async def _bad(self, problem: str) -> None:
        """One message the call got wrong: logged, reported on the session, not fatal."""
        self.bad_messages += 1
        log.warning("session %s: %s stream: %s", self.session, self.provider.name, problem)
        await self.bus.report("bad_message", f"{self.provider.title}: {problem}",
                              subject=self.subjects.audio_in(self.session))
        if self.bad_messages >= MAX_BAD_MESSAGES and not self.closed.is_set():
            self._ended_by = f"{MAX_BAD_MESSAGES} bad messages from the call"
            await self.close(self._ended_by)

    async def _refuse(self, code: int, reason: str) -> bool:
        """Close a stream that never became a session, saying why (close reasons: 123 bytes)."""
        self.gateway.forget(self)
        log.warning("session %s: %s stream refused: %s", self.session, self.provider.name,
                    reason)
        await self.ws.close(code=code, message=reason.encode()[:123])
        return False

    # --- the agent's side (BusSession's hooks) -------------------------------------------

    @property
    def queued_s(self) -> float:
        return len(self._buffer) / 2 / WIRE_RATE

    def play(self, pcm: bytes) -> None:
        self._buffer += pcm
        self._audio.set()

    def flush(self) -> None:
        self._buffer.clear()
        self._ahead_until = 0.0
        # Every user turn start flushes; the provider holds audio only if some went out.
        if self.serializer is not None and self._sent_since_clear:
            self._sent_since_clear = False
            self.spawn(self._send_clear())
        if self._sending:
            self._sending = False
            self.drained(True)

    async def _send_clear(self) -> None:
        clear = await clear_message(self.serializer)
        if clear and not self.ws.closed:
            await self.ws.send_str(clear)

    async def _send_out(self) -> None:
        """Send the agent's audio at most LEAD_S ahead of what the provider has played."""
        while True:
            now = time.monotonic()
            if not self._buffer:
                if self._sending:
                    wait = max(0.0, self._ahead_until - now) + DRY_AFTER_S
                    try:
                        await asyncio.wait_for(self._audio.wait(), wait)
                    except TimeoutError:
                        self._sending = False
                        await self._send_mark()
                        self.drained(False)
                else:
                    await self._audio.wait()
                self._audio.clear()
                continue
            if self._ahead_until < now:
                self._ahead_until = now
            ahead = self._ahead_until - now - LEAD_S
            if ahead > 0:
                await asyncio.sleep(ahead)
                continue
            chunk = bytes(self._buffer[:FRAME_BYTES])
            del self._buffer[:FRAME_BYTES]
            message = await media_message(self.serializer, chunk)
            if message is None:
                continue
            if not self._sending:
                self._sending = True
                self.playing()
            await self.ws.send_str(message)
            self._sent_since_clear = True
            self._ahead_until += len(chunk) / 2 / WIRE_RATE

    async def _send_mark(self) -> None:
        self._marks += 1
        mark = self.provider.mark(self.start, f"reply-{self.turn}-{self._marks}")
        if mark and not self.ws.closed:
            await self.ws.send_str(mark)

    async def close_transport(self, reason: str) -> None:
        if self.ws.closed:
            return
        if self.ended_on_bus:
            await self._play_out()
        await self.ws.close(code=WSCloseCode.OK, message=reason.encode()[:123])

    async def _play_out(self) -> None:
        """The agent hung up: its last words (queued here and at the provider) play first."""
        if self.serializer is None:
            return
        deadline = time.monotonic() + PLAY_OUT_MAX_S
        while self._buffer and time.monotonic() < deadline:
            chunk = bytes(self._buffer[:FRAME_BYTES])
            del self._buffer[:FRAME_BYTES]
            message = await media_message(self.serializer, chunk)
            if message:
                await self.ws.send_str(message)
                self._ahead_until = max(self._ahead_until, time.monotonic()) + \
                    len(chunk) / 2 / WIRE_RATE
        rest = self._ahead_until - time.monotonic()
        if rest > 0:
            await asyncio.sleep(min(rest, max(0.0, deadline - time.monotonic())))


def _parse(data: str) -> dict:
    try:
        message = json.loads(data)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ProtocolError(f"a message that is not JSON ({type(e).__name__}: "
                            f"{str(e)[:60]})") from None
    if not isinstance(message, dict) or not isinstance(message.get("event"), str):
        raise ProtocolError(f"a message that is not a JSON object with an \"event\": "
                            f"{_shown(data)}")
    return message


def _shown(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return repr(text if len(text) <= 40 else text[:40] + "...")

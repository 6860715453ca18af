"""A phone provider's side of a call, as Twilio (or Telnyx) speaks it to a media-stream server.

It asks the gateway's call webhook how to answer (TwiML/TeXML, as the provider would), opens
the ``<Stream>`` URL with aiohttp's WebSocket client and sends the provider's exact messages:
``connected``, ``start`` (stream and call ids, the ``<Parameter>``s as ``customParameters``),
then a ``media`` message of base64 8 kHz μ-law every 20 ms (speech when the test says some,
line silence otherwise), and ``stop`` when it hangs up. It plays what it receives on a model of
the provider's buffer: ``clear`` empties it, and a ``mark`` is echoed once the audio sent before
it has played (and at once on a clear), as Twilio does.
"""

from __future__ import annotations

import asyncio
import audioop
import base64
import contextlib
import json
import time
import uuid
import xml.etree.ElementTree as ET
from collections import deque
from dataclasses import dataclass, field

import aiohttp

from voxbus.audio import read_wav

RATE = 8000
CHUNK = RATE // 50  # 20 ms of μ-law: 160 bytes
LINE_SILENCE = b"\xff" * CHUNK  # μ-law's zero


def ulaw_from_wav(path: str) -> bytes:
    """A WAV (any rate) as the 8 kHz μ-law a phone line carries."""
    return audioop.lin2ulaw(read_wav(path, RATE), 2)


@dataclass
class Heard:
    at: float
    event: str
    message: dict
    pcm: bytes = b""  # media: the decoded 8 kHz PCM16


@dataclass
class ProviderCall:
    base_url: str
    """The gateway's http://host:port/."""
    provider: str = "twilio"
    agent: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    form: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.stream_id = ("MZ" if self.provider == "twilio" else "") + uuid.uuid4().hex
        self.call_id = ("CA" if self.provider == "twilio" else "v3:") + uuid.uuid4().hex
        self.account_id = "AC" + uuid.uuid4().hex
        self.stream_url = ""
        self.parameters: dict[str, str] = {}
        self.heard: list[Heard] = []
        self.changed = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self.marks_echoed: list[str] = []
        self._http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._speech: deque[bytes] = deque()
        self._seq = 0
        self._chunk = 0
        self._tasks: list[asyncio.Task] = []
        self._played_until = 0.0  # the provider's buffer model
        self._marks: list[tuple[float, str]] = []

    # --- the call webhook -------------------------------------------------------------

    async def answer(self) -> str:
        """POST the call webhook as the provider does; returns the answer's body."""
        self._http = self._http or aiohttp.ClientSession()
        url = f"{self.base_url}phone/{self.provider}/answer"
        if self.agent:
            url += f"?agent={self.agent}"
        form = self.form or {"CallSid": self.call_id, "AccountSid": self.account_id,
                             "From": "+15550001111", "To": "+15550002222",
                             "Direction": "inbound"}
        async with self._http.post(url, data=form, headers=self.headers) as r:
            body = await r.text()
            if r.status != 200:
                raise AssertionError(f"answer: {r.status} {body}")
            assert r.content_type == "application/xml", r.content_type
        root = ET.fromstring(body)
        stream = root.find("./Connect/Stream")
        if stream is not None:  # TwiML, TeXML
            self.stream_url = stream.get("url")
            self.parameters = {p.get("name"): p.get("value")
                               for p in stream.findall("Parameter")}
        else:  # Plivo: the URL is the element's text, and there are no parameters
            stream = root.find("./Stream")
            assert stream is not None and stream.get("bidirectional") == "true", body
            self.stream_url = stream.text.strip()
        return body

    # --- the stream ---------------------------------------------------------------------

    async def connect(self, *, start: bool = True) -> ProviderCall:
        if not self.stream_url:
            await self.answer()
        self._http = self._http or aiohttp.ClientSession()
        # The provider reaches the gateway through a tunnel; here the wss URL is local ws.
        url = self.stream_url.replace("wss://", "ws://")
        self.ws = await self._http.ws_connect(url, autoclose=False, max_msg_size=0)
        self._tasks.append(asyncio.create_task(self._receive()))
        if start:
            await self.send(self.connected_message())
            await self.send(self.start_message())
            self._tasks.append(asyncio.create_task(self._microphone()))
        return self

    def connected_message(self) -> dict:
        if self.provider == "twilio":
            return {"event": "connected", "protocol": "Call", "version": "1.0.0"}
        return {"event": "connected", "version": "1.0.0"}

    def start_message(self) -> dict:
        if self.provider == "twilio":
            return {"event": "start", "sequenceNumber": self._next_seq(), "streamSid":
                    self.stream_id, "start": {
                        "accountSid": self.account_id, "streamSid": self.stream_id,
                        "callSid": self.call_id, "tracks": ["inbound"],
                        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE,
                                        "channels": 1},
                        "customParameters": self.parameters}}
        if self.provider == "plivo":
            return {"event": "start", "sequenceNumber": int(self._next_seq()), "start": {
                "callId": self.call_id, "streamId": self.stream_id, "accountId": "MA1",
                "tracks": ["inbound"], "mediaFormat": {"encoding": "audio/x-mulaw",
                                                       "sampleRate": RATE}},
                "extra_headers": "{}"}
        return {"event": "start", "sequence_number": self._next_seq(), "stream_id":
                self.stream_id, "start": {
                    "user_id": str(uuid.uuid4()), "call_control_id": self.call_id,
                    "client_state": "", "from": "+15550001111", "to": "+15550002222",
                    "media_format": {"encoding": "PCMU", "sample_rate": RATE, "channels": 1}}}

    def media_message(self, ulaw: bytes) -> dict:
        self._chunk += 1
        media = {"track": "inbound", "chunk": str(self._chunk),
                 "timestamp": str(self._chunk * 20), "payload": base64.b64encode(ulaw).decode()}
        if self.provider == "twilio":
            return {"event": "media", "sequenceNumber": self._next_seq(), "media": media,
                    "streamSid": self.stream_id}
        if self.provider == "plivo":
            return {"event": "media", "sequenceNumber": int(self._next_seq()),
                    "streamId": self.stream_id, "media": media}
        return {"event": "media", "sequence_number": self._next_seq(), "media": media,
                "stream_id": self.stream_id}

    def stop_message(self) -> dict:
        if self.provider == "twilio":
            return {"event": "stop", "sequenceNumber": self._next_seq(), "streamSid":
                    self.stream_id, "stop": {"accountSid": self.account_id,
                                             "callSid": self.call_id}}
        if self.provider == "plivo":
            return {"event": "stop", "sequenceNumber": int(self._next_seq()),
                    "streamId": self.stream_id}
        return {"event": "stop", "sequence_number": self._next_seq(), "stream_id":
                self.stream_id, "stop": {"user_id": "u", "call_control_id": self.call_id}}

    def _next_seq(self) -> str:
        self._seq += 1
        return str(self._seq)

    async def send(self, message: dict | str | bytes) -> None:
        if isinstance(message, bytes):
            await self.ws.send_bytes(message)
        else:
            await self.ws.send_str(message if isinstance(message, str) else json.dumps(message))

    def say(self, ulaw: bytes) -> None:
        """Speak into the call: the μ-law goes out in 20 ms messages from the next one on."""
        for i in range(0, len(ulaw), CHUNK):
            chunk = ulaw[i:i + CHUNK]
            self._speech.append(chunk + LINE_SILENCE[len(chunk):])

    @property
    def speaking(self) -> bool:
        return bool(self._speech)

    async def _microphone(self) -> None:
        t0 = time.monotonic()
        n = 0
        while not self.ws.closed:
            chunk = self._speech.popleft() if self._speech else LINE_SILENCE
            try:
                await self.send(self.media_message(chunk))
            except (ConnectionResetError, RuntimeError):
                return
            n += 1
            await asyncio.sleep(max(0.0, t0 + n * 0.02 - time.monotonic()))

    async def _receive(self) -> None:
        while True:
            msg = await self.ws.receive()
            if msg.type == aiohttp.WSMsgType.CLOSE:
                self.close_code, self.close_reason = msg.data, msg.extra or ""
                await self.ws.close()
                break
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING,
                            aiohttp.WSMsgType.ERROR):
                self.close_code = self.close_code or self.ws.close_code
                break
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            now = time.monotonic()
            message = json.loads(msg.data)
            event = message.get("event")
            pcm = b""
            if event in ("media", "playAudio"):
                ulaw = base64.b64decode(message["media"]["payload"])
                pcm = audioop.ulaw2lin(ulaw, 2)
                self._played_until = max(self._played_until, now) + len(ulaw) / RATE
            elif event in ("clear", "clearAudio"):
                self._played_until = now
                for _, name in self._marks:  # Twilio returns pending marks on a clear
                    await self._echo_mark(name)
                self._marks.clear()
            elif event == "mark":
                self._marks.append((self._played_until, message["mark"]["name"]))
            self.heard.append(Heard(now, event, message, pcm))
            await self._echo_due_marks()
            self.changed.set()
        self.changed.set()

    async def _echo_due_marks(self) -> None:
        now = time.monotonic()
        due = [m for m in self._marks if m[0] <= now]
        self._marks = [m for m in self._marks if m[0] > now]
        for _, name in due:
            await self._echo_mark(name)

    async def _echo_mark(self, name: str) -> None:
        self.marks_echoed.append(name)
        with contextlib.suppress(Exception):
            await self.send({"event": "mark", "sequenceNumber": self._next_seq(),
                             "streamSid": self.stream_id, "mark": {"name": name}})

    # --- what was heard -------------------------------------------------------------------

    def events(self, name: str) -> list[Heard]:
        return [h for h in self.heard if h.event == name]

    def media(self, since: float = 0.0) -> list[Heard]:
        """The agent's audio messages (Plivo's are ``playAudio``)."""
        return [h for h in self.heard if h.event in ("media", "playAudio") and h.at >= since]

    def audio_s(self, since: float = 0.0) -> float:
        return sum(len(h.pcm) / 2 / RATE for h in self.media(since))

    def audio(self, since: float = 0.0) -> bytes:
        return b"".join(h.pcm for h in self.media(since))

    async def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            result = predicate(self)
            if result:
                return result
            left = deadline - time.monotonic()
            if left <= 0:
                counts = {e: len(self.events(e)) for e in {h.event for h in self.heard}}
                raise AssertionError(f"{what}: not within {timeout:.0f} s (heard {counts}, "
                                     f"{self.audio_s():.1f} s of audio, close code "
                                     f"{self.close_code} {self.close_reason!r})")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.2))

    async def hang_up(self) -> None:
        """The caller hangs up: the provider sends ``stop`` and closes the socket."""
        if self.ws is not None and not self.ws.closed:
            with contextlib.suppress(Exception):
                await self.send(self.stop_message())
            await self.ws.close()
        await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.ws is not None and not self.ws.closed:
            await self.ws.close()
        if self._http is not None:
            await self._http.close()
            self._http = None

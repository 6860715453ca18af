"""A scripted OpenAI-compatible endpoint: deterministic replies for protocol edge cases.

Each request to ``/v1/chat/completions`` takes the next step of the script: text (streamed in
small deltas), tool calls (streamed as argument fragments, as OpenAI does), an HTTP error, or a
delay before the first byte. Every request body is recorded for the test to inspect.

The audio API too, when given the functions that do the work: ``/v1/audio/transcriptions``
(a multipart WAV upload; ``transcribe(pcm16, rate)`` answers it, e.g. with the local Whisper
model) and ``/v1/audio/speech`` (``speak(text)`` returns 24 kHz PCM16, the rate OpenAI documents
for ``response_format=pcm``, streamed in chunks). ``audio_faults`` are steps (an HTTP error, a
delay) the next audio requests take first; every audio request is recorded, with what its
upload really held. ``/v1/realtime`` is the Realtime API's transcription session over a
WebSocket (a streaming provider): appended 24 kHz audio is transcribed on each commit, sent
back as word deltas and a completed transcript (``realtime_split``: two completed items per
commit, as a provider that ends segments on its own does).
"""

from __future__ import annotations

import asyncio
import io
import json
import wave
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Step:
    text: str = ""
    tool_calls: list[dict] = field(default_factory=list)  # {"name", "arguments": dict}
    status: int = 200
    delay_s: float = 0.0


class ScriptedOpenAI:
    """``script``: the steps in order, or a function choosing a step from the request body."""

    def __init__(self, script: list[Step] | Callable[[dict], Step] = (), *,
                 transcribe: Callable[[bytes, int], str] | None = None,
                 speak: Callable[[str], bytes] | None = None):
        self.script = script if callable(script) else list(script)
        self.requests: list[dict] = []
        self.warmups: list[dict] = []
        self.transcribe = transcribe
        self.speak = speak
        self.audio_faults: list[Step] = []
        self.api_key: str | None = None
        """Set: audio requests with another key are refused (401), as OpenAI does."""
        self.transcriptions: list[dict] = []
        """Each upload: its form fields, and the WAV's ``rate``, ``channels``, ``width`` and
        ``seconds`` as parsed here (an upload that is no WAV has ``error``)."""
        self.speeches: list[dict] = []
        self.realtime_split = False
        self.commits: list[dict] = []
        """Each realtime commit: the ``seconds`` of 24 kHz audio it held and its ``text``."""
        self.sessions: list[dict] = []
        """Each realtime ``session.update``'s session."""
        self.spoken: list[bytes] = []
        """The audio each successful speech request was answered with, in order."""
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self) -> ScriptedOpenAI:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_post("/v1/audio/transcriptions", self._transcription)
        app.router.add_post("/v1/audio/speech", self._speech)
        app.router.add_get("/v1/realtime", self._realtime)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        one_token = body.get("max_tokens") == 1 or body.get("max_completion_tokens") == 1
        if one_token and all(m.get("role") == "system" for m in body.get("messages", [])):
            # A new session warming the prompt cache (VOXBUS_LLM_WARM): its system prompt
            # alone, one token. Not a turn, and no step of the script.
            self.warmups.append(body)
            step = Step(text="ok")
        elif callable(self.script):
            self.requests.append(body)
            step = self.script(body)
        else:
            self.requests.append(body)
            step = self.script.pop(0) if self.script else Step(text="(script exhausted)")
        if step.delay_s:
            await asyncio.sleep(step.delay_s)
        if step.status != 200:
            return web.json_response({"error": {"message": "scripted failure",
                                                "type": "server_error"}}, status=step.status)
        res = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await res.prepare(request)

        async def send(delta: dict, finish: str | None = None) -> None:
            chunk = {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 0,
                     "model": body.get("model", "scripted"),
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            await res.write(f"data: {json.dumps(chunk)}\n\n".encode())

        await send({"role": "assistant", "content": ""})
        words = step.text.split(" ") if step.text else []
        for i, word in enumerate(words):
            await send({"content": word if i == 0 else " " + word})
        for i, call in enumerate(step.tool_calls):
            args = json.dumps(call.get("arguments", {}))
            await send({"tool_calls": [{"index": i, "id": f"call_{i}", "type": "function",
                                        "function": {"name": call["name"], "arguments": ""}}]})
            for j in range(0, len(args), 7):
                await send({"tool_calls": [{"index": i, "function": {"arguments": args[j:j + 7]}}]})
        await send({}, "tool_calls" if step.tool_calls else "stop")
        await res.write(b"data: [DONE]\n\n")
        return res

    async def _fault(self, request: web.Request) -> web.Response | None:
        """The next audio fault, if any: a delay (then the real answer), or an HTTP error."""
        if self.api_key is not None and request.headers.get("Authorization") != (
                f"Bearer {self.api_key}"):
            return _error(401, "Incorrect API key provided", "invalid_api_key")
        step = self.audio_faults.pop(0) if self.audio_faults else None
        if step is None:
            return None
        if step.delay_s:
            await asyncio.sleep(step.delay_s)
        if step.status != 200:
            kind = "invalid_api_key" if step.status == 401 else "server_error"
            return _error(step.status, f"scripted {step.status}", kind)
        return None

    async def _transcription(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload = form.get("file")
        record: dict = {k: v for k, v in form.items() if isinstance(v, str)}
        self.transcriptions.append(record)
        pcm, rate = b"", 0
        try:
            with wave.open(io.BytesIO(upload.file.read()), "rb") as w:  # type: ignore[union-attr]
                rate = w.getframerate()
                record.update(rate=rate, channels=w.getnchannels(), width=w.getsampwidth(),
                              seconds=w.getnframes() / rate)
                pcm = w.readframes(w.getnframes())
        except (AttributeError, wave.Error, EOFError) as e:
            record["error"] = f"not a WAV upload: {e}"
            return _error(400, record["error"], "invalid_request_error")
        failed = await self._fault(request)
        if failed is not None:
            return failed
        if self.transcribe is None:
            return _error(404, "this scripted endpoint has no transcriber", "not_found")
        text = await asyncio.to_thread(self.transcribe, pcm, rate)
        record["text"] = text
        if record.get("response_format") in (None, "json", "verbose_json"):
            return web.json_response({"text": text})
        return web.Response(text=text)

    async def _realtime(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await _realtime_events(self, ws)
        return ws

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.speeches.append(body)
        failed = await self._fault(request)
        if failed is not None:
            return failed
        if self.speak is None or body.get("response_format") != "pcm":
            return _error(400, "this scripted endpoint speaks response_format=pcm only",
                          "invalid_request_error")
        pcm = await asyncio.to_thread(self.speak, body["input"])
        self.spoken.append(pcm)
        res = web.StreamResponse(headers={"Content-Type": "audio/pcm"})
        await res.prepare(request)
        for i in range(0, len(pcm), 4800):  # 0.1 s at 24 kHz, as a streaming server sends
            await res.write(pcm[i:i + 4800])
        await res.write_eof()
        return res


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind, "code": kind}},
                             status=status)


async def _realtime_events(server: ScriptedOpenAI, ws: web.WebSocketResponse) -> None:
    import base64

    import numpy as np

    await ws.send_json({"type": "session.created", "session": {}})
    audio = bytearray()
    item = 0
    async for msg in ws:
        if msg.type != web.WSMsgType.TEXT:
            continue
        event = json.loads(msg.data)
        kind = event.get("type")
        if kind == "session.update":
            server.sessions.append(event.get("session", {}))
            await ws.send_json({"type": "session.updated", "session": event.get("session")})
        elif kind == "input_audio_buffer.append":
            audio += base64.b64decode(event["audio"])
        elif kind == "input_audio_buffer.clear":
            audio.clear()
        elif kind == "input_audio_buffer.commit":
            pcm24, audio = bytes(audio), bytearray()
            record = {"seconds": len(pcm24) / 2 / 24000}
            server.commits.append(record)
            x = np.frombuffer(pcm24, np.int16).astype(np.float32)
            n = int(len(x) * 16000 / 24000)
            pcm16 = np.interp(np.linspace(0, len(x) - 1, n), np.arange(len(x)), x).astype(
                np.int16).tobytes() if len(x) else b""
            text = await asyncio.to_thread(server.transcribe, pcm16, 16000) if pcm16 else ""
            record["text"] = text
            words = text.split()
            parts = ([" ".join(words[:len(words) // 2]), " ".join(words[len(words) // 2:])]
                     if server.realtime_split and len(words) > 1 else [text])
            for part in parts:
                item += 1
                for word in part.split():
                    await ws.send_json({
                        "type": "conversation.item.input_audio_transcription.delta",
                        "item_id": f"item_{item}", "delta": word + " "})
                await ws.send_json({
                    "type": "conversation.item.input_audio_transcription.completed",
                    "item_id": f"item_{item}", "transcript": part})

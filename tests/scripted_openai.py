"""A scripted OpenAI-compatible endpoint: deterministic replies for protocol edge cases.

Each request to ``/v1/chat/completions`` takes the next step of the script: text (streamed in
small deltas), tool calls (streamed as argument fragments, as OpenAI does), an HTTP error, or a
delay before the first byte. Every request body is recorded for the test to inspect.
"""

from __future__ import annotations

import asyncio
import json
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

    def __init__(self, script: list[Step] | Callable[[dict], Step]):
        self.script = script if callable(script) else list(script)
        self.requests: list[dict] = []
        self.warmups: list[dict] = []
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self) -> ScriptedOpenAI:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._complete)
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

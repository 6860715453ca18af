"""An OpenAI-compatible chat endpoint whose every answer takes a fixed time to its first token,
however many requests it serves at once: a stand-in for a remote LLM, whose cost is not this
machine's CPU, so the LLM stage's capacity is set by its replicas alone.

    python bench/fixed_latency_llm.py --port 8399 --delay 1.5 --text "Sure, I can help."

``/v1/chat/completions`` (streamed or not), ``/v1/models``, and ``/stats``: requests served,
in flight now and at most at once (so a bench can show how many its callers ran together).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web


class FixedLatencyLlm:
    def __init__(self, delay_s: float, text: str, token_s: float = 0.0, model: str = "fixed"):
        self.delay_s = delay_s
        self.words = text.split(" ")
        self.token_s = token_s
        self.model = model
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.cancelled = 0
        """Requests whose caller went away before the answer ended (a cancel, a hedge)."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.complete)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/stats", self.stats)
        app.router.add_post("/stats/reset", self.reset)
        return app

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model, "object": "model", "created": 0, "owned_by": "bench"}]})

    async def stats(self, _request: web.Request) -> web.Response:
        return web.json_response({"requests": self.requests, "in_flight": self.in_flight,
                                  "max_in_flight": self.max_in_flight,
                                  "cancelled": self.cancelled, "delay_s": self.delay_s})

    async def reset(self, request: web.Request) -> web.Response:
        self.requests = self.cancelled = 0
        self.max_in_flight = self.in_flight
        return await self.stats(request)

    async def complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if not await self._wait(request):
                self.cancelled += 1
                return web.Response(status=499)  # nobody is listening any more
            if not body.get("stream"):
                return web.json_response({
                    "id": "chatcmpl-fixed", "object": "chat.completion",
                    "created": int(time.time()), "model": body.get("model", self.model),
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {
                        "role": "assistant", "content": " ".join(self.words)}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": len(self.words),
                              "total_tokens": 1 + len(self.words)}})
            return await self._stream(request, body)
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1

    async def _wait(self, request: web.Request) -> bool:
        """The fixed delay, cut short when the caller hangs up (a cancel, a hedge's loser):
        aiohttp does not cancel a handler whose client left, and a request nobody waits for
        must not count as in flight."""
        until = time.monotonic() + self.delay_s
        while (left := until - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.01))
            if request.transport is None or request.transport.is_closing():
                return False
        return True

    async def _stream(self, request: web.Request, body: dict) -> web.StreamResponse:
        res = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await res.prepare(request)

        async def send(delta: dict, finish: str | None = None) -> None:
            chunk = {"id": "chatcmpl-fixed", "object": "chat.completion.chunk",
                     "created": int(time.time()), "model": body.get("model", self.model),
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            await res.write(f"data: {json.dumps(chunk)}\n\n".encode())

        await send({"role": "assistant", "content": ""})
        for i, word in enumerate(self.words):
            if i and self.token_s:
                await asyncio.sleep(self.token_s)
            await send({"content": word if i == 0 else " " + word})
        await send({}, "stop")
        await res.write(b"data: [DONE]\n\n")
        return res


async def serve(args) -> None:
    llm = FixedLatencyLlm(args.delay, args.text, args.token_delay, args.model)
    runner = web.AppRunner(llm.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"fixed-latency LLM on http://{args.host}:{port}/v1 (first token after "
          f"{args.delay:g} s, model {args.model!r})", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (printed)")
    parser.add_argument("--delay", type=float, default=1.5,
                        help="seconds from request to first token (default 1.5)")
    parser.add_argument("--token-delay", type=float, default=0.0,
                        help="seconds between the answer's words after the first (default 0)")
    parser.add_argument("--text", default="Sure, I can help you with that.",
                        help="what every answer says")
    parser.add_argument("--model", default="fixed", help="the model name it lists")
    try:
        asyncio.run(serve(parser.parse_args()))
    except KeyboardInterrupt:
        pass

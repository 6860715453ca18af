"""LLM stage: one completion per request, deltas streamed to the turn's reply subject.

The worker uses Pipecat's OpenAI service for the request (adapter, settings, client) and relays
the stream chunk by chunk; a ``Cancel`` for the turn closes the HTTP stream at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import replace

import openai
from nats.aio.msg import Msg
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.services.openai.llm import OpenAILLMService

from services.llm.engine import (
    context_from_wire,
    has_developer_messages,
    llm_provider,
    make_llm_service,
)
from voxbus.errors import Full
from voxbus.metrics import LLM_TTFT, QUEUE_DEPTH
from voxbus.runner import Service
from voxbus.stage_work import Admission, Ticket, TurnTasks
from voxbus.subjects import Stage
from voxbus.wire import Cancel, Frame, LlmDelta, LlmDone, LlmRequest

log = logging.getLogger("voxbus.llm")

MAX_SERVICES = 16
"""Distinct (temperature, max_tokens) clients kept; the oldest non-default one goes first."""



class LlmWorker(Service):
    stage = Stage.LLM

    def __init__(self, settings=None, *, base_url: str | None = None):
        super().__init__(settings)
        self.provider = llm_provider(self.settings)
        """One of Pipecat's OpenAI-compatible services, checked; None: ``base_url``'s."""
        self.base_url = base_url or self.settings.openai_base_url
        if not self.base_url and self.provider is None:
            raise SystemExit("OPENAI_BASE_URL is not set (voxbus up starts a local endpoint)")
        self.tasks = TurnTasks()
        self.admission = Admission(self.declared_capacity, self.settings.queue_max,
                                   name=self.worker_id,
                                   depth=QUEUE_DEPTH.labels(self.stage.value))
        """Requests run at once up to capacity, a few more wait; the rest go elsewhere."""
        self.developer_role = True
        """Whether the endpoint takes ``developer`` messages; learnt on its first refusal."""

    async def on_start(self) -> None:
        self.service = make_llm_service(self.settings, self.base_url, self.provider)
        self._default = (float(self.settings.llm_temperature), int(self.settings.llm_max_tokens))
        self._services = {self._default: self.service}
        await self.subscribe(self.subjects.work(self.stage), self._on_request, work=True)
        await self.subscribe(self.subjects.all_ctl(), self._on_ctl)

    async def _on_request(self, frame: Frame, msg: Msg) -> None:
        if not isinstance(frame, LlmRequest):
            raise TypeError(f"expected LlmRequest, got {type(frame).__name__}")
        reply = msg.reply or self.subjects.reply(frame.session, Stage.LLM, frame.turn)
        try:
            ticket = self.admission.admit(f"session {frame.session} turn {frame.turn}")
        except Full as e:
            # The terminal frame with an error, before any delta: the stage caller's cue to
            # ask the next replica at once (an ErrorEvent would read as the reply's start).
            log.info("%s turn %d: %s", frame.session, frame.turn, e)
            await self.bus.publish(reply, LlmDone(turn=frame.turn, count=0,
                                                  error=f"{Full.code}: {e}"))
            return
        self.tasks.start(frame.session, frame.turn, self._complete(frame, reply, ticket),
                         reply=reply, on_done=ticket.release)

    async def _on_ctl(self, frame: Frame, _msg: Msg) -> None:
        if isinstance(frame, Cancel):
            self.tasks.cancel(frame.session, frame.turn, frame.reply)

    async def _complete(self, req: LlmRequest, reply: str, ticket: Ticket) -> None:
        started = time.monotonic()
        ttft: float | None = None
        count = 0
        error = None
        calls: dict[int, dict] = {}
        running = False
        try:
            await ticket.wait()
            running = True
            self.inflight += 1
            context = context_from_wire(req.messages, req.tools, req.settings.get("tool_choice"))
            stream = await self._open(req, context)
            try:
                async for chunk in stream:
                    if not chunk.choices:
                        continue
                    delta = chunk.choices[0].delta
                    if delta is None:
                        continue
                    for tc in delta.tool_calls or []:
                        call = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                        call["id"] = tc.id or call["id"]
                        if tc.function and tc.function.name:
                            call["name"] += tc.function.name
                        if tc.function and tc.function.arguments:
                            call["arguments"] += tc.function.arguments
                    if delta.content:
                        if ttft is None:
                            ttft = time.monotonic() - started
                            if not req.warm:
                                LLM_TTFT.labels(self.stage.value).observe(ttft)
                        await self.bus.publish(reply, LlmDelta(turn=req.turn, index=count,
                                                               text=delta.content))
                        count += 1
            finally:
                await stream.close()
            if calls:
                if ttft is None:
                    ttft = time.monotonic() - started
                assembled = [_parse_call(c) for _, c in sorted(calls.items())]
                await self.bus.publish(reply, LlmDelta(turn=req.turn, index=count,
                                                       tool_calls=assembled))
                count += 1
        except asyncio.CancelledError:
            error = "cancelled"
            raise
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            log.error("%s turn %d: completion failed: %s", req.session, req.turn, error)
        finally:
            if running:
                self.inflight -= 1
            ticket.release()
            done = LlmDone(turn=req.turn, count=count, error=error,
                           ttft_ms=ttft * 1000 if ttft is not None else None)
            try:
                await self.bus.publish(reply, done)
            except Exception as e:
                log.warning("could not send LlmDone: %s", e)

    async def _open(self, req: LlmRequest, context: LLMContext):
        """Start the completion; an endpoint that refuses ``developer`` messages (llama.cpp's
        server answers 500, older OpenAI-compatible servers 400) gets them as user messages,
        from this request on."""
        service = self._service_for(req.settings)
        try:
            return await service.get_chat_completions(context)
        except openai.APIStatusError as e:
            if not (self.developer_role and has_developer_messages(req.messages)):
                raise
            log.warning("%s turn %d: the endpoint refused a developer message (%d); sending "
                        "developer messages as user messages from now on", req.session,
                        req.turn, e.status_code)
            self.developer_role = False
            for known in self._services.values():
                known.supports_developer_role = False
            return await service.get_chat_completions(context)

    def _service_for(self, overrides: dict) -> OpenAILLMService:
        """The agent's sampling settings, on a service kept per distinct combination."""
        temperature = overrides.get("temperature", self.settings.llm_temperature)
        max_tokens = overrides.get("max_tokens", self.settings.llm_max_tokens)
        key = (float(temperature), int(max_tokens))
        if key not in self._services:
            if len(self._services) >= MAX_SERVICES:  # agents' combinations, not unbounded
                del self._services[next(k for k in self._services if k != self._default)]
            service = make_llm_service(replace(
                self.settings, llm_temperature=key[0], llm_max_tokens=key[1]), self.base_url,
                self.provider)
            service.supports_developer_role = self.developer_role
            self._services[key] = service
        return self._services[key]

    async def on_drain(self) -> None:
        await self.tasks.wait_idle()

    async def on_stop(self) -> None:
        await self.tasks.cancel_all()


def _parse_call(call: dict) -> dict:
    try:
        args = json.loads(call["arguments"] or "{}")
    except json.JSONDecodeError:
        args = {"_raw": call["arguments"]}
    return {"id": call["id"], "name": call["name"], "arguments": args}

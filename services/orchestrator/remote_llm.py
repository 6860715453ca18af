"""The LLM stage as Pipecat sees it: its OpenAI LLM service, the HTTP stream replaced by the bus.

Everything Pipecat does around a completion (context and tool formatting, function-call
assembly and execution, re-running the LLM on tool results, interruptions, metrics) stays
Pipecat's; only ``get_chat_completions`` changes: the request goes to the LLM queue group and the
turn's ``LlmDelta`` frames come back as OpenAI ``ChatCompletionChunk``s.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, Any

from openai.types.chat import ChatCompletionChunk
from openai.types.chat.chat_completion_chunk import (
    Choice,
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.utils.types import assert_given

from voxbus.subjects import Stage
from voxbus.wire import Cancel, LlmDelta, LlmDone, LlmRequest, WireError, decode

if TYPE_CHECKING:
    from services.orchestrator.session import SessionRunner

from services.orchestrator.proxies import STAGE_REPLY_TIMEOUT_S


class LlmStageError(RuntimeError):
    """The LLM stage answered the turn with an error (endpoint down, bad request, ...)."""


def _plain(value: Any) -> Any:
    """openai's NOT_GIVEN/Omit markers and pydantic objects, made msgpack-safe."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if _given(v)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "model_dump"):
        return value.model_dump(exclude_none=True)
    return value


def _given(value: Any) -> bool:
    return type(value).__name__ not in ("NotGiven", "Omit")


def _chunk(delta: ChoiceDelta) -> ChatCompletionChunk:
    return ChatCompletionChunk(id="voxbus", created=0, model="voxbus",
                               object="chat.completion.chunk",
                               choices=[Choice(index=0, delta=delta, finish_reason=None)])


def _user_messages(context: LLMContext) -> int:
    return sum(1 for m in context.get_messages() if isinstance(m, dict) and m.get("role") == "user")


class BusCompletionStream:
    """An async iterator of chunks for one turn's reply subject; closing it early cancels the
    stage's work for the turn (Pipecat closes the stream when the user interrupts)."""

    def __init__(self, runner: SessionRunner, turn: int, reply: str, started: float):
        self.s = runner
        self.turn = turn
        self.reply = reply
        self.started = started
        self.queue: asyncio.Queue = asyncio.Queue()
        self.sub = None
        self.finished = False
        self.first = True

    async def open(self, request: LlmRequest) -> BusCompletionStream:
        bus = self.s.bus

        async def on(msg) -> None:
            try:
                await self.queue.put(decode(msg.data))
            except WireError as e:
                await bus.report(e.code, e.message, subject=msg.subject)
                await self.queue.put(LlmDone(turn=self.turn, count=0,
                                             error=f"bad reply frame: {e}"))

        self.sub = await bus.nc.subscribe(self.reply, cb=on)
        await bus.publish(self.s.subjects.work(Stage.LLM), request, reply=self.reply)
        return self

    def __aiter__(self):
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        while True:
            try:
                item = await asyncio.wait_for(self.queue.get(), STAGE_REPLY_TIMEOUT_S)
            except TimeoutError:
                await self.s.report("llm_timeout", f"no LLM reply for turn {self.turn}")
                raise LlmStageError(f"LLM stage silent for {STAGE_REPLY_TIMEOUT_S:.0f} s") from None
            if isinstance(item, LlmDone):
                self.finished = True
                if item.error:
                    raise LlmStageError(f"LLM stage: {item.error}")
                raise StopAsyncIteration
            if not isinstance(item, LlmDelta):
                continue
            if self.first and (item.text or item.tool_calls):
                self.first = False
                await self.s.metric("llm_ttft", (time.monotonic() - self.started) * 1000,
                                    self.turn)
            if item.tool_calls:
                self.s.note_tool_calls([c.get("name", "") for c in item.tool_calls])
                return _chunk(ChoiceDelta(tool_calls=[
                    ChoiceDeltaToolCall(index=i, id=c.get("id") or f"call_{self.turn}_{i}",
                                        type="function",
                                        function=ChoiceDeltaToolCallFunction(
                                            name=c.get("name", ""),
                                            arguments=json.dumps(c.get("arguments", {}))))
                    for i, c in enumerate(item.tool_calls)]))
            if item.text:
                return _chunk(ChoiceDelta(content=item.text))

    async def close(self) -> None:
        if self.sub is not None:
            sub, self.sub = self.sub, None
            try:
                await sub.unsubscribe()
            except Exception:  # the connection is closing: nothing left to unsubscribe
                pass
        if not self.finished:
            self.finished = True
            # Interrupted (cancelled) or timed out: stop the worker's stream too.
            await self.s.bus.publish(self.s.subjects.ctl(self.s.session),
                                     Cancel(session=self.s.session, turn=self.turn))


class RemoteLLM(OpenAILLMService):
    def __init__(self, session: SessionRunner, *, system_instruction: str | None = None,
                 llm_settings: dict[str, Any] | None = None, **kwargs):
        super().__init__(api_key="unused", base_url="http://llm-stage.invalid",
                         settings=OpenAILLMService.Settings(
                             model="voxbus-llm-stage", system_instruction=system_instruction),
                         **kwargs)
        self.s = session
        self.llm_settings = dict(llm_settings or {})
        self._user_messages_seen = 0

    async def get_chat_completions(self, context: LLMContext) -> BusCompletionStream:
        params = await self.get_llm_adapter().get_llm_invocation_params(
            context, system_instruction=assert_given(self._settings.system_instruction),
            convert_developer_to_user=not self.supports_developer_role)
        messages = _plain(list(params["messages"]))
        # A completion after new user words starts a bot turn; one after tool results or a
        # flow transition continues the current one.
        user_messages = _user_messages(context)
        if user_messages != self._user_messages_seen or self.s.turn == 0:
            self._user_messages_seen = user_messages
            turn = self.s.begin_bot_turn()
        else:
            turn = self.s.turn
        tools = _plain(params.get("tools")) if _given(params.get("tools")) else []
        settings = dict(self.llm_settings)
        if _given(params.get("tool_choice")) and params.get("tool_choice") is not None:
            settings["tool_choice"] = _plain(params["tool_choice"])
        request = LlmRequest(session=self.s.session, turn=turn, messages=messages,
                             tools=tools or [], settings=settings)
        reply = self.s.subjects.reply(self.s.session, Stage.LLM, turn, self._next_index(turn))
        stream = BusCompletionStream(self.s, turn, reply, time.monotonic())
        return await stream.open(request)

    def resumed(self, context: LLMContext) -> None:
        """The context was restored from a stored session: its user turns are already counted."""
        self._user_messages_seen = _user_messages(context)

    def _next_index(self, turn: int) -> int:
        """Each completion of a turn (first, then after each tool round) has its own subject."""
        if getattr(self, "_index_turn", None) != turn:
            self._index_turn, self._index = turn, 0
        else:
            self._index += 1
        return self._index

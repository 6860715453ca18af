"""The LLM stage as Pipecat sees it: its OpenAI LLM service, the HTTP stream replaced by the bus.

Everything Pipecat does around a completion (context and tool formatting, function-call
assembly and execution, re-running the LLM on tool results, interruptions, metrics) stays
Pipecat's; only ``get_chat_completions`` changes: the request goes to the LLM queue group and the
turn's ``LlmDelta`` frames come back as OpenAI ``ChatCompletionChunk``s.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from openai.types.chat import ChatCompletionChunk
from openai.types.chat.chat_completion_chunk import (
    Choice,
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
)
from pipecat.frames.frames import (
    EagerEndOfTurnCancelFrame,
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSSpeakFrame,
)
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.utils.types import assert_given

from services.orchestrator.context_window import recent
from services.orchestrator.metrics import FALLBACKS
from voxbus.errors import StageFailed, StageUnavailable
from voxbus.stage_call import StageCall
from voxbus.subjects import Stage
from voxbus.wire import LlmDelta, LlmDone, LlmRequest

if TYPE_CHECKING:
    from services.orchestrator.session import SessionRunner

log = logging.getLogger("voxbus.orchestrator")



class LlmStageError(RuntimeError):
    """The LLM stage could not answer (endpoint down, bad request, no replica, stalled)."""


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
    """An async iterator of chunks for one completion over the bus; closing it early cancels
    the stage's work (Pipecat closes the stream when the user interrupts)."""

    def __init__(self, runner: SessionRunner, request: LlmRequest, index: int):
        self.s = runner
        self.turn = request.turn
        subjects = runner.subjects
        self.call = StageCall(runner.bus, Stage.LLM, request, policy=runner.worker.policy,
                              retry_to=runner.retry_target(Stage.LLM),
                              can_hedge=runner.hedge_when(Stage.LLM),
                              reply=lambda attempt: subjects.reply(
                                  request.session, Stage.LLM, request.turn, index, attempt))
        self.produced = False
        """Something reached the user from this completion (words or a tool call)."""

    @property
    def answered_empty(self) -> bool:
        """The stage finished without error and without a word or a tool call."""
        done = self.call.done
        return (not self.produced and isinstance(done, LlmDone) and not done.error)

    async def open(self) -> BusCompletionStream:
        await self.call.__aenter__()
        return self

    def __aiter__(self):
        return self

    async def __anext__(self) -> ChatCompletionChunk:
        while True:
            try:
                item = await self.call.__anext__()
            except StopAsyncIteration:
                done = self.call.done
                if isinstance(done, LlmDone) and done.error and done.error != "cancelled":
                    raise LlmStageError(f"llm: {done.error} (turn {self.turn}, after "
                                        f"{done.count} deltas)") from None
                raise
            except (StageUnavailable, StageFailed) as e:
                raise LlmStageError(str(e)) from None
            if not isinstance(item, LlmDelta):
                continue
            if not self.produced and (item.text.strip() or item.tool_calls):
                self.produced = True
                first = self.call.first_frame_at or time.monotonic()
                await self.s.metric("llm_ttft", (first - self.call.started) * 1000, self.turn)
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
        await self.call.close()


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
        self._user_messages_speculated = 0
        self._stream: BusCompletionStream | None = None

    async def get_chat_completions(self, context: LLMContext) -> BusCompletionStream:
        params = await self.get_llm_adapter().get_llm_invocation_params(
            context, system_instruction=assert_given(self._settings.system_instruction),
            convert_developer_to_user=not self.supports_developer_role)
        messages = recent(_plain(list(params["messages"])),
                          self.s.worker.settings.llm_context_chars)
        # A completion after new user words starts a bot turn; one after tool results or a
        # flow transition continues the current one.
        user_messages = _user_messages(context)
        if user_messages != self._user_messages_seen or self.s.turn == 0:
            # A speculative answer's user turn is not over: it counts once confirmed (a
            # withdrawn one leaves the committed answer to begin a turn of its own).
            speculative = self._speculation_gate.is_speculating
            if speculative:
                self._user_messages_speculated = user_messages
            else:
                self._user_messages_seen = user_messages
            turn = self.s.begin_bot_turn(speculative=speculative)
        else:
            turn = self.s.turn
        tools = _plain(params.get("tools")) if _given(params.get("tools")) else []
        settings = dict(self.llm_settings)
        if _given(params.get("tool_choice")) and params.get("tool_choice") is not None:
            settings["tool_choice"] = _plain(params["tool_choice"])
        request = LlmRequest(session=self.s.session, turn=turn, messages=messages,
                             tools=tools or [], settings=settings)
        self._stream = BusCompletionStream(self.s, request, self._next_index(turn))
        return await self._stream.open()

    async def _process_context(self, context: LLMContext) -> None:
        """A completion the stage could not give is reported, and the agent says its fallback
        line instead of going silent (unless part of an answer was already said)."""
        self._stream = None
        try:
            await super()._process_context(context)
            if self._stream is not None and self._stream.answered_empty:
                # A reply of nothing (a small model that stops at once, or only whitespace)
                # is a turn the user would wait on in silence.
                raise LlmStageError(f"the LLM's reply to turn {self.s.turn} was empty")
        except LlmStageError as e:
            turn = self.s.turn
            await self.s.stage_failed(Stage.LLM, e, turn)
            if (self._stream is None or not self._stream.produced) and self.s.owes_fallback(turn):
                FALLBACKS.labels(Stage.LLM.value).inc()
                await self.push_frame(TTSSpeakFrame(self.s.agent.fallback_line,
                                                    append_to_context=False))

    async def push_frame(self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM):
        # Before the gate: a speculated reply's first words go to TTS while it is held.
        prefetch = self.s.prefetch
        if prefetch and direction is FrameDirection.DOWNSTREAM:
            if self._speculation_gate.is_speculating:
                if isinstance(frame, LLMFullResponseStartFrame):
                    await prefetch.begin()
                elif isinstance(frame, LLMTextFrame):
                    await prefetch.text(frame.text)
            if isinstance(frame, LLMFullResponseEndFrame):
                await prefetch.reply_ended()
        await super().push_frame(frame, direction)

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        if self.s.prefetch and isinstance(frame, EagerEndOfTurnCancelFrame | InterruptionFrame):
            self.s.prefetch.drop()
        await super().process_frame(frame, direction)

    async def warm(self, context: LLMContext) -> None:
        """Have the endpoint evaluate the conversation so far (the system prompt, for a new
        session) while the user draws breath: its prompt cache then holds the prefix, and
        the first turn's answer costs only the user's words."""
        params = await self.get_llm_adapter().get_llm_invocation_params(
            context, system_instruction=assert_given(self._settings.system_instruction),
            convert_developer_to_user=not self.supports_developer_role)
        messages = recent(_plain(list(params["messages"])),
                          self.s.worker.settings.llm_context_chars)
        request = LlmRequest(session=self.s.session, turn=self.s.turn, messages=messages,
                             settings={"max_tokens": 1}, warm=True)
        try:
            async with StageCall(self.s.bus, Stage.LLM, request,
                                 policy=self.s.worker.policy) as call:
                async for _ in call:
                    pass
        except (StageUnavailable, StageFailed) as e:
            log.debug("%s: LLM warm-up skipped: %s", self.s.session, e)

    def speculation_confirmed(self) -> None:
        """The speculative answer stands: its user turn is counted as answered."""
        self._user_messages_seen = self._user_messages_speculated
        if self.s.prefetch:
            self.s.prefetch.stop_watching()

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

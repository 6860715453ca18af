"""The extraction: the transcript and the agent's schema to the LLM stage over the bus, the
reply parsed and checked; a reply that is not valid gets one more try, told what was wrong."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from services.post_call.config import PostCallConfig
from services.post_call.metrics import EXTRACTION_RETRIES
from services.post_call.schema import describe, parse_reply, validate
from voxbus.bus import Bus
from voxbus.stage_call import CallPolicy, StageCall
from voxbus.subjects import Stage
from voxbus.transcript import Line
from voxbus.wire import LlmDelta, LlmRequest

log = logging.getLogger("voxbus.post_call")

TURN = 1_000_000
"""The turn id of a session's extraction: past any real turn, so its reply subjects and its
recorded request never share a turn with the conversation's."""
TRIES = 2


@dataclass(frozen=True)
class Extraction:
    fields: dict[str, Any] | None
    error: str | None
    tries: int


def messages(config: PostCallConfig, lines: list[Line]) -> list[dict[str, str]]:
    said = "\n".join(f"{'caller' if line.role == 'user' else 'agent'}: {line.text}"
                     for line in lines)
    system = (f"{config.prompt}\n\nFields:\n{describe(config.schema_)}\n\nAnswer with one "
              "JSON object whose keys are exactly these field names, and nothing else: no "
              "prose, no code fence.")
    return [{"role": "system", "content": system},
            {"role": "user", "content": f"The conversation:\n{said}"}]


async def extract(bus: Bus, session: str, config: PostCallConfig, lines: list[Line], *,
                  policy: CallPolicy) -> Extraction:
    """Fields valid against the schema, or an ``error`` after :data:`TRIES` invalid replies.
    A stage that cannot be reached raises (``StageUnavailable``/``StageFailed``): the caller
    retries the whole session later; a model that answers badly is an answer."""
    if not lines:
        return Extraction(None, "the conversation is empty: nobody said anything", 0)
    convo = messages(config, lines)
    problem = ""
    for attempt in range(TRIES):
        text = await _complete(bus, session, convo, config, policy, attempt)
        try:
            value = parse_reply(text)
            errors = validate(config.schema_, value)
            if not errors:
                return Extraction(value, None, attempt + 1)
            problem = "; ".join(errors)
        except ValueError as e:
            problem = str(e)
        log.warning("%s: extraction reply %d invalid: %s", session, attempt + 1, problem)
        if attempt + 1 < TRIES:
            EXTRACTION_RETRIES.inc()
            convo = [*convo, {"role": "assistant", "content": text},
                     {"role": "user", "content": f"That is not valid: {problem}. Answer again "
                      "with only the JSON object."}]
    return Extraction(None, f"the model's reply was not valid after {TRIES} tries: {problem}",
                      TRIES)


async def _complete(bus: Bus, session: str, convo: list[dict[str, str]],
                    config: PostCallConfig, policy: CallPolicy, attempt: int) -> str:
    request = LlmRequest(session=session, turn=TURN, messages=convo,
                         settings={"temperature": config.llm.temperature,
                                   "max_tokens": config.llm.max_tokens})
    # Each try's attempts get reply subjects of their own (r0/r1, then r2/r3).
    async with StageCall(bus, Stage.LLM, request, policy=policy,
                         first_attempt=attempt * policy.attempts) as call:
        parts = [frame.text async for frame in call if isinstance(frame, LlmDelta)]
    if call.done is not None and getattr(call.done, "error", None):
        log.warning("%s: extraction reply ended with an error: %s", session, call.done.error)
    return "".join(parts)


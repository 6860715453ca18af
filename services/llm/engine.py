"""Builds the LLM worker's Pipecat service: any OpenAI-compatible endpoint through ``openai``."""

from __future__ import annotations

from typing import Any

from pipecat.adapters.llm.schemas.function_schema import FunctionSchema
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.services.openai.llm import OpenAILLMService

from services import providers
from services.providers import Built
from voxbus.config import Settings


def llm_provider(settings: Settings) -> Built | None:
    """The provider ``VOXBUS_LLM_SERVICE`` names, checked and imported (None: the
    OpenAI-compatible endpoint at ``OPENAI_BASE_URL``). Called once per worker, at start."""
    provider = providers.chosen("llm", settings.llm_service)
    return providers.load(provider) if provider is not None else None


def make_llm_service(settings: Settings, base_url: str,
                     provider: Built | None = None) -> OpenAILLMService:
    """``provider``: one of Pipecat's OpenAI-compatible services (Groq's, Together's, ...),
    which keep their own base URL, model and request shaping; the worker relays its stream
    the same way. The sampling settings are the request's either way."""
    if provider is not None:
        service = provider.make(max_tokens=settings.llm_max_tokens,
                                temperature=settings.llm_temperature)
        service._client = service._client.with_options(max_retries=0)
        return service
    service = OpenAILLMService(
        api_key=settings.openai_api_key or "sk-local",
        base_url=base_url,
        settings=OpenAILLMService.Settings(
            model=settings.llm_model,
            max_tokens=settings.llm_max_tokens,
            temperature=settings.llm_temperature,
        ),
    )
    # The caller retries on another replica after a short first-token deadline; the client's
    # own retries (with backoff) would only hold a failure back past it, in silence.
    service._client = service._client.with_options(max_retries=0)
    return service


def has_developer_messages(messages: list[dict[str, Any]]) -> bool:
    return any(isinstance(m, dict) and m.get("role") == "developer" for m in messages)


def context_from_wire(messages: list[dict[str, Any]], tools: list[dict[str, Any]],
                      tool_choice: Any = None) -> LLMContext:
    """Rebuild a Pipecat context from OpenAI-format messages, function tools and tool choice."""
    schemas = []
    for tool in tools:
        fn = tool.get("function", tool)
        params = fn.get("parameters") or {}
        schemas.append(FunctionSchema(
            name=fn["name"], description=fn.get("description", ""),
            properties=params.get("properties", {}), required=params.get("required", []),
        ))
    if not schemas:
        return LLMContext(messages=list(messages))
    if tool_choice is None:
        return LLMContext(messages=list(messages), tools=schemas)
    return LLMContext(messages=list(messages), tools=schemas, tool_choice=tool_choice)

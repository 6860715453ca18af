"""An agent's ``post_call:`` settings: what to extract from the finished conversation and
where to deliver it. Validated when the agent file loads, so a bad one is refused there."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.post_call.schema import SchemaError, check_schema

_TOPIC = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

DEFAULT_PROMPT = ("Read the conversation between a caller (user) and a voice agent "
                  "(assistant) and extract the fields below.")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Delivery(_Strict):
    """Exactly one of a webhook URL or a NATS topic."""

    webhook: str | None = None
    """POSTed as JSON, signed (``Voxbus-Signature``) with ``VOXBUS_POST_CALL_SECRET``."""
    nats: str | None = None
    """A topic: the result is a ``PostCallResult`` frame on ``<prefix>.postcall.<topic>``."""

    @field_validator("webhook")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        if url is None:
            return url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL with a host")
        return url

    @field_validator("nats")
    @classmethod
    def _topic(cls, topic: str | None) -> str | None:
        if topic is not None and not _TOPIC.match(topic):
            raise ValueError(f"{topic!r} is not a topic: 1-64 of [A-Za-z0-9_-] (it becomes "
                             "the last token of <prefix>.postcall.<topic>)")
        return topic

    @model_validator(mode="after")
    def _one(self) -> Delivery:
        if (self.webhook is None) == (self.nats is None):
            raise ValueError("name exactly one of webhook (a URL) or nats (a topic)")
        return self

    def describe(self) -> str:
        return f"webhook {self.webhook}" if self.webhook else f"nats topic {self.nats}"


class ExtractionLlm(_Strict):
    temperature: float = Field(default=0.0, ge=0, le=2)
    max_tokens: int = Field(default=256, gt=0, le=4096)


class PostCallConfig(_Strict):
    """``post_call:`` in an agent file."""

    schema_: dict[str, Any] = Field(alias="schema")
    """The fields to extract: a small JSON Schema (see services/post_call/schema.py)."""
    prompt: str = Field(default=DEFAULT_PROMPT, min_length=1, max_length=4000)
    """What the extraction model is told about the task (the fields are listed after it)."""
    deliver: Delivery
    llm: ExtractionLlm = ExtractionLlm()

    @field_validator("schema_")
    @classmethod
    def _schema(cls, schema: Any) -> dict[str, Any]:
        try:
            return check_schema(schema)
        except SchemaError as e:
            raise ValueError(str(e)) from None

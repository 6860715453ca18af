"""What of a long conversation goes to the LLM: the system messages and the newest turns that
fit a budget, so a session that talks for an hour costs what a short one does (a small local
model's context is 2,048 tokens, and every extra token is prompt time on each turn)."""

from __future__ import annotations

import json
from typing import Any


def recent(messages: list[dict[str, Any]], budget_chars: int) -> list[dict[str, Any]]:
    """The leading system messages, then the newest messages within ``budget_chars`` (their
    JSON size), starting at a user message, so a tool result never goes without the call that
    asked for it. The newest message always goes."""
    head = 0
    while head < len(messages) and messages[head].get("role") == "system":
        head += 1
    kept: list[dict[str, Any]] = []
    size = 0
    for message in reversed(messages[head:]):
        cost = len(json.dumps(message, default=str))
        if kept and size + cost > budget_chars:
            break
        kept.append(message)
        size += cost
    kept.reverse()
    if len(kept) < len(messages) - head:  # something was left out: start at a user turn
        start = next((i for i, m in enumerate(kept) if m.get("role") == "user"), 0)
        kept = kept[start:]
    return messages[:head] + kept

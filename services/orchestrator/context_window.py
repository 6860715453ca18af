"""What of a long conversation goes to the LLM: the system messages and the newest turns that
fit a budget, so a session that talks for an hour costs what a short one does (a small local
model's context is 2,048 tokens, and every extra token is prompt time on each turn).

The cut moves in steps of half the budget, not one turn at a time: the text sent begins the
same way for several turns in a row, so an endpoint with a prompt cache (llama.cpp's, the
hosted APIs') reuses the prefix it already evaluated and prefills only the new turn.
"""

from __future__ import annotations

import json
from typing import Any


def recent(messages: list[dict[str, Any]], budget_chars: int) -> list[dict[str, Any]]:
    """The leading system messages, then the newest messages within ``budget_chars`` (their
    JSON size), starting at a user message, so a tool result never goes without the call that
    asked for it. The newest message always goes.

    A cut can only fall on the first user message past each multiple of ``budget_chars / 2``
    (counted from the start of the conversation), so the kept part is between half the budget
    and the whole of it, and the cut stays put while the conversation grows by half a budget.
    """
    head = 0
    while head < len(messages) and messages[head].get("role") == "system":
        head += 1
    body = messages[head:]
    costs = [len(json.dumps(m, default=str)) for m in body]
    total = sum(costs)
    if total <= budget_chars:
        return messages
    step = max(1, budget_chars // 2)
    # The allowed cuts: at each step boundary, the first user message at or after it.
    cuts: list[int] = []
    before = 0  # characters before message i
    boundary = step
    for i, (message, cost) in enumerate(zip(body, costs, strict=True)):
        if before >= boundary and message.get("role") == "user":
            cuts.append(i)
            boundary = (before // step + 1) * step
        before += cost
    kept_from = len(body) - 1  # at worst, the newest message alone
    for cut in cuts:
        if total - sum(costs[:cut]) <= budget_chars:
            kept_from = cut
            break
    else:
        # No step cut fits (one huge turn): the newest turn that fits, or the newest message.
        size = 0
        for i in range(len(body) - 1, -1, -1):
            size += costs[i]
            if size > budget_chars and i < len(body) - 1:
                break
            if body[i].get("role") == "user" or i == len(body) - 1:
                kept_from = i
    return messages[:head] + body[kept_from:]

"""What of a long conversation goes to the LLM: the system prompt and the newest turns."""

from services.orchestrator.context_window import recent

SYSTEM = {"role": "system", "content": "You are a host."}


def turns(n: int) -> list[dict]:
    out = []
    for i in range(n):
        out += [{"role": "user", "content": f"question {i} " + "x" * 80},
                {"role": "assistant", "content": f"answer {i} " + "y" * 80}]
    return out


def test_a_short_conversation_goes_whole():
    messages = [SYSTEM, *turns(3)]
    assert recent(messages, 6000) == messages


def test_a_long_one_keeps_the_system_prompt_and_the_newest_turns_within_budget():
    messages = [SYSTEM, *turns(200), {"role": "user", "content": "the latest question"}]
    sent = recent(messages, 2000)
    assert sent[0] == SYSTEM and sent[-1]["content"] == "the latest question"
    assert len(str(sent)) < 2600 and len(sent) < 30
    assert sent[1]["role"] == "user"  # starts at a turn, not halfway through one


def test_a_tool_result_never_goes_without_its_call():
    call = {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                 "function": {"name": "book", "arguments": "{}"}}]}
    result = {"role": "tool", "tool_call_id": "c1", "content": "booked " + "z" * 400}
    messages = [SYSTEM, *turns(50), {"role": "user", "content": "book it"}, call, result]
    sent = recent(messages, 700)
    assert sent[1] == {"role": "user", "content": "book it"} and sent[-2:] == [call, result]


def test_the_newest_message_always_goes():
    huge = {"role": "user", "content": "w" * 10_000}
    assert recent([SYSTEM, *turns(5), huge], 600) == [SYSTEM, huge]


def test_the_cut_moves_in_half_budget_steps_so_a_prompt_cache_keeps_hitting():
    """Growing a conversation turn by turn, the first message sent changes about once per
    half budget of new text (not every turn), and what is sent stays within the budget."""
    budget, conversation, firsts, sizes = 2000, [SYSTEM], [], []
    for pair in (turns(60)[i:i + 2] for i in range(0, 120, 2)):
        conversation += pair[:1]  # the question is asked: a completion is requested
        sent = recent(conversation, budget)
        firsts.append(sent[1]["content"])
        sizes.append(sum(len(str(m)) for m in sent[1:]))
        conversation += pair[1:]
    changes = sum(a != b for a, b in zip(firsts, firsts[1:], strict=False))
    growth = sum(len(str(m)) for m in conversation[1:])
    assert 0 < changes <= growth // (budget // 2) + 1
    assert changes < len(firsts) // 3  # one turn at a time would change it on nearly every turn
    assert max(sizes) <= budget + 100 and min(sizes[20:]) >= budget // 2 - 300

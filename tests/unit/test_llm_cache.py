"""The embedded endpoint's prompt cache: one entry per conversation, bounded by what it holds.

The cache is driven the way llama-cpp-python drives it (look up the prompt, then store
prompt + completion), with real ``LlamaState`` objects; that it speeds a real conversation up
is measured by bench/soak.py, not asserted here.
"""

import numpy as np
from llama_cpp.llama import LlamaState

from voxbus.llm_endpoint import ConversationCache, entry_bytes

SYSTEM = list(range(1000, 1040))


def state(tokens, logits_rows=8, vocab=1000) -> LlamaState:
    return LlamaState(input_ids=np.array(tokens, dtype=np.intc),
                      scores=np.zeros((logits_rows, vocab), dtype=np.single),
                      n_tokens=len(tokens), llama_state=bytes(100), llama_state_size=100,
                      seed=0)


def complete(cache: ConversationCache, prompt: list[int], reply: list[int]) -> None:
    try:
        cache[prompt]
    except KeyError:
        pass
    cache[prompt + reply] = state(prompt + reply)


def test_a_conversation_keeps_one_entry_and_others_keep_theirs():
    cache = ConversationCache(1 << 30)
    a, b = SYSTEM + [1, 2, 3], SYSTEM + [7, 8, 9]
    complete(cache, a, [50, 51])
    complete(cache, b, [60, 61])
    # Turn 2 of A: its prompt carries turn 1 (the reply as the template writes it back).
    a2 = a + [50, 51, 99, 4, 5]
    complete(cache, a2, [52])
    keys = list(cache.cache_state)
    assert tuple(a2 + [52]) in keys and tuple(b + [60, 61]) in keys
    assert tuple(a + [50, 51]) not in keys  # superseded by its own next turn
    assert len(keys) == 2


def test_capacity_counts_the_logits_too():
    one = entry_bytes(state(SYSTEM + [1]))
    assert one > 8 * 1000 * 4  # the scores array, not only llama.cpp's 100 bytes
    cache = ConversationCache(capacity_bytes=int(one * 2.5))
    for k in range(5):
        complete(cache, SYSTEM + [k], [k + 100])
    assert len(cache.cache_state) == 2 and cache.cache_size <= one * 2.5
    assert tuple(SYSTEM + [4, 104]) in cache.cache_state  # the newest stay


def test_a_lookup_finds_the_conversation_with_the_longest_shared_prefix():
    cache = ConversationCache(1 << 30)
    complete(cache, SYSTEM + [1, 2], [3])
    complete(cache, SYSTEM + [5, 6], [7])
    got = cache[SYSTEM + [5, 6, 7, 8]]
    assert list(got.input_ids) == SYSTEM + [5, 6, 7]

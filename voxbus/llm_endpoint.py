"""llama-cpp-python's OpenAI-compatible server, with a prompt cache that suits conversations.

Without a cache every turn re-evaluates the whole conversation: on a 2-core machine that is
most of the time to first token once a session has talked for a minute. llama-cpp-python's RAM
cache keeps the model state after each completion and restores the longest-prefix match, but
it counts only the llama.cpp state against its capacity (each entry also holds the logits,
about as large again: 4.6 GB resident for a 512 MB cache in 48 completions) and it keeps every
turn of every conversation. ``ConversationCache`` counts all of an entry and keeps one entry
per conversation: the one a completion started from is superseded by the one it ends with.

Run as ``python -m voxbus.llm_endpoint`` with llama_cpp.server's own arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

import llama_cpp
from llama_cpp.llama_cache import LlamaRAMCache


def entry_bytes(state) -> int:
    return int(state.llama_state_size) + state.scores.nbytes + state.input_ids.nbytes


class ConversationCache(LlamaRAMCache):
    """A RAM prompt cache bounded by what it really holds, one entry per conversation."""

    def __init__(self, capacity_bytes: int = 1 << 30):
        super().__init__(capacity_bytes)
        self._prompt: tuple[int, ...] = ()
        """The prompt of the completion running (the server runs one at a time)."""
        self._prompt_len: dict[tuple[int, ...], int] = {}
        """Each entry's prompt length: the rest of its key is the completion."""

    @property
    def cache_size(self) -> int:
        return sum(entry_bytes(state) for state in self.cache_state.values())

    def __getitem__(self, key: Sequence[int]):
        self._prompt = tuple(key)  # asked once, just before each completion
        return super().__getitem__(key)

    def __setitem__(self, key: Sequence[int], value) -> None:
        key = tuple(key)
        # An entry whose whole prompt begins this one is the same conversation, a turn ago.
        same = llama_cpp.Llama.longest_token_prefix
        for old in [k for k in self.cache_state if k != key]:
            if same(old, key) >= self._prompt_len.get(old, len(old)):
                del self.cache_state[old]
        super().__setitem__(key, value)
        self._prompt_len = {k: self._prompt_len.get(k, len(k)) for k in self.cache_state}
        self._prompt_len[key] = len(self._prompt) if key[:len(self._prompt)] == self._prompt \
            else len(key)


def main() -> None:
    # llama_cpp.server builds its cache as ``llama_cpp.LlamaRAMCache(capacity_bytes=...)``.
    llama_cpp.LlamaRAMCache = ConversationCache
    from llama_cpp.server.__main__ import main as serve

    serve()


if __name__ == "__main__":
    main()

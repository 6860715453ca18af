"""The first words of a reply go to TTS at the first clause break, the rest by sentences.

Pipecat's TTS services speak whole sentences: the agent is silent until the LLM has written
the first one and Piper has synthesized all of it. The first clause ("Sure, ...", "The
capital of France, ...") is enough to start speaking; after it, sentences keep Piper's
prosody whole while the audio already playing hides their synthesis.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from pipecat.services.tts_service import TTSService
from pipecat.utils.text.base_text_aggregator import Aggregation, TextType
from pipecat.utils.text.simple_text_aggregator import SimpleTextAggregator

CLAUSE_MARKS = ",;:—"
MIN_WORDS = 3
"""Words before a clause break that make it worth speaking alone ("Well," is not)."""

_WORD = re.compile(r"\w+")


class FirstClauseAggregator(SimpleTextAggregator):
    def __init__(self, *, min_words: int = MIN_WORDS, **kwargs):
        super().__init__(**kwargs)
        self.min_words = min_words
        self._first_out = False
        self._after_mark = False

    async def aggregate(self, text: str) -> AsyncIterator[Aggregation]:
        if self._aggregation_type == TextType.TOKEN or self._first_out:
            async for aggregation in super().aggregate(text):
                self._first_out = True
                yield aggregation
            return
        for char in text:
            if self._after_mark and not self._first_out:
                self._after_mark = False
                # "1,000" is no clause break: only a mark followed by a space is.
                if char.isspace() and len(_WORD.findall(self._text)) >= self.min_words:
                    clause, self._text = self._text.strip(" "), ""
                    self._first_out = True
                    yield Aggregation(text=clause, type=TextType.SENTENCE)
                    continue
            self._text += char
            self._after_mark = char in CLAUSE_MARKS
            if result := await self._check_sentence_with_lookahead(char):
                self._first_out = True
                yield result

    async def reset(self):
        self._first_out = self._after_mark = False
        await super().reset()

    async def handle_interruption(self):
        self._first_out = self._after_mark = False
        await super().handle_interruption()


def speak_first_clause(tts: TTSService) -> TTSService:
    """``tts`` with the first-clause aggregator. Pipecat 1.14 takes no aggregator argument,
    so this replaces the one its constructor made, keeping its mode and language."""
    made = tts._text_aggregator
    tts._text_aggregator = FirstClauseAggregator(aggregation_type=made._aggregation_type,
                                                 language=made.language)
    return tts

"""The first words of a reply go to TTS at the first clause break, the rest by sentences.

A clause break is a comma (semicolon, colon, dash) followed by a space, or a word that
begins a phrase (a conjunction, a verb, a preposition: ``BREAK_WORDS``) after at least
``MIN_WORDS`` words.

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
BREAK_WORDS = frozenset(
    # conjunctions: "The sky is blue | because of..."
    "because but and so which when while although since or "
    # a verb after its subject: "The capital of France | is Paris."
    "is are was were has have had can will would could should does do "
    # a prepositional phrase: "I can book a table | for you"
    "in on at for with from about into".split())
"""Words a phrase can begin with: a break a speaker makes, where speaking can start. A
reply's first sentence (~10 tokens, ~200 ms of generation on two cores) is most often
subject, verb, rest, with no comma: waiting for its full stop kept the agent silent for
half of the words it had."""
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
            if char.isspace() and not self._first_out:
                # The word just ended; a phrase's first word after enough words starts the next one.
                words = _WORD.findall(self._text)
                if len(words) > self.min_words and words[-1].lower() in BREAK_WORDS:
                    cut = self._text.rstrip().rfind(words[-1])
                    clause, self._text = self._text[:cut].strip(" "), self._text[cut:]
                    self._first_out = True
                    self._text += char
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


def reply_aggregator(first_clause: bool) -> SimpleTextAggregator:
    """How a reply's text is cut for TTS (what a prefetch must cut the same way)."""
    return FirstClauseAggregator() if first_clause else SimpleTextAggregator()


def speak_first_clause(tts: TTSService) -> TTSService:
    """``tts`` with the first-clause aggregator. Pipecat 1.14 takes no aggregator argument,
    so this replaces the one its constructor made, keeping its mode and language."""
    made = tts._text_aggregator
    tts._text_aggregator = FirstClauseAggregator(aggregation_type=made._aggregation_type,
                                                 language=made.language)
    return tts

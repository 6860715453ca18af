"""The words' say in ending a turn, and the first clause of a reply going to TTS alone."""

from __future__ import annotations

import pytest
from pipecat.audio.turn.base_turn_analyzer import EndOfTurnState

from services.orchestrator.first_clause import FirstClauseAggregator
from services.orchestrator.turn_end import WordsAndAudioTurnStop, WordsFirstSmartTurn, words_wait

WAITS = dict(question_s=0.3, statement_s=1.3, fallback_s=1.5)


@pytest.mark.parametrize("text, complete, wait", [
    ("What time is it in Tokyo?", False, 0.3),   # Smart Turn unsure, the question is not
    ("What time is it in Tokyo?", True, 0.3),
    ("I'd like to book a table for", True, 1.5),  # "complete" audio, dangling words
    ("I'd like to book a table for...", False, 1.5),
    ("My order number is", True, 1.5),
    ("Um,", True, 1.5),
    ("I'd like to book a table.", True, 1.3),     # a fragment Whisper punctuated
    ("I'd like to book a table.", False, 1.5),
    ("Tell me a fun fact about cats", True, 1.3),  # unpunctuated: maybe not finished
    ("Tell me a fun fact about cats.", False, 0.3),  # a request, asked like a question
    ("Please give me three ideas for dinner!", True, 0.3),
    ("Tell me about.", True, 1.5),                 # dangling, request or not
    ("Tell me more.", True, 1.3),                  # too short to be sure it is all
    ("I'd like you to tell me a story.", True, 1.3),  # a statement that contains one
    ("Can you tell me?", True, 1.3),               # a lead-in to the real question
    ("", True, None),                              # no words: Smart Turn alone
])
def test_words_wait(text, complete, wait):
    assert words_wait(text, complete, **WAITS) == wait


async def spoken(tokens: list[str], aggregator=None) -> list[str]:
    agg = aggregator or FirstClauseAggregator()
    out = []
    for token in tokens:
        out += [a.text async for a in agg.aggregate(token)]
    if rest := await agg.flush():
        out.append(rest.text)
    return out


def tokens(text: str) -> list[str]:
    words = text.split(" ")
    return [words[0]] + [" " + w for w in words[1:]]


async def test_first_clause_alone_then_sentences():
    text = "The capital of France, as you may know, is Paris. It is lovely in May. Go!"
    assert await spoken(tokens(text)) == [
        "The capital of France,", "as you may know, is Paris.", "It is lovely in May.", "Go!"]


async def test_short_or_numeric_commas_do_not_split():
    assert await spoken(tokens("Well, it costs 1,000 euros. Yes.")) == [
        "Well, it costs 1,000 euros.", "Yes."]


async def test_each_reply_starts_afresh():
    agg = FirstClauseAggregator()
    first = await spoken(tokens("Sure thing, my friend, here it is."), agg)
    second = await spoken(tokens("And again, my friend, here it is."), agg)
    assert first == ["Sure thing, my friend,", "here it is."]
    assert second == ["And again, my friend,", "here it is."]


async def test_a_conjunction_after_enough_words_starts_the_next_clause():
    text = "The sky is blue because of Rayleigh scattering. So it is."
    assert await spoken(tokens(text)) == [
        "The sky is blue", "because of Rayleigh scattering.", "So it is."]


@pytest.mark.parametrize("text,first", [
    ("The capital of France is Paris.", "The capital of France"),
    ("Le Grand Paris is the capital of France.", "Le Grand Paris"),
    ("I can book a table for you tonight.", "I can book a table"),
    # Too few words before the break: said whole.
    ("A spider has eight legs.", "A spider has eight legs."),
    ("Cats and dogs make good pets.", "Cats and dogs make good pets."),
])
async def test_a_phrase_break_after_enough_words_starts_speaking(text, first):
    out = await spoken(tokens(text))
    assert out[0] == first
    assert " ".join(out) == text


def strategy_with(text: str) -> WordsAndAudioTurnStop:
    stop = WordsAndAudioTurnStop(turn_analyzer=WordsFirstSmartTurn(), question_stop_s=0.3,
                                 statement_stop_s=1.3, fallback_stop_s=1.5)
    stop._turn_text = text
    stop._words_in.set()
    return stop


@pytest.mark.parametrize("text, needed", [
    ("What time is it in Tokyo?", False),      # a question: the words decide
    ("Tell me a fun fact about cats.", False),  # a request
    ("I'd like to book a table for", False),   # dangling: the whole fallback either way
    ("I'd like to book a table.", True),       # a statement: the audio's say matters
    ("", True),
])
async def test_smart_turn_runs_only_when_the_words_leave_it_open(text, needed):
    stop = strategy_with(text)
    analyzer = stop._turn_analyzer
    assert analyzer.verdict_needed() is needed
    analyzer.set_sample_rate(16000)
    analyzer.append_audio(bytes(3200), is_speech=True)
    state, _ = await analyzer.analyze_end_of_turn()
    assert analyzer.skipped == (0 if needed else 1)
    if not needed:
        assert state is EndOfTurnState.COMPLETE


async def test_smart_turn_waits_for_the_words_before_it_is_skipped():
    stop = strategy_with("What time is it in Tokyo?")
    stop._words_in.clear()  # the segment's transcript has not arrived yet
    assert stop._turn_analyzer.verdict_needed()

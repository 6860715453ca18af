"""The guard that sends a shortened-window Whisper transcript back for a full-window decode."""

from services.stt.short_window import looks_degenerate


def test_plain_sentences_pass():
    assert not looks_degenerate("What is the capital of France?", 1.8)
    assert not looks_degenerate("Yes.", 0.4)
    assert not looks_degenerate("Hello. Hello?", 1.0)


def test_runaway_length_is_caught():
    assert looks_degenerate("one two three four five six seven eight nine ten", 0.6)


def test_repeated_phrase_is_caught():
    assert looks_degenerate("Hello. Hello? Hello? Hello.", 5.0)

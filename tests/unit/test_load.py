"""The load generator's pure parts: the capacity search's doubling and bisection (against a
measure function with a known capacity), percentiles with misses, and a recording's user turns
as the corpus."""

from __future__ import annotations

import math

import numpy as np
import pytest

from voxbus import recording
from voxbus.caller import CorpusError, load_corpus, recording_utterances
from voxbus.load import Step, find_capacity, parse_pause, percentile
from voxbus.subjects import Subjects
from voxbus.wire import AudioIn, Transcript, TurnEvent, encode


def fake(capacity: int):
    """A measure whose e2e p95 is 500 ms up to ``capacity`` sessions and 5 s past it."""
    asked: list[int] = []

    async def measure(n: int) -> Step:
        asked.append(n)
        p95 = 500.0 if n <= capacity else 5000.0
        return Step(n, p95 <= 1000, p95)

    return measure, asked


@pytest.mark.parametrize("capacity", [0, 1, 2, 3, 5, 6, 8, 13, 31, 32, 40])
async def test_capacity_search_finds_the_largest_good_count(capacity):
    measure, asked = fake(capacity)
    cap = await find_capacity(measure, 1000, max_sessions=32)
    assert cap.sessions == min(capacity, 32)
    assert cap.first_bad == (capacity + 1 if capacity < 32 else None)
    assert [s.sessions for s in cap.steps] == asked
    assert len(set(asked)) == len(asked), f"a count measured twice: {asked}"


async def test_capacity_search_doubles_then_bisects():
    measure, asked = fake(5)
    await find_capacity(measure, 1000, max_sessions=64)
    assert asked == [1, 2, 4, 8, 6, 5]


async def test_capacity_search_stops_at_its_ceiling():
    measure, asked = fake(100)
    cap = await find_capacity(measure, 1000, max_sessions=12)
    assert asked == [1, 2, 4, 8, 12] and cap.sessions == 12 and cap.first_bad is None


def test_percentile_is_numpys_and_a_miss_is_over_any_bound():
    values = [120.0, 80.0, 300.0, 95.0, 110.0, 400.0, 101.0]
    for q in (50, 95):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))
    assert percentile([], 95) is None
    assert percentile([100.0] * 19 + [math.inf], 50) == 100.0
    assert percentile([100.0] * 19 + [math.inf], 95) == math.inf


def test_pause_parses():
    assert parse_pause("1.5-4") == (1.5, 4.0)
    assert parse_pause("2") == (2.0, 2.0)
    for bad in ("4-1", "x", "-1-2"):
        with pytest.raises(ValueError):
            parse_pause(bad)


def _tone(seconds: float) -> list[bytes]:
    t = np.arange(int(seconds * 16000)) / 16000
    pcm = (np.sin(2 * np.pi * 220 * t) * 8000).astype("<i2").tobytes()
    return [pcm[i:i + 640] for i in range(0, len(pcm), 640)]


def test_a_recordings_user_turns_are_its_corpus(tmp_path):
    """Two spoken turns (0.6 s and 1.0 s of voice) between silences, each declared over: two
    utterances, cut at the turn boundaries, with what the STT heard as their text."""
    subjects, session = Subjects("rec"), "abc123"
    silence = [bytes(640)] * 40
    audio = silence + _tone(0.6) + silence + silence + _tone(1.0) + silence
    msgs, t = [], 0

    def put(subject, frame):
        nonlocal t
        t += 20_000
        msgs.append(recording.RecordedMessage(t, subject, {}, encode(frame)))

    for seq, pcm in enumerate(audio):
        put(subjects.audio_in(session), AudioIn(seq=seq, ts_us=t, sample_rate=16000, pcm=pcm))
        for end, text, turn in ((40 + 30 + 10, "first question", 1),
                                (40 + 30 + 80 + 50 + 10, "second question", 2)):
            if seq == end:
                put(subjects.event(session, "transcript"),
                    Transcript(text=text, final=True, seq=end, ts_us=t))
                put(subjects.event(session, "turn"),
                    TurnEvent(turn=turn, state="user_ended", ts_us=t))
    rec = recording.Recording(recording.RecordingHeader(session, "rec", "chat", 0, "capture"),
                              msgs)
    path = recording.write(tmp_path / "two.vxrec", rec)
    turns = recording_utterances(path)
    assert [u.text for u in turns] == ["first question", "second question"]
    lead = 0.3
    assert [round(len(u.pcm) / 32000 - lead, 1) for u in turns] == [0.6, 1.0]
    assert load_corpus([str(tmp_path)]) == turns  # a folder: the files in it


def test_a_corpus_that_cannot_be_spoken_is_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CorpusError, match="no such file"):
        load_corpus([str(tmp_path / "missing.wav")])
    with pytest.raises(CorpusError, match="no .wav or .vxrec files"):
        load_corpus([str(tmp_path)])
    with pytest.raises(CorpusError, match="not a PCM WAV"):
        (tmp_path / "bad.wav").write_bytes(b"RIFF....")
        load_corpus([str(tmp_path / "bad.wav")])

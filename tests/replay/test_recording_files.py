"""The recording file format (round trip, every way a file can be bad), WER, and the timeline,
on a synthetic session built from real wire frames: no servers needed."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from voxbus import recording
from voxbus.bus import REPLY_HEADER, SENT_HEADER
from voxbus.cli import main
from voxbus.recording import RecordedMessage, Recording, RecordingError, RecordingHeader
from voxbus.replay import compare_live, format_report, pair_turns
from voxbus.subjects import Event, Stage, Subjects
from voxbus.timeline import LANES, render, write_timeline
from voxbus.turns import SessionView, wer
from voxbus.wire import (
    AudioFlush,
    AudioIn,
    AudioOut,
    BotText,
    ErrorEvent,
    Frame,
    LlmDelta,
    LlmDone,
    LlmRequest,
    Metric,
    SessionEnd,
    SessionStart,
    Transcript,
    TtsAudio,
    TtsDone,
    TtsRequest,
    TurnEvent,
    VadEvent,
    VadState,
    encode,
)

S = Subjects("vox")
SESSION = "abc123"


def tone(ms: int = 20, amp: float = 3000) -> bytes:
    t = np.arange(16 * ms) / 16000
    return (amp * np.sin(2 * math.pi * 220 * t)).astype("<i2").tobytes()


def synthetic(user_text: str = "What is the capital of France?") -> Recording:
    """A one-turn session: 1 s of speech, VAD, transcript, turn end, LLM, TTS, agent audio, a
    barge-in and an error; with the messages a real one has, on the subjects it uses."""
    msgs: list[RecordedMessage] = []

    def put(t_s: float, subject: str, frame: Frame, **headers: str) -> None:
        msgs.append(RecordedMessage(int(t_s * 1e6), subject, {SENT_HEADER: "1", **headers},
                                    encode(frame)))

    put(0.0, S.work_copy(SESSION, Stage.ORCHESTRATOR), SessionStart(session=SESSION))
    for i in range(150):  # 3 s of user audio: silence, 1 s of speech, silence
        pcm = tone() if 25 <= i < 75 else bytes(640)
        put(0.1 + i * 0.02, S.audio_in(SESSION), AudioIn(seq=i, ts_us=i * 20000,
                                                         sample_rate=16000, pcm=pcm))
        if i == 35:
            put(0.1 + i * 0.02, S.event(SESSION, Event.VAD),
                VadEvent(state=VadState.STARTED, seq=i, ts_us=0))
        if i == 85:
            put(0.1 + i * 0.02, S.event(SESSION, Event.VAD),
                VadEvent(state=VadState.STOPPED, seq=i, ts_us=0))
    put(2.1, S.event(SESSION, Event.TRANSCRIPT),
        Transcript(text=user_text, final=True, seq=85, ts_us=0))
    put(2.11, S.event(SESSION, Event.METRIC), Metric(name="stt_ttfs", value_ms=400.0))
    put(2.2, S.event(SESSION, Event.TURN), TurnEvent(turn=1, state="user_ended", ts_us=0))
    put(2.2, S.event(SESSION, Event.METRIC), Metric(name="eou_delay", value_ms=900.0, turn=1))
    llm_reply = S.reply(SESSION, Stage.LLM, 1, 0)
    put(2.21, S.work_copy(SESSION, Stage.LLM), LlmRequest(
        session=SESSION, turn=1, messages=[{"role": "user", "content": user_text}]),
        **{REPLY_HEADER: llm_reply})
    for i, word in enumerate(["Paris ", "is ", "the ", "capital."]):
        put(2.5 + i * 0.05, llm_reply, LlmDelta(turn=1, index=i, text=word))
    put(2.7, llm_reply, LlmDone(turn=1, count=4, ttft_ms=290.0))
    put(2.5, S.event(SESSION, Event.METRIC), Metric(name="llm_ttft", value_ms=290.0, turn=1))
    put(2.7, S.event(SESSION, Event.BOT), BotText(turn=1, text="Paris is the capital."))
    tts_reply = S.reply(SESSION, Stage.TTS, 1, 0)
    put(2.71, S.work_copy(SESSION, Stage.TTS), TtsRequest(
        session=SESSION, turn=1, index=0, text="Paris is the capital."),
        **{REPLY_HEADER: tts_reply})
    put(2.85, tts_reply, TtsAudio(turn=1, index=0, seq=0, sample_rate=16000, pcm=tone(500)))
    put(2.86, tts_reply, TtsDone(turn=1, index=0, count=1, ttfa_ms=140.0))
    put(2.85, S.event(SESSION, Event.METRIC), Metric(name="tts_ttfa", value_ms=140.0, turn=1))
    for i in range(10):
        put(2.9 + i * 0.02, S.audio_out(SESSION), AudioOut(turn=1, seq=i, sample_rate=16000,
                                                           pcm=tone()))
    put(3.0, S.event(SESSION, Event.TURN), TurnEvent(turn=1, state="interrupted", ts_us=0))
    put(3.0, S.audio_out(SESSION), AudioFlush(turn=1))
    put(3.05, S.event(SESSION, Event.ERROR), ErrorEvent(service="tts", code="cancelled",
                                                        message="turn 1 cancelled"))
    put(3.2, S.ctl(SESSION), SessionEnd(session=SESSION, reason="done"))
    msgs.sort(key=lambda m: m.t_us)
    return Recording(RecordingHeader(session=SESSION, prefix="vox", agent="chat",
                                     started_at_us=1_700_000_000_000_000, source="test"), msgs)


def test_round_trip_keeps_every_message_byte_for_byte(tmp_path):
    rec = synthetic()
    path = recording.write(tmp_path / "s.vxrec", rec)
    back = recording.read(path)
    assert back.messages == rec.messages
    assert (back.header.session, back.header.prefix, back.header.agent) == (SESSION, "vox", "chat")
    assert back.header.started_at_us == rec.header.started_at_us
    assert not list(tmp_path.glob(".*tmp")), "the temporary file was left behind"


def test_truncated_file_says_where(tmp_path):
    path = recording.write(tmp_path / "s.vxrec", synthetic())
    raw = path.read_bytes()
    n = len(synthetic().messages)
    cut = tmp_path / "cut.vxrec"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(RecordingError, match=rf"cut\.vxrec: truncated after \d+ of {n} messages"):
        recording.read(cut)
    cut.write_bytes(raw[:-3])  # only the end marker is damaged
    with pytest.raises(RecordingError, match="cut.vxrec: truncated after|cut.vxrec: corrupted"):
        recording.read(cut)
    cut.write_bytes(raw[:10])
    with pytest.raises(RecordingError, match="cut.vxrec: truncated inside the header"):
        recording.read(cut)


def test_corrupted_file_is_refused_with_a_clear_error(tmp_path):
    path = recording.write(tmp_path / "s.vxrec", synthetic())
    raw = bytearray(path.read_bytes())
    bad = tmp_path / "bad.vxrec"
    # A flipped byte inside some audio: still valid msgpack, caught by the checksum.
    at = raw.index(tone()[100:120])
    raw[at] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(RecordingError, match="bad.vxrec: corrupted: the checksum"):
        recording.read(bad)
    # Garbage where a message should start: msgpack itself cannot go on.
    raw = bytearray(path.read_bytes())
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(bytes(raw))
    unpacker.unpack()
    at = unpacker.tell()
    raw[at : at + 4] = b"\xc1\xc1\xc1\xc1"  # 0xc1 is never valid msgpack
    bad.write_bytes(bytes(raw))
    with pytest.raises(RecordingError, match=r"bad.vxrec: corrupted at message 1 of \d+"):
        recording.read(bad)


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"RIFF\x00\x00\x00\x00WAVEfmt ", "not a voxbus recording"),
    (msgpack.packb({"format": "voxbus-recording", "version": 99}), "format version 99"),
    (msgpack.packb([1, 2, 3]), "not a voxbus recording"),
])
def test_not_a_recording(tmp_path, content, reason):
    path = tmp_path / "x.vxrec"
    path.write_bytes(content)
    with pytest.raises(RecordingError, match=reason):
        recording.read(path)


def test_cli_reports_a_bad_file_without_a_traceback(tmp_path, capsys):
    path = recording.write(tmp_path / "s.vxrec", synthetic())
    path.write_bytes(path.read_bytes()[:-40])
    assert main(["replay", str(path), "--timeline", str(tmp_path / "t.html")]) == 2
    err = capsys.readouterr().err
    assert "s.vxrec: truncated after" in err and "Traceback" not in err
    assert not (tmp_path / "t.html").exists()
    assert main(["replay", str(tmp_path / "missing.vxrec")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_turns_and_latencies_are_read_from_the_frames():
    view = SessionView(synthetic())
    (turn,) = view.turns
    assert turn.turn == 1 and turn.user_text.startswith("What is the capital")
    assert turn.bot_text == "Paris is the capital." and turn.interrupted
    assert turn.boundary_s == pytest.approx(1.7)  # the VAD stop at seq 85
    lat = turn.latency_ms
    assert (lat["eou_delay"], lat["stt_ttfs"], lat["llm_ttft"], lat["tts_ttfa"]) == (
        900.0, 400.0, 290.0, 140.0)
    # Speech ended at frame 75 (t = 0.1 + 75 * 0.02); the agent's first audio came at 2.9 s.
    assert lat["e2e_latency"] == pytest.approx((2.9 - (0.1 + 75 * 0.02)) * 1000, abs=1)
    (llm,) = view.llm
    assert llm.text == "Paris is the capital." and llm.done.ttft_ms == 290.0
    (tts,) = view.tts
    assert tts.audio_s == pytest.approx(0.5)


def test_comparison_flags_changed_words_not_resampled_replies():
    same = compare_live(SessionView(synthetic()), SessionView(synthetic()))
    assert not same.changed and same.wer == 0.0 and same.boundary_agreement == 1.0
    other = compare_live(SessionView(synthetic()),
                         SessionView(synthetic("What is the capital of Spain?")))
    assert other.changed and other.wer == pytest.approx(1 / 6, abs=1e-3)
    assert "transcripts differ" in other.changes[0]
    text = format_report(other)
    assert "Spain" in text and "France" in text and "eou_delay" in text


def test_wer_and_turn_pairing():
    assert wer("What is the capital of France?", "what is the capital of france") == 0.0
    assert wer("a b c d", "a x c") == 0.5
    assert wer("", "") == 0.0
    view = SessionView(synthetic())
    (pair,) = pair_turns(view.turns, view.turns)
    assert pair[0] is pair[1]


def test_timeline_draws_every_lane_from_the_recording(tmp_path):
    out = write_timeline(synthetic(), tmp_path / "t.html")
    page = out.read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page
    for lane in LANES:
        assert f">{lane}</text>" in page, lane
    assert "What is the capital of France?" in page  # the transcript
    assert "Paris is the capital." in page  # LLM reply and TTS sentence
    assert "turn 1" in page and "barge-in" in page and "cancelled" in page
    assert "eou_delay 900 ms" in page and "llm_ttft 290 ms" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert render(synthetic()) == page  # deterministic

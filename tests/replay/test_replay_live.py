"""A ``voxbus talk`` session recorded by the stream, exported, and replayed live: same words."""

from __future__ import annotations

import pytest

from voxbus import recording
from voxbus.replay import Replayer, TurnDiff, format_report
from voxbus.talk import talk
from voxbus.turns import SessionView

pytestmark = pytest.mark.slow


async def test_talk_session_exports_and_replays_live_with_the_same_transcripts(
        system, recorder, speak, tmp_path):
    wavs = [speak("What is the capital of France?"), speak("Tell me about the moon.")]
    results = await talk(system.nats_url, wavs, prefix=system.prefix)
    session = results[0].session

    listed = {s.session: s for s in await recorder.sessions()}
    assert session in listed, listed
    assert listed[session].agent == "chat" and listed[session].ended == "done"
    exported = await recorder.export(session)
    path = recording.write(tmp_path / f"{session}.vxrec", exported)
    rec = recording.read(path)
    assert rec.messages == exported.messages and rec.header.agent == "chat"

    # Everything the session did is in the file, work requests included.
    view = SessionView(rec)
    assert len(view.audio_in) > 200 and view.audio_out and view.vad
    assert view.llm and view.tts and view.metrics
    said = [t.user_text for t in view.turns]
    assert said == [r.user_text for r in results], (said, results)

    async with Replayer(system.nats_url, system.prefix, speed=1.5) as replayer:
        report = await replayer.run(rec, "live", file=str(path))
    print(format_report(report))
    assert report.replayed_session and report.replayed_session != session
    pairs = [d for d in report.items if isinstance(d, TurnDiff)]
    assert len(pairs) == 2 and all(d.original and d.replayed for d in pairs), report
    assert all(d.same_words for d in pairs), format_report(report)
    assert report.wer == 0.0
    assert all(abs(d.boundary_delta_s) <= 0.25 for d in pairs), format_report(report)
    assert all(d.replayed.bot_text for d in pairs)

    # The replayed session was recorded too, like any other.
    again = await recorder.export(report.replayed_session)
    assert [t.user_text for t in SessionView(again).turns] == said

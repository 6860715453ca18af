"""A session from a WebRTC peer (what the browser does) recorded, exported, replayed into each
stage alone, drawn as a timeline, and run as a corpus next to a damaged file."""

from __future__ import annotations

import asyncio
import html

import pytest

from services.media_gateway.client import GatewayClient
from voxbus import recording
from voxbus.audio import read_wav
from voxbus.replay import (
    LlmDiff,
    Replayer,
    SegmentDiff,
    TtsDiff,
    format_corpus,
    format_report,
    recording_files,
    replay_paths,
)
from voxbus.timeline import LANES, write_timeline
from voxbus.turns import SessionView

pytestmark = pytest.mark.slow


async def _webrtc_session(gateway, wav: str) -> str:
    client = GatewayClient(gateway.url)
    try:
        session = await client.connect()
        client.mic.say(read_wav(wav))
        replied = await client.wait_for(lambda c: c.texts("bot") and c.loud_frames > 10, 40)
        assert replied, client.events
        await asyncio.sleep(1.0)
    finally:
        await client.close()
    return session


async def _ended(recorder, session: str) -> None:
    for _ in range(50):
        if any(s.session == session and s.ended for s in await recorder.sessions()):
            return
        await asyncio.sleep(0.1)


async def test_browser_session_replays_into_each_stage(system, recorder, gateway,
                                                       speech_wav, tmp_path):
    session = await _webrtc_session(gateway, speech_wav)
    await _ended(recorder, session)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    path = recording.write(corpus / "web.vxrec", await recorder.export(session))
    rec = recording.read(path)
    view = SessionView(rec)
    assert rec.header.agent == "chat"
    assert view.turns and "france" in view.turns[0].user_text.lower(), view.turns

    async with Replayer(system.nats_url, system.prefix, speed=4.0) as replayer:
        stt = await replayer.run(rec, "stt", file=str(path))
        print(format_report(stt))
        segments = [d for d in stt.items if isinstance(d, SegmentDiff)]
        assert segments and all(d.original and d.replayed for d in segments), stt
        assert stt.wer == 0.0 and not stt.changed, format_report(stt)

        llm = await replayer.run(rec, "llm", file=str(path))
        print(format_report(llm))
        requests = [d for d in llm.items if isinstance(d, LlmDiff)]
        assert len(requests) == len(view.llm) >= 1
        assert all(d.replayed and d.error is None for d in requests), format_report(llm)

        tts = await replayer.run(rec, "tts", file=str(path))
        print(format_report(tts))
        sentences = [d for d in tts.items if isinstance(d, TtsDiff)]
        assert len(sentences) == len(view.tts) >= 1
        assert all(d.audio_s[1] > 0.3 and d.error is None for d in sentences), format_report(tts)

        # A corpus: this recording and a damaged copy; the damaged one is reported, not fatal.
        (corpus / "damaged.vxrec").write_bytes(path.read_bytes()[:5000])
        reports = await replay_paths(replayer, recording_files(corpus), "stt")
    table = format_corpus(reports)
    print(table)
    assert "damaged.vxrec" in table and "truncated after" in table
    assert "web.vxrec" in table and "stt_ttfs" in table
    assert [r.error is None for r in reports] == [False, True]

    page = write_timeline(rec, tmp_path / "web.html").read_text()
    for lane in LANES:
        assert f">{lane}</text>" in page
    for said in (view.turns[0].user_text, view.llm[0].text.strip()[:20], view.tts[0].request.text):
        assert html.escape(said) in page, said

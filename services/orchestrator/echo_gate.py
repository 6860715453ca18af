"""Keeps the agent from interrupting itself when its own voice comes back through the user's mic.

Browsers cancel echo themselves; a phone bridge, a speakerphone or a client without AEC does
not. The orchestrator knows exactly what the agent said and when (its ``audio.out``), so each
incoming frame is compared with that reference over the plausible echo delays: a frame that is
mostly a delayed, scaled copy of the agent's voice is echo and reaches the VAD as silence. The
user talking over the agent does not correlate with the reference, so barge-in still works.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

FRAME_S = 0.02


class EchoGate:
    def __init__(self, sample_rate: int = 16000, *, max_delay_s: float = 0.6,
                 window_s: float = 0.2, threshold: float = 0.8, lag_tolerance_s: float = 0.004,
                 min_rms: float = 150.0):
        self.rate = sample_rate
        self.max_delay_s = max_delay_s
        self.window = int(window_s * sample_rate)
        self.threshold = threshold
        """Normalised correlation above which the mic is judged to be replaying the agent."""
        self._reference: deque[tuple[float, np.ndarray]] = deque()
        self._mic = np.zeros(self.window, dtype=np.float32)
        self._delay: float | None = None
        """The echo path's delay once seen; echo keeps it, a voice that merely sounds alike
        correlates at some other lag."""
        self.lag_tolerance_s = lag_tolerance_s
        self.min_rms = min_rms
        """Quieter frames pass untouched and cost nothing: too faint for the VAD anyway (and
        what a browser's own echo cancellation leaves behind)."""
        self.gated = 0
        """Frames replaced by silence so far (for metrics and tests)."""

    def reference(self, pcm: bytes, play_at: float) -> None:
        """The agent's audio, with the monotonic time it is due to be played."""
        self._reference.append((play_at, np.frombuffer(pcm, dtype="<i2").astype(np.float32)))
        horizon = play_at - self.max_delay_s - 1.0
        while self._reference and self._reference[0][0] < horizon:
            self._reference.popleft()

    def flush(self) -> None:
        """Barge-in dropped the queued audio: what was not played yet cannot echo."""
        now = time.monotonic()
        while self._reference and self._reference[-1][0] > now:
            self._reference.pop()

    def filter(self, pcm: bytes, now: float | None = None) -> bytes:
        """The frame as the VAD should hear it: unchanged, or silence if it is echo."""
        frame = np.frombuffer(pcm, dtype="<i2").astype(np.float32)
        self._mic = np.concatenate([self._mic[frame.size:], frame])
        if not self._reference or np.sqrt(np.mean(frame ** 2)) < self.min_rms:
            return pcm
        now = time.monotonic() if now is None else now
        start = now - self.max_delay_s - self.window / self.rate
        ref = self._reference_between(start, now)
        if ref is None:
            return pcm
        score, lag = self._correlation(self._mic, ref, min_rms=self.min_rms / 4)
        if score < self.threshold:
            return pcm
        # The mic window ends at `now`; it matched the reference starting at `lag`.
        delay = (ref.size - lag - self._mic.size) / self.rate
        if self._delay is not None and abs(delay - self._delay) > self.lag_tolerance_s:
            if score < 0.95:  # a near-perfect match is echo even if the path changed
                return pcm
        self._delay = delay
        self.gated += 1
        return bytes(len(pcm))

    def _reference_between(self, start: float, end: float) -> np.ndarray | None:
        n = int((end - start) * self.rate)
        out = np.zeros(n, dtype=np.float32)
        heard = False
        for at, samples in self._reference:
            i = int(round((at - start) * self.rate))
            if i >= n or i + samples.size <= 0:
                continue
            lo, hi = max(i, 0), min(i + samples.size, n)
            out[lo:hi] = samples[lo - i:hi - i]
            heard = True
        return out if heard and np.any(out) else None

    @staticmethod
    def _correlation(mic: np.ndarray, ref: np.ndarray, *,
                     min_rms: float) -> tuple[float, int]:
        """Best normalised correlation of ``mic`` with a slice of ``ref``, and where it starts.

        Only slices of ``ref`` at least ``min_rms`` loud count: a slice from before the agent
        began is zeros, and the FFT's rounding noise over its near-zero norm once scored in the
        hundreds, so the user talking in the first half second of a reply was taken for echo.
        """
        m = mic - mic.mean()
        m_norm = float(np.sqrt(np.dot(m, m)))
        if m_norm < 1e-3 * mic.size or ref.size < mic.size:
            return 0.0, 0
        size = 1 << int(np.ceil(np.log2(ref.size + mic.size)))
        dots = np.fft.irfft(np.fft.rfft(ref, size) * np.conj(np.fft.rfft(m, size)), size)
        dots = dots[: ref.size - mic.size + 1]
        energy = np.cumsum(np.concatenate([[0.0], ref.astype(np.float64) ** 2]))
        slice_energy = energy[mic.size:] - energy[:-mic.size]
        loud = slice_energy >= mic.size * min_rms ** 2
        if not loud.any():
            return 0.0, 0
        scores = np.where(loud, dots / (np.sqrt(np.maximum(slice_energy, 1.0)) * m_norm), 0.0)
        best = int(np.argmax(scores))
        return float(scores[best]), best

"""PCM helpers: WAV in/out, resampling to the wire format, 20 ms framing."""

from __future__ import annotations

import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soxr

WIRE_RATE = 16000
FRAME_MS = 20


def read_wav(path: str | Path, rate: int = WIRE_RATE) -> bytes:
    """Any PCM WAV (any rate, 8/16/32-bit, any channels) → mono PCM16 at ``rate``."""
    with wave.open(str(path), "rb") as w:
        channels, width, src_rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
        raw = w.readframes(w.getnframes())
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}.get(width)
    if dtype is None:
        raise ValueError(f"{path}: {8 * width}-bit WAV is not supported")
    x = np.frombuffer(raw, dtype=dtype).astype(np.float32)
    if width == 1:
        x = (x - 128.0) / 128.0
    else:
        x /= float(2 ** (8 * width - 1))
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    return to_pcm16(x, src_rate, rate)


def to_pcm16(x: np.ndarray, src_rate: int, rate: int = WIRE_RATE) -> bytes:
    if src_rate != rate:
        x = soxr.resample(x, src_rate, rate)
    return (np.clip(x, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def resample_pcm16(pcm: bytes, src_rate: int, rate: int = WIRE_RATE) -> bytes:
    if src_rate == rate:
        return pcm
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    return to_pcm16(x, src_rate, rate)


def write_wav(path: str | Path, pcm: bytes, rate: int = WIRE_RATE) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)


def frames(pcm: bytes, rate: int = WIRE_RATE, ms: int = FRAME_MS) -> Iterator[bytes]:
    """Split into ``ms`` frames; the last one is zero-padded to full length."""
    size = rate * ms // 1000 * 2
    for i in range(0, len(pcm), size):
        chunk = pcm[i : i + size]
        yield chunk if len(chunk) == size else chunk + bytes(size - len(chunk))


def duration_s(pcm: bytes, rate: int = WIRE_RATE) -> float:
    return len(pcm) / 2 / rate


SPEECH_RMS = 300
"""PCM16 RMS above which a 20 ms frame counts as speech (to date where the user's speech ends)."""


def rms(pcm: bytes) -> float:
    x = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.float32)
    return float(np.sqrt((x**2).mean())) if x.size else 0.0

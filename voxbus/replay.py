"""``voxbus replay``: re-run a recorded session and say what changed.

Live (default): a new session on the running system hears the recorded user audio with its
original timing and is compared turn by turn with the recording. ``stage``: the recorded inputs of
one stage (STT: audio and VAD segments; LLM: requests; TTS: sentences) go to that stage alone and
its outputs are compared. A folder of recordings is a regression corpus: every file is replayed
and one table says which sessions changed.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from voxbus.audio import SPEECH_RMS, rms
from voxbus.bus import Bus, now_us
from voxbus.errors import VoxbusError
from voxbus.recording import SUFFIX, Recording, RecordingError, SessionCapture, read
from voxbus.stage_call import CallPolicy, StageCall, ask
from voxbus.subjects import Event, Stage, Subjects
from voxbus.turns import (
    FRAME_S,
    STAGES,
    SessionView,
    Turn,
    Work,
    normalize,
    word_errors,
)
from voxbus.wire import (
    AudioIn,
    AudioOut,
    SessionEnd,
    SessionStart,
    SttClaim,
    Transcript,
    TurnEvent,
    VadEvent,
)

MODES = ("live", "stt", "llm", "tts")
BOUNDARY_TOL_S = 0.25
"""Two turn boundaries agree when they are this close in the user's audio (one VAD hop or so)."""
PAIR_TOL_S = 1.5
"""Turns further apart than this in the user's audio are different turns, not one that moved."""
BUSY_AUDIO_S = 0.6
"""The agent counts as speaking this long after its last audio frame."""
ONSET_SILENCE_FRAMES = 25
"""A voiced frame after this much silence (0.5 s) starts a user utterance."""
ONSET_LEAD_FRAMES = 10
"""The replay waits for the agent this many frames (0.2 s) before an utterance starts."""
HOLD_MAX_S = 20.0
SILENCE = bytes(640)


# --- what a replay reports ---------------------------------------------------------------


@dataclass
class TurnDiff:
    original: Turn | None
    replayed: Turn | None
    wer: float | None
    boundary_delta_s: float | None
    same_words: bool
    same_reply: bool


@dataclass
class SegmentDiff:
    """One VAD segment transcribed again by the STT stage."""

    at_s: float
    original: str | None
    replayed: str | None
    wer: float
    stt_ttfs_ms: tuple[float | None, float | None]


@dataclass
class LlmDiff:
    turn: int
    index: int
    original: str
    replayed: str
    same: bool
    tool_calls: tuple[list[str], list[str]]
    llm_ttft_ms: tuple[float | None, float | None]
    error: str | None


@dataclass
class TtsDiff:
    turn: int
    index: int
    text: str
    audio_s: tuple[float, float]
    tts_ttfa_ms: tuple[float | None, float | None]
    error: str | None


@dataclass
class Report:
    mode: str
    file: str
    original_session: str
    replayed_session: str = ""
    items: list = field(default_factory=list)
    wer: float | None = None
    word_errors: tuple[int, int] = (0, 0)
    """(errors, reference words) behind ``wer``, so a corpus adds them up."""
    boundary_agreement: float | None = None
    turns: tuple[int, int] | None = None
    replies_changed: int = 0
    changed: bool = False
    changes: list[str] = field(default_factory=list)
    latency_ms: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """Per stage: the figures of every turn, ``original`` and ``replayed``."""
    error: str | None = None
    replayed: Recording | None = field(default=None, repr=False)
    """The new session as captured (``--save``); not part of the JSON."""

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("replayed")
        return out


# --- the live system's state, as a client sees it ----------------------------------------


class AgentState:
    """Whether the agent is busy (deciding, answering or speaking) at a moment of a session."""

    DECIDING_MAX_S = 3.0
    """A final transcript with no turn decision after this long will not get one."""
    ANSWERING_MAX_S = 15.0
    """A turn with no reply after this long failed; the user would talk again."""

    def __init__(self):
        self.last_out = float("-inf")
        self.last_final = float("-inf")
        self.last_ended = float("-inf")
        self.open_turns: dict[int, float] = {}

    def feed(self, t: float, frame) -> None:
        if isinstance(frame, AudioOut):
            self.last_out = t
        elif isinstance(frame, Transcript) and frame.final and frame.text.strip():
            self.last_final = t
        elif isinstance(frame, TurnEvent):
            if frame.state == "user_ended":
                self.last_ended = t
                self.open_turns[frame.turn] = t
            elif frame.state in ("bot_stopped", "interrupted"):
                self.open_turns = {k: v for k, v in self.open_turns.items() if k > frame.turn}

    def busy(self, t: float) -> bool:
        speaking = t - self.last_out < BUSY_AUDIO_S
        deciding = self.last_final > self.last_ended and t - self.last_final < self.DECIDING_MAX_S
        answering = any(t - since < self.ANSWERING_MAX_S for since in self.open_turns.values())
        return speaking or deciding or answering


def _original_busy(view: SessionView) -> Callable[[float], bool]:
    """``busy(t)`` on the recording's own clock."""
    events = sorted([(t, f) for t, f in view.audio_out] + view.transcripts + view.turn_events,
                    key=lambda x: x[0])

    def busy(t: float) -> bool:
        state = AgentState()
        for te, f in events:
            if te > t:
                break
            state.feed(te, f)
        return state.busy(t)

    return busy


def utterance_starts(audio: list[AudioIn]) -> list[int]:
    """Indices of frames that start a user utterance (voiced after half a second of silence)."""
    voiced = [rms(f.pcm) > SPEECH_RMS for f in audio]
    starts, quiet = [], ONSET_SILENCE_FRAMES
    for i, v in enumerate(voiced):
        if v and quiet >= ONSET_SILENCE_FRAMES:
            starts.append(i)
        quiet = 0 if v else quiet + 1
    return starts


# --- the replayer ------------------------------------------------------------------------


class Replayer:
    """Replays recordings into the system running on ``prefix`` at ``nats_url``."""

    def __init__(self, nats_url: str, prefix: str, *, speed: float = 1.0,
                 agent: str | None = None, settle_s: float = 2.5, timeout_s: float = 60.0):
        if speed <= 0:
            raise ValueError("--speed must be > 0")
        self.nats_url = nats_url
        self.subjects = Subjects(prefix)
        self.speed = speed
        self.agent = agent
        self.settle_s = settle_s
        self.timeout_s = timeout_s
        self.bus: Bus | None = None

    async def start(self) -> Replayer:
        self.bus = await Bus.connect(self.nats_url, self.subjects, "replay", attempts=3)
        return self

    async def stop(self) -> None:
        if self.bus:
            await self.bus.close()
            self.bus = None

    async def __aenter__(self) -> Replayer:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def run(self, recording: Recording, mode: str = "live", file: str = "") -> Report:
        if mode not in MODES:
            raise ValueError(f"unknown replay mode {mode!r}: one of {', '.join(MODES)}")
        view = SessionView(recording)
        if mode in ("live", "stt") and not view.audio_in:
            raise RecordingError(f"{file or recording.header.session}: "
                                 "the recording has no user audio to replay")
        run = {"live": self._live, "stt": self._stt, "llm": self._llm, "tts": self._tts}[mode]
        report = await run(view)
        report.file = file
        return report

    # --- live ---------------------------------------------------------------------------

    async def _live(self, view: SessionView) -> Report:
        bus, subjects = self.bus, self.subjects
        audio = view.user_audio()
        agent = self.agent or view.recording.header.agent or "chat"
        session = uuid.uuid4().hex[:12]
        capture = await SessionCapture(bus, session, agent).start()
        state, seen, last_activity = AgentState(), 0, 0.0
        inserted: list[tuple[int, int]] = []
        """(replay seq, silent frames the replay added there while waiting for the agent)"""

        def update() -> float:
            nonlocal seen, last_activity
            for m in capture.messages[seen:]:
                frame = m.frame()
                if frame is not None and not isinstance(frame, AudioIn):
                    state.feed(m.t_us / 1e6, frame)
                    last_activity = m.t_us / 1e6
            seen = len(capture.messages)
            return (now_us() - capture.started_at_us) / 1e6

        seq = 0

        async def send(pcm: bytes) -> None:
            nonlocal seq
            await bus.publish(subjects.audio_in(session), AudioIn(
                seq=seq, ts_us=now_us(), sample_rate=audio[0].sample_rate, pcm=pcm))
            seq += 1

        async def wait_for_agent(quiet_s: float, max_s: float) -> float:
            """Silence while the agent is busy (and ``quiet_s`` of quiet); returns seconds."""
            started = time.monotonic()
            while time.monotonic() - started < max_s:
                now = update()
                if not state.busy(now) and now - last_activity >= quiet_s:
                    break
                await send(SILENCE)
                await asyncio.sleep(FRAME_S)
            return time.monotonic() - started

        try:
            await ask(bus, Stage.ORCHESTRATOR, SessionStart(
                session=session, sample_rate=audio[0].sample_rate, agent=agent), timeout_s=15.0)
            was_busy = _original_busy(view)
            holds = {max(0, i - ONSET_LEAD_FRAMES) for i in utterance_starts(audio)
                     if not was_busy(view.audio_in[i][0])}
            t0, base, shift = time.monotonic(), audio[0].ts_us, 0.0
            for i, frame in enumerate(audio):
                if i in holds:
                    before = seq
                    shift += await wait_for_agent(0.0, HOLD_MAX_S)
                    if seq > before:
                        inserted.append((before, seq - before))
                delay = t0 + shift + (frame.ts_us - base) / 1e6 / self.speed - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await send(frame.pcm)
            await wait_for_agent(self.settle_s, self.timeout_s)
            await bus.publish(subjects.ctl(session), SessionEnd(session=session,
                                                               reason="replay done"))
            await asyncio.sleep(0.3)
        finally:
            await capture.stop()
        replayed = SessionView(capture.recording())
        for t in replayed.turns:  # back onto the original audio's clock
            t.boundary_s = round(t.boundary_s - _inserted_before(inserted, t.boundary_s), 3)
        report = compare_live(view, replayed)
        report.replayed = capture.recording()
        return report

    # --- one stage ----------------------------------------------------------------------

    async def _stt(self, view: SessionView) -> Report:
        bus, subjects = self.bus, self.subjects
        session = uuid.uuid4().hex[:12]
        capture = await SessionCapture(bus, session).start()
        first = view.first_seq
        timed: list[tuple[float, int, object]] = [(t, 0, f) for t, f in view.audio_in]
        timed += [(t, 1, e) for t, e in view.vad]
        timed.sort(key=lambda x: (x[0], x[1]))
        expected = len([1 for _, tr in view.final_transcripts() if tr.text.strip()])
        try:
            await ask(bus, Stage.STT, SttClaim(
                session=session, sample_rate=view.audio_in[0][1].sample_rate), timeout_s=10.0)
            t0, base = time.monotonic(), timed[0][0]
            for t, _, f in timed:
                delay = t0 + (t - base) / self.speed - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if isinstance(f, AudioIn):
                    await bus.publish(subjects.audio_in(session), AudioIn(
                        seq=f.seq - first, ts_us=now_us(), sample_rate=f.sample_rate, pcm=f.pcm))
                else:
                    assert isinstance(f, VadEvent)
                    await bus.publish(subjects.event(session, Event.VAD), VadEvent(
                        state=f.state, seq=max(0, f.seq - first), ts_us=now_us()))

            def finals() -> int:
                return sum(1 for m in capture.messages if m.subject.endswith(".evt.transcript")
                           and (fr := m.frame()) is not None and fr.final and fr.text.strip())

            await _until(capture, lambda: finals() >= expected, self.timeout_s,
                         quiet_s=self.settle_s)
            await bus.publish(subjects.ctl(session), SessionEnd(session=session,
                                                               reason="replay done"))
        finally:
            await capture.stop()
        report = compare_stt(view, SessionView(capture.recording()))
        report.replayed = capture.recording()
        return report

    async def _llm(self, view: SessionView) -> Report:
        return await self._work(view, Stage.LLM, view.llm)

    async def _tts(self, view: SessionView) -> Report:
        return await self._work(view, Stage.TTS, view.tts)

    async def _work(self, view: SessionView, stage: Stage, works: list[Work]) -> Report:
        """Send each recorded request again, one at a time, and wait for its last reply."""
        bus, subjects = self.bus, self.subjects
        session = uuid.uuid4().hex[:12]
        capture = await SessionCapture(bus, session).start()
        replies: list[str] = []
        works = [w for w in works if not w.request.attempt]  # a retry is the same request
        policy = CallPolicy(give_up_s=self.timeout_s, stall_s=self.timeout_s)
        try:
            for i, w in enumerate(works):
                req = w.request.model_copy(update={"session": session, "attempt": 0})
                index = getattr(req, "index", None)
                if index is None:
                    # <stage>.<turn>.<index>[.r<attempt>] after the session's "reply."
                    parts = w.reply_subject.split(".reply.", 1)[-1].split(".")
                    index = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else i
                call = StageCall(bus, stage, req, policy=policy,
                                 reply=lambda a, t=req.turn, n=index: subjects.reply(
                                     session, stage, t, n, a))
                try:
                    async with call:
                        async for _ in call:
                            pass
                except VoxbusError:
                    pass  # the comparison shows the error the recording holds
                replies.append(call.reply_subject)
            await bus.publish(subjects.ctl(session), SessionEnd(session=session,
                                                               reason="replay done"))
        finally:
            await capture.stop()
        new = SessionView(capture.recording())
        by_reply = {w.reply_subject: w for w in (new.llm if stage is Stage.LLM else new.tts)}
        pairs = [(w, by_reply.get(r)) for w, r in zip(works, replies, strict=True)]
        report = (compare_llm if stage is Stage.LLM else compare_tts)(view, pairs)
        report.replayed_session = session
        report.replayed = capture.recording()
        return report


async def _until(capture: SessionCapture, done: Callable[[], bool], timeout_s: float, *,
                 quiet_s: float | None = None) -> bool:
    """Wait for ``done()``, or for ``quiet_s`` without new messages, or the timeout."""
    deadline = time.monotonic() + timeout_s
    last_count, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        if done():
            return True
        if len(capture.messages) != last_count:
            last_count, last_change = len(capture.messages), time.monotonic()
        elif quiet_s is not None and time.monotonic() - last_change >= quiet_s:
            return False
        capture.changed.clear()
        try:
            await asyncio.wait_for(capture.changed.wait(), 0.2)
        except TimeoutError:
            pass
    return done()


def _inserted_before(inserted: list[tuple[int, int]], pos_s: float) -> float:
    frames = pos_s / FRAME_S
    return sum(min(n, max(0.0, frames - at)) for at, n in inserted) * FRAME_S


# --- comparisons -------------------------------------------------------------------------


def _latencies(a: list[Turn], b: list[Turn]) -> dict[str, dict[str, list[float]]]:
    return {s: {"original": [t.latency_ms[s] for t in a if t.latency_ms.get(s) is not None],
                "replayed": [t.latency_ms[s] for t in b if t.latency_ms.get(s) is not None]}
            for s in STAGES}


def _same(a: str | None, b: str | None) -> bool:
    return normalize(a or "") == normalize(b or "")


def pair_turns(a: list[Turn], b: list[Turn]) -> list[tuple[Turn | None, Turn | None]]:
    """Line the turns of two runs up by where they ended in the user's audio."""
    pairs, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        if i < len(a) and j < len(b) and abs(a[i].boundary_s - b[j].boundary_s) <= PAIR_TOL_S:
            pairs.append((a[i], b[j]))
            i, j = i + 1, j + 1
        elif j >= len(b) or (i < len(a) and a[i].boundary_s < b[j].boundary_s):
            pairs.append((a[i], None))
            i += 1
        else:
            pairs.append((None, b[j]))
            j += 1
    return pairs


def compare_live(original: SessionView, replayed: SessionView) -> Report:
    a, b = original.turns, replayed.turns
    items, errors, words, agree, replies = [], 0, 0, 0, 0
    for o, r in pair_turns(a, b):
        e, n = word_errors(o.user_text if o else "", r.user_text if r else "")
        errors, words = errors + e, words + n
        delta = round(r.boundary_s - o.boundary_s, 3) if o and r else None
        # Only the user's turns have a boundary to agree on (not an agent's greeting).
        agree += (delta is not None and abs(delta) <= BOUNDARY_TOL_S
                  and bool(o.user_text and r.user_text))
        same_reply = bool(o and r) and _same(o.bot_text, r.bot_text)
        replies += not same_reply
        items.append(TurnDiff(original=o, replayed=r, wer=round(e / n, 3) if n else None,
                              boundary_delta_s=delta,
                              same_words=_same(o.user_text if o else "",
                                               r.user_text if r else ""),
                              same_reply=same_reply))
    spoken = max(sum(bool(t.user_text) for t in a), sum(bool(t.user_text) for t in b))
    report = Report(mode="live", file="", original_session=original.session,
                    replayed_session=replayed.session, items=items,
                    wer=round(errors / words, 4) if words else float(errors > 0),
                    word_errors=(errors, words),
                    boundary_agreement=round(agree / spoken, 3) if spoken else 1.0,
                    turns=(len(a), len(b)), replies_changed=replies,
                    latency_ms=_latencies(a, b))
    if not all(d.same_words for d in items):
        report.changes.append(f"transcripts differ (WER {report.wer:.1%})")
    if len(a) != len(b):
        report.changes.append(f"{len(a)} turns became {len(b)}")
    if report.boundary_agreement < 1.0:
        report.changes.append(f"turn boundaries: {agree} of {spoken} agree")
    report.changed = bool(report.changes)
    return report


def compare_stt(original: SessionView, replayed: SessionView) -> Report:
    def segments(view: SessionView) -> dict[float, tuple[str, float | None]]:
        return {view.audio_pos(tr.seq): (tr.text.strip(), view._ttfs.get(id(tr)))
                for _, tr in view.final_transcripts() if tr.text.strip()}

    a, b = segments(original), segments(replayed)
    items, errors, words = [], 0, 0
    for at in sorted(set(a) | set(b)):
        (ot, ol), (rt, rl) = a.get(at, (None, None)), b.get(at, (None, None))
        e, n = word_errors(ot or "", rt or "")
        errors, words = errors + e, words + n
        items.append(SegmentDiff(at_s=at, original=ot, replayed=rt,
                                 wer=round(e / n, 3) if n else float(e > 0),
                                 stt_ttfs_ms=(ol, rl)))
    report = Report(mode="stt", file="", original_session=original.session,
                    replayed_session=replayed.session, items=items,
                    wer=round(errors / words, 4) if words else float(errors > 0),
                    word_errors=(errors, words), turns=(len(a), len(b)),
                    latency_ms={"stt_ttfs": {"original": [v for _, v in a.values() if v],
                                             "replayed": [v for _, v in b.values() if v]}})
    if any(not _same(d.original, d.replayed) for d in items):
        report.changes.append(f"transcripts differ (WER {report.wer:.1%})")
    report.changed = bool(report.changes)
    return report


def compare_llm(original: SessionView, pairs: list[tuple[Work, Work | None]]) -> Report:
    items = []
    for o, r in pairs:
        od, rd = o.done, r.done if r else None
        items.append(LlmDiff(
            turn=o.request.turn, index=len([i for i in items if i.turn == o.request.turn]),
            original=o.text, replayed=r.text if r else "",
            same=bool(r) and _same(o.text, r.text) and o.tool_calls == r.tool_calls,
            tool_calls=(o.tool_calls, r.tool_calls if r else []),
            llm_ttft_ms=(od.ttft_ms if od else None, rd.ttft_ms if rd else None),
            error=(rd.error if rd else "no reply")))
    report = Report(mode="llm", file="", original_session=original.session, items=items,
                    replies_changed=sum(not d.same for d in items),
                    latency_ms={"llm_ttft": {
                        "original": [d.llm_ttft_ms[0] for d in items if d.llm_ttft_ms[0]],
                        "replayed": [d.llm_ttft_ms[1] for d in items if d.llm_ttft_ms[1]]}})
    if not items:
        report.changes.append("the recording has no LLM requests")
    if report.replies_changed:
        report.changes.append(f"{report.replies_changed} of {len(items)} replies differ")
    if any(d.error for d in items):
        report.changes.append(f"{sum(bool(d.error) for d in items)} requests failed")
    report.changed = bool(report.changes)
    return report


def compare_tts(original: SessionView, pairs: list[tuple[Work, Work | None]]) -> Report:
    items = []
    for o, r in pairs:
        od, rd = o.done, r.done if r else None
        items.append(TtsDiff(
            turn=o.request.turn, index=o.request.index, text=o.request.text,
            audio_s=(round(o.audio_s, 3), round(r.audio_s, 3) if r else 0.0),
            tts_ttfa_ms=(od.ttfa_ms if od else None, rd.ttfa_ms if rd else None),
            error=(rd.error if rd else "no reply")))
    report = Report(mode="tts", file="", original_session=original.session, items=items,
                    latency_ms={"tts_ttfa": {
                        "original": [d.tts_ttfa_ms[0] for d in items if d.tts_ttfa_ms[0]],
                        "replayed": [d.tts_ttfa_ms[1] for d in items if d.tts_ttfa_ms[1]]}})
    moved = [d for d in items if abs(d.audio_s[0] - d.audio_s[1]) > 0.1]
    if not items:
        report.changes.append("the recording has no TTS requests")
    if moved:
        report.changes.append(f"{len(moved)} of {len(items)} sentences changed length")
    if any(d.error for d in items):
        report.changes.append(f"{sum(bool(d.error) for d in items)} requests failed")
    report.changed = bool(report.changes)
    return report


# --- files and folders -------------------------------------------------------------------


def recording_files(path: str | Path) -> list[Path]:
    """The recordings a path names: the file itself, or every ``*.vxrec`` in a folder."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob(f"*{SUFFIX}"))
        if not files:
            raise RecordingError(f"{path}: no {SUFFIX} recordings in this folder")
        return files
    if not path.exists():
        raise RecordingError(f"{path}: no such file or folder")
    return [path]


async def replay_paths(replayer: Replayer, files: list[Path], mode: str,
                       on_report: Callable[[Report], None] | None = None) -> list[Report]:
    """Replay each file; a file that cannot be read or replayed is reported, not fatal."""
    reports = []
    for f in files:
        try:
            report = await replayer.run(read(f), mode, file=str(f))
        except RecordingError as e:
            report = Report(mode=mode, file=str(f), original_session="", error=str(e),
                            changed=True)
        reports.append(report)
        if on_report:
            on_report(report)
    return reports


# --- printing ----------------------------------------------------------------------------


def _ms(v: float | None) -> str:
    return f"{v:.0f}" if v is not None else "-"


def _delta(a: float | None, b: float | None) -> str:
    return f"{b - a:+.0f}" if a is not None and b is not None else "-"


def format_report(r: Report) -> str:
    if r.error:
        return f"{r.file}: {r.error}"
    head = f"replay ({r.mode}) of {r.original_session}"
    head += f" as session {r.replayed_session}" if r.replayed_session else ""
    head += f"  [{r.file}]" if r.file else ""
    lines = [head]
    for i, d in enumerate(r.items, 1):
        lines += _format_item(i, d)
    lines.append("summary: " + _summary(r))
    return "\n".join(lines)


def _format_item(i: int, d) -> list[str]:
    if isinstance(d, TurnDiff):
        o, r = d.original, d.replayed
        ob = f"{o.boundary_s:.2f} s" if o else "-"
        rb = f"{r.boundary_s:.2f} s" if r else "-"
        delta = f" ({d.boundary_delta_s:+.2f})" if d.boundary_delta_s is not None else ""
        turn = (o or r).turn
        rows = [f"turn {i} (id {turn})  boundary {ob} -> {rb}{delta}",
                f"  you    original: {(o.user_text if o else '(no turn)') or '(nothing)'}",
                f"         replay:   {(r.user_text if r else '(no turn)') or '(nothing)'}"
                f"  [{'same' if d.same_words else f'WER {d.wer or 0:.0%}'}]",
                f"  agent  original: {(o.bot_text if o else '') or '(no reply)'}",
                f"         replay:   {(r.bot_text if r else '') or '(no reply)'}"
                f"  [{'same' if d.same_reply else 'differs'}]"]
        header = "  latency ms " + "".join(f"{s:>13}" for s in STAGES)
        rows += [header,
                 "    original " + "".join(f"{_ms(o.latency_ms[s] if o else None):>13}"
                                           for s in STAGES),
                 "    replay   " + "".join(f"{_ms(r.latency_ms[s] if r else None):>13}"
                                           for s in STAGES),
                 "    delta    " + "".join(
                     f"{_delta(o.latency_ms[s] if o else None, r.latency_ms[s] if r else None):>13}"
                     for s in STAGES)]
        return rows
    if isinstance(d, SegmentDiff):
        tag = "same" if _same(d.original, d.replayed) else f"WER {d.wer:.0%}"
        return [f"segment ending at {d.at_s:.2f} s  stt_ttfs {_ms(d.stt_ttfs_ms[0])} -> "
                f"{_ms(d.stt_ttfs_ms[1])} ms",
                f"  original: {d.original or '(nothing)'}",
                f"  replay:   {d.replayed or '(nothing)'}  [{tag}]"]
    if isinstance(d, LlmDiff):
        rows = [f"turn {d.turn} request {d.index}  llm_ttft {_ms(d.llm_ttft_ms[0])} -> "
                f"{_ms(d.llm_ttft_ms[1])} ms" + (f"  error: {d.error}" if d.error else ""),
                f"  original: {d.original or '(no text)'}",
                f"  replay:   {d.replayed or '(no text)'}  [{'same' if d.same else 'differs'}]"]
        if any(d.tool_calls):
            rows.append(f"  tool calls: {d.tool_calls[0]} -> {d.tool_calls[1]}")
        return rows
    assert isinstance(d, TtsDiff)
    return [f"turn {d.turn} sentence {d.index}: {d.text!r}",
            f"  audio {d.audio_s[0]:.2f} s -> {d.audio_s[1]:.2f} s   tts_ttfa "
            f"{_ms(d.tts_ttfa_ms[0])} -> {_ms(d.tts_ttfa_ms[1])} ms"
            + (f"  error: {d.error}" if d.error else "")]


def _summary(r: Report) -> str:
    parts = []
    if r.wer is not None:
        parts.append(f"WER {r.wer:.1%}")
    if r.boundary_agreement is not None:
        parts.append(f"turn boundaries agree {r.boundary_agreement:.0%}")
    if r.turns is not None:
        parts.append(f"{'turns' if r.mode == 'live' else 'segments'} {r.turns[0]} -> "
                     f"{r.turns[1]}")
    if r.mode in ("live", "llm"):
        parts.append(f"replies changed {r.replies_changed}")
    parts.append("CHANGED: " + "; ".join(r.changes) if r.changed else "unchanged")
    return "  ".join(parts)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def format_corpus(reports: list[Report]) -> str:
    """The regression table: one row per recording, then latency percentiles per stage."""
    rows = [("file", "session", "turns", "WER", "boundaries", "replies", "changed")]
    for r in reports:
        if r.error:
            rows.append((Path(r.file).name, "-", "-", "-", "-", "-", "ERROR: " + r.error))
            continue
        rows.append((
            Path(r.file).name, r.original_session,
            f"{r.turns[0]}->{r.turns[1]}" if r.turns else str(len(r.items)),
            f"{r.wer:.1%}" if r.wer is not None else "-",
            f"{r.boundary_agreement:.0%}" if r.boundary_agreement is not None else "-",
            str(r.replies_changed) if r.mode in ("live", "llm") else "-",
            "; ".join(r.changes) if r.changed else "no"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1]
             for row in rows]
    ok = [r for r in reports if not r.error]
    total_e = sum(r.word_errors[0] for r in ok)
    total_n = sum(r.word_errors[1] for r in ok)
    changed = [Path(r.file).name for r in reports if r.changed]
    lines.append("")
    if total_n:
        lines.append(f"corpus WER {total_e / total_n:.1%} over {total_n} words; "
                     f"{len(changed)} of {len(reports)} sessions changed"
                     + (f": {', '.join(changed)}" if changed else ""))
    else:
        lines.append(f"{len(changed)} of {len(reports)} sessions changed"
                     + (f": {', '.join(changed)}" if changed else ""))
    stages = [s for s in STAGES if any(s in r.latency_ms for r in ok)]
    if stages:
        lines.append("")
        lines.append(f"{'latency ms':<12}{'orig p50':>10}{'orig p95':>10}"
                     f"{'replay p50':>12}{'replay p95':>12}{'p50 delta':>11}")
        for s in stages:
            o = [v for r in ok for v in r.latency_ms.get(s, {}).get("original", [])]
            n = [v for r in ok for v in r.latency_ms.get(s, {}).get("replayed", [])]
            o50, o95, n50, n95 = (percentile(o, 50), percentile(o, 95), percentile(n, 50),
                                  percentile(n, 95))
            lines.append(f"{s:<12}{_ms(o50):>10}{_ms(o95):>10}{_ms(n50):>12}{_ms(n95):>12}"
                         f"{_delta(o50, n50):>11}")
    return "\n".join(lines)


def to_json(reports: list[Report]) -> str:
    return json.dumps([r.to_json() for r in reports] if len(reports) != 1
                      else reports[0].to_json(), default=str)

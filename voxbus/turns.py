"""A recording read back as a conversation: its turns, what was said, and each stage's latency.

Replay compares two of these; the timeline draws one. Times are seconds on the recording's clock
(``t_us``); audio positions are seconds into the user's audio (``AudioIn.seq`` × 20 ms), which do
not depend on how fast the audio was fed.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from voxbus.audio import SPEECH_RMS, rms
from voxbus.bus import REPLY_HEADER
from voxbus.recording import Recording
from voxbus.wire import (
    AudioFlush,
    AudioIn,
    AudioOut,
    BotText,
    ErrorEvent,
    LlmDelta,
    LlmDone,
    LlmRequest,
    Metric,
    SessionEnd,
    Transcript,
    TtsAudio,
    TtsDone,
    TtsRequest,
    TurnEvent,
    VadEvent,
)

FRAME_S = 0.02

STAGES = ("eou_delay", "stt_ttfs", "llm_ttft", "tts_ttfa", "e2e_latency")
"""Per-turn latency figures, in the order the turn goes through them."""


@dataclass
class Turn:
    """One exchange: the user's words that ended with a turn decision, and the agent's reply."""

    turn: int | None
    """The orchestrator's turn id; None for speech that never ended a turn."""
    user_text: str
    bot_text: str
    boundary_s: float
    """Audio position where the user's turn ended: the VAD stop that closed its last transcript
    (or, without one, the audio being fed when the turn was declared over)."""
    ended_at_s: float | None
    interrupted: bool = False
    tool_calls: list[str] = field(default_factory=list)
    latency_ms: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Work:
    """One stage request (LLM completion or TTS sentence) and what came back for it."""

    t: float
    request: LlmRequest | TtsRequest
    reply_subject: str
    replies: list[tuple[float, object]] = field(default_factory=list)

    @property
    def done(self) -> LlmDone | TtsDone | None:
        return next((f for _, f in self.replies if isinstance(f, LlmDone | TtsDone)), None)

    @property
    def done_t(self) -> float | None:
        return next((t for t, f in self.replies if isinstance(f, LlmDone | TtsDone)), None)

    @property
    def text(self) -> str:
        return "".join(f.text for _, f in self.replies if isinstance(f, LlmDelta))

    @property
    def tool_calls(self) -> list[str]:
        return [c.get("name", "") for _, f in self.replies if isinstance(f, LlmDelta)
                for c in f.tool_calls]

    @property
    def audio_s(self) -> float:
        return sum(len(f.pcm) / 2 / f.sample_rate for _, f in self.replies
                   if isinstance(f, TtsAudio))


class SessionView:
    """Every frame of a recording, decoded once and sorted by kind."""

    def __init__(self, recording: Recording):
        self.recording = recording
        self.session = recording.header.session
        self.audio_in: list[tuple[float, AudioIn]] = []
        self.audio_out: list[tuple[float, AudioOut]] = []
        self.flushes: list[tuple[float, AudioFlush]] = []
        self.vad: list[tuple[float, VadEvent]] = []
        self.transcripts: list[tuple[float, Transcript]] = []
        self.turn_events: list[tuple[float, TurnEvent]] = []
        self.bot_text: list[tuple[float, BotText]] = []
        self.metrics: list[tuple[float, Metric]] = []
        self.errors: list[tuple[float, ErrorEvent]] = []
        self.ends: list[tuple[float, SessionEnd]] = []
        self.llm: list[Work] = []
        self.tts: list[Work] = []
        self.bad_frames = 0
        replies: dict[str, list[tuple[float, object]]] = {}
        buckets = {AudioIn: self.audio_in, AudioOut: self.audio_out, AudioFlush: self.flushes,
                   VadEvent: self.vad, Transcript: self.transcripts, TurnEvent: self.turn_events,
                   BotText: self.bot_text, Metric: self.metrics, ErrorEvent: self.errors,
                   SessionEnd: self.ends}
        for m in recording.messages:
            frame = m.frame()
            t = m.t_us / 1e6
            if frame is None:
                self.bad_frames += 1
            elif type(frame) in buckets:
                buckets[type(frame)].append((t, frame))
            elif isinstance(frame, LlmRequest) and frame.warm:
                continue  # a session's start warming the prompt cache: no turn's work
            elif isinstance(frame, LlmRequest | TtsRequest):
                work = Work(t, frame, m.headers.get(REPLY_HEADER, ""))
                (self.llm if isinstance(frame, LlmRequest) else self.tts).append(work)
            elif isinstance(frame, LlmDelta | LlmDone | TtsAudio | TtsDone):
                replies.setdefault(m.subject, []).append((t, frame))
        for work in self.llm + self.tts:
            work.replies = replies.get(work.reply_subject, [])
        self.audio_in.sort(key=lambda x: x[1].seq)
        self.first_seq = self.audio_in[0][1].seq if self.audio_in else 0
        self._in_times = [t for t, _ in self.audio_in]
        self.duration_s = recording.duration_s
        self.barge_ins = self._barge_ins()
        self._ttfs = self._ttfs_by_transcript()
        self.turns = self._turns()

    # --- audio --------------------------------------------------------------------------

    def audio_pos(self, seq: int) -> float:
        """Seconds into the user's audio of the frame with this ``seq``."""
        return round((seq - self.first_seq) * FRAME_S, 3)

    def audio_pos_at(self, t: float) -> float:
        """Seconds of user audio sent by time ``t``."""
        i = bisect.bisect_right(self._in_times, t)
        return self.audio_pos(self.audio_in[i - 1][1].seq + 1) if i else 0.0

    def speech_end_before(self, t: float) -> float | None:
        """Recording time at which the last voiced user frame before ``t`` ended."""
        i = bisect.bisect_right(self._in_times, t)
        for j in range(i - 1, -1, -1):
            if rms(self.audio_in[j][1].pcm) > SPEECH_RMS:
                return self.audio_in[j][0] + FRAME_S
        return None

    def user_audio(self) -> list[AudioIn]:
        return [f for _, f in self.audio_in]

    # --- turns --------------------------------------------------------------------------

    def _barge_ins(self) -> list[tuple[float, int]]:
        """``interrupted`` events that cut an agent turn short. Pipecat interrupts whenever the
        user starts speaking; only while a turn is between ``user_ended`` and ``bot_stopped``
        did it stop the agent."""
        ended: set[int] = set()
        stopped: set[int] = set()
        found = []
        for t, e in self.turn_events:
            if e.state == "user_ended":
                ended.add(e.turn)
            elif e.state == "bot_stopped":
                stopped.add(e.turn)
            elif e.state == "interrupted" and e.turn in ended and e.turn not in stopped:
                found.append((t, e.turn))
                stopped.add(e.turn)
        return found

    def _ttfs_by_transcript(self) -> dict[int, float]:
        """The STT stage does not know turn ids: its ``stt_ttfs`` follows the transcript it
        timed, so each figure belongs to the final transcript just before it."""
        events = sorted([(t, 0, tr) for t, tr in self.transcripts if tr.final]
                        + [(t, 1, m) for t, m in self.metrics if m.name == "stt_ttfs"],
                        key=lambda x: (x[0], x[1]))
        found: dict[int, float] = {}
        last: Transcript | None = None
        for _, _, item in events:
            if isinstance(item, Transcript):
                last = item
            elif last is not None and id(last) not in found:
                found[id(last)] = item.value_ms
        return found

    def _turns(self) -> list[Turn]:
        ended = [(t, e) for t, e in self.turn_events if e.state == "user_ended"]
        finals = [(t, tr) for t, tr in self.transcripts if tr.final and tr.text.strip()]
        windows = [(ended[i - 1][0] if i else float("-inf"), t, e) for i, (t, e) in
                   enumerate(ended)]
        turns = [self._turn(lo, hi, e, finals) for lo, hi, e in windows]
        after = ended[-1][0] if ended else float("-inf")
        late = [tr for t, tr in finals if t > after]
        if late:  # the user spoke but no turn ended before the recording did
            turns.append(Turn(turn=None, user_text=" ".join(tr.text.strip() for tr in late),
                              bot_text="", boundary_s=self.audio_pos(late[-1].seq),
                              ended_at_s=None))
        return turns

    def _turn(self, lo: float, hi: float, event: TurnEvent,
              finals: list[tuple[float, Transcript]]) -> Turn:
        k = event.turn
        said = [(t, tr) for t, tr in finals if lo < t <= hi]
        boundary = self.audio_pos(said[-1][1].seq) if said else self.audio_pos_at(hi)
        latency: dict[str, float | None] = dict.fromkeys(STAGES)
        for _, m in self.metrics:
            if m.name in ("eou_delay", "llm_ttft", "tts_ttfa") and m.turn == k:
                latency[m.name] = latency[m.name] if latency[m.name] is not None else m.value_ms
        if said:
            latency["stt_ttfs"] = self._ttfs.get(id(said[-1][1]))
        first_out = next((t for t, f in self.audio_out if f.turn == k and t > hi - 0.001), None)
        speech_end = self.speech_end_before(hi)
        if first_out is not None and speech_end is not None and first_out > speech_end:
            latency["e2e_latency"] = (first_out - speech_end) * 1000
        stopped = [e for _, e in self.turn_events if e.turn == k and e.state == "bot_stopped"]
        return Turn(
            turn=k, user_text=" ".join(tr.text.strip() for _, tr in said),
            bot_text=" ".join(b.text for _, b in self.bot_text if b.turn == k).strip(),
            boundary_s=boundary, ended_at_s=round(hi, 3),
            interrupted=any(turn == k for _, turn in self.barge_ins),
            tool_calls=stopped[-1].tool_calls if stopped else [],
            latency_ms={s: (round(v, 1) if v is not None else None) for s, v in latency.items()})

    def final_transcripts(self) -> list[tuple[float, Transcript]]:
        return [(t, tr) for t, tr in self.transcripts if tr.final]


def normalize(text: str) -> list[str]:
    """Words for WER: lower case, punctuation dropped (Whisper's casing and commas vary)."""
    kept = "".join(c if c.isalnum() or c in "' " else " " for c in text.lower())
    return kept.split()


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words): word-level edit distance."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate of ``hypothesis`` against ``reference`` (0.0 when both are empty)."""
    errors, words = word_errors(reference, hypothesis)
    return errors / words if words else float(errors > 0)

"""A session's transcript, read from its recording: who said what, in which turn, and when.

Read from the session's events in the recording stream (final ``Transcript`` frames for the
user, ``BotText`` for the agent, ``TurnEvent`` for turn ids), not from the orchestrator's saved
context: the context is deleted when the session ends and is trimmed to the newest part of long
conversations, while the recording keeps every word for its retention. ``voxbus transcript``
and the post-call stage both read it here.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from voxbus.errors import VoxbusError
from voxbus.subjects import Subjects
from voxbus.wire import BotText, Transcript, TurnEvent, WireError, decode


class TranscriptError(VoxbusError):
    """No transcript to be had: the message says why (no stream, unknown session)."""

    code = "no_transcript"


@dataclass(frozen=True)
class Line:
    """One thing one side said."""

    turn: int | None
    """The orchestrator's turn id; None for user words no turn ended on."""
    role: str
    """``user`` or ``agent``."""
    text: str
    at_us: int
    """When its first words were recorded, µs since the Unix epoch."""
    t_s: float
    """The same, in seconds since the session's first recorded message."""
    interrupted: bool = False
    """The agent was cut off during this line (barge-in): not all of it was heard."""

    def as_dict(self) -> dict:
        return asdict(self)


def lines_from(events: list[tuple[int, object]], start_us: int) -> list[Line]:
    """The transcript of ``events``: ``(recorded at µs, frame)`` pairs in recording order."""
    out: list[Line] = []
    pending: list[tuple[int, str]] = []
    agent: dict[int, dict] = {}
    cut: set[int] = set()

    def user(turn: int | None) -> None:
        if pending:
            at = pending[0][0]
            out.append(Line(turn, "user", " ".join(t for _, t in pending), at,
                            round((at - start_us) / 1e6, 3)))
            pending.clear()

    for at, frame in events:
        if isinstance(frame, Transcript) and frame.final and frame.text.strip():
            pending.append((at, frame.text.strip()))
        elif isinstance(frame, TurnEvent) and frame.state == "user_ended":
            user(frame.turn)
        elif isinstance(frame, TurnEvent) and frame.state == "interrupted":
            cut.add(frame.turn)
        elif isinstance(frame, BotText) and frame.text.strip():
            said = agent.setdefault(frame.turn, {"at": at, "text": []})
            said["text"].append(frame.text.strip())
    user(None)
    for turn, said in agent.items():
        out.append(Line(turn, "agent", " ".join(said["text"]), said["at"],
                        round((said["at"] - start_us) / 1e6, 3), interrupted=turn in cut))
    return sorted(out, key=lambda line: line.at_us)


async def read_transcript(js, subjects: Subjects, session: str, *,
                          until_seq: int | None = None, timeout_s: float = 10.0) -> list[Line]:
    """The transcript of ``session`` from the recording stream (``js``: a JetStream context);
    ``until_seq``: only what was recorded before that stream sequence (the session's end)."""
    stream = subjects.recording_stream()
    every = subjects.session_all(session)  # ValueError for a bad session id
    try:
        first = await js.get_msg(stream, seq=1, subject=every, next=True)
    except NotFoundError as e:
        what = "stream" if "stream" in str(e).lower() else "session"
        raise TranscriptError(
            f"no recording stream {stream} for prefix {subjects.prefix!r} (voxbus up records "
            "by default)" if what == "stream" else
            f"session {session} is not in the recording stream {stream} (see voxbus sessions)"
        ) from None
    start_us = us_of(first.time)
    sub = await js.pull_subscribe(subjects.events(session), stream=stream, config=ConsumerConfig(
        ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=30.0,
        mem_storage=True))
    events: list[tuple[int, object]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            try:
                batch = await sub.fetch(500, timeout=1.0)
            except NatsTimeout:
                break  # nothing (more) recorded for it
            done = False
            for msg in batch:
                meta = msg.metadata
                if until_seq is not None and meta.sequence.stream >= until_seq:
                    done = True
                    break
                with contextlib.suppress(WireError):
                    events.append((us_of(meta.timestamp), decode(msg.data)))
            if done or (batch and batch[-1].metadata.num_pending == 0):
                break
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return lines_from(events, start_us)


def format_text(session: str, lines: list[Line]) -> str:
    """The transcript as a person reads it: one line each, offset from the session's start."""
    out = [f"session {session}"]
    for line in lines:
        mins, secs = divmod(line.t_s, 60)
        cut = " [cut off]" if line.interrupted else ""
        turn = f"turn {line.turn}" if line.turn is not None else "no turn"
        out.append(f"[{int(mins):02d}:{secs:04.1f}] {turn:<8} {line.role:>5}: {line.text}{cut}")
    return "\n".join(out)


def us_of(when: datetime) -> int:
    """A JetStream timestamp as µs since the Unix epoch."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1_000_000)

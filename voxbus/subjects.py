"""Every NATS subject voxbus uses is built here, and nowhere else.

Layout (``<p>`` is the deployment prefix, ``vox`` by default)::

    <p>.sess.<session>.audio.in          user audio (AudioIn)
    <p>.sess.<session>.audio.out         agent audio (AudioOut, AudioFlush)
    <p>.sess.<session>.evt.<kind>        events: vad, turn, transcript, bot, metric, error
    <p>.sess.<session>.ctl               control: Cancel, SessionEnd
    <p>.sess.<session>.claim.<stage>     a replica announcing it holds the session (SttClaimed)
    <p>.sess.<session>.reply.<stage>.<turn>.<index>[.r<attempt>]   one request's streamed reply
    <p>.sess.<session>.work.<stage>      copies of the session's work requests, for its recording
    <p>.work.<stage>                     work requests; queue group = stage name
    <p>.work.<stage>.<worker>            work requests for one replica (retries)
    <p>.hb.<stage>                       worker heartbeats
    <p>.ctl.worker.<worker>              one replica's control subject (Drain)
    <p>.err                              errors not tied to a session
    <p>.postcall.<topic>                 post-call results delivered on NATS (PostCallResult)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Stage(StrEnum):
    STT = "stt"
    LLM = "llm"
    TTS = "tts"
    ORCHESTRATOR = "orchestrator"
    GATEWAY = "gateway"
    CONTROL = "control"
    """The operator's gRPC control plane (voxbus/control/): heartbeats, takes no stage work."""
    POST_CALL = "post_call"
    """Work after a session ended (services/post_call/): fed by a durable JetStream consumer
    on session ends, not by a work subject."""


class Event(StrEnum):
    VAD = "vad"
    TURN = "turn"
    TRANSCRIPT = "transcript"
    BOT = "bot"
    METRIC = "metric"
    ERROR = "error"


def _token(value: str, what: str) -> str:
    if not _TOKEN.match(value):
        raise ValueError(f"invalid {what} {value!r}: use 1-64 of [A-Za-z0-9_-]")
    return value


@dataclass(frozen=True)
class Subjects:
    """Subject builder for one deployment prefix."""

    prefix: str = "vox"

    def __post_init__(self):
        for part in self.prefix.split("."):
            _token(part, "prefix")

    # sessions
    def session_root(self, session: str) -> str:
        return f"{self.prefix}.sess.{_token(session, 'session')}"

    def audio_in(self, session: str) -> str:
        return f"{self.session_root(session)}.audio.in"

    def audio_out(self, session: str) -> str:
        return f"{self.session_root(session)}.audio.out"

    def event(self, session: str, kind: Event) -> str:
        return f"{self.session_root(session)}.evt.{Event(kind).value}"

    def events(self, session: str) -> str:
        return f"{self.session_root(session)}.evt.>"

    def ctl(self, session: str) -> str:
        return f"{self.session_root(session)}.ctl"

    def all_ctl(self) -> str:
        return f"{self.prefix}.sess.*.ctl"

    def all_events(self, kind: Event) -> str:
        """One kind of event of every session (the control plane follows metrics, errors, turns)."""
        return f"{self.prefix}.sess.*.evt.{Event(kind).value}"

    def claim(self, session: str, stage: Stage) -> str:
        """Where the replica that claimed a session's stateful work (its STT stream) says so,
        and any other still holding it lets go. Not ``ctl``: a stage may announce its claim
        without being allowed to end or cancel anything (NATS permissions are per subject)."""
        return f"{self.session_root(session)}.claim.{Stage(stage).value}"

    def reply(self, session: str, stage: Stage, turn: int, index: int = 0,
              attempt: int = 0) -> str:
        """Where one request's streamed reply goes; a retry (``attempt`` 1) has its own, so
        frames of an abandoned attempt can never mix into the one that is being used."""
        base = f"{self.session_root(session)}.reply.{Stage(stage).value}.{int(turn)}.{int(index)}"
        return f"{base}.r{int(attempt)}" if attempt else base

    def replies(self, session: str, stage: Stage) -> str:
        """Every reply subject of one stage in a session (a wildcard over :meth:`reply`)."""
        return f"{self.session_root(session)}.reply.{Stage(stage).value}.>"

    def work_copy(self, session: str, stage: Stage) -> str:
        """Where the bus copies a session's work request so the session's recording holds it."""
        return f"{self.session_root(session)}.work.{Stage(stage).value}"

    def session_all(self, session: str) -> str:
        """Every subject of one session: what its recording captures."""
        return f"{self.session_root(session)}.>"

    def all_sessions(self) -> str:
        return f"{self.prefix}.sess.>"

    # stages
    def work(self, stage: Stage) -> str:
        return f"{self.prefix}.work.{Stage(stage).value}"

    def work_direct(self, stage: Stage, worker: str) -> str:
        """One replica's own work subject: a retry is sent here, to a replica known to be
        alive, instead of to the queue group (which may pick the one that did not answer)."""
        return f"{self.work(stage)}.{_token(worker, 'worker id')}"

    def queue_group(self, stage: Stage) -> str:
        return f"{self.prefix}-{Stage(stage).value}"

    def heartbeat(self, stage: Stage) -> str:
        return f"{self.prefix}.hb.{Stage(stage).value}"

    def all_heartbeats(self) -> str:
        return f"{self.prefix}.hb.*"

    def worker_ctl(self, worker: str) -> str:
        """One replica's own control subject: an operator's ``Drain`` reaches only it."""
        return f"{self.prefix}.ctl.worker.{_token(worker, 'worker')}"

    def errors(self) -> str:
        return f"{self.prefix}.err"

    def post_call_delivery(self, topic: str) -> str:
        """Where an agent's post-call results go when it delivers on NATS (``deliver.nats``)."""
        return f"{self.prefix}.postcall.{_token(topic, 'post-call topic')}"

    def all_post_call_deliveries(self) -> str:
        return f"{self.prefix}.postcall.>"

    # JetStream (their names cannot hold dots)
    def recording_stream(self) -> str:
        """The stream that records every session subject of this prefix."""
        return "VOXBUS_REC_" + self.prefix.replace(".", "_")

    def post_call_consumer(self) -> str:
        """The durable consumer (on the recording stream, over every session's ``ctl``) that
        feeds the post-call stage: one per prefix, shared by its replicas."""
        return "voxbus_post_call"

    def post_call_bucket(self) -> str:
        """The KV bucket holding each ended session's post-call state and result."""
        return "voxbus_postcall_" + self.prefix.replace(".", "_")

    def sessions_bucket(self) -> str:
        """The KV bucket holding each live session's resumable state (the orchestrators')."""
        return "voxbus_sessions_" + self.prefix.replace(".", "_")

    @staticmethod
    def session_of(subject: str) -> str | None:
        """The session id inside a session subject, if any."""
        parts = subject.split(".")
        try:
            i = parts.index("sess")
        except ValueError:
            return None
        return parts[i + 1] if i + 1 < len(parts) else None

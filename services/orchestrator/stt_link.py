"""A session's link to its STT replica: the claim, and what keeps the user's words when that
replica dies or drains.

The orchestrator hears the same audio as the STT replica, so it keeps the audio since the end of
the last transcribed segment in a short ring buffer. When the replica's heartbeats stop (or it
drops the session while draining), another replica is claimed and handed that audio; a segment
whose transcript does not come in time becomes an error event and the agent's fallback line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from services.orchestrator.metrics import STT_HANDOVERS
from voxbus.errors import VoxbusError
from voxbus.liveness import Liveness
from voxbus.stage_call import ask
from voxbus.subjects import Stage
from voxbus.wire import SttClaim, SttClaimed, Transcript

if TYPE_CHECKING:
    from services.orchestrator.session import SessionRunner

log = logging.getLogger("voxbus.orchestrator.stt")

BACKLOG_MAX_BYTES = 900_000
"""Audio kept for a hand-over (28 s at 16 kHz), under the 1 MiB frame cap with the claim."""
PRE_ROLL_FRAMES = 25
"""Audio before the VAD heard speech that goes with it (0.5 s): Whisper needs the onset."""
TRANSCRIPT_SLACK_S = 3.0
"""Beyond a lease: how long a closed segment may wait for its transcript before it failed."""


class SttLink:
    def __init__(self, runner: SessionRunner, worker: str | None = None):
        self.r = runner
        self.worker = worker
        """Id of the STT replica transcribing the session."""
        self.claimed_at = 0.0
        self._frames: deque[tuple[int, bytes]] = deque()
        self._bytes = 0
        self.last_seq = -1
        self.untranscribed_from: int | None = None
        """Seq where speech no transcript has covered yet begins (with pre-roll); None: all
        that was said is transcribed."""
        self.speaking = False
        self._deadline: asyncio.Task | None = None
        self._moving = False
        self._unavailable = False

    # --- what the session hears ---------------------------------------------------------

    def audio(self, seq: int, pcm: bytes) -> None:
        self.last_seq = max(self.last_seq, seq)
        self._frames.append((seq, pcm))
        self._bytes += len(pcm)
        while self._bytes > BACKLOG_MAX_BYTES and self._frames:
            self._bytes -= len(self._frames.popleft()[1])

    def vad(self, started: bool) -> None:
        self.speaking = started
        if started:
            if self.untranscribed_from is None:
                self.untranscribed_from = max(0, self.last_seq - PRE_ROLL_FRAMES)
        else:
            self._arm_deadline()

    def transcript(self, t: Transcript, closes_latest: bool) -> None:
        """A final transcript (possibly empty: nothing intelligible) arrived."""
        if not closes_latest:
            return
        self.untranscribed_from = None
        if self._deadline:
            self._deadline.cancel()
            self._deadline = None
        while self._frames and self._frames[0][0] <= t.seq:
            self._bytes -= len(self._frames.popleft()[1])

    def close(self) -> None:
        if self._deadline:
            self._deadline.cancel()
            self._deadline = None

    # --- the claim ----------------------------------------------------------------------

    async def claim(self, *, handover: bool = False) -> None:
        """Ask the STT queue group for a replica; ``handover`` gives it the untranscribed audio."""
        backlog, last = b"", -1
        if handover and self.untranscribed_from is not None:
            kept = [(q, p) for q, p in self._frames if q >= self.untranscribed_from]
            if kept:
                backlog, last = b"".join(p for _, p in kept), kept[-1][0]
        claimed = await ask(self.r.bus, Stage.STT, SttClaim(
            session=self.r.session, sample_rate=self.r.sample_rate, backlog=backlog,
            backlog_seq=last, backlog_speaking=bool(backlog) and self.speaking), timeout_s=5.0,
            placement=self.r.worker.liveness)
        if not isinstance(claimed, SttClaimed):
            raise VoxbusError(f"STT claim answered with {type(claimed).__name__}")
        self.worker = claimed.worker
        self.claimed_at = time.monotonic()
        self._unavailable = False
        if backlog:
            log.warning("%s: handed %.1f s of untranscribed audio to %s", self.r.session,
                        len(backlog) / 2 / self.r.sample_rate, self.worker)

    async def check(self, liveness: Liveness, lease_s: float) -> None:
        """Called every heartbeat: a replica that stopped serving the session is replaced."""
        if self._moving or time.monotonic() - self.claimed_at < lease_s or not liveness.warm:
            return
        if self.worker and liveness.serving(self.worker, self.r.session):
            return
        gone = self.worker or "none"
        why = "draining" if self.worker and liveness.alive(self.worker) else "silent"
        self._moving = True
        try:
            await self.claim(handover=True)
            STT_HANDOVERS.inc()
            log.warning("%s: STT replica %s %s; %s took the session over", self.r.session, gone,
                        why, self.worker)
            if self.untranscribed_from is not None and not self.speaking:
                self._arm_deadline()  # the new replica's transcript gets a full allowance
        except VoxbusError as e:
            if not self._unavailable:
                self._unavailable = True
                await self.r.stage_failed(Stage.STT, e, self.r.turn)
        finally:
            self._moving = False

    # --- a transcript that does not come ------------------------------------------------

    def _arm_deadline(self) -> None:
        if self._deadline:
            self._deadline.cancel()
        allowance = self.r.worker.settings.lease_s + TRANSCRIPT_SLACK_S
        self._deadline = self.r.worker.spawn(self._expire(allowance))

    async def _expire(self, allowance: float) -> None:
        await asyncio.sleep(allowance)
        if self._deadline is asyncio.current_task():
            self._deadline = None
        if self._moving or self.untranscribed_from is None or self.speaking:
            return  # a hand-over in progress re-arms the deadline when it is done
        self.untranscribed_from = None  # said once: what was lost is not asked for again
        turn = self.r.turn
        await self.r.stage_failed(Stage.STT, VoxbusError(
            f"no transcript {allowance:.0f} s after the user stopped speaking "
            f"(STT replica {self.worker})"), turn)
        await self.r.say_fallback(Stage.STT, turn)

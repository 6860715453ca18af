"""Transcribe at the user's first pause, before the VAD has decided that they stopped.

The VAD calls a segment ended only after ``stop_secs`` of silence (0.2 s), and Whisper then
needs ~120 ms more: the transcript arrives ~350 ms after the last word. Most of that wait is
dead time. ``EarlyTranscript`` starts transcribing the segment as it stands once the audio has
been quiet for ``QUIET_S``; when the VAD's stop comes and nothing voiced was added since, that
result *is* the segment's transcript, ready when the stop arrives. A user who goes on talking
only costs the discarded run (it was made while they spoke, when the stages after STT idle).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from voxbus.audio import SPEECH_RMS, rms

log = logging.getLogger("voxbus.stt")

QUIET_S = 0.1
"""Quiet audio after speech before the early run starts: longer than the gaps inside most
words, half the VAD's stop (0.2 s)."""
MIN_SPEECH_S = 0.25
"""Voiced audio before a segment's first run: a pause after one syllable is not worth one."""
FRAME_S = 0.02


@dataclass
class _Run:
    snapshot: bytes
    task: asyncio.Task


class EarlyTranscript:
    """One session's early run: started on a pause, kept only while the audio stays quiet."""

    def __init__(self, transcribe: Callable[[bytes], Awaitable[list]], sample_rate: int,
                 spawn: Callable[[Awaitable], asyncio.Task], busy: Callable[[], bool]):
        self._transcribe = transcribe
        self._spawn = spawn
        self._busy = busy
        self._bytes_per_s = sample_rate * 2
        self._quiet_s = 0.0
        self._voiced_s = 0.0
        """Voiced audio since the last run's snapshot (or the segment's start): a run whose
        snapshot has any after it is stale, and the next pause replaces it."""
        self._run: _Run | None = None
        """The open segment's latest run."""
        self._closed: deque[_Run | None] = deque()
        """Closed segments' runs, in the order Pipecat will transcribe the segments."""
        self.used = 0
        """Segments whose transcript was the early run's."""
        self.wasted = 0
        """Early runs dropped because speech went on after their snapshot."""

    def heard(self, chunk: bytes, buffer: bytes | bytearray, speaking: bool) -> None:
        """A chunk the segment buffer just took in; ``buffer`` is the segment so far."""
        if not speaking:
            self._quiet_s = self._voiced_s = 0.0
            return
        seconds = len(chunk) / self._bytes_per_s
        if rms(chunk) > SPEECH_RMS:
            self._quiet_s = 0.0
            self._voiced_s += seconds
            return
        self._quiet_s += seconds
        if self._quiet_s < QUIET_S or self._voiced_s == 0.0:
            return
        if self._run is None and self._voiced_s < MIN_SPEECH_S:
            return
        if self._busy():
            return  # one transcription at a time: two at once take ten times as long
        if self._run is not None:  # words came after its snapshot: it is stale
            self.wasted += 1
        snapshot = bytes(buffer)
        self._voiced_s = 0.0
        self._run = _Run(snapshot, self._spawn(self._transcribe(snapshot)))
        log.debug("early run on %.2f s of audio", len(snapshot) / self._bytes_per_s)

    def segment_closed(self) -> None:
        """The VAD stopped: this segment's run (or none) waits for its turn to be transcribed,
        while the next segment may already be starting runs of its own."""
        self._closed.append(self._run)
        self._run = None
        self._quiet_s = self._voiced_s = 0.0

    async def result_for(self, segment: bytes) -> list | None:
        """The closed segment's early frames if ``segment`` is its run's snapshot plus quiet
        audio only (the run heard every word); else None: transcribe it as usual."""
        run = self._closed.popleft() if self._closed else None
        if run is None:
            log.debug("no early run for this segment")
            return None
        n = len(run.snapshot)
        if not (segment.startswith(run.snapshot) and self._quiet(segment[n:])):
            log.debug("early run on %.2f s dropped: speech went on", n / self._bytes_per_s)
            self.wasted += 1
            return None  # the run's thread finishes on its own; its result is dropped
        try:
            frames = await run.task
        except Exception as e:  # transcribe the segment the usual way instead
            log.warning("early transcription failed: %s", e)
            frames = None
        if frames is None:  # Pipecat's task manager logs a failure and returns None
            log.debug("early run gave nothing")
            return None
        self.used += 1
        log.debug("early run on %.2f s is the segment's transcript", n / self._bytes_per_s)
        return frames

    def cancel(self) -> None:
        for run in (self._run, *self._closed):
            if run is not None:
                run.task.cancel()
        self._run = None
        self._closed.clear()

    def _quiet(self, pcm: bytes) -> bool:
        step = int(self._bytes_per_s * FRAME_S) & ~1
        return all(rms(pcm[i:i + step]) <= SPEECH_RMS for i in range(0, len(pcm), step))

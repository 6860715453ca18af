"""What a fault costs a conversation: replica kills and drains, the LLM endpoint crashing, the
nats-server restarting, a NATS node lost; one row per fault.

Each row runs on a fresh subject prefix: the stage in question as two real ``voxbus <stage>``
processes (one replica of each other stage in this process), the embedded llama-cpp SmolLM2
endpoint, a real nats-server with the session recording on. ``--sessions`` callers (2) each speak
``--turns`` questions in real time (the Piper voice and espeak-ng's voices, 20 ms frames, a pause
after each reply); during session 1's fault turn the fault is injected at a moment that hits work
in flight:

* STT: 1.1 s into the utterance, the replica transcribing session 1;
* LLM / TTS: once the turn's request is on the bus, the replica reporting it in flight
  (``/healthz`` polled every 20 ms);
* orchestrator, nats-server: the moment the turn is declared over (the reply is being made);
* LLM endpoint: the moment the turn's LLM request is on the bus (SIGKILL of the llama server,
  restarted on the same port a second later).

Per row: sessions affected (a turn with an error event, the fallback line, or no answer), turns
without an answer (neither agent words nor audio before the next question), the time from the
fault until the session's next turn fully answered (words and audio, no error, no fallback,
audio starting after the fault; p50/max over sessions), and frames missing from the recording
(the ``audio.in`` frames the callers published and the ``audio.out`` frames they received that
``Recorder.export`` of the session does not hold).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from harness import (
    AGENT,
    Caller,
    Proc,
    Procs,
    Turn,
    Utterance,
    agents_dir,
    log,
    make_utterances,
    stage_replies,
    table,
)

from voxbus.bus import Bus
from voxbus.config import Settings
from voxbus.llm_server import MODEL_ALIAS, LocalLlmServer
from voxbus.natsd import NatsServer
from voxbus.recording import Recorder
from voxbus.subjects import Event, Stage, Subjects
from voxbus.wire import Heartbeat, LlmRequest, TtsRequest, TurnEvent

TURN_TIMEOUT_S = 25.0
PAUSE_S = 1.0
STAGGER_S = 1.0
"""Session k starts k seconds after the first, so their turns do not line up exactly."""
GREETING_WAIT_S = 1.5
SPEECH_HIT_S = 1.1
"""0.3 s of lead silence, then 0.8 s into the words."""


@dataclass(frozen=True)
class Fault:
    key: str
    label: str
    stage: str | None
    """The stage run as two processes (None: every stage in this process)."""
    action: str
    """kill, drain, endpoint, nats, cluster"""
    trigger: str
    """speech, eou, llm_work, tts_work"""


FAULTS = [
    Fault("none", "no fault (baseline)", None, "none", "eou"),
    Fault("stt-kill", "STT replica SIGKILL", "stt", "kill", "speech"),
    Fault("llm-kill", "LLM replica SIGKILL", "llm", "kill", "llm_work"),
    Fault("tts-kill", "TTS replica SIGKILL", "tts", "kill", "tts_work"),
    Fault("orch-kill", "orchestrator replica SIGKILL", "orchestrator", "kill", "eou"),
    Fault("stt-drain", "STT replica drain (SIGTERM)", "stt", "drain", "speech"),
    Fault("llm-drain", "LLM replica drain (SIGTERM)", "llm", "drain", "llm_work"),
    Fault("tts-drain", "TTS replica drain (SIGTERM)", "tts", "drain", "tts_work"),
    Fault("orch-drain", "orchestrator replica drain (SIGTERM)", "orchestrator", "drain", "eou"),
    Fault("endpoint", "LLM endpoint crash (llama server SIGKILL)", "llm", "endpoint", "llm_work"),
    Fault("nats", "nats-server restart (same port, same JetStream)", None, "nats", "eou"),
    Fault("cluster", "NATS cluster node loss (3 nodes)", None, "cluster", "eou"),
]


@dataclass
class Outcome:
    fault: Fault
    sessions: int = 0
    affected: int = 0
    unanswered: int = 0
    spoken: int = 0
    recovery_s: list[float | None] = field(default_factory=list)
    missing_in: int = 0
    sent_in: int = 0
    missing_out: int = 0
    got_out: int = 0
    hit: str = ""
    note: str = ""
    details: list[str] = field(default_factory=list)


class Beats:
    """The latest heartbeat of every replica of one stage."""

    def __init__(self):
        self.last: dict[str, Heartbeat] = {}

    async def on(self, frame, _msg) -> None:
        if isinstance(frame, Heartbeat):
            self.last[frame.worker] = frame


class Scene:
    """One row's running system: what the fault needs to find its victim and hit it."""

    def __init__(self, fault: Fault, settings: Settings, procs: Procs, replicas: list[Proc],
                 llm: LocalLlmServer, nats, watch: Bus):
        self.fault = fault
        self.settings = settings
        self.procs = procs
        self.replicas = replicas
        self.llm = llm
        self.nats = nats
        """The NatsServer to restart, or the NatsCluster to lose a node of."""
        self.watch = watch
        self.beats = Beats()
        self.fault_turn = asyncio.Event()
        self.target: Caller | None = None
        self.turn: Turn | None = None
        self.work = asyncio.Event()
        """The trigger's event (turn declared over, the turn's request on the bus) was seen."""
        self.fault_at: float | None = None
        self.hit = ""
        self.note = ""

    async def start(self, target: Caller) -> None:
        self.target = target
        if self.fault.stage:
            await self.watch.subscribe(self.watch.subjects.heartbeat(Stage(self.fault.stage)),
                                       self.beats.on)
        if self.fault.trigger == "eou":
            async def turn(frame, _msg):
                if (isinstance(frame, TurnEvent) and frame.state == "user_ended"
                        and self.fault_turn.is_set()):
                    self.work.set()

            await self.watch.subscribe(self.watch.subjects.event(target.session, Event.TURN),
                                       turn)
        kind = {"llm_work": (Stage.LLM, LlmRequest), "tts_work": (Stage.TTS, TtsRequest)}
        if self.fault.trigger in kind:
            stage, cls = kind[self.fault.trigger]

            async def work(frame, _msg):
                if isinstance(frame, cls) and self.fault_turn.is_set():
                    self.work.set()

            await self.watch.subscribe(self.watch.subjects.work_copy(target.session, stage), work)

    def on_turn(self, caller: Caller, turn: Turn, fault_index: int) -> None:
        if caller is self.target and turn.index == fault_index:
            self.turn = turn
            self.fault_turn.set()

    async def when(self) -> None:
        """Wait for the moment the fault should land."""
        await self.fault_turn.wait()
        t = self.fault.trigger
        if t == "speech":
            await asyncio.sleep(SPEECH_HIT_S)
        else:
            await self.work.wait()

    async def victim(self) -> Proc:
        """The replica doing the target session's work right now."""
        session = self.target.session
        if self.fault.trigger in ("speech", "eou"):
            for p in self.replicas:
                beat = self.beats.last.get(p.id)
                if beat and session in beat.sessions:
                    self.hit = f"{p.id} serving the session"
                    return p
            self.hit = "MISSED: no replica listed the session; killed the first"
            return self.replicas[0]
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            healths = await asyncio.gather(*(asyncio.to_thread(p.health) for p in self.replicas))
            for p, h in zip(self.replicas, healths, strict=True):
                if h and h.get("inflight"):
                    self.hit = f"{p.id} with {h['inflight']} in flight"
                    return p
            await asyncio.sleep(0.02)
        self.hit = "MISSED: no replica had work in flight within 3 s; killed the first"
        return self.replicas[0]

    async def inject(self) -> None:
        action = self.fault.action
        if action == "none":
            self.hit = "-"
            return
        await self.when()
        if action in ("kill", "drain"):
            p = await self.victim()
            self.fault_at = time.monotonic()
            p.signal(signal.SIGKILL if action == "kill" else signal.SIGTERM)
            log(f"  {action} {p.id} ({self.hit})")
            if action == "drain":
                rc = await self.procs.wait_exit(p, 60)
                self.note = (f"{p.id} drained in {time.monotonic() - self.fault_at:.1f} s, "
                             f"exit {rc}")
        elif action == "endpoint":
            self.fault_at = time.monotonic()
            os.killpg(self.llm.proc.pid, signal.SIGKILL)
            self.hit = "llama server killed with the turn's request sent"
            log(f"  {self.hit}")
            await asyncio.to_thread(self.llm.proc.wait)
            self.llm.stop()
            await asyncio.sleep(1.0)
            await asyncio.to_thread(self.llm.start)
            self.note = f"endpoint back after {time.monotonic() - self.fault_at:.1f} s"
        elif action == "nats":
            self.fault_at = time.monotonic()
            self.hit = "server stopped as the turn was declared over"
            await asyncio.to_thread(self.nats.stop)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(self.nats.start)
            self.note = f"nats-server back after {time.monotonic() - self.fault_at:.1f} s"
        elif action == "cluster":
            self.fault_at = time.monotonic()
            await asyncio.to_thread(self.nats.kill, 0)
            self.hit = "node 0 (every connection's first URL) killed as the turn ended"
            self.note = "node 0 stays down; recording stream and sessions bucket R3"
        log(f"  fault injected: {self.fault.label}; {self.note}")


def pick(utterances: list[Utterance], session: int, turn: int) -> Utterance:
    return utterances[(session * 5 + turn * 3) % len(utterances)]


async def converse(caller: Caller, k: int, args, utterances, scene: Scene, fault_index: int):
    await asyncio.sleep(GREETING_WAIT_S)  # as voxbus talk: an agent may speak first
    for j in range(args.turns):
        u = pick(utterances, k, j)
        turn = await caller.say(u, turn_timeout_s=TURN_TIMEOUT_S,
                                on_start=lambda c, t: scene.on_turn(c, t, fault_index))
        log(f"  s{k} t{j} [{u.voice}] {u.text!r} -> "
            f"{'answer' if caller.last_audio_at >= turn.started_at else 'NO AUDIO'}")
        if caller.ended:
            log(f"  s{k}: session ended ({caller.ended})")
            break
        await asyncio.sleep(PAUSE_S)


async def in_process(settings: Settings, base_url: str, skip: str | None) -> list:
    from services.llm.worker import LlmWorker
    from services.orchestrator.worker import OrchestratorWorker
    from services.stt.worker import SttWorker
    from services.tts.worker import TtsWorker

    make = {"stt": lambda: SttWorker(settings), "tts": lambda: TtsWorker(settings),
            "llm": lambda: LlmWorker(settings, base_url=base_url),
            "orchestrator": lambda: OrchestratorWorker(settings)}
    services = []
    for stage, new in make.items():
        if stage != skip:
            svc = new()
            await svc.start()
            services.append(svc)
    return services


async def run(fault: Fault, args, utterances, llm: LocalLlmServer, shared: NatsServer,
              tmp: Path) -> Outcome:
    out = Outcome(fault)
    own = None
    nats = shared
    replicas_js = 1
    if fault.action == "cluster":
        try:
            from voxbus.natsd import NatsCluster
        except ImportError:
            out.note = "not measured (no cluster support yet)"
            return out
        own = await asyncio.to_thread(
            NatsCluster(3, store_root=str(tmp / f"jsc-{uuid.uuid4().hex[:6]}")).start)
        nats, replicas_js = own, 3
    elif fault.action == "nats":
        own = NatsServer(store_dir=str(tmp / f"js-{uuid.uuid4().hex[:6]}")).start()
        nats = own
    prefix = "fb" + uuid.uuid4().hex[:8]
    agents = agents_dir(tmp)
    settings = Settings(nats_url=nats.url, prefix=prefix, llm_model=MODEL_ALIAS,
                        agents_dir=agents, js_replicas=replicas_js)
    procs = Procs(nats.url, prefix, OPENAI_BASE_URL=llm.base_url, VOXBUS_LLM_MODEL=MODEL_ALIAS,
                  VOXBUS_AGENTS_DIR=agents)
    services: list = []
    callers: list[Caller] = []
    watch = None
    try:
        async with Recorder(nats.url, prefix) as rec:
            await rec.enable(max_age_s=3600, max_bytes=256 * 2**20, replicas=replicas_js)
        replicas = []
        if fault.stage:
            log(f"  starting two {fault.stage} replica processes")
            replicas = list(await asyncio.gather(procs.start(fault.stage, "a"),
                                                 procs.start(fault.stage, "b")))
        services = await in_process(settings, llm.base_url, fault.stage)
        watch = await Bus.connect(nats.url, Subjects(prefix), "bench-watch")
        scene = Scene(fault, settings, procs, replicas, llm, nats, watch)
        fault_index = max(1, args.turns // 2 - 1)
        for k in range(args.sessions):
            if k:
                await asyncio.sleep(STAGGER_S)
            callers.append(await Caller(nats.url, prefix, AGENT, f"caller{k}").start())
        await scene.start(callers[0])
        injector = asyncio.create_task(scene.inject())
        await asyncio.gather(*(converse(c, k, args, utterances, scene, fault_index)
                               for k, c in enumerate(callers)))
        if not injector.done():
            injector.cancel()
            scene.hit = scene.hit or "MISSED: the fault's moment never came"
        await asyncio.gather(injector, return_exceptions=True)
        for c in callers:
            await c.stop()
        await asyncio.sleep(1.0)  # the last frames reach the stream
        out.hit, out.note = scene.hit, scene.note
        async with Recorder(nats.url, prefix) as rec:
            for c in callers:
                c.judge()
                miss_in, sent, miss_out, got = c.missing_from(await rec.export(c.session))
                out.missing_in += miss_in
                out.sent_in += sent
                out.missing_out += miss_out
                out.got_out += got
                describe(out, c, scene.fault_at, await rec.export(c.session))
    finally:
        for c in callers:
            await c.stop()
        if watch:
            await watch.close()
        for svc in reversed(services):
            await svc.stop()
        procs.close()
        if own:
            own.stop()
        if llm.proc is None or llm.proc.poll() is not None:
            await asyncio.to_thread(llm.start)
    return out


def describe(out: Outcome, c: Caller, fault_at: float | None, recording) -> None:
    out.sessions += 1
    bad = [t for t in c.turns if not t.answered or t.errors or t.fallback]
    out.affected += bool(bad)
    out.spoken += len(c.turns)
    out.unanswered += sum(not t.answered for t in c.turns)
    back = None
    if fault_at is not None:
        after = [t for t in c.turns if t.clean and t.first_audio_at > fault_at]
        back = after[0].answered_at - fault_at if after else None
    out.recovery_s.append(back)
    for t in bad:
        what = "NO ANSWER" if not t.answered else ("fallback line" if t.fallback else "error")
        out.details.append(
            f"{c.name} ({c.session}) turn {t.index} [{t.voice}] {what}: heard {t.heard!r}, "
            f"turn declared over: {t.user_ended}; {'; '.join(t.errors)[:300] or t.words[:80]}")
        if not t.answered or t.fallback:
            for tid in t.turn_ids:
                out.details.append(f"      recording, turn {tid}: {stage_replies(recording, tid)}")
    if c.missing_seqs:
        out.details.append(f"{c.name} ({c.session}): audio.in seqs not recorded: "
                           f"{c.missing_seqs[:20]} (of {len(c.sent_seqs)} published, "
                           f"{c.send_failures} publishes refused)")
    if c.resumed():
        out.details.append(f"{c.name} ({c.session}): resumed by another orchestrator "
                           f"{c.resumed()}x")


def row(o: Outcome) -> list[str]:
    if not o.sessions:
        return [o.fault.label, "-", "-", "-", "-", "-", o.note]
    got = [r for r in o.recovery_s if r is not None]
    never = len(o.recovery_s) - len(got)
    if o.fault.action == "none":
        whole = "-"
    elif got:
        whole = f"{statistics.median(got):.1f} / {max(got):.1f}"
        whole += f" ({never} never)" if never else ""
    else:
        whole = "never"
    return [o.fault.label, str(o.sessions), str(o.affected), f"{o.unanswered}/{o.spoken}",
            whole, f"{o.missing_in}/{o.sent_in} in, {o.missing_out}/{o.got_out} out", o.hit]


async def main(args) -> None:
    from voxbus.runner import configure_logging

    configure_logging("WARNING")
    if args.quick:
        args.turns = min(args.turns, 4)
    faults = [f for f in FAULTS if not args.only or f.key in args.only.split(",")]
    with tempfile.TemporaryDirectory(prefix="voxbus-faults-") as tmp_name:
        tmp = Path(tmp_name)
        utterances, notes = await asyncio.to_thread(make_utterances, tmp)
        for n in notes:
            log(f"NOTE: {n}")
        llm = await asyncio.to_thread(LocalLlmServer().start)
        shared = NatsServer(store_dir=str(tmp / "js")).start()
        outcomes = []
        try:
            for f in faults:
                log(f"== {f.label}")
                started = time.monotonic()
                try:
                    o = await run(f, args, utterances, llm, shared, tmp)
                except Exception as e:
                    log(f"  bench failure: {type(e).__name__}: {e}")
                    o = Outcome(f, note=f"bench failed: {type(e).__name__}: {e}"[:120])
                outcomes.append(o)
                log(f"  ({time.monotonic() - started:.0f} s) {row(o)}")
                for d in o.details:
                    log(f"    {d}")
        finally:
            shared.stop()
            llm.stop()
    head = ["fault", "sessions", "affected", "unanswered turns", "whole again s p50/max",
            "missing from recording", "what the fault hit"]
    print(table(head, [row(o) for o in outcomes]))
    voices = sorted({u.voice for u in utterances})
    for o in outcomes:
        if o.note and o.sessions:
            print(f"* {o.fault.label}: {o.note}")
    print(f"* {args.sessions} concurrent sessions per row, {args.turns} spoken turns each, the "
          f"fault in turn {max(1, args.turns // 2 - 1) + 1} of session 1; voices: "
          f"{', '.join(voices)}")
    print("* LLM: the embedded llama-cpp SmolLM2-135M endpoint (no scripted endpoint); other "
          "stages one replica each in the bench's process (every stage for the baseline, "
          "nats-server and cluster rows); default heartbeats (1 s) and leases (3 s)")
    print("* affected: a turn with an error event, the fallback line, or no answer; "
          "unanswered: neither agent words nor audio before the next question "
          f"(each turn waits {TURN_TIMEOUT_S:.0f} s)")
    print("* whole again: from the fault to the words+audio of the first clean turn whose "
          "audio began after the fault (includes waiting for the next question)")
    print("* missing: audio.in frames published / audio.out frames received by the callers "
          "that Recorder.export of the session lacks")
    for n in notes:
        print(f"* {n}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=2, help="concurrent sessions per row")
    parser.add_argument("--turns", type=int, default=6, help="spoken turns per session")
    parser.add_argument("--quick", action="store_true", help="4 turns per session")
    parser.add_argument("--only", default="", help="comma-separated row keys: " +
                        ", ".join(f.key for f in FAULTS))
    asyncio.run(main(parser.parse_args()))

"""What a long run does to the services: memory, subscriptions and tasks before and after, and
per-stage latency over time, for ``--sessions`` concurrent conversations lasting ``--minutes``.

The system is what ``voxbus up`` runs, started here: a nats-server with JetStream and its
monitoring port, the recording stream on, the embedded llama-cpp SmolLM2 endpoint, and one
``voxbus stt`` / ``llm`` / ``tts`` / ``orchestrator`` process each (``--in-process``: the four
stages in this process instead, which makes asyncio tasks countable). Each session is one caller
on the bus speaking questions in real time (the Piper voice and espeak-ng's voices, 20 ms
frames), waiting for the reply to finish, pausing 1.5-4 s, and looping until the time is up.

Measured: each process's resident memory (``/proc/<pid>/status`` VmRSS, also sampled at the
end of every time bucket) and its NATS
subscriptions (the server's ``/connz?subs=1``, by connection name) while idle before the soak
(after one warm-up session) and idle after it (its sessions ended), plus subscriptions at the
end of the soak while the sessions still ran; asyncio tasks likewise when in-process; and per
time bucket, turns answered / spoken and p50/p95 of eou_delay, stt_ttfs, llm_ttft, tts_ttfa
(the session's ``Metric`` events) and e2e_latency (first agent audio heard minus the end of the
question's speech, as ``voxbus talk`` computes it).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
from harness import AGENT, MonitoredNats, Procs, agents_dir, log, rss_mib

from voxbus.caller import FIGURES, Caller, Turn, make_utterances
from voxbus.config import Settings
from voxbus.llm_server import MODEL_ALIAS, LocalLlmServer
from voxbus.load import converse, table
from voxbus.recording import Recorder

STAGES = ("stt", "llm", "tts", "orchestrator")
TURN_TIMEOUT_S = 25.0
SETTLE_S = 3.0
"""After the sessions end: time for the services to let go of them before measuring."""


class System:
    """The running services, whichever way they were started, as rows to measure."""

    def __init__(self, nats: MonitoredNats, llm: LocalLlmServer):
        self.nats = nats
        self.llm = llm
        self.procs: Procs | None = None
        self.services: list = []
        self.pids: dict[str, int] = {}
        """Service name → process id."""
        self.connections: dict[str, str] = {}
        """Service name → the NATS connection name it uses (``voxbus-<worker id>``)."""

    async def start(self, settings: Settings, agents: str, in_process: bool) -> None:
        import os

        self.pids = {"nats-server": self.nats.proc.pid, "llama server": self.llm.proc.pid}
        if in_process:
            from services.llm.worker import LlmWorker
            from services.orchestrator.worker import OrchestratorWorker
            from services.stt.worker import SttWorker
            from services.tts.worker import TtsWorker

            self.services = [SttWorker(settings), LlmWorker(settings, base_url=self.llm.base_url),
                             TtsWorker(settings), OrchestratorWorker(settings)]
            for svc in self.services:
                await svc.start()
                self.connections[svc.stage.value] = f"voxbus-{svc.worker_id}"
            self.pids["this process (4 stages + callers)"] = os.getpid()
            return
        self.procs = Procs(settings.nats_url, settings.prefix, OPENAI_BASE_URL=self.llm.base_url,
                           VOXBUS_LLM_MODEL=MODEL_ALIAS, VOXBUS_AGENTS_DIR=agents)
        for stage in STAGES:
            p = await self.procs.start(stage, "soak")
            self.pids[stage] = p.proc.pid
            self.connections[stage] = f"voxbus-{p.id}"

    async def stop(self) -> None:
        for svc in reversed(self.services):
            await svc.stop()
        if self.procs:
            self.procs.close()

    def snapshot(self) -> dict:
        subs = self.nats.subscriptions()
        return {"rss": {name: rss_mib(pid) for name, pid in self.pids.items()},
                "subs": {name: subs.get(conn, 0) for name, conn in self.connections.items()},
                "tasks": len(asyncio.all_tasks()) if self.services else None}


def said(caller: Caller, turn: Turn, u) -> None:
    ok = caller.last_audio_at >= turn.started_at
    log(f"  {caller.name} [{u.voice}] {u.text!r} -> {'answer' if ok else 'NO AUDIO'}")


def pct(values) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    p50, p95 = np.percentile(vals, [50, 95])
    return f"{p50:.0f}/{p95:.0f}"


def service_table(system: System, before: dict, during: dict, after: dict) -> str:
    head = ["service", "RSS before MiB", "RSS after MiB", "change MiB", "change %",
            "subs before", "subs during", "subs after"]
    rows = []
    names = [*system.pids, *(c for c in system.connections if c not in system.pids)]
    for name in names:
        a, b = before["rss"].get(name), after["rss"].get(name)
        sub = [str(x["subs"].get(name, "-")) if name in system.connections else "-"
               for x in (before, during, after)]
        if a is None or b is None:
            rows.append([name, "-", "-", "-", "-", *sub])
            continue
        rows.append([name, f"{a:.0f}", f"{b:.0f}", f"{b - a:+.1f}", f"{(b - a) / a * 100:+.1f}",
                     *sub])
    lines = [table(head, rows)]
    if before["tasks"] is not None:
        lines.append(f"asyncio tasks in this process: before {before['tasks']}, during "
                     f"{during['tasks']}, after {after['tasks']}")
    else:
        lines.append("asyncio tasks: not measurable (each stage is its own process; "
                     "--in-process counts them)")
    return "\n".join(lines)


async def sample_rss(system: System, t0: float, every_s: float, into: list) -> None:
    """RSS of every process at the end of each time bucket, so a steady climb shows."""
    k = 1
    while True:
        await asyncio.sleep(max(0.0, t0 + k * every_s - time.monotonic()))
        into.append((k * every_s, {n: rss_mib(pid) for n, pid in system.pids.items()}))
        k += 1


def rss_table(system: System, before: dict, samples: list) -> str:
    names = list(system.pids)
    head = ["RSS MiB at minute", *names]
    rows = [["0 (before)", *[f"{before['rss'][n]:.0f}" for n in names]]]
    for at, rss in samples:
        rows.append([f"{at / 60:g}", *[f"{rss[n]:.0f}" if rss[n] else "-" for n in names]])
    return table(head, rows)


def latency_table(turns: list[Turn], t0: float, bucket_s: float, minutes: float) -> str:
    n = max(1, int(np.ceil(minutes * 60 / bucket_s)))
    buckets: list[list[Turn]] = [[] for _ in range(n)]
    for t in turns:
        buckets[min(n - 1, max(0, int((t.started_at - t0) // bucket_s)))].append(t)
    head = ["minutes", "answered/spoken", *[f"{f} p50/p95" for f in FIGURES]]
    rows = []
    for i, b in enumerate(buckets):
        span = f"{i * bucket_s / 60:g}-{(i + 1) * bucket_s / 60:g}"
        lat = [t.latency_ms() for t in b]
        rows.append([span, f"{sum(t.answered for t in b)}/{len(b)}",
                     *[pct(x[f] for x in lat) for f in FIGURES]])
    return table(head, rows)


async def main(args) -> None:
    from voxbus.runner import configure_logging

    configure_logging("WARNING")
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="voxbus-soak-") as tmp_name:
        tmp = Path(tmp_name)
        utterances, notes = await asyncio.to_thread(make_utterances, tmp)
        for n in notes:
            log(f"NOTE: {n}")
        nats = MonitoredNats(store_dir=str(tmp / "js")).start()
        llm = await asyncio.to_thread(LocalLlmServer().start)
        prefix = "soak" + uuid.uuid4().hex[:8]
        agents = agents_dir(tmp)
        settings = Settings(nats_url=nats.url, prefix=prefix, llm_model=MODEL_ALIAS,
                            agents_dir=agents)
        system = System(nats, llm)
        callers: list[Caller] = []
        try:
            async with Recorder(nats.url, prefix) as rec:
                await rec.enable(max_age_s=3600, max_bytes=1024**3)
            log(f"starting the stages ({'in-process' if args.in_process else 'processes'})")
            await system.start(settings, agents, args.in_process)
            log("warm-up session")
            warm = await Caller(nats.url, prefix, AGENT, "warmup", keep_audio=False).start()
            await warm.say(utterances[0], turn_timeout_s=TURN_TIMEOUT_S)
            await warm.stop()
            await asyncio.sleep(SETTLE_S)
            before = system.snapshot()
            t0 = time.monotonic()
            until = t0 + args.minutes * 60
            log(f"soak: {args.sessions} sessions for {args.minutes:g} min")
            samples: list = []
            sampler = asyncio.create_task(sample_rss(system, t0, args.bucket_minutes * 60,
                                                     samples))
            tasks = []
            for k in range(args.sessions):
                c = await Caller(nats.url, prefix, AGENT, f"caller{k}", keep_audio=False).start()
                callers.append(c)
                tasks.append(asyncio.create_task(converse(
                    c, utterances, until, random.Random(rng.random()), pause_s=(1.5, 4.0),
                    turn_timeout_s=TURN_TIMEOUT_S, on_turn=said)))
                await asyncio.sleep(2.0)
            await asyncio.gather(*tasks)
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
            during = system.snapshot()
            for c in callers:
                await c.stop()
            await asyncio.sleep(SETTLE_S)
            after = system.snapshot()
        finally:
            for c in callers:
                await c.stop()
            await system.stop()
            llm.stop()
            nats.stop()
    turns = []
    for c in callers:
        c.judge()
        turns += c.turns
    print(service_table(system, before, during, after))
    print()
    print(rss_table(system, before, samples))
    print()
    print(latency_table(turns, t0, args.bucket_minutes * 60, args.minutes))
    spoken, answered = len(turns), sum(t.answered for t in turns)
    print(f"turns answered / spoken: {answered}/{spoken}; errors: "
          f"{sum(bool(t.errors) for t in turns)} turns; fallback lines: "
          f"{sum(t.fallback for t in turns)}  (latencies in ms, by when the question began)")
    codes = Counter(e.split(": ")[0] + ": " + e.split(": ")[1] for t in turns for e in t.errors)
    if codes:
        print("errors by stage and code: " + ", ".join(f"{k} x{n}" for k, n in codes.most_common()))
        shapes = {re.sub(r"[0-9a-f]{12}|\d+", "N", e): e for t in turns for e in t.errors}
        for example in shapes.values():
            print(f"  e.g. {example[:300]}")
    print(f"* {args.sessions} sessions, each one long conversation for {args.minutes:g} min; "
          f"stages: {'in this process' if args.in_process else 'one process each'}; "
          "LLM: embedded llama-cpp SmolLM2-135M; recording on")
    print(f"* before: idle after one warm-up session; during: the soak's last moment, "
          f"{args.sessions} sessions live; after: {SETTLE_S:g} s after they ended")
    print(f"* voices: {', '.join(sorted({u.voice for u in utterances}))}")
    for n in notes:
        print(f"* {n}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=4, help="concurrent sessions")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the soak")
    parser.add_argument("--bucket-minutes", type=float, default=None,
                        help="latency rows every N minutes (default: minutes / 5)")
    parser.add_argument("--in-process", action="store_true",
                        help="the four stages in this process (tasks countable)")
    a = parser.parse_args()
    a.bucket_minutes = a.bucket_minutes or max(a.minutes / 5, 0.25)
    asyncio.run(main(a))

"""Adding a replica of the bottleneck stage raises capacity: ``voxbus bench load``'s capacity
search, once with one LLM replica and once with two, against an LLM whose cost is not this
machine's CPU.

Each run is a real ``voxbus up --scale llm=N`` (its own nats-server with JetStream and
per-service credentials, the control plane, one STT, TTS and orchestrator replica, real
Whisper, Piper, Silero and Smart Turn) in front of ``bench/fixed_latency_llm.py``: an
OpenAI-compatible endpoint whose first token takes ``--delay`` seconds however many requests it
serves at once, as a remote model's would. Each LLM replica runs ``--llm-capacity`` requests at
once (``VOXBUS_LLM_CAPACITY``; a few more wait in its queue, the rest are refused), so the LLM
stage serves at most replicas x capacity requests per ``--delay`` seconds, whatever the rest
of the box is doing. The search (steps doubling from 1 session, then bisection) finds the most
concurrent sessions whose e2e p95 stays within ``--p95``; each step is a fresh load run of
``--step-for`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path

from voxbus.caller import make_utterances
from voxbus.load import (
    Capacity,
    LoadConfig,
    Step,
    capacity_dict,
    find_capacity,
    format_capacity,
    judge,
    parse_pause,
    run_load,
    table,
    to_json,
    warm_up,
)
from voxbus.natsd import free_port

HERE = Path(__file__).resolve().parent
READY_S = 600.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Process:
    """A child in its own process group, its output kept; ``stop`` signals and waits."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], ready: str):
        self.name = name
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                if ready in line:
                    self.ready.set()

        threading.Thread(target=read, daemon=True).start()

    async def until_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready.is_set():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = "".join(self.lines[-30:])
                raise RuntimeError(f"{self.name} did not start:\n{tail}")
            await asyncio.sleep(0.2)

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM to the child itself (``voxbus up`` then stops its own children in order);
        whatever is left of its group after ``timeout_s`` is killed."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def endpoint_stats(base_url: str, reset: bool = False) -> dict:
    root = base_url.removesuffix("/v1")
    req = urllib.request.Request(f"{root}/stats/reset" if reset else f"{root}/stats",
                                 method="POST" if reset else "GET")
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


async def search(args, llm_replicas: int, utterances,
                 tmp: Path) -> tuple[Capacity, list[dict], Step]:
    """One deployment with ``llm_replicas`` LLM replicas: the capacity search against it, the
    endpoint's figures per step, and the step at ``--ceiling-at`` sessions."""
    port = free_port()
    endpoint = Process("fixed-latency LLM", [
        sys.executable, str(HERE / "fixed_latency_llm.py"), "--port", str(port),
        "--delay", str(args.delay), "--text", args.text], dict(os.environ), "fixed-latency LLM")
    base_url = f"http://127.0.0.1:{port}/v1"
    control_file = tmp / f"control-llm{llm_replicas}.json"
    nats_port, http_port = free_port(), free_port()
    env = dict(os.environ, OPENAI_BASE_URL=base_url, OPENAI_API_KEY="sk-bench",
               VOXBUS_LLM_MODEL="fixed", VOXBUS_LLM_CAPACITY=str(args.llm_capacity),
               VOXBUS_STAGE_FIRST_FRAME_S=str(args.first_frame),
               VOXBUS_CONTROL_FILE=str(control_file),
               VOXBUS_CONTROL_ADDRESS=f"127.0.0.1:{free_port()}",
               VOXBUS_PREFIX="cap" + uuid.uuid4().hex[:6])
    for name in ("VOXBUS_NATS_URL", "VOXBUS_CONTROL_TOKEN"):
        env.pop(name, None)
    up = None
    per_step: list[dict] = []
    try:
        await endpoint.until_ready(15)
        log(f"voxbus up --scale llm={llm_replicas} (LLM capacity {args.llm_capacity} each, "
            f"endpoint first token {args.delay:g} s)")
        up = Process("voxbus up", [sys.executable, "-m", "voxbus.cli", "up", "--nats-port",
                                   str(nats_port), "--http-port", str(http_port), "--scale",
                                   f"llm={llm_replicas}"], env, "voxbus ready")
        await up.until_ready(READY_S)
        # The load generator finds the bus's credentials and the control plane in that file.
        os.environ["VOXBUS_CONTROL_FILE"] = str(control_file)
        config = LoadConfig(f"nats://127.0.0.1:{nats_port}", env["VOXBUS_PREFIX"], "chat",
                            1, None, args.step_for, parse_pause(args.pause), seed=args.seed)
        await warm_up(config, utterances[0])

        async def measure(n: int) -> Step:
            log(f"  llm={llm_replicas}: {n} sessions for {args.step_for:g} s")
            endpoint_stats(base_url, reset=True)
            step = judge(await run_load(replace(config, sessions=n), utterances,
                                        corpus="espeak-ng questions"), args.p95)
            stats = endpoint_stats(base_url)
            per_step.append({"sessions": n, "endpoint_requests": stats["requests"],
                             "endpoint_max_at_once": stats["max_in_flight"],
                             "endpoint_cancelled": stats["cancelled"]})
            log(f"  -> e2e p95 {step.p95_ms:.0f} ms, {len(step.result.turns)} turns, "
                f"{'ok' if step.ok else step.why}; endpoint at most "
                f"{stats['max_in_flight']} at once")
            await asyncio.sleep(3.0)
            return step

        cap = await find_capacity(measure, args.p95, max_sessions=args.max_sessions)
        ceiling = next((s for s in cap.steps if s.sessions == args.ceiling_at), None)
        if ceiling is None:
            log(f"  llm={llm_replicas}: the ceiling at {args.ceiling_at} sessions (not part "
                "of the search)")
            ceiling = await measure(args.ceiling_at)
        return cap, per_step, ceiling
    finally:
        if up is not None:
            up.stop()
        endpoint.stop()


def demand(cap: Capacity, delay_s: float) -> float | None:
    """LLM seconds each session asked for per second it talked, over the good steps (what one
    session costs the LLM stage)."""
    shares = [x["turns"] * delay_s / x["live_s"] for s in cap.steps
              if s.result is not None and s.ok for x in s.result.sessions if x["live_s"]]
    return sum(shares) / len(shares) if shares else None


async def main(args) -> None:
    from voxbus.runner import configure_logging

    configure_logging("WARNING")
    with tempfile.TemporaryDirectory(prefix="voxbus-capacity-") as tmp_name:
        tmp = Path(tmp_name)
        utterances, _ = await asyncio.to_thread(make_utterances, tmp, piper=False)
        results: dict[int, tuple[Capacity, list[dict], Step]] = {}
        for n in args.llm:
            results[n] = await search(args, n, utterances, tmp)
    if args.json:
        await asyncio.to_thread(Path(args.json).write_text, to_json({
            "delay_s": args.delay, "llm_capacity": args.llm_capacity, "p95_bound_ms": args.p95,
            "runs": {f"llm={n}": {**capacity_dict(cap), "endpoint": stats,
                                  "ceiling_step": ceiling.result.to_dict()}
                     for n, (cap, stats, ceiling) in results.items()}}))
    for n, (cap, stats, _) in results.items():
        print(f"== voxbus up --scale llm={n}: LLM capacity {args.llm_capacity} per replica, "
              f"endpoint first token {args.delay:g} s, e2e p95 bound {args.p95:g} ms")
        print(format_capacity(cap))
        print("endpoint: " + ", ".join(f"{s['sessions']} sessions: {s['endpoint_requests']} "
                                       f"requests, at most {s['endpoint_max_at_once']} at once"
                                       for s in stats))
        print()
    rows = []
    for n, (cap, stats, ceiling) in results.items():
        d = demand(cap, args.delay)
        slots = n * args.llm_capacity
        r = ceiling.result
        clean = sum(t.clean for t in r.turns)
        rows.append([f"llm={n}", str(cap.sessions), str(cap.first_bad or "-"),
                     f"{d:.3f}" if d else "-", f"{slots / d:.1f}" if d else "-",
                     f"{ceiling.sessions}: {clean}/{len(r.turns)}, {r.fallback}",
                     f"{clean / (r.wall_s / 60):.1f}",
                     str(max((s["endpoint_max_at_once"] for s in stats), default=0))])
    print(table(["replicas", "capacity (sessions)", "first over", "LLM demand per session",
                 "LLM saturates at (sessions)", "ceiling step: clean/turns, fallback",
                 "clean answers/min", "endpoint at most at once"], rows))
    caps = [results[n][0].sessions for n in args.llm]
    if len(caps) == 2 and caps[0]:
        print(f"capacity x{caps[1] / caps[0]:.2f} with {args.llm[1]} LLM replicas instead of "
              f"{args.llm[0]}")
    print(f"* LLM demand per session: the LLM seconds a session asks for per second it "
          f"talks (its turns x {args.delay:g} s over its time), over the good steps; the stage "
          f"serves replicas x {args.llm_capacity} requests at once, so it saturates at replicas x "
          f"{args.llm_capacity} / demand sessions; queueing before that is what the p95 "
          "bound sees")
    print(f"* ceiling step: {args.ceiling_at} sessions, past what one replica carries: clean "
          "answers (words and audio, no error, not the fallback line) per minute are the most "
          "the LLM stage gives")
    print("* each LLM request goes to a replica the NATS queue group picks at random, not the "
          "idlest: one can wait behind another while a second replica is idle, so the "
          "p95-bounded capacity grows less than the ceiling")
    print(f"* first-frame deadline {args.first_frame:g} s (VOXBUS_STAGE_FIRST_FRAME_S): above "
          "the endpoint's latency, so a call is hedged to another replica only after "
          "waiting in a queue")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=2.0,
                        help="the endpoint's seconds to first token (default 2)")
    parser.add_argument("--text", default="Sure, I can help you with that.",
                        help="every answer")
    parser.add_argument("--llm-capacity", type=int, default=1,
                        help="requests per LLM replica at once (default 1)")
    parser.add_argument("--llm", default="1,2", help="LLM replica counts to compare")
    parser.add_argument("--p95", type=float, default=None,
                        help="e2e p95 bound, ms (default: delay + 3 s)")
    parser.add_argument("--step-for", type=float, default=40.0,
                        help="seconds each step talks after its ramp (default 40)")
    parser.add_argument("--pause", default="1.5-4", help="callers' pause after a reply, s")
    parser.add_argument("--first-frame", type=float, default=None,
                        help="VOXBUS_STAGE_FIRST_FRAME_S (default: delay + 1.5 s)")
    parser.add_argument("--max-sessions", type=int, default=16)
    parser.add_argument("--ceiling-at", type=int, default=8,
                        help="sessions of the step that shows each stage's ceiling (default 8; "
                             "measured after the search if it was not a step of it)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", metavar="FILE", help="also write every step's figures here")
    a = parser.parse_args()
    a.llm = [int(x) for x in a.llm.split(",")]
    a.p95 = a.p95 if a.p95 is not None else a.delay * 1000 + 3000
    a.first_frame = a.first_frame if a.first_frame is not None else a.delay + 1.5
    asyncio.run(main(a))

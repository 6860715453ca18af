"""What bench/faults.py and bench/soak.py share: stage replicas as real ``voxbus <stage>``
processes, a nats-server whose subscriptions can be counted, the bench agent, and fixed-width
tables. The real-time caller and its spoken questions live in :mod:`voxbus.caller`, shared with
``voxbus bench load``; they are re-exported here for the benches that import them from here."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from voxbus.caller import FIGURES as FIGURES
from voxbus.caller import Caller as Caller
from voxbus.caller import Turn as Turn
from voxbus.caller import Utterance as Utterance
from voxbus.caller import make_utterances as make_utterances
from voxbus.load import table as table
from voxbus.natsd import NatsServer, free_port
from voxbus.wire import LlmDelta, LlmDone, TtsRequest

AGENT = "bench"
AGENT_YAML = """name: bench
system_prompt: >-
  You are a friendly voice assistant. Answer in one or two short spoken sentences.
  No lists, no markdown, no emojis.
turn:
  idle_timeout_s: 0
"""
"""The shipped chat agent without idle prompts: a prompt must never pass for an answer."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def agents_dir(folder: Path) -> str:
    (folder / "agents").mkdir(exist_ok=True)
    (folder / "agents" / f"{AGENT}.yaml").write_text(AGENT_YAML)
    return str(folder / "agents")


# --- processes -----------------------------------------------------------------------------


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class Proc:
    """One ``voxbus <stage>`` process: its worker id, output and health endpoint."""

    stage: str
    worker_id: str
    proc: subprocess.Popen
    metrics_port: int
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def id(self) -> str:
        return f"{self.stage}-{self.worker_id}"

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            os.killpg(self.proc.pid, sig)

    def health(self) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/healthz",
                                        timeout=0.5) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None

    def output(self, n: int = 40) -> str:
        return "".join(self.lines[-n:])


class Procs:
    """Stage replicas on one NATS and prefix; ``close`` kills whatever is left."""

    def __init__(self, nats_url: str, prefix: str, **env: str):
        self.env = dict(os.environ, VOXBUS_NATS_URL=nats_url, VOXBUS_PREFIX=prefix,
                        VOXBUS_LOG_LEVEL="INFO", **env)
        self.running: list[Proc] = []

    async def start(self, stage: str, worker_id: str, timeout_s: float = 300.0,
                    **env: str) -> Proc:
        port = free_port()
        proc = await asyncio.to_thread(
            subprocess.Popen, [sys.executable, "-m", "voxbus.cli", stage],
            env=dict(self.env, VOXBUS_WORKER_ID=worker_id, VOXBUS_METRICS_PORT=str(port), **env),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        p = Proc(stage, worker_id, proc, port)
        self.running.append(p)

        def read() -> None:
            for line in proc.stdout:
                p.lines.append(line)
                if line.strip().endswith(f"{p.id} ready"):
                    p.ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while not p.ready.is_set():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{p.id} did not start:\n{p.output()}")
            await asyncio.sleep(0.1)
        return p

    async def wait_exit(self, p: Proc, timeout_s: float = 30.0) -> int | None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(p.proc.wait, timeout_s)
        return p.proc.poll()

    def close(self) -> None:
        for p in self.running:
            if p.alive:
                p.signal(signal.SIGCONT)
                p.signal(signal.SIGKILL)
                p.proc.wait()


class MonitoredNats(NatsServer):
    """nats-server with its HTTP monitoring port on (``/connz?subs=1``)."""

    def __init__(self, *, store_dir: str | None = None):
        super().__init__(store_dir=store_dir, http_port=free_port())

    def subscriptions(self) -> dict[str, int]:
        """Open subscriptions per connection name (summed over same-named connections)."""
        connz = self.monitor("/connz?subs=1&limit=1024", timeout=2) or {}
        subs: Counter[str] = Counter()
        for c in connz.get("connections", []):
            subs[c.get("name") or f"cid{c['cid']}"] += c.get("subscriptions", 0)
        return dict(subs)


def stage_replies(recording, turn_id: int) -> str:
    """What the session's recording holds for one orchestrator turn: the LLM text streamed
    back, each reply's end (count, error) and the TTS sentences asked for."""
    text, ends, sentences = [], [], 0
    for m in recording.messages:
        f = m.frame()
        if isinstance(f, LlmDelta) and f.turn == turn_id:
            text.append(f.text)
        elif isinstance(f, LlmDone) and f.turn == turn_id:
            ends.append(f"{m.subject.rsplit('.', 1)[-1]}:{f.count} frames"
                        + (f" error {f.error!r}" if f.error else ""))
        elif isinstance(f, TtsRequest) and f.turn == turn_id and ".work." in m.subject:
            sentences += 1
    return (f"LLM text {''.join(text)!r}, LLM ends [{', '.join(ends)}], "
            f"TTS requests {sentences}")

"""``voxbus up``: everything on one machine, each stage its own process, as deployed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

from voxbus.config import Settings
from voxbus.llm_server import MODEL_ALIAS, LocalLlmServer
from voxbus.natsd import NatsServer
from voxbus.recording import Recorder

log = logging.getLogger("voxbus.up")

STAGES = ("stt", "llm", "tts", "orchestrator", "gateway")
RESTART_LIMIT = 5


class Child:
    """One stage process; restarted if it dies, stopped with its whole process group."""

    def __init__(self, name: str, env: dict[str, str]):
        self.name = name
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.restarts = 0

    async def start(self) -> None:
        self.ready.clear()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "voxbus.cli", self.name, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=None, start_new_session=True,
        )
        asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc and self.proc.stdout
        async for line in self.proc.stdout:
            text = line.decode(errors="replace").rstrip()
            if text.endswith(" ready"):
                self.ready.set()
            print(f"[{self.name}] {text}", flush=True)

    async def stop(self) -> None:
        if not self.proc or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


async def record_sessions(nats_url: str, settings: Settings) -> None:
    """Turn on the recording stream (on by default; ``VOXBUS_RECORD=0`` leaves it off)."""
    async with Recorder(nats_url, settings.prefix) as recorder:
        await recorder.enable(max_age_s=settings.record_max_age_s,
                              max_bytes=settings.record_max_bytes)
    age = f"{settings.record_max_age_s / 3600:g} h" if settings.record_max_age_s > 0 else "no"
    size = (f"{settings.record_max_bytes / 2**20:g} MiB" if settings.record_max_bytes > 0
            else "no")
    print(f"recording sessions in JetStream stream {recorder.stream} ({age} age limit, {size} "
          "size limit): voxbus sessions / record / replay", flush=True)


async def up(nats_port: int, http_port: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    env = dict(os.environ)
    nats = llm = None
    children: list[Child] = []
    try:
        settings = Settings()
        if not env.get("VOXBUS_NATS_URL"):
            store = settings.jetstream_dir or None
            nats = await asyncio.to_thread(NatsServer(nats_port, store_dir=store).start)
            env["VOXBUS_NATS_URL"] = nats.url
            print(f"nats-server with JetStream on {nats.url}", flush=True)
        if settings.record:
            await record_sessions(env["VOXBUS_NATS_URL"], settings)
        if not env.get("OPENAI_BASE_URL"):
            print("starting local LLM endpoint (llama-cpp-python, SmolLM2-135M)...", flush=True)
            llm = await asyncio.to_thread(LocalLlmServer().start)
            env["OPENAI_BASE_URL"] = llm.base_url
            env.setdefault("VOXBUS_LLM_MODEL", MODEL_ALIAS)
            print(f"LLM endpoint on {llm.base_url}", flush=True)
        env["VOXBUS_HTTP_PORT"] = str(http_port)
        children = [Child(name, env) for name in STAGES]
        for child in children:
            await child.start()
        print("loading models...", flush=True)
        waits = [asyncio.create_task(c.ready.wait()) for c in children]
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([asyncio.gather(*waits), stopper], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            return 130
        host = env.get("VOXBUS_HTTP_HOST", "127.0.0.1")
        host = "127.0.0.1" if host in ("", "0.0.0.0") else host
        print(f"voxbus ready: open http://{host}:{http_port}/  nats={env['VOXBUS_NATS_URL']} "
              f"(or: voxbus talk some.wav --nats {env['VOXBUS_NATS_URL']})", flush=True)
        while not stop.is_set():
            for child in children:
                if child.proc and child.proc.returncode is not None:
                    if child.restarts >= RESTART_LIMIT:
                        print(f"{child.name} keeps dying; stopping", flush=True)
                        return 1
                    child.restarts += 1
                    print(f"{child.name} exited ({child.proc.returncode}); restarting", flush=True)
                    await child.start()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        return 0
    finally:
        print("stopping...", flush=True)
        await asyncio.gather(*(c.stop() for c in children))
        if llm:
            llm.stop()
        if nats:
            nats.stop()
        print("stopped", flush=True)

"""How one TTS replica serves concurrent sentences: wall time and time to first audio per request.

``python -m services.tts.bench [--rounds R] [--concurrency 1 2 4] [--capacity 1 4]`` starts a
nats-server and one in-process TTS replica per capacity (the packaged Piper voice), then sends
each N sentences at once (a long one first, then short ones: the case where a short sentence
must not wait behind a long one), the replicas taking turns round by round so that a busy box
slows them alike, and prints per replica and N the round's wall time, time to first audio
(all requests; the short ones) and when the long one was done.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections import defaultdict
from dataclasses import replace

import numpy as np

from voxbus.bus import Bus
from voxbus.config import Settings
from voxbus.natsd import NatsServer
from voxbus.runner import Service, configure_logging
from voxbus.subjects import Stage, Subjects
from voxbus.wire import TtsAudio, TtsDone, TtsRequest, decode

LONG = ("When you arrive at the station tomorrow morning, take the second exit on the left, "
        "walk past the bakery and the old library, and you will find our office on the corner.")
SHORT = ("Sure, no problem.", "Yes, that works.", "Thank you very much.")


async def one(bus: Bus, session: str, text: str) -> tuple[float, float]:
    """(seconds to first audio, seconds to done) for one sentence."""
    reply = bus.subjects.reply(session, Stage.TTS, 1)
    got: asyncio.Queue = asyncio.Queue()

    async def on(msg) -> None:
        await got.put(decode(msg.data))

    sub = await bus.nc.subscribe(reply, cb=on)
    started = time.monotonic()
    first = None
    await bus.publish(bus.subjects.work(Stage.TTS),
                      TtsRequest(session=session, turn=1, index=0, text=text), reply=reply)
    while True:
        frame = await asyncio.wait_for(got.get(), 60)
        if isinstance(frame, TtsAudio) and first is None:
            first = time.monotonic() - started
        if isinstance(frame, TtsDone):
            await sub.unsubscribe()
            if frame.error or first is None:
                raise RuntimeError(f"{session}: {frame.error or 'no audio'}")
            return first, time.monotonic() - started


def texts_for(n: int) -> list[str]:
    return [LONG, *SHORT][:n] if n > 1 else [SHORT[0]]


async def measure(replicas: dict[str, Service], buses: dict[str, Bus], *, rounds: int,
                  concurrency: list[int]) -> None:
    """Each round: for each N, each replica gets its N sentences at once, in turn."""
    for label in replicas:
        await one(buses[label], "warm", SHORT[0])
    results: dict[tuple[str, int], list] = defaultdict(list)
    for r in range(rounds):
        for n in concurrency:
            for label in replicas:
                t0 = time.monotonic()
                got = await asyncio.gather(*(one(buses[label], f"r{r}n{n}i{i}", text)
                                             for i, text in enumerate(texts_for(n))))
                results[label, n].append((time.monotonic() - t0, got))

    def ms(xs, q) -> str:
        return f"{np.percentile(xs, q) * 1000:5.0f}"

    for label in replicas:
        for n in concurrency:
            runs = results[label, n]
            walls = [wall for wall, _ in runs]
            pairs = [(f, d, t) for _, got in runs
                     for (f, d), t in zip(got, texts_for(n), strict=True)]
            firsts = [f for f, _, _ in pairs]
            shorts = [f for f, _, t in pairs if t != LONG]
            line = (f"{label} N={n}: wall p50 {ms(walls, 50)} ms; TTFA p50 {ms(firsts, 50)} "
                    f"p95 {ms(firsts, 95)}; short sentences' TTFA p50 {ms(shorts, 50)} "
                    f"p95 {ms(shorts, 95)}")
            longs = [d for _, d, t in pairs if t == LONG]
            if longs:
                line += f"; the long one done p50 {ms(longs, 50)}"
            print(line, flush=True)


async def main() -> None:
    from services.tts.worker import TtsWorker

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--capacity", type=int, nargs="+", default=[0],
                        help="one replica per capacity (0: the stage's default)")
    args = parser.parse_args()
    configure_logging("WARNING")
    with NatsServer() as server:
        replicas, buses = {}, {}
        for capacity in args.capacity:
            settings = replace(Settings(nats_url=server.url, prefix="b" + uuid.uuid4().hex[:8]),
                               capacity=capacity)
            worker = await TtsWorker(settings).start()
            label = f"capacity {worker.declared_capacity}"
            replicas[label] = worker
            buses[label] = await Bus.connect(settings.nats_url, Subjects(settings.prefix),
                                             "bench")
        try:
            await measure(replicas, buses, rounds=args.rounds, concurrency=args.concurrency)
        finally:
            for label, worker in replicas.items():
                await worker.stop()
                await buses[label].close()


if __name__ == "__main__":
    asyncio.run(main())

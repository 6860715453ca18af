"""A service never dies from one bad message: it reports it and keeps serving."""

from __future__ import annotations

import asyncio

import msgpack
import pytest

from services.tts.worker import TtsWorker
from voxbus.subjects import Stage
from voxbus.wire import SCHEMA_VERSION, ErrorEvent, SttClaim, TtsDone, TtsRequest

pytestmark = pytest.mark.slow

GARBAGE = [
    b"\xff\x00garbage",
    msgpack.packb([SCHEMA_VERSION + 7, 50, {}]),
    msgpack.packb([SCHEMA_VERSION, 424242, {}]),
    msgpack.packb([SCHEMA_VERSION, 50, {"session": "s", "turn": "x"}]),
    b"\x00" * (1024 * 1024 - 100),
]


async def test_worker_survives_garbage_and_reports_it(settings, bus):
    errors: asyncio.Queue = asyncio.Queue()

    async def on_error(frame, _msg):
        await errors.put(frame)

    await bus.subscribe(bus.subjects.errors(), on_error)
    async with TtsWorker(settings) as worker:
        work = bus.subjects.work(Stage.TTS)
        for payload in GARBAGE:
            await bus.nc.publish(work, payload)
        codes = {(await asyncio.wait_for(errors.get(), 10)).code for _ in GARBAGE}
        assert codes == {"malformed", "version", "unknown_tag", "invalid"}
        # The wrong frame kind on a work subject is refused too, with a reply saying why.
        reply = await bus.nc.request(work, __import__("voxbus.wire", fromlist=["encode"]).encode(
            SttClaim(session="s")), timeout=5)
        from voxbus.wire import decode

        assert isinstance(decode(reply.data), ErrorEvent)
        assert worker.bus.bad_frames == len(GARBAGE)

        # ... and real work still goes through.
        got: asyncio.Queue = asyncio.Queue()

        async def on(frame, _msg):
            await got.put(frame)

        reply_subject = bus.subjects.reply("s", Stage.TTS, 1)
        await bus.subscribe(reply_subject, on)
        await bus.publish(work, TtsRequest(session="s", turn=1, index=0, text="Still here."),
                          reply=reply_subject)
        while not isinstance(frame := await asyncio.wait_for(got.get(), 30), TtsDone):
            pass
        assert frame.error is None and frame.count > 0

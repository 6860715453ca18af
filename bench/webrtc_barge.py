"""Barge-in over WebRTC for ``bench/e2e.py`` (part ``webrtc``): a peer speaks over the agent's
reply through the media gateway, and what counts is when that peer stops hearing the agent.

The peer is ``services/media_gateway/client.py``'s ``GatewayClient``, the Python stand-in for a
browser (aiortc, Opus both ways): its mic notes when each 20 ms frame of queued speech left for
the encoder, and its receiver when each 20 ms of the agent's audio arrived decoded and how loud
it was. The bench also listens to the gateway's session on the bus (``BusSession.listen``): for
the orchestrator's ``AudioFlush`` and VAD, and for which agent turn each ``AudioOut`` belongs
to, which is how the interrupted reply's audio is told from the answer to the interruption (a
peer cannot hear a turn before the gateway has received it). Times are ``time.monotonic()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from sessions import FRAME_S, BusSession, Speech, until, wait_reply

from services.media_gateway.client import LOUD_RMS, GatewayClient
from voxbus.audio import WIRE_RATE

PLAYING_GAP_S = 0.3
"""The agent counts as talking at the onset if the peer heard it this recently (a pause between
words or sentences is allowed for), or heard more of the same reply after it."""
STOP_WITHIN_S = 3.0


class Gateway:
    """The media gateway of an in-process bench system: ``python -m voxbus.cli gateway`` on a
    free port, on the bench's NATS and subject prefix (started as ``bench/gateway.py`` does)."""

    def __init__(self):
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""

    async def start(self, nats_url: str, prefix: str) -> str:
        from gateway import start_gateway

        self.proc, port = await start_gateway(nats_url, prefix)
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        from gateway import stop_process

        if self.proc is not None:
            await stop_process(self.proc, 10.0)


def _spoken(client: GatewayClient, pcm: bytes, first: int) -> Speech:
    """What the mic sent of ``pcm``, queued when ``first`` frames had been sent, as a
    ``Speech`` with each frame's send time (``onset_at``, ``end_at``)."""
    speech = Speech(pcm)
    speech.sent_at = [at for at, _ in client.mic.sent[first:first + len(speech.chunks)]]
    speech.done.set()
    return speech


async def _say(client: GatewayClient, pcm: bytes) -> Speech:
    """Speak ``pcm`` (the mic's queue being empty) and wait until all of it has been sent."""
    first = len(client.mic.sent)
    client.mic.say(pcm)
    if not await until(lambda: client.mic.pending_s == 0,
                       len(pcm) / 2 / WIRE_RATE + 10.0, poll_s=FRAME_S):
        raise RuntimeError("the peer's mic track is not being sent")
    return _spoken(client, pcm, first)


def _loud_after(client: GatewayClient, t: float) -> float | None:
    return next((at for at, r in client.heard if at >= t and r > LOUD_RMS), None)


async def webrtc_turn(gateway_url: str, nats_url: str, prefix: str, i: int, question: bytes,
                      interruption: bytes, timeout_s: float) -> dict:
    """A fresh session through the gateway: the question, its answer heard, then the
    interruption spoken over it; what the peer heard as one record."""
    rec = {"part": "webrtc", "system": "voxbus", "attempt": i, "status": "error", "errors": []}
    client = GatewayClient(gateway_url)
    tap: BusSession | None = None
    try:
        rec["session"] = await client.connect()
        tap = BusSession(nats_url, prefix)
        tap.session = rec["session"]
        await tap.listen()
        if not await client.wait_for(lambda c: any(e.get("type") == "state"
                                                   for e in c.events), 15.0):
            raise RuntimeError("the data channel gave no state within 15 s")
        asked = await _say(client, question)
        first = await _first_loud(client, asked, timeout_s)
        if first is None:
            rec["status"] = "unanswered"
            return rec
        # Into the answer (as heard) by 0.2-0.8 s: the interruption lands at different points.
        await asyncio.sleep(max(0.0, first + 0.2 + 0.2 * (i % 4) - time.monotonic()))
        said = await _say(client, interruption)
        onset = said.onset_at
        h = tap.heard
        await until(lambda: any(at >= onset for at, _ in h.flushes), STOP_WITHIN_S)
        await asyncio.sleep(0.5)  # late audio of the interrupted turn, if any
        await wait_reply(h, said, timeout_s)
    except Exception as e:
        rec["errors"].append(f"bench: {type(e).__name__}: {e}")
        return rec
    finally:
        if tap is not None and tap.bus is not None:
            with contextlib.suppress(Exception):
                await tap.bus.close()
        await client.close()
    rec.update(_analyse(client, tap, asked, said))
    return rec


async def _first_loud(client: GatewayClient, asked: Speech, timeout_s: float) -> float | None:
    left = asked.end_at + timeout_s - time.monotonic()
    if await until(lambda: _loud_after(client, asked.onset_at) is not None, left):
        return _loud_after(client, asked.onset_at)
    return None


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 1) if seconds is not None else None


def _analyse(client: GatewayClient, tap: BusSession, asked: Speech, said: Speech) -> dict:
    h, onset = tap.heard, said.onset_at
    before = [(at, t) for at, t in h.audio if at < onset]
    turn = before[-1][1] if before else None
    # The answer to the interruption: a later turn's first AudioOut on the bus. Whatever the
    # peer heard before the gateway even had it is the interrupted reply.
    new = next((at for at, t in h.audio if at >= onset and t != turn), None)
    cutoff = new if new is not None else float("inf")
    loud = [at for at, r in client.heard if r > LOUD_RMS and asked.onset_at <= at < cutoff]
    heard_before = [at for at in loud if at < onset]
    heard_after = [at for at in loud if at >= onset]
    playing = bool(heard_before) and (onset - heard_before[-1] < PLAYING_GAP_S
                                      or bool(heard_after))
    last = heard_after[-1] if heard_after else heard_before[-1] if heard_before else None
    flush = next((at for at, _ in h.flushes if at >= onset), None)
    vad = next((at for at in h.vad_starts if at >= onset), None)
    quiet_vad = next((at for at in h.vad_starts if at >= asked.onset_at), None)
    # Nothing loud heard after the onset: the peer stopped hearing the agent at the onset.
    stop = max(0.0, last - onset) if last is not None else None
    status = ("missed" if not playing
              else "stopped" if flush is not None and stop <= STOP_WITHIN_S else "not_stopped")
    return {
        "status": status, "errors": h.errors, "turn": turn, "heard": " ".join(h.transcripts),
        "reply": " ".join(h.reply),
        "onset_to_heard_stop": _ms(stop) if playing else None,
        "onset_to_flush": _ms(flush - onset) if flush is not None else None,
        "flush_to_heard_stop": (_ms(last - flush) if playing and flush is not None
                                and last is not None else None),
        "onset_to_vad": _ms(vad - onset) if vad is not None else None,
        "quiet_onset_to_vad": _ms(quiet_vad - asked.onset_at) if quiet_vad is not None else None,
        "onset_to_last_audio_out": (_ms(max(at for at, t in h.audio if t == turn) - onset)
                                    if turn is not None else None),
        "into_reply_ms": _ms(onset - heard_before[0]) if heard_before else None,
        "loud_frames_after_onset": len(heard_after),
    }

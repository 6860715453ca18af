"""Pipecat's SmallWebRTC signaling on the gateway: what it refuses (and keeps serving after),
session tokens through ``/start``, and a whole RTVI turn from an aiortc peer that trickles its
ICE candidates over ``PATCH /api/offer`` (the browser test drives the real JS SDK)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from dataclasses import replace

import aiohttp
import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from services.media_gateway.client import MicTrack
from services.media_gateway.worker import GatewayWorker
from voxbus.audio import read_wav


async def _call(gw, method: str, path: str, body=None, headers=None) -> tuple[int, dict]:
    data = body if isinstance(body, (str, bytes)) or body is None else json.dumps(body)
    async with aiohttp.ClientSession() as http, http.request(
            method, gw.url.rstrip("/") + path, data=data,
            headers={"Content-Type": "application/json", **(headers or {})}) as res:
        return res.status, await res.json(content_type=None)


class Peer:
    """An aiortc peer offering as the JS transport does (audio, a data channel "chat")."""

    def __init__(self):
        self.pc = RTCPeerConnection()
        self.mic = MicTrack()
        self.pc.addTrack(self.mic)
        self.channel = self.pc.createDataChannel("chat", ordered=True)
        self.messages: list[dict] = []
        self.loud_frames = 0
        self.channel.on("message", lambda raw: self.messages.append(json.loads(raw)))
        self.pc.on("track", lambda track: asyncio.ensure_future(self._receive(track)))

    async def offer(self, *, trickle: bool = False) -> tuple[str, list[str]]:
        """The offer's SDP and its candidates; ``trickle``: cut out of the SDP, for PATCH."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        sdp = self.pc.localDescription.sdp
        candidates = re.findall(r"^a=(candidate:[^\r\n]+)", sdp, flags=re.M)
        if trickle:
            sdp = re.sub(r"^a=(candidate:|end-of-candidates)[^\r\n]*\r\n", "", sdp, flags=re.M)
        return sdp, candidates

    def rtvi(self, kind: str) -> list[dict]:
        return [m for m in self.messages if m.get("type") == kind]

    async def _receive(self, track) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                if np.abs(frame.to_ndarray()).max() > 500:
                    self.loud_frames += 1

    async def wait_for(self, predicate, timeout: float) -> bool:
        for _ in range(int(timeout * 20)):
            if predicate():
                return True
            await asyncio.sleep(0.05)
        return predicate()


async def test_start_returns_a_session_id_and_ice_config(lone_gateway):
    status, started = await _call(lone_gateway, "POST", "/start", {"agent": "chat"})
    assert status == 200 and set(started) == {"sessionId", "iceConfig"}, started
    assert started["iceConfig"] == {"iceServers": []}
    # The runner's own body shape, and an empty body, start sessions too.
    assert (await _call(lone_gateway, "POST", "/start",
                        {"transport": "webrtc", "body": {"agent": "chat"}}))[0] == 200
    assert (await _call(lone_gateway, "POST", "/start", ""))[0] == 200
    assert len(lone_gateway.pipecat.pending) == 3
    assert (await _call(lone_gateway, "GET", "/status")) == (
        200, {"status": "ready", "transports": ["webrtc"]})


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/start", "{not json", 400),
    ("POST", "/start", "[1, 2]", 400),
    ("POST", "/start", {"agent": "../etc/passwd"}, 400),
    ("POST", "/start", {"transport": "daily"}, 400),
    ("POST", "/start", {"body": "chat"}, 400),
    ("POST", "/start", {"token": "not.a.jwt"}, 401),
    ("POST", "/start", b"x" * (1 << 20), 413),
    ("POST", "/sessions/nope/api/offer", {"sdp": "v=0", "type": "offer", "pc_id": None}, 404),
    ("POST", "/api/offer", {"sdp": "v=0", "type": "offer", "pc_id": None}, 401),
    ("POST", "/api/offer", {"sdp": "v=0", "type": "offer", "pc_id": "voxbus-nope"}, 404),
    ("POST", "/api/offer", {"sdp": "v=0", "type": "offer", "pc_id": None, "extra": 1}, 400),
    ("POST", "/api/offer", {"sdp": 42, "type": "offer", "pc_id": None}, 400),
    ("PATCH", "/api/offer", {"pc_id": "voxbus-nope", "candidates": []}, 404),
    ("PATCH", "/api/offer", {"candidates": []}, 400),
    ("PATCH", "/api/offer", {"pc_id": "x", "candidates": [{"candidate": "x"}]}, 400),
    ("PATCH", "/api/offer", "{not json", 400),
])
async def test_bad_signaling_gets_a_clear_error(lone_gateway, method, path, body, status):
    got, answer = await _call(lone_gateway, method, path, body)
    assert got == status, answer
    assert answer["error"] and answer["detail"] == answer["error"]  # Pipecat's SDK reads detail
    assert lone_gateway.sessions() == []
    assert (await _call(lone_gateway, "POST", "/start", {}))[0] == 200  # still serving


@pytest.mark.parametrize("sdp", ["garbage", "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"])
async def test_garbage_sdp_on_a_started_session(lone_gateway, sdp):
    _, started = await _call(lone_gateway, "POST", "/start", {})
    path = f"/sessions/{started['sessionId']}/api/offer"
    status, answer = await _call(lone_gateway, "POST", path,
                                 {"sdp": sdp, "type": "offer", "pc_id": None})
    assert status == 400 and "offer" in answer["error"], answer
    # A sessionId admits one offer: its token was used.
    status, answer = await _call(lone_gateway, "POST", path,
                                 {"sdp": sdp, "type": "offer", "pc_id": None})
    assert status == 404 and "/start" in answer["error"], answer
    assert lone_gateway.sessions() == []


async def test_closed_gateway_checks_the_app_servers_token_at_start(settings):
    gw = GatewayWorker(replace(settings, http_port=0, open_tokens=False))
    await gw.start()
    try:
        status, answer = await _call(gw, "POST", "/start", {"agent": "chat"})
        assert status == 401 and "Bearer" in answer["error"], answer
        token, grant = gw.tokens.mint(agent="restaurant")
        bearer = {"Authorization": f"Bearer {token}"}
        status, answer = await _call(gw, "POST", "/start", {"agent": "chat"}, bearer)
        assert status == 403 and "restaurant" in answer["error"], answer
        status, started = await _call(gw, "POST", "/start", {}, bearer)
        assert status == 200, started
        # The offer redeems it: a token used once cannot start another session.
        peer = Peer()
        sdp, _ = await peer.offer()
        try:
            status, answer = await _call(
                gw, "POST", f"/sessions/{started['sessionId']}/api/offer",
                {"sdp": sdp, "type": "offer", "pc_id": None})
            assert status == 503 and "orchestrator" in answer["error"], answer  # none here
        finally:
            await peer.pc.close()
        status, answer = await _call(gw, "POST", "/start", {}, bearer)
        assert status == 401 and "already used" in answer["error"], answer
    finally:
        await gw.stop()


@pytest.mark.slow
async def test_rtvi_turn_over_trickled_ice(gateway, stages, speech_wav):
    peer, first = Peer(), None
    sdp, candidates = await peer.offer(trickle=True)
    assert candidates and "a=candidate" not in sdp
    try:
        # Straight to /api/offer, as Pipecat's runner serves it: the token in requestData.
        token, grant = gateway.tokens.mint(agent="chat")
        status, answer = await _call(gateway, "POST", "/api/offer", {
            "sdp": sdp, "type": "offer", "pc_id": None, "restart_pc": False,
            "requestData": {"token": token}})
        assert status == 200 and answer["pc_id"].startswith("voxbus-"), answer
        await peer.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        status, patched = await _call(gateway, "PATCH", "/api/offer", {
            "pc_id": answer["pc_id"],
            "candidates": [{"candidate": c, "sdp_mid": "0", "sdp_mline_index": 0}
                           for c in candidates]})
        assert (status, patched) == (200, {"status": "success"})
        assert await peer.wait_for(lambda: peer.channel.readyState == "open", 10)
        # Nothing is sent before client-ready; then bot-ready answers it, by its id.
        await asyncio.sleep(0.3)
        assert peer.messages == []
        peer.channel.send("ping: 1")  # the JS transport's keep-alive, ignored
        peer.channel.send(json.dumps({"label": "rtvi-ai", "type": "client-ready", "id": "r1",
                                      "data": {"version": "2.1.0",
                                               "about": {"library": "test"}}}))
        assert await peer.wait_for(lambda: peer.rtvi("bot-ready"), 5), peer.messages
        ready = peer.rtvi("bot-ready")[0]
        assert ready["id"] == "r1" and ready["label"] == "rtvi-ai"
        assert ready["data"]["about"]["session"] == grant.session
        # An offer naming the pc_id renegotiates that connection; a restart is refused and
        # the session goes on.
        again_sdp, _ = await peer.offer()
        offer = {"sdp": again_sdp, "type": "offer", "pc_id": answer["pc_id"],
                 "restart_pc": False}
        status, again = await _call(gateway, "POST", "/api/offer", offer)
        assert status == 200 and again["pc_id"] == answer["pc_id"], again
        await peer.pc.setRemoteDescription(RTCSessionDescription(again["sdp"], again["type"]))
        status, refused = await _call(gateway, "POST", "/api/offer", {**offer, "sdp": "garbage"})
        assert status == 400, refused
        status, refused = await _call(gateway, "PATCH", "/api/offer", {
            "pc_id": answer["pc_id"],
            "candidates": [{"candidate": "candidate:garbage", "sdp_mid": "0",
                            "sdp_mline_index": 0}]})
        assert status == 400 and "candidate" in refused["error"], refused
        assert gateway.sessions() == [grant.session]
        peer.channel.send(json.dumps({"label": "rtvi-ai", "type": "send-text", "id": "t1",
                                      "data": {"content": "hi"}}))
        assert await peer.wait_for(lambda: peer.rtvi("error-response"), 5), peer.messages
        assert peer.rtvi("error-response")[0]["id"] == "t1"

        # restart_pc, as the SDK reconnects after its ICE failed: a new peer connection for
        # the same pc_id, and the session (and the conversation) goes on over it.
        first, peer = peer, Peer()
        restart_sdp, _ = await peer.offer()
        status, restarted = await _call(gateway, "POST", "/api/offer", {
            "sdp": restart_sdp, "type": "offer", "pc_id": answer["pc_id"], "restart_pc": True})
        assert status == 200 and restarted["pc_id"] == answer["pc_id"], restarted
        await peer.pc.setRemoteDescription(RTCSessionDescription(restarted["sdp"],
                                                                 restarted["type"]))
        await first.pc.close()
        assert await peer.wait_for(lambda: peer.channel.readyState == "open", 10)
        await asyncio.sleep(0.5)
        assert gateway.sessions() == [grant.session]
        assert stages.orchestrator.sessions() == [grant.session]

        peer.mic.say(read_wav(speech_wav))
        assert await peer.wait_for(lambda: any(
            m["data"]["final"] and "france" in m["data"]["text"].lower()
            for m in peer.rtvi("user-transcription")), 30), peer.messages
        assert await peer.wait_for(lambda: peer.rtvi("bot-stopped-speaking")
                                   and peer.loud_frames > 10, 60), peer.messages
        kinds = [m["type"] for m in peer.messages]
        assert kinds.index("user-started-speaking") < kinds.index("user-stopped-speaking")
        assert kinds.index("bot-started-speaking") < kinds.index("bot-stopped-speaking")
        assert " ".join(m["data"]["text"] for m in peer.rtvi("bot-llm-text")).strip()
        assert peer.rtvi("metrics") and not peer.rtvi("error"), peer.messages
        assert gateway.pipecat.by_pc[answer["pc_id"]].session == grant.session

        # The client's disconnect-bot ends the session in every stage.
        peer.channel.send(json.dumps({"label": "rtvi-ai", "type": "disconnect-bot",
                                      "id": "d1", "data": {}}))
        assert await peer.wait_for(lambda: not (gateway.sessions()
                                                or stages.orchestrator.sessions()), 10)
        assert gateway.pipecat.by_pc == {}
    finally:
        await peer.pc.close()
        if first is not None:
            await first.pc.close()

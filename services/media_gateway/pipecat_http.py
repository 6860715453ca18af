"""Pipecat's SmallWebRTC signaling, as Pipecat's development runner serves it, so Pipecat's
client SDKs (``@pipecat-ai/small-webrtc-transport``, the prebuilt page) connect unchanged.

    POST  /start                          {"agent"?, "token"?} or the runner's {"transport":
                                          "webrtc", "body": {...}} → {"sessionId", "iceConfig"}
    POST  /sessions/{sessionId}/api/offer {"sdp", "type", "pc_id", "restart_pc"} → {"sdp",
                                          "type", "pc_id"}
    PATCH /sessions/{sessionId}/api/offer {"pc_id", "candidates": [{"candidate", "sdp_mid",
                                          "sdp_mline_index"}]}: the client's trickled ICE
    POST  /api/offer, PATCH /api/offer    the same without /start (a token in ``requestData``
                                          or ``Authorization: Bearer``)
    GET   /status                         {"status": "ready", "transports": ["webrtc"]}
    GET   /client/                        Pipecat's prebuilt page, when it is installed

Session tokens still apply: ``/start`` mints one (when ``VOXBUS_OPEN_TOKENS`` allows, as
``/api/token`` does) or checks the one the app server handed out, and keeps it under the
``sessionId`` it returns; the first offer on that ``sessionId`` redeems it, so a ``sessionId``
admits one peer, once. Such peers speak RTVI on the data channel (``rtvi.py``).
"""

from __future__ import annotations

import importlib.util
import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from pipecat.transports.smallwebrtc.request_handler import (
    IceCandidate,
    SmallWebRTCPatchRequest,
    SmallWebRTCRequest,
)

from services.media_gateway.http_json import AGENT_NAME
from services.media_gateway.http_json import error as _error
from services.media_gateway.http_json import json_body as _json_body
from services.media_gateway.http_json import shown as _shown
from services.media_gateway.rtvi import RtviPeerSession
from services.media_gateway.tokens import TokenError

if TYPE_CHECKING:
    from services.media_gateway.bus_session import BusSession
    from services.media_gateway.worker import GatewayWorker

log = logging.getLogger("voxbus.gateway.pipecat")

MAX_PENDING = 10_000
"""Started sessions waiting for their offer; past this ``/start`` answers 503 (each holds a
token until it expires, so an open gateway cannot be made to hold more)."""
PREBUILT = "pipecat_ai_small_webrtc_prebuilt"


class PipecatSignaling:
    """The gateway's Pipecat-shaped HTTP routes and the peers that came through them."""

    def __init__(self, gateway: GatewayWorker):
        self.gateway = gateway
        self.pending: dict[str, tuple[str, float]] = {}
        """``sessionId`` → the token its first offer redeems, and when that expires."""
        self.by_pc: dict[str, RtviPeerSession] = {}
        """``pc_id`` → its peer, for renegotiation and trickled candidates."""

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/start", self._start)
        app.router.add_get("/status", self._status)
        app.router.add_post("/sessions/{start_id}/api/offer", self._session_offer)
        app.router.add_patch("/sessions/{start_id}/api/offer", self._session_patch)
        app.router.add_patch("/api/offer", self._patch)
        prebuilt = _prebuilt_dir()
        if prebuilt is not None:
            app.router.add_get("/client", _redirect_to_client)
            app.router.add_get("/client/", _prebuilt_index(prebuilt))
            app.router.add_static("/client/", prebuilt, show_index=False)

    def forget(self, peer: BusSession) -> None:
        pc_id = getattr(peer, "pc_id", None)
        if pc_id is not None and self.by_pc.get(pc_id) is peer:
            del self.by_pc[pc_id]

    # --- /start ---------------------------------------------------------------------------

    async def _start(self, request: web.Request) -> web.Response:
        gateway = self.gateway
        if gateway.draining:
            return _error(503, "gateway is draining; try another replica")
        body = await _json_body(request, required=False)
        if isinstance(body, web.Response):
            return body
        transport = body.get("transport", "webrtc")
        if transport != "webrtc":
            return _error(400, f"this gateway serves the webrtc transport, not {_shown(transport)}"
                               " (phone calls: /phone/...)")
        data = body.get("body", body)  # the runner's {"body": ...} or requestData itself
        if not isinstance(data, dict):
            return _error(400, "body must be a JSON object")
        agent = data.get("agent")
        if agent is not None and (not isinstance(agent, str) or not AGENT_NAME.match(agent)):
            return _error(400, f"agent must be an agent's name (1-64 of A-Z a-z 0-9 _ -), "
                               f"not {_shown(agent)}")
        token = _bearer(request) or data.get("token")
        if token is not None and not isinstance(token, str):
            return _error(401, f"the session token must be a string, not {_shown(token)}")
        if token:
            try:
                grant = gateway.tokens.check(token)
            except TokenError as e:
                return _error(401, str(e))
            if agent is not None and agent != grant.agent:
                return _error(403, f"this session token is for agent {grant.agent!r}, "
                                   f"not {agent!r}")
        elif gateway.settings.open_tokens:
            token, grant = gateway.tokens.mint(agent=agent or "chat")
        else:
            return _error(401, "this gateway needs a session token from the app server: "
                               'send it as "Authorization: Bearer <token>" or requestData.token')
        now = time.time()
        self.pending = {k: v for k, v in self.pending.items() if v[1] > now}
        if len(self.pending) >= MAX_PENDING:
            return _error(503, f"{len(self.pending)} started sessions wait for their offer; "
                               "try again later")
        start_id = str(uuid.uuid4())
        self.pending[start_id] = (token, grant.expires_at)
        return web.json_response({"sessionId": start_id,
                                  "iceConfig": {"iceServers": self._ice_servers()}})

    def _ice_servers(self) -> list[dict]:
        """The gateway's own servers, so both peers gather against the same STUN and TURN."""
        return [{"urls": s.urls} for s in self.gateway.rtc_configuration().iceServers or []]

    async def _status(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ready", "transports": ["webrtc"]})

    # --- offers ---------------------------------------------------------------------------

    async def _session_offer(self, request: web.Request) -> web.Response:
        body = await _json_body(request, required=True)
        if isinstance(body, web.Response):
            return body
        return await self.offer(request, body, start_id=request.match_info["start_id"])

    async def offer(self, request: web.Request, body: dict,
                    start_id: str | None) -> web.Response:
        """A Pipecat client's offer: the first on a ``sessionId`` starts the session, one
        naming a ``pc_id`` renegotiates that peer connection (``restart_pc``: replaces it)."""
        gateway = self.gateway
        if gateway.draining:
            return _error(503, "gateway is draining; try another replica")
        try:
            offer = SmallWebRTCRequest.from_dict(dict(body))
        except TypeError as e:
            return _error(400, f"not a SmallWebRTC offer: {e}")
        if (not isinstance(offer.sdp, str) or not offer.sdp.strip() or offer.type != "offer"
                or not isinstance(offer.pc_id, str | None)
                or not isinstance(offer.restart_pc, bool | None)):
            return _error(400, 'expected {"sdp": "<offer SDP>", "type": "offer", '
                               '"pc_id": null or a string, "restart_pc": null or a boolean}')
        if offer.pc_id is not None:
            peer = self.by_pc.get(offer.pc_id)
            if peer is None or (start_id is not None and peer.start_id != start_id):
                return _error(404, f"no peer connection {_shown(offer.pc_id)} here")
            try:
                if offer.restart_pc:  # the client's new RTCPeerConnection for this session
                    answer = await peer.restart(offer.sdp, offer.type)
                else:
                    answer = await peer.renegotiate(offer.sdp, offer.type)
            except Exception as e:  # a bad offer: refused (a failed restart ended the session)
                log.warning("refused %s of %s: %s: %s",
                            "restart" if offer.restart_pc else "renegotiation", peer.session,
                            type(e).__name__, e)
                return _error(400, f"cannot accept this offer: {type(e).__name__}: {e}")
            return web.json_response({"sdp": answer.sdp, "type": answer.type,
                                      "pc_id": peer.pc_id})
        if start_id is not None:
            token = self.pending.pop(start_id, (None, 0.0))[0]
            if token is None:
                return _error(404, f"no started session {_shown(start_id)} waits for an offer "
                                   "(already connected, expired, or never started): call /start")
        else:
            data = offer.request_data if isinstance(offer.request_data, dict) else {}
            token = _bearer(request) or data.get("token")
            if not isinstance(token, str | None):
                return _error(401, f"the session token must be a string, not {_shown(token)}")
        try:
            grant = gateway.tokens.redeem(token)
        except TokenError as e:
            return _error(401, str(e))
        peer = RtviPeerSession(gateway, grant, start_id=start_id)
        answer = await gateway.open_peer(peer, offer.sdp, offer.type)
        if isinstance(answer, web.Response):
            return answer
        self.by_pc[peer.pc_id] = peer
        return web.json_response({"sdp": answer.sdp, "type": answer.type, "pc_id": peer.pc_id})

    # --- trickle ICE ----------------------------------------------------------------------

    async def _session_patch(self, request: web.Request) -> web.Response:
        return await self._patch(request, request.match_info["start_id"])

    async def _patch(self, request: web.Request, start_id: str | None = None) -> web.Response:
        body = await _json_body(request, required=True)
        if isinstance(body, web.Response):
            return body
        try:
            patch = SmallWebRTCPatchRequest(
                pc_id=body["pc_id"],
                candidates=[IceCandidate(**c) for c in body.get("candidates") or []])
        except (KeyError, TypeError) as e:
            return _error(400, 'expected {"pc_id": "...", "candidates": [{"candidate", '
                               f'"sdp_mid", "sdp_mline_index"}}, ...]}}: {type(e).__name__}: {e}')
        peer = self.by_pc.get(patch.pc_id) if isinstance(patch.pc_id, str) else None
        if peer is None or (start_id is not None and peer.start_id != start_id):
            return _error(404, f"no peer connection {_shown(patch.pc_id)} here")
        for c in patch.candidates:
            if not isinstance(c.candidate, str) or not isinstance(c.sdp_mid, str | None) \
                    or not isinstance(c.sdp_mline_index, int | None):
                return _error(400, f"not an ICE candidate: {_shown(c.candidate)}")
            try:
                await peer.add_ice_candidate(c.candidate, c.sdp_mid, c.sdp_mline_index)
            except Exception as e:  # a garbled candidate: the others (and the peer) stand
                return _error(400, f"cannot add ICE candidate {_shown(c.candidate)}: "
                                   f"{type(e).__name__}: {e}")
        return web.json_response({"status": "success"})


def _bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    return auth[7:].strip() or None if auth[:7].lower() == "bearer " else None


def _prebuilt_dir() -> Path | None:
    """Pipecat's prebuilt page's built files, when ``pipecat-ai-small-webrtc-prebuilt`` is
    installed (it is optional: the page loads Daily's bundle from a CDN, so it needs the
    network)."""
    spec = importlib.util.find_spec(PREBUILT)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for index in sorted(Path(root).rglob("index.html")):
            return index.parent
    return None


async def _redirect_to_client(_request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/client/")


def _prebuilt_index(folder: Path):
    async def index(_request: web.Request) -> web.StreamResponse:
        return web.FileResponse(folder / "index.html", headers={"Cache-Control": "no-cache"})
    return index

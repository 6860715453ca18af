"""Media gateway: serves the page, hands out session tokens, terminates WebRTC, bridges to NATS.

HTTP API (JSON):
    GET  /                 the page (static files under ``web/``, no build step)
    POST /api/token        {"agent"?} → {"token", "session", "expires_in"}   (VOXBUS_OPEN_TOKENS)
    POST /api/offer        {"sdp", "type": "offer", "token"} → {"sdp", "type": "answer", "session"}
    /phone/...             phone calls over providers' WebSocket media streams (phone_http.py)
    /start, /sessions/..   Pipecat's SmallWebRTC signaling, RTVI on the data channel
                           (pipecat_http.py; an /api/offer body with "pc_id" is Pipecat's too)
Errors are ``{"error": "...", "detail": "..."}`` with 400 (bad offer), 401 (token), 403, 405,
409, 413 (body over 256 KB), 415 (a body that is not ``application/json``), 503 (no
orchestrator); never a page.
Our page's signaling is non-trickle: it waits for ICE gathering before it posts the offer.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import web
from aiortc import RTCConfiguration, RTCIceServer, RTCSessionDescription

from services.media_gateway.bus_session import BusSession
from services.media_gateway.http_json import AGENT_NAME, MAX_BODY
from services.media_gateway.http_json import error as _error
from services.media_gateway.http_json import json_body as _json_body
from services.media_gateway.http_json import shown as _shown
from services.media_gateway.peer import PeerSession
from services.media_gateway.phone_http import add_phone_routes
from services.media_gateway.pipecat_http import PipecatSignaling
from services.media_gateway.tokens import TokenAuthority, TokenError, generate_secret
from voxbus.errors import VoxbusError
from voxbus.liveness import Liveness
from voxbus.runner import Service
from voxbus.subjects import Stage

log = logging.getLogger("voxbus.gateway")

WEB_DIR = Path(__file__).parent / "web"
JSON_PATHS = ("/api/", "/start", "/sessions/")
"""Where every answer, refusals included, is JSON (our API and Pipecat's signaling)."""


class GatewayWorker(Service):
    stage = Stage.GATEWAY

    def __init__(self, settings=None):
        super().__init__(settings)
        secret = self.settings.gateway_secret or generate_secret()
        self.tokens = TokenAuthority(secret, ttl_s=self.settings.token_ttl_s)
        self.peers: dict[str, BusSession] = {}
        """Every session this replica carries: browsers' and phone calls'."""
        self.pipecat = PipecatSignaling(self)
        """Pipecat's SmallWebRTC signaling (``/start``, ``/sessions/{id}/api/offer``)."""
        self.http_port: int | None = None
        self._site_runner: web.AppRunner | None = None
        self.liveness: Liveness | None = None
        """The orchestrators' heartbeats: a new session goes to the least loaded."""

    def sessions(self) -> list[str]:
        return sorted(self.peers)

    def rtc_configuration(self) -> RTCConfiguration:
        urls = [u.strip() for u in self.settings.ice_servers.split(",") if u.strip()]
        return RTCConfiguration(iceServers=[RTCIceServer(urls=u) for u in urls])

    def forget(self, peer: BusSession) -> None:
        if self.peers.get(peer.session) is peer:
            del self.peers[peer.session]
        self.pipecat.forget(peer)

    @property
    def url(self) -> str:
        host = self.settings.http_host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{shown}:{self.http_port}/"

    # --- lifecycle ------------------------------------------------------------------

    async def on_start(self) -> None:
        self.liveness = await Liveness(self.bus, self.settings.lease_s).watch(Stage.ORCHESTRATOR)
        app = web.Application(client_max_size=MAX_BODY, middlewares=[_api_errors])
        app.router.add_get("/", self._index)
        app.router.add_static("/static/", WEB_DIR, show_index=False)
        app.router.add_post("/api/token", self._token)
        app.router.add_post("/api/offer", self._offer)
        add_phone_routes(app, self)
        self.pipecat.add_routes(app)
        self._site_runner = web.AppRunner(app, access_log=None)
        await self._site_runner.setup()
        site = web.TCPSite(self._site_runner, self.settings.http_host, self.settings.http_port)
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("%s serving %s (phone calls: %sphone/twilio/answer, see README)",
                 self.worker_id, self.url, self.url)

    async def on_drain(self) -> None:
        for peer in list(self.peers.values()):
            await peer.close("gateway draining")

    async def on_stop(self) -> None:
        await self.on_drain()
        if self._site_runner:
            await self._site_runner.cleanup()
        if self.liveness:
            await self.liveness.close()

    # --- HTTP -------------------------------------------------------------------------

    async def _index(self, _request: web.Request) -> web.StreamResponse:
        return web.FileResponse(WEB_DIR / "index.html",
                                headers={"Cache-Control": "no-cache"})

    async def _token(self, request: web.Request) -> web.Response:
        if not self.settings.open_tokens:
            return _error(403, "this gateway does not hand out tokens; ask the app server")
        body = await _json_body(request, required=False)
        if isinstance(body, web.Response):
            return body
        agent = body.get("agent") or "chat"
        if not isinstance(agent, str) or not AGENT_NAME.match(agent):
            return _error(400, f"agent must be an agent's name (1-64 of A-Z a-z 0-9 _ -), "
                               f"not {_shown(agent)}")
        token, grant = self.tokens.mint(agent=agent)
        return web.json_response({"token": token, "session": grant.session,
                                  "expires_in": self.settings.token_ttl_s})

    async def _offer(self, request: web.Request) -> web.Response:
        if self.draining:
            return _error(503, "gateway is draining; try another replica")
        body = await _json_body(request, required=True)
        if isinstance(body, web.Response):
            return body
        if "pc_id" in body:  # Pipecat's SmallWebRTC client, straight to /api/offer
            return await self.pipecat.offer(request, body, start_id=None)
        sdp, kind = body.get("sdp"), body.get("type", "offer")
        if not isinstance(sdp, str) or not sdp.strip() or kind != "offer":
            return _error(400, 'expected {"sdp": "<offer SDP>", "type": "offer", "token": ...}')
        token = body.get("token")
        if token is not None and not isinstance(token, str):
            return _error(401, f"the session token must be a string, not {_shown(token)}")
        try:
            grant = self.tokens.redeem(token)
        except TokenError as e:
            return _error(401, str(e))
        answer = await self.open_peer(PeerSession(self, grant), sdp, kind)
        if isinstance(answer, web.Response):
            return answer
        return web.json_response({"sdp": answer.sdp, "type": answer.type,
                                  "session": grant.session})

    async def open_peer(self, peer: PeerSession, sdp: str,
                        kind: str) -> RTCSessionDescription | web.Response:
        """Answer a first offer: the session starts on the bus, or the refusal says why."""
        if len(self.peers) >= self.settings.gateway_max_sessions:
            return _error(503, f"gateway full ({len(self.peers)} sessions); try another replica")
        if peer.session in self.peers:
            return _error(409, f"session {peer.session} is already connected")
        self.peers[peer.session] = peer
        try:
            answer = await peer.answer(sdp, kind)
        except VoxbusError as e:  # no orchestrator answered, or it could not start the session
            await peer.close("session not started")
            status = 400 if e.code == "bad_agent" else 503
            return _error(status, f"cannot start the session: {e}")
        except Exception as e:  # garbage SDP, no audio, DTLS setup: the offer is what was bad
            await peer.close("bad offer")
            log.warning("refused offer for %s: %s: %s", peer.session, type(e).__name__, e)
            return _error(400, f"cannot accept this offer: {type(e).__name__}: {e}")
        log.info("%s: session %s connected (agent %s, %s)", self.worker_id, peer.session,
                 peer.agent, peer.caller)
        return answer


@web.middleware
async def _api_errors(request: web.Request, handler) -> web.StreamResponse:
    """The API answers in JSON whatever goes wrong: aiohttp's own refusals (405, 404, 413) and,
    should a handler ever fail, a 500 saying so rather than a page."""
    if not request.path.startswith(JSON_PATHS):
        return await handler(request)
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error(e.status, e.reason)
    except Exception as e:
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, f"internal error: {type(e).__name__}")

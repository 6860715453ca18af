"""The gateway's phone routes: the call webhook's answer and the media stream's WebSocket.

    POST /phone/{provider}/answer[?agent=NAME]   the provider's call webhook (Twilio TwiML,
                                                 Telnyx TeXML, Plivo XML; Exotel: GET or POST,
                                                 JSON {"url"}): points the call at the stream
    GET  /phone/{provider}/stream/{token}        the WebSocket media stream (wss behind a tunnel)

The answer mints a single-use session token (``tokens.py``, the page's kind) into the stream's
URL, so only a call that went through the answer can open a stream, and only once; with
``VOXBUS_TWILIO_AUTH_TOKEN`` set, Twilio's answer first checks ``X-Twilio-Signature``, so only
Twilio can get one (and with ``VOXBUS_TELNYX_PUBLIC_KEY``, Telnyx's its Ed25519 signature).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web

from services.media_gateway.phone import PhoneCall
from services.media_gateway.telephony import PROVIDERS, Telnyx, Twilio
from services.media_gateway.tokens import TokenError

if TYPE_CHECKING:
    from services.media_gateway.worker import GatewayWorker

log = logging.getLogger("voxbus.gateway.phone")

MAX_MESSAGE = 64 * 1024
"""A stream message: 20 ms of μ-law is ~300 bytes of JSON, a start message a few KB."""
AGENT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def add_phone_routes(app: web.Application, gateway: GatewayWorker) -> None:
    phone = PhoneRoutes(gateway)
    app.router.add_post("/phone/{provider}/answer", phone.answer)
    app.router.add_get("/phone/{provider}/answer", phone.answer)
    app.router.add_get("/phone/{provider}/stream/{token}", phone.stream)


class PhoneRoutes:
    def __init__(self, gateway: GatewayWorker):
        self.gateway = gateway
        self.settings = gateway.settings

    async def answer(self, request: web.Request) -> web.Response:
        provider = PROVIDERS.get(request.match_info["provider"])
        if provider is None:
            return _text(404, f"no phone provider {request.match_info['provider'][:40]!r}: "
                              f"use one of {', '.join(PROVIDERS)}")
        if request.method == "GET" and provider.name != "exotel":
            return _text(405, f"{provider.title}: the call webhook is a POST")
        if self.gateway.draining:
            return _text(503, "gateway is draining; try another replica")
        raw = await request.read()
        form = await request.post() if request.method == "POST" else {}
        public = self.public_url(request)
        if isinstance(provider, Telnyx) and self.settings.telnyx_public_key:
            problem = telnyx_signature_problem(self.settings.telnyx_public_key, request.headers,
                                               raw)
            if problem:
                log.warning("refused a Telnyx webhook for %s: %s", public, problem)
                return _text(403, f"Telnyx signature: {problem}")
        if isinstance(provider, Twilio) and self.settings.twilio_auth_token:
            signature = request.headers.get("X-Twilio-Signature", "")
            if not twilio_signature_ok(self.settings.twilio_auth_token, public, form,
                                       signature):
                log.warning("refused a Twilio webhook for %s: X-Twilio-Signature %s", public,
                            "missing" if not signature else "does not match")
                return _text(403, "X-Twilio-Signature missing or wrong for this URL "
                                  "(is VOXBUS_PHONE_PUBLIC_URL the URL Twilio calls?)")
        agent = request.query.get("agent") or self.settings.phone_agent
        if not AGENT_NAME.match(agent):
            return _text(400, "agent must be an agent's name (1-64 of A-Z a-z 0-9 _ -)")
        token, grant = self.gateway.tokens.mint(agent=agent)
        scheme, netloc = urlsplit(public)[:2]
        ws_scheme = "wss" if scheme == "https" else "ws"
        stream_url = f"{ws_scheme}://{netloc}/phone/{provider.name}/stream/{token}"
        body, content_type = provider.answer(stream_url, {"agent": agent,
                                                          "session": grant.session})
        log.info("%s: %s call %s answered: session %s, agent %s", self.gateway.worker_id,
                 provider.name, str(form.get("CallSid") or form.get("CallUUID") or "?")[:64],
                 grant.session, agent)
        return web.Response(text=body, content_type=content_type)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        gateway = self.gateway
        provider = PROVIDERS.get(request.match_info["provider"])
        if provider is None:
            return _text(404, f"no phone provider {request.match_info['provider'][:40]!r}")
        if gateway.draining:
            return _text(503, "gateway is draining; try another replica")
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, heartbeat=None)
        if not ws.can_prepare(request).ok:
            return _text(400, "expected a WebSocket upgrade (the provider's media stream)")
        try:
            grant = gateway.tokens.redeem(request.match_info["token"])
        except TokenError as e:
            log.warning("refused a %s stream: %s", provider.name, e)
            return _text(401, f"{e}: the stream URL comes from /phone/{provider.name}/answer")
        if len(gateway.peers) >= self.settings.gateway_max_sessions:
            return _text(503, f"gateway full ({len(gateway.peers)} sessions)")
        if grant.session in gateway.peers:
            return _text(409, f"session {grant.session} is already connected")
        await ws.prepare(request)
        call = PhoneCall(gateway, ws, provider, grant)
        gateway.peers[grant.session] = call
        await call.run()
        return ws

    def public_url(self, request: web.Request) -> str:
        """The URL the provider requested: VOXBUS_PHONE_PUBLIC_URL's host, else what the
        tunnel forwarded (``X-Forwarded-Proto``/``-Host``), else the request's own."""
        base = self.settings.phone_public_url
        if base:
            scheme, netloc, path = urlsplit(base)[:3]
            return urlunsplit((scheme, netloc, path.rstrip("/") + request.path,
                               request.query_string, ""))
        scheme = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip()
        host = request.headers.get("X-Forwarded-Host", request.host).split(",")[0].strip()
        return urlunsplit((scheme, host, request.path, request.query_string, ""))


def twilio_signature_ok(auth_token: str, url: str, form, signature: str) -> bool:
    """Twilio's webhook signature: HMAC-SHA1 over the URL and the sorted form fields, base64;
    tried with and without the URL's default port, as Twilio's own validator does."""
    if not signature:
        return False
    pairs = sorted((str(k), str(v)) for k, v in form.items())
    payload = "".join(k + v for k, v in pairs)
    for candidate in _url_variants(url):
        mac = hmac.new(auth_token.encode(), (candidate + payload).encode(), hashlib.sha1)
        if hmac.compare_digest(base64.b64encode(mac.digest()).decode(), signature):
            return True
    return False


def twilio_signature(auth_token: str, url: str, form: dict[str, str]) -> str:
    """What Twilio would send for this request (for tests and for checking a setup by hand)."""
    payload = "".join(k + v for k, v in sorted(form.items()))
    mac = hmac.new(auth_token.encode(), (url + payload).encode(), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode()


TELNYX_TOLERANCE_S = 300
"""A Telnyx signature older (or newer) than this is a replay: refused."""


def telnyx_signature_problem(public_key_b64: str, headers, body: bytes) -> str | None:
    """Telnyx signs ``{telnyx-timestamp}|{raw body}`` with the account's Ed25519 key; None if
    the request's signature is good, else what is wrong with it."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    signature, stamp = headers.get("telnyx-signature-ed25519"), headers.get("telnyx-timestamp")
    if not signature or not stamp:
        return "telnyx-signature-ed25519 or telnyx-timestamp missing"
    try:
        age = abs(time.time() - int(stamp))
        sig = base64.b64decode(signature, validate=True)
    except (ValueError, binascii.Error):
        return "telnyx-timestamp or telnyx-signature-ed25519 malformed"
    if age > TELNYX_TOLERANCE_S:
        return f"timestamp {age:.0f} s away from now (a replay?)"
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))
    try:
        key.verify(sig, stamp.encode() + b"|" + body)
    except InvalidSignature:
        return "does not match (is VOXBUS_TELNYX_PUBLIC_KEY your account's public key?)"
    return None


def _url_variants(url: str) -> list[str]:
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    host = parts.hostname or ""
    bare = urlunsplit(parts._replace(netloc=host))
    with_port = urlunsplit(parts._replace(netloc=f"{host}:{parts.port or default}"))
    return list(dict.fromkeys([url, bare, with_port]))


def _text(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n")

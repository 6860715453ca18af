"""What the gateway refuses, and that it keeps serving afterwards."""

from __future__ import annotations

import time

import aiohttp
import jwt
import pytest

from services.media_gateway.client import GatewayClient, GatewayError
from services.media_gateway.tokens import TokenAuthority, TokenError


async def _offer(client: GatewayClient, token: str | None) -> GatewayError:
    client.pc.addTrack(client.mic)
    await client.pc.setLocalDescription(await client.pc.createOffer())
    with pytest.raises(GatewayError) as err:
        await client.post("/api/offer", {"sdp": client.pc.localDescription.sdp, "type": "offer",
                                         "token": token})
    return err.value


@pytest.mark.parametrize("token", [None, "", "not.a.jwt"])
async def test_offer_without_valid_token_is_refused(lone_gateway, token):
    client = GatewayClient(lone_gateway.url)
    try:
        err = await _offer(client, token)
        assert err.status == 401 and "token" in err.message
    finally:
        await client.close()


async def test_token_signed_with_another_secret_is_refused(lone_gateway):
    forged, _ = TokenAuthority("someone-elses-secret-0123456789-abcdef").mint()
    client = GatewayClient(lone_gateway.url)
    try:
        err = await _offer(client, forged)
        assert err.status == 401 and "signature" in err.message.lower()
    finally:
        await client.close()


SECRET = "a-secret-of-enough-length-for-hs256!"


def test_expired_and_reused_tokens():
    authority = TokenAuthority(SECRET, ttl_s=60)
    token, grant = authority.mint(agent="restaurant")
    assert authority.redeem(token) == grant
    with pytest.raises(TokenError, match="already used"):
        authority.redeem(token)
    stale = jwt.encode({"sub": "s1", "jti": "j1", "exp": int(time.time()) - 5,
                        "aud": "voxbus-gateway"}, SECRET, algorithm="HS256")
    with pytest.raises(TokenError, match="expired"):
        authority.redeem(stale)


@pytest.mark.parametrize("body", [
    '{"sdp": "garbage", "type": "offer", "token": "%s"}',
    '{"sdp": "v=0\\r\\no=- 1 1 IN IP4 0.0.0.0\\r\\ns=-\\r\\nt=0 0\\r\\n", "type": "offer", '
    '"token": "%s"}',
    '{"sdp": "", "type": "offer", "token": "%s"}',
    '{"sdp": 42, "type": "answer", "token": "%s"}',
    '[1, 2, "%s"]',
    '{not json %s',
])
async def test_garbage_offers_get_a_clear_400(lone_gateway, body):
    client = GatewayClient(lone_gateway.url)
    try:
        token = await client.token()
        with pytest.raises(GatewayError) as err:
            await client.post("/api/offer", body % token)
        assert err.value.status == 400 and err.value.message
        assert lone_gateway.sessions() == []
        # ...and the gateway is still there for the next peer.
        assert (await client.token())
    finally:
        await client.close()


async def test_oversized_offer_is_refused(lone_gateway):
    async with aiohttp.ClientSession() as http:
        async with http.post(lone_gateway.url + "api/offer", data=b"x" * (1 << 20)) as res:
            assert res.status == 413


async def test_no_orchestrator_is_a_503(lone_gateway):
    client = GatewayClient(lone_gateway.url)
    try:
        client.pc.addTrack(client.mic)
        await client.pc.setLocalDescription(await client.pc.createOffer())
        token = await client.token()
        with pytest.raises(GatewayError) as err:
            await client.post("/api/offer", {"sdp": client.pc.localDescription.sdp,
                                             "type": "offer", "token": token})
        assert err.value.status == 503 and "orchestrator" in err.value.message
        assert lone_gateway.sessions() == []
    finally:
        await client.close()


async def test_closed_token_endpoint(settings):
    from dataclasses import replace

    from services.media_gateway.worker import GatewayWorker

    gw = GatewayWorker(replace(settings, http_port=0, open_tokens=False))
    await gw.start()
    client = GatewayClient(gw.url)
    try:
        with pytest.raises(GatewayError) as err:
            await client.token()
        assert err.value.status == 403
    finally:
        await client.close()
        await gw.stop()

"""What a phone stream or call webhook gets wrong: refused with a reason the provider's logs
show (HTTP status, WebSocket close code and text, an ErrorEvent on the session), and the
gateway goes on serving the next call."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import replace

import aiohttp
import pytest
from hypothesis import strategies as st

from services.media_gateway.phone import CLOSE_PROTOCOL, CLOSE_UNAVAILABLE
from services.media_gateway.worker import GatewayWorker
from tests.faults.test_fuzz_frames import draw
from tests.phone.provider_call import ProviderCall
from tests.phone.test_twilio_call import final_text, live_call, released, started
from voxbus.wire import ErrorEvent, SessionEnd


async def refused_stream(gateway, first_messages: list) -> ProviderCall:
    """A call that went through the answer, then sent these instead of a proper start."""
    call = ProviderCall(gateway.url)
    await call.connect(start=False)
    for message in first_messages:
        await call.send(message)
    await call.wait_for(lambda c: c.close_code is not None, 15, "the gateway closing it")
    await call.close()
    return call


async def test_bad_streams_before_start_are_closed_with_the_reason(lone_gateway):
    gw = lone_gateway
    cases = [
        (["{not json"], "not JSON"),
        ([json.dumps([1, 2, 3])], "not a JSON object"),
        ([{"event": "media", "media": {"payload": "//8="}}], "'media' before the start"),
        ([{"event": "hello"}], "'hello' before the start"),
        ([{"event": "connected"}, {"event": "start", "start": {"callSid": "CA1"}}],
         "stream id"),
        ([b"\x00\x01binary"], "binary"),
    ]
    for messages, reason in cases:
        call = await refused_stream(gw, messages)
        assert call.close_code == CLOSE_PROTOCOL, (messages, call.close_code)
        assert reason in call.close_reason, (reason, call.close_reason)
    # A proper start with no orchestrator to take the session: 4503, and said so.
    call = ProviderCall(gw.url)
    await call.connect()
    await call.wait_for(lambda c: c.close_code is not None, 30, "the gateway closing it")
    assert call.close_code == CLOSE_UNAVAILABLE and "cannot start" in call.close_reason
    await call.close()
    assert not gw.peers  # nothing half-open left behind


async def test_stream_urls_need_a_fresh_token_from_the_answer(lone_gateway):
    gw = lone_gateway
    async with aiohttp.ClientSession() as http:
        base = gw.url.replace("http://", "ws://")
        for token, status in (("nonsense", 401), ("", 404)):
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await http.ws_connect(f"{base}phone/twilio/stream/{token}")
            assert e.value.status == status
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await http.ws_connect(f"{base}phone/nokia/stream/abc")
        assert e.value.status == 404
        # The answer's token opens one stream, once:
        call = ProviderCall(gw.url)
        await call.answer()
        async with http.get(call.stream_url.replace("ws://", "http://")) as r:
            assert r.status == 400 and "WebSocket" in await r.text()  # not an upgrade
        ws = await http.ws_connect(call.stream_url)
        await ws.close()
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await http.ws_connect(call.stream_url)  # used once already
        assert e.value.status == 401
        async with http.post(f"{gw.url}phone/nokia/answer") as r:
            assert r.status == 404 and "twilio" in await r.text()
        async with http.post(f"{gw.url}phone/twilio/answer?agent=../../etc") as r:
            assert r.status == 400
        async with http.get(f"{gw.url}phone/twilio/answer") as r:
            assert r.status == 405
        async with http.get(f"{gw.url}phone/exotel/answer") as r:  # Exotel: just a URL
            assert r.status == 200
            url = (await r.json())["url"]
            assert url.startswith(f"{base}phone/exotel/stream/")
        await call.close()


def twilio_sign(token: str, url: str, form: dict[str, str]) -> str:
    """Twilio's documented scheme, written out here independently of the gateway's."""
    data = url + "".join(f"{k}{form[k]}" for k in sorted(form))
    return base64.b64encode(hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()
                            ).decode()


async def test_twilio_signature_is_checked_when_an_auth_token_is_set(settings):
    auth = "f" * 32
    public = "https://voxbus.example.ngrok.app"
    gw = GatewayWorker(replace(settings, http_port=0, twilio_auth_token=auth,
                               phone_public_url=public))
    await gw.start()
    try:
        form = {"CallSid": "CA123", "AccountSid": "AC123", "From": "+15550001111",
                "To": "+15550002222"}
        url = f"{public}/phone/twilio/answer?agent=chat"
        async with aiohttp.ClientSession() as http:
            endpoint = f"{gw.url}phone/twilio/answer?agent=chat"
            for headers in ({}, {"X-Twilio-Signature": "bm9wZQ=="},
                            {"X-Twilio-Signature": twilio_sign(auth, url + "&x=1", form)},
                            {"X-Twilio-Signature": twilio_sign("g" * 32, url, form)}):
                async with http.post(endpoint, data=form, headers=headers) as r:
                    assert r.status == 403, headers
                    assert "X-Twilio-Signature" in await r.text()
            good = {"X-Twilio-Signature": twilio_sign(auth, url, form)}
            async with http.post(endpoint, data=form, headers=good) as r:
                assert r.status == 200, await r.text()
                twiml = await r.text()
            # A tampered form (another caller id) no longer matches.
            async with http.post(endpoint, data={**form, "From": "+15559999999"},
                                 headers=good) as r:
                assert r.status == 403
        assert "<Connect><Stream url=\"wss://voxbus.example.ngrok.app/phone/twilio/stream/" \
            in twiml, twiml
        assert '<Parameter name="agent" value="chat"/>' in twiml
    finally:
        await gw.stop()


async def test_telnyx_signature_is_checked_when_a_public_key_is_set(settings):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.generate()
    public = base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
    gw = GatewayWorker(replace(settings, http_port=0, telnyx_public_key=public.decode()))
    await gw.start()
    try:
        body = b"CallSid=v3:abc&From=%2B15550001111"
        endpoint = f"{gw.url}phone/telnyx/answer"

        def signed(stamp: int, payload: bytes = body, by=key) -> dict[str, str]:
            signature = by.sign(str(stamp).encode() + b"|" + payload)
            return {"telnyx-signature-ed25519": base64.b64encode(signature).decode(),
                    "telnyx-timestamp": str(stamp),
                    "Content-Type": "application/x-www-form-urlencoded"}

        now = int(time.time())
        async with aiohttp.ClientSession() as http:
            for headers, data in (
                    ({"Content-Type": "application/x-www-form-urlencoded"}, body),  # unsigned
                    (signed(now), body + b"&To=1"),  # another body
                    (signed(now - 3600), body),  # an hour-old replay
                    (signed(now, by=Ed25519PrivateKey.generate()), body),  # another key
                    ({**signed(now), "telnyx-signature-ed25519": "%%%"}, body)):
                async with http.post(endpoint, data=data, headers=headers) as r:
                    assert r.status == 403, (headers, await r.text())
                    assert "Telnyx signature" in await r.text()
            async with http.post(endpoint, data=body, headers=signed(now)) as r:
                assert r.status == 200, await r.text()
                assert "/phone/telnyx/stream/" in await r.text()
    finally:
        await gw.stop()


@pytest.mark.slow
async def test_bad_messages_mid_call_are_reported_and_the_gateway_goes_on(gateway, stages, bus,
                                                                         lines):
    call = ProviderCall(gateway.url)
    try:
        session, watch = await live_call(call, stages, bus)
        bad = ["{garbage", json.dumps({"event": "sing", "song": "la"}), json.dumps([1]),
               json.dumps({"event": "media", "media": {}}),
               json.dumps({"event": "media", "media": {"payload": "%%%notbase64"}}),
               json.dumps(call.start_message()), b"\x00binary"]
        for message in bad:
            await call.send(message)
        def reported(w):
            found = [e for e in w.of(ErrorEvent) if e.code == "bad_message"]
            return found if len(found) >= len(bad) else None

        errors = await watch.wait(reported, 15, "one error event per bad message")
        assert len(errors) == len(bad), [e.message for e in errors]
        text = " | ".join(e.message for e in errors)
        for expected in ("not JSON", "unknown event 'sing'", "without media.payload",
                         "not base64", "second start", "binary"):
            assert expected in text, (expected, text)
        assert all(e.service == gateway.worker_id for e in errors)
        # The call goes on: the caller is still heard.
        spoke_at = time.monotonic()
        call.say(lines["question"])
        await watch.wait(lambda w: "france" in final_text(w, spoke_at), 40, "the transcript")

        # An oversized message is the end of that call (close 1009), and only of that call.
        await call.send(json.dumps({"event": "media", "media": {"payload": "A" * 100_000}}))
        await call.wait_for(lambda c: c.close_code is not None, 10, "the socket closing")
        assert call.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        end = await watch.wait(lambda w: w.of(SessionEnd), 10, "SessionEnd")
        assert "1009" in end[0].reason and "exceeds limit" in end[0].reason, end[0].reason
        await released(gateway, stages, session)
    finally:
        await call.close()
    # ...and the next call is served.
    other = ProviderCall(gateway.url)
    try:
        await other.answer()
        await other.connect()
        await started(stages, other.parameters["session"])
    finally:
        await other.hang_up()


# --- fuzzed: provider-shaped messages with random fields -------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=8)
_events = st.sampled_from(["media", "start", "mark", "dtmf", "connected", "clear", "Media",
                           "playAudio", "", "x" * 300]) | st.text(max_size=12)
MESSAGES = st.one_of(
    st.text(max_size=200),
    _json.map(json.dumps),
    st.fixed_dictionaries({"event": _events}, optional={
        "media": st.fixed_dictionaries({}, optional={
            "payload": st.text(max_size=80) | st.binary(max_size=60).map(
                lambda b: base64.b64encode(b).decode()) | _json,
            "track": _json | st.just("inbound")}) | _json,
        "start": _json, "streamSid": _json, "mark": _json}).map(json.dumps),
)


async def test_fuzzed_first_messages_are_refused_and_the_gateway_goes_on(lone_gateway):
    for message in draw(MESSAGES, 40):
        # (A "connected" or "dtmf" is let pass: the garbage after it is what gets refused.)
        call = await refused_stream(lone_gateway, [message, "{garbage"])
        # Nothing random is a valid start: every one is refused with the protocol's code.
        assert call.close_code == CLOSE_PROTOCOL, (message, call.close_code, call.close_reason)
        assert call.close_reason
    assert not lone_gateway.peers
    call = ProviderCall(lone_gateway.url)  # ...and a proper call still gets as far as it can
    await call.connect()
    await call.wait_for(lambda c: c.close_code is not None, 30, "the gateway closing it")
    assert call.close_code == CLOSE_UNAVAILABLE
    await call.close()


@pytest.mark.slow
async def test_fuzzed_messages_mid_call_leave_the_call_working(gateway, stages, bus, lines):
    call = ProviderCall(gateway.url)
    try:
        session, watch = await live_call(call, stages, bus)
        messages = [m for m in draw(MESSAGES, 60) if '"stop"' not in m][:15]  # < 20 bad ones
        for message in messages:
            await call.send(message)
        spoke_at = time.monotonic()
        call.say(lines["question"])
        await watch.wait(lambda w: "france" in final_text(w, spoke_at), 40, "the transcript")
        assert session in gateway.sessions() and call.close_code is None
        errors = watch.of(ErrorEvent)
        assert errors and {e.code for e in errors} == {"bad_message"}, errors
        await call.hang_up()
        await released(gateway, stages, session)
    finally:
        await call.close()

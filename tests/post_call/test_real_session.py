"""A real session (Piper speech in, Whisper, Smart Turn, the orchestrator, Piper out; the LLM
stage on the scripted endpoint) ends, and its post-call result reaches the webhook signed, with
the fields and the transcript; ``voxbus transcript`` prints it, ``voxbus sessions`` and the
control plane's GetSession show the result. Then the same with the post-call stage a real
``voxbus post_call`` process that was SIGKILLed before the session ended."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import replace

import grpc
import pytest

from services.orchestrator.worker import OrchestratorWorker
from services.post_call.signature import verify
from services.stt.worker import SttWorker
from services.tts.worker import TtsWorker
from tests.post_call.conftest import AGENT_REPLY, FIELDS, SECRET, until
from voxbus.control.auth import bearer
from voxbus.control.protos import pb, rpc
from voxbus.control.service import ControlService
from voxbus.talk import talk
from voxbus.turns import normalize

pytestmark = pytest.mark.slow

SAID = "A table for four people on Friday, please."
TOKEN = "post-call-control-token-0123456789"


@pytest.fixture
async def voice_stages(pc_settings, llm):
    """STT, TTS and an orchestrator beside the scripted LLM stage (``llm``)."""
    services = [SttWorker(pc_settings), TtsWorker(pc_settings), OrchestratorWorker(pc_settings)]
    for svc in services:
        await svc.start()
    yield services
    for svc in reversed(services):
        await svc.stop()


def heard(text: str) -> bool:
    words = normalize(text)
    return "four" in words and "friday" in words


async def cli(settings, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXBUS_NATS_")}
    env.update(VOXBUS_PREFIX=settings.prefix, VOXBUS_CONTROL_FILE="/nonexistent/control.json")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voxbus.cli", *args, "--nats", settings.nats_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


async def test_a_real_session_is_extracted_delivered_signed_and_shown(
        pc_settings, recorder, voice_stages, receiver, script, speak):
    from services.post_call.stage import PostCallStage

    control = await ControlService(replace(pc_settings, worker_id="ctl", control_token=TOKEN,
                                           control_address="127.0.0.1:0")).start()
    try:
        async with PostCallStage(pc_settings):
            (turn,) = await talk(pc_settings.nats_url, [speak(SAID)], prefix=pc_settings.prefix,
                                 agent="booking", turn_timeout_s=30)
            assert heard(turn.user_text) and turn.bot_text == AGENT_REPLY, turn
            await asyncio.wait_for(receiver.got.wait(), 30)
        session = turn.session
        (hook,) = receiver.requests
        # Signed with the secret over the exact bytes received, and a receiver can dedupe.
        assert verify(SECRET, hook["raw"], hook["headers"]["Voxbus-Signature"]) > 0
        assert hook["key"] == f"post_call-{session}"
        assert hook["headers"]["Voxbus-Event"] == "post_call.completed"
        body = hook["body"]
        assert (body["type"], body["session"], body["agent"]) == (
            "post_call.completed", session, "booking")
        assert body["fields"] == FIELDS and body["error"] is None
        assert body["ended_reason"] == "done"
        lines = [(x["turn"], x["role"]) for x in body["transcript"]]
        assert lines == [(1, "user"), (1, "agent")], body["transcript"]
        assert heard(body["transcript"][0]["text"])
        assert body["transcript"][1]["text"] == AGENT_REPLY
        # The model was asked with the conversation the recording holds, and the schema.
        (asked,) = script.seen
        assert heard(asked["messages"][1]["content"]) and AGENT_REPLY in asked["messages"][1][
            "content"]
        assert "- party_size (integer, required): how many people" in asked["messages"][0][
            "content"]

        # voxbus transcript, as text and as JSON, from the recording.
        rc, out, err = await cli(pc_settings, "transcript", session)
        assert rc == 0, err
        text = out.splitlines()
        assert text[0] == f"session {session}"
        assert "turn 1" in text[1] and " user: " in text[1] and heard(text[1])
        assert text[2].endswith(f"agent: {AGENT_REPLY}") and len(text) == 3
        rc, out, err = await cli(pc_settings, "transcript", session, "--json")
        assert rc == 0, err
        data = json.loads(out)
        assert data["session"] == session
        assert [(x["turn"], x["role"]) for x in data["lines"]] == [(1, "user"), (1, "agent")]
        first, second = data["lines"]
        assert 0 < first["t_s"] < second["t_s"] < 30 and first["at_us"] < second["at_us"]
        assert set(first) == {"turn", "role", "text", "at_us", "t_s", "interrupted"}
        rc, out, err = await cli(pc_settings, "transcript", "nosuchsession")
        assert rc == 2 and "not in the recording stream" in err, (out, err)

        # voxbus sessions lists the result; GetSession shows it.
        rc, out, err = await cli(pc_settings, "sessions", "--json")
        assert rc == 0, err
        (listed,) = [json.loads(x) for x in out.splitlines()]
        assert listed["session"] == session and listed["agent"] == "booking"
        assert listed["post_call"]["status"] == "delivered"
        assert listed["post_call"]["fields"] == FIELDS
        rc, out, err = await cli(pc_settings, "sessions")
        assert f"post-call: delivered to webhook {receiver.url}" in out, out
        async with grpc.aio.insecure_channel(control.address) as channel:
            detail = await rpc.ControlStub(channel).GetSession(
                pb.GetSessionRequest(session=session), metadata=bearer(TOKEN))
        assert detail.session.id == session and detail.post_call.status == "delivered"
        assert json.loads(detail.post_call.fields_json) == FIELDS
        assert detail.post_call.target == f"webhook {receiver.url}"
    finally:
        await control.stop()


async def start_post_call(settings, n: int):
    """``voxbus post_call`` as its own process, ready (its consumer bound or being bound)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXBUS_NATS_")}
    env.update(VOXBUS_NATS_URL=settings.nats_url, VOXBUS_PREFIX=settings.prefix,
               VOXBUS_AGENTS_DIR=settings.agents_dir, VOXBUS_POST_CALL_SECRET=SECRET,
               VOXBUS_POST_CALL_BACKOFF_S="0.3,0.6", VOXBUS_WORKER_ID=f"p{n}",
               VOXBUS_CONTROL_FILE="/nonexistent/control.json")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voxbus.cli", "post_call", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT, env=env)
    line = b""
    while b" ready" not in line:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line, "voxbus post_call exited before it was ready"
    return proc


async def stop(proc) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def test_a_session_that_ends_while_the_stage_is_killed_is_delivered_when_it_returns(
        pc_settings, recorder, voice_stages, receiver, speak):
    first = await start_post_call(pc_settings, 1)
    try:
        js = recorder.js
        stream, durable = recorder.subjects.recording_stream(), "voxbus_post_call"
        await until(lambda: _consumer(js, stream, durable), 10, "the durable consumer")
        first.kill()  # SIGKILL: no drain, no goodbye
        await first.wait()
        (turn,) = await talk(pc_settings.nats_url, [speak(SAID)], prefix=pc_settings.prefix,
                             agent="booking", turn_timeout_s=30)
        assert heard(turn.user_text), turn
        # The end waits in the consumer; nobody delivered anything.
        await until(lambda: _pending(js, stream, durable), 10, "the session end, pending")
        await asyncio.sleep(1.0)
        assert receiver.requests == []
        second = await start_post_call(pc_settings, 2)
        try:
            await asyncio.wait_for(receiver.got.wait(), 30)
        finally:
            await stop(second)
    finally:
        await stop(first)
    (hook,) = receiver.requests
    assert hook["valid"] and hook["body"]["session"] == turn.session
    assert hook["body"]["fields"] == FIELDS
    assert heard(hook["body"]["transcript"][0]["text"])
    info = await js.consumer_info(stream, durable)
    assert info.num_pending == 0 and info.num_ack_pending == 0


async def _consumer(js, stream: str, durable: str):
    try:
        return await js.consumer_info(stream, durable)
    except Exception:
        return None


async def _pending(js, stream: str, durable: str) -> bool:
    info = await js.consumer_info(stream, durable)
    return info.num_pending + info.num_ack_pending > 0

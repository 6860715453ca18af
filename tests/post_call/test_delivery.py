"""Delivery mechanics on a real bus: retries with backoff and one delivery per session, giving
up with an ErrorEvent and a metric, NATS-subject delivery, a model's bad JSON, a session that
ended before any post-call replica ever ran, and a session end seen twice."""

from __future__ import annotations

import asyncio
import json
import uuid

from prometheus_client import REGISTRY

from services.post_call.signature import verify
from services.post_call.stage import PostCallStage
from tests.post_call.conftest import FIELDS, SECRET, played_session, until
from voxbus.post_call_results import ResultStore
from voxbus.subjects import Event
from voxbus.wire import ErrorEvent, PostCallResult, decode


def sid() -> str:
    return "pc" + uuid.uuid4().hex[:10]


async def record_of(recorder, settings, session: str):
    store = await ResultStore(recorder.js, settings.prefix).open()
    return await store.get(session) if store else None


async def errors_of(bus, session: str) -> list[ErrorEvent]:
    seen: list[ErrorEvent] = []

    async def on(msg):
        seen.append(decode(msg.data))

    await bus.nc.subscribe(bus.subjects.event(session, Event.ERROR), cb=on)
    await bus.sync()
    return seen


async def test_a_webhook_that_fails_twice_gets_the_result_once(pc_settings, recorder, llm,
                                                               receiver, script, bus):
    receiver.statuses = [500, 500]
    session = sid()
    errors = await errors_of(bus, session)
    async with PostCallStage(pc_settings):
        await played_session(bus, session, "booking")
        await until(lambda: receiver.delivered, 15, "the webhook's 200")
        await asyncio.sleep(1.0)  # nothing more comes: it was acked
    assert [r["status"] for r in receiver.requests] == [500, 500, 200]
    # Same idempotency key, same fields every time; the model was asked once.
    assert {r["key"] for r in receiver.requests} == {f"post_call-{session}"}
    assert all(r["valid"] for r in receiver.requests)
    assert [r["body"]["fields"] for r in receiver.requests] == [FIELDS] * 3
    assert len(script.seen) == 1
    record = await record_of(recorder, pc_settings, session)
    assert (record.status, record.attempts, record.fields) == ("delivered", 3, FIELDS)
    assert record.target == f"webhook {receiver.url}"
    retries = [e for e in errors if e.code == "post_call_retry"]
    assert len(retries) == 2 and "answered 500" in retries[0].message


async def test_a_webhook_that_never_answers_is_given_up_with_an_error_event(
        pc_settings, recorder, llm, receiver, bus):
    receiver.statuses = [503] * 10
    session = sid()
    errors = await errors_of(bus, session)
    before = REGISTRY.get_sample_value("voxbus_post_call_sessions_total",
                                       {"outcome": "given_up"}) or 0
    async with PostCallStage(pc_settings):
        await played_session(bus, session, "booking")
        await until(lambda: any(e.code == "post_call_failed" for e in errors), 15,
                    "the give-up ErrorEvent")
        await asyncio.sleep(1.0)
    # max deliveries = backoff waits + 1 = 3, then no more.
    assert [r["status"] for r in receiver.requests] == [503, 503, 503]
    record = await record_of(recorder, pc_settings, session)
    assert record.status == "failed" and record.attempts == 3
    assert "answered 503" in record.last_failure and record.fields == FIELDS
    (gave_up,) = [e for e in errors if e.code == "post_call_failed"]
    assert f"session {session} given up after 3 attempts" in gave_up.message
    assert REGISTRY.get_sample_value("voxbus_post_call_sessions_total",
                                     {"outcome": "given_up"}) == before + 1


async def test_nats_subject_delivery(pc_settings, recorder, llm, bus):
    session = sid()
    got: list[PostCallResult] = []

    async def on(msg):
        got.append(decode(msg.data))

    await bus.nc.subscribe(bus.subjects.post_call_delivery("crm"), cb=on)
    await bus.sync()
    async with PostCallStage(pc_settings):
        await played_session(bus, session, "booking_nats", reason="agent ended")
        await until(lambda: got, 15, "the PostCallResult on <p>.postcall.crm")
    (result,) = got
    assert (result.session, result.agent, result.fields, result.error) == (
        session, "booking_nats", FIELDS, None)
    assert result.id == f"post_call-{session}" and result.ended_reason == "agent ended"
    assert [(x["turn"], x["role"], x["text"]) for x in result.transcript] == [
        (1, "user", "A table for four on Friday, please."),
        (1, "agent", "A table for four on Friday, noted.")]
    record = await record_of(recorder, pc_settings, session)
    assert record.target == f"nats {bus.subjects.post_call_delivery('crm')}"


async def test_bad_json_gets_one_retry_with_the_error(pc_settings, recorder, llm, receiver,
                                                      script, bus):
    script.extractions = ["Sure! The party is four people.",
                          "```json\n" + json.dumps(FIELDS) + "\n```"]
    session = sid()
    async with PostCallStage(pc_settings):
        await played_session(bus, session, "booking")
        await until(lambda: receiver.delivered, 15, "the delivery")
    assert receiver.delivered[0]["body"]["fields"] == FIELDS
    assert len(script.seen) == 2
    retry = script.seen[1]["messages"]
    assert retry[-2] == {"role": "assistant", "content": "Sure! The party is four people."}
    assert "no JSON object in the reply" in retry[-1]["content"]


async def test_json_invalid_twice_is_delivered_with_an_error(pc_settings, recorder, llm,
                                                             receiver, script, bus):
    script.extractions = [json.dumps({"party_size": "four", "day": "Friday"})]
    session = sid()
    async with PostCallStage(pc_settings):
        await played_session(bus, session, "booking")
        await until(lambda: receiver.delivered, 15, "the delivery")
    body = receiver.delivered[0]["body"]
    assert body["fields"] is None
    assert "not valid after 2 tries" in body["error"]
    assert "party_size: expected integer, got string" in body["error"]
    assert len(script.seen) == 2


async def test_a_session_that_ended_before_any_replica_ran_is_processed(
        pc_settings, recorder, llm, receiver, bus):
    """No post-call replica has ever run on this prefix (no consumer yet): the session's end
    is in the recording, and the first replica to start finds it."""
    session = sid()
    await played_session(bus, session, "booking")
    await asyncio.sleep(0.5)
    assert receiver.requests == []
    async with PostCallStage(pc_settings):
        await until(lambda: receiver.delivered, 15, "the backlog's delivery")
    (hook,) = receiver.requests
    assert hook["body"]["session"] == session and hook["body"]["fields"] == FIELDS
    verify(SECRET, hook["raw"], hook["headers"]["Voxbus-Signature"])


async def test_a_second_session_end_and_agents_without_post_call(pc_settings, recorder, llm,
                                                                 receiver, script, bus):
    """An operator's EndSession after the agent's own end is one result, not two; a session
    of an agent with no post_call (or of no agent: a stage replay) is acked and left."""
    session, plain, bare = sid(), sid(), sid()
    async with PostCallStage(pc_settings) as stage:
        await played_session(bus, session, "booking")
        await until(lambda: receiver.delivered, 15, "the delivery")
        await played_session(bus, plain, "chat")
        from voxbus.wire import SessionEnd

        await bus.publish(bus.subjects.ctl(bare), SessionEnd(session=bare))
        await bus.publish(bus.subjects.ctl(session), SessionEnd(session=session,
                                                                reason="ended by operator"))
        await bus.nc.flush()
        info = await until(lambda: _drained(stage), 10, "every session end acked")
    assert len(receiver.requests) == 1 and len(script.seen) == 1
    assert info.num_pending == 0 and info.num_ack_pending == 0
    assert await record_of(recorder, pc_settings, plain) is None


async def _drained(stage: PostCallStage):
    info = await stage.js.consumer_info(stage.subjects.recording_stream(),
                                        stage.subjects.post_call_consumer())
    return info if info.num_pending == 0 and info.num_ack_pending == 0 else None


async def test_get_session_shows_a_result_the_control_plane_never_saw_live(
        pc_settings, recorder, llm, receiver, bus, tmp_path):
    """A control replica started after the session ended (and after its result was delivered)
    still answers GetSession for it, from the results bucket; a session nobody knows is
    NOT_FOUND."""
    from dataclasses import replace

    import grpc
    import pytest

    from tests.control.conftest import ctl, ctl_env
    from voxbus.control.auth import bearer
    from voxbus.control.protos import pb, rpc
    from voxbus.control.service import ControlService

    session = sid()
    async with PostCallStage(pc_settings):
        await played_session(bus, session, "booking")
        await until(lambda: receiver.delivered, 15, "the delivery")
    token = "control-token-" + "c" * 24
    control = await ControlService(replace(pc_settings, worker_id="ctl", control_token=token,
                                           control_address="127.0.0.1:0")).start()
    try:
        async with grpc.aio.insecure_channel(control.address) as channel:
            stub = rpc.ControlStub(channel)
            detail = await stub.GetSession(pb.GetSessionRequest(session=session),
                                           metadata=bearer(token))
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.GetSession(pb.GetSessionRequest(session=sid()),
                                      metadata=bearer(token))
        shown = await ctl(control.address, "session", session, token=token,
                          env=ctl_env(tmp_path))
    finally:
        await control.stop()
    assert (detail.session.id, detail.session.state, detail.session.agent) == (
        session, "ended", "booking")
    assert detail.post_call.status == "delivered" and detail.post_call.attempts == 1
    assert json.loads(detail.post_call.fields_json) == FIELDS
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert shown.rc == 0, shown.err
    assert (f"  post-call delivered (webhook {receiver.url}, 1 attempts): "
            + json.dumps(FIELDS)) in shown.out.splitlines(), shown.out


async def test_two_ends_at_once_make_one_result_and_replays_make_none(
        pc_settings, recorder, llm, receiver, script, bus):
    """Two ``SessionEnd``s of one session waiting together (two replicas' worth of fetchers
    take one each): one claims the session, the other leaves it. A session ``voxbus replay``
    fed into the live system ends with "replay done": no post to a real receiver."""
    from voxbus.wire import SessionEnd

    session, replayed = sid(), sid()
    await played_session(bus, session, "booking")
    await bus.publish(bus.subjects.ctl(session), SessionEnd(session=session,
                                                            reason="ended by operator"))
    await played_session(bus, replayed, "booking", reason="replay done")
    async with PostCallStage(pc_settings) as stage:
        assert stage.declared_capacity == 2
        await until(lambda: _drained(stage), 15, "every session end acked")
    assert len(receiver.requests) == 1 and len(script.seen) == 1
    assert receiver.requests[0]["body"]["session"] == session
    record = await record_of(recorder, pc_settings, session)
    # Which of the two claims first is a race: the result names that end's reason.
    assert record.status == "delivered"
    assert record.ended_reason in ("hangup", "ended by operator")
    assert receiver.requests[0]["body"]["ended_reason"] == record.ended_reason
    assert await record_of(recorder, pc_settings, replayed) is None


async def test_without_a_recording_stream_it_says_so_waits_and_stops_at_once(pc_settings,
                                                                            bus):
    """No recording on this prefix: an ErrorEvent on <p>.err says what post-call work needs,
    the replica keeps waiting for the stream, and a stop does not wait out the drain grace."""
    import time

    seen: list[ErrorEvent] = []

    async def on(msg):
        seen.append(decode(msg.data))

    await bus.nc.subscribe(bus.subjects.errors(), cb=on)
    await bus.sync()
    stage = await PostCallStage(pc_settings).start()
    try:
        await until(lambda: seen, 10, "the no_recording ErrorEvent")
    finally:
        started = time.monotonic()
        await stage.stop()
    assert time.monotonic() - started < 5
    assert seen[0].code == "no_recording" and "VOXBUS_RECORD=1" in seen[0].message

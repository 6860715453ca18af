"""Sessions through the control plane with real stages (the only tests here that load the STT
and TTS models): a real turn's latency figures in GetSession, EndSession ending a session in
every stage, and an orchestrator drained while it holds a session, which another adopts and
carries on."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from tests.conftest import bounded
from tests.control.conftest import ctl, ctl_env, until
from voxbus.control.protos import pb
from voxbus.stage_call import ask
from voxbus.subjects import Stage
from voxbus.talk import talk
from voxbus.wire import SessionStart

pytestmark = pytest.mark.slow
Kind = pb.Event.Kind


@pytest.fixture
async def stages(fast, endpoint):
    """STT, TTS and an LLM replica on the scripted endpoint; the test brings orchestrators."""
    from services.llm.worker import LlmWorker
    from services.stt.worker import SttWorker
    from services.tts.worker import TtsWorker

    services = [SttWorker(replace(fast, worker_id="s")), TtsWorker(replace(fast, worker_id="t")),
                LlmWorker(replace(fast, worker_id="l"), base_url=endpoint.base_url)]
    for svc in services:
        await svc.start()
    yield SimpleNamespace(stt=services[0], tts=services[1], llm=services[2])
    for svc in reversed(services):
        await svc.stop()


async def orchestrator(fast, worker_id: str, replicas: list):
    from services.orchestrator.worker import OrchestratorWorker

    worker = await OrchestratorWorker(replace(fast, worker_id=worker_id)).start()
    replicas.append(worker)
    return worker


async def test_a_real_turn_then_end_session_everywhere(fast, stages, control, api, events,
                                                       replicas, speech_wav, tmp_path):
    orch = await orchestrator(fast, "o1", replicas)
    seen: dict = {}

    async def after_turn(result) -> None:
        s = result.session
        await until(lambda: s in control.state.sessions, "the session in the control state")
        listed = await ctl(api.address, "sessions", "--json", env=ctl_env(tmp_path))
        assert listed.rc == 0, listed.err
        row = next(r for r in listed.json()["sessions"] if r["id"] == s)
        assert row["orchestrator"] == "orchestrator-o1" and row["agent"] == "chat"
        assert row["stt_worker"] == "stt-s" and row["state"] == "running"
        detail = await until(lambda: _turn_with(api, s, "llm_ttft"), "turn 1's figures")
        seen["detail"] = detail
        shown = await ctl(api.address, "session", s, "--json", env=ctl_env(tmp_path))
        assert shown.rc == 0, shown.err
        seen["json"] = shown.json()
        seen["text"] = (await ctl(api.address, "session", s, env=ctl_env(tmp_path))).out

    turns = await bounded(talk(fast.nats_url, [speech_wav], prefix=fast.prefix,
                               on_turn=after_turn, turn_timeout_s=30), 120, "the turn")
    session = turns[0].session
    assert turns[0].bot_text, turns
    turn = seen["detail"].turns[0]
    assert turn.turn == 1 and turn.latency_ms["llm_ttft"] > 0 and "eou_delay" in turn.latency_ms
    assert seen["json"]["session"]["id"] == session
    assert seen["json"]["turns"][0]["latency_ms"]["llm_ttft"] == pytest.approx(
        turn.latency_ms["llm_ttft"])
    assert "llm_ttft" in seen["text"] and session in seen["text"]
    # talk hung up: the session ended, and the stream said so.
    await events.wait_for(Kind.SESSION_STARTED, session=session)
    await events.wait_for(Kind.SESSION_ENDED, session=session)
    ended = await api.stub.GetSession(pb.GetSessionRequest(session=session), metadata=api.auth)
    assert ended.session.state == "ended" and ended.session.ended_unix_ms > 0

    # EndSession on a live session (no audio needed): gone from the orchestrator, the STT
    # replica and the sessions bucket.
    await ask(control.bus, Stage.ORCHESTRATOR, SessionStart(session="tobeended"), timeout_s=15)
    await until(lambda: "tobeended" in control.state.sessions, "the new session seen")
    assert "tobeended" in stages.stt.streams and "tobeended" in orch.runners
    out = await ctl(api.address, "end", "tobeended", "--reason", "test", "--json",
                    env=ctl_env(tmp_path))
    assert out.rc == 0 and out.json()["ended"] is True, out
    assert "tobeended" not in orch.runners
    assert "tobeended" not in orch.store.entries
    await until(lambda: "tobeended" not in stages.stt.streams, "the STT replica let it go")
    await events.wait_for(Kind.SESSION_ENDED, session="tobeended")
    listed = await api.stub.ListSessions(pb.ListSessionsRequest(), metadata=api.auth)
    assert "tobeended" not in [s.id for s in listed.sessions]
    again = await ctl(api.address, "end", "tobeended", env=ctl_env(tmp_path))
    assert again.rc == 1 and "no live session" in again.err


async def _turn_with(api, session: str, figure: str):
    detail = await api.stub.GetSession(pb.GetSessionRequest(session=session), metadata=api.auth)
    return detail if detail.turns and figure in detail.turns[0].latency_ms else None


async def test_draining_an_orchestrator_hands_its_live_session_over(
        fast, stages, control, api, events, replicas, speech_wav, tmp_path):
    first = await orchestrator(fast, "first", replicas)
    state: dict = {}

    async def between_turns(result) -> None:
        if "drained" in state:
            return
        session = result.session
        assert session in first.runners
        second = await orchestrator(fast, "second", replicas)
        await until(lambda: "orchestrator-second" in control.state.workers, "second listed")
        out = await ctl(api.address, "drain", "orchestrator-first", "--wait", "--json",
                        "--timeout", "30", env=ctl_env(tmp_path))
        assert out.rc == 0 and out.json()["drained"] is True, out
        state["drained"] = out.json()
        await until(lambda: session in second.runners, "the second replica adopted it")
        adopted = await events.wait_for(Kind.SESSION_ADOPTED, session=session)
        assert adopted.worker == "orchestrator-second"
        await events.wait_for(Kind.SESSION_RESUMED, session=session)
        listed = await api.stub.ListSessions(pb.ListSessionsRequest(), metadata=api.auth)
        row = next(s for s in listed.sessions if s.id == session)
        assert row.orchestrator == "orchestrator-second" and row.state == "running"

    turns = await bounded(talk(fast.nats_url, [speech_wav, speech_wav], prefix=fast.prefix,
                               on_turn=between_turns, turn_timeout_s=30), 180, "two turns")
    assert "drained" in state
    assert state["drained"]["worker"]["sessions"] == []
    # The session carried on: the second turn, on the adopting replica, was answered.
    assert len(turns) == 2 and turns[1].bot_text, [(t.user_text, t.bot_text, t.errors)
                                                   for t in turns]
    assert first.drained.is_set() and not first.runners
    await events.wait_for(Kind.WORKER_DRAINING, worker="orchestrator-first")

"""A three-node NATS cluster with JetStream replication 3 on loopback: the node every service of
a session is connected to is SIGKILLed mid-session; they all move to another node, the next turn
is answered, and the session's stored state and recording (both turns) are intact on the
surviving nodes. And a node killed and started again rejoins: it serves a session started
afterwards and counts towards JetStream's quorum."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from types import SimpleNamespace

import pytest
from nats.errors import TimeoutError as NatsTimeoutError

from services.llm.worker import LlmWorker
from services.orchestrator.session_store import SessionRecord, SessionStore
from services.orchestrator.worker import OrchestratorWorker
from services.stt.worker import SttWorker
from services.tts.worker import TtsWorker
from tests.conftest import bounded
from tests.e2e.caller import Caller
from tests.faults.replicas import FAST_HEARTBEAT_S, FAST_LEASE_S
from tests.faults.test_replica_loss import ANSWER, errors, transcripts
from tests.scripted_openai import ScriptedOpenAI, Step
from voxbus.audio import read_wav
from voxbus.bus import Bus
from voxbus.config import Settings
from voxbus.natsd import NatsCluster
from voxbus.recording import Recorder
from voxbus.subjects import Subjects
from voxbus.wire import AudioOut, BotText, Transcript

pytestmark = pytest.mark.slow

REPLICAS = 3


@pytest.fixture
def cluster(tmp_path):
    """Three nodes of the test's own, each with its store under tmp_path (a restarted node
    comes back with what it had); every node is stopped at the end, whatever happened."""
    nodes = NatsCluster(3, store_root=str(tmp_path / "js"))
    try:
        yield nodes.start()
    finally:
        nodes.stop()
        assert not nodes.running()


@pytest.fixture
async def endpoint():
    server = await ScriptedOpenAI(lambda _b: Step(text=ANSWER)).start()
    yield server
    await server.stop()


def on_cluster(cluster: NatsCluster, prefix: str) -> Settings:
    # The URL list starts with node 0: every service lands there first.
    return Settings(nats_url=cluster.url, prefix=prefix, heartbeat_s=FAST_HEARTBEAT_S,
                    lease_s=FAST_LEASE_S, llm_model="scripted", js_replicas=REPLICAS)


def stages(s: Settings, endpoint) -> tuple[OrchestratorWorker, list]:
    orchestrator = OrchestratorWorker(s)
    return orchestrator, [SttWorker(s), TtsWorker(s), LlmWorker(s, base_url=endpoint.base_url),
                          orchestrator]


def port_of(bus: Bus) -> int | None:
    url = bus.nc.connected_url
    return url.port if url is not None else None


async def lead_on(bus: Bus, stream: str, node: str, tries: int = 10) -> None:
    """Make ``node`` the stream's leader (its loss then forces an election: the hard case)."""
    js = bus.nc.jetstream()
    for _ in range(tries):
        if (await js.stream_info(stream)).cluster.leader == node:
            return
        await bus.nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}",
                             json.dumps({"placement": {"preferred": node}}).encode(), timeout=5)
        for _ in range(50):
            await asyncio.sleep(0.1)
            leader = (await js.stream_info(stream)).cluster.leader
            if leader:
                break
    assert (await js.stream_info(stream)).cluster.leader == node, f"{stream} not led by {node}"


async def replicated(bus: Bus, stream: str, dead: str | None = None) -> dict:
    """The stream's cluster as its leader reports it: R3, led by a living node. The JetStream
    API may not answer while the cluster is still re-electing after a node loss: asked again
    for up to 20 s."""
    deadline = time.monotonic() + 20
    while True:
        try:
            info = await bus.nc.jetstream(timeout=5).stream_info(stream)
            break
        except NatsTimeoutError:
            if time.monotonic() > deadline:
                raise
    assert info.config.num_replicas == REPLICAS, info.config
    assert info.cluster.leader and info.cluster.leader != dead, info.cluster
    return {"leader": info.cluster.leader,
            "replicas": {r.name: r.current for r in info.cluster.replicas or []}}


async def stored(bus: Bus, prefix: str, session: str, timeout_s: float,
                 has: str) -> SessionRecord:
    """The session's KV entry, once its context holds ``has`` (saves follow agent turns)."""
    deadline = time.monotonic() + timeout_s
    record = None
    while time.monotonic() < deadline:
        try:
            kv = await bus.nc.jetstream().key_value(Subjects(prefix).sessions_bucket())
            record = SessionRecord.model_validate_json((await kv.get(session)).value)
        except Exception as e:  # no leader for a moment: ask again
            print(f"kv get: {type(e).__name__}: {e}")
        else:
            if has in json.dumps(record.messages).lower():
                return record
        await asyncio.sleep(0.5)
    raise AssertionError(f"the stored session never held {has!r}: {record}")


async def answer_to(caller: Caller, since: float, words: str, timeout_s: float = 40.0):
    """The user's ``words`` (not the first word said: a loaded box may clip it) transcribed
    after ``since``, then the agent's words and voice after
    that transcript (not a tail of an earlier turn); returns when each was heard."""
    for _ in range(int(timeout_s / 0.05)):
        heard = next((h for h in caller.frames_of(Transcript, since)
                      if h.frame.final and words in h.frame.text.lower()), None)
        if heard is not None:
            bot = [h for h in caller.frames_of(BotText, heard.at) if h.frame.text]
            voice = caller.frames_of(AudioOut, heard.at)
            if bot and voice:
                assert ANSWER in " ".join(h.frame.text for h in bot), bot
                return SimpleNamespace(transcript=heard.at, words=bot[0].at, voice=voice[0].at)
        await asyncio.sleep(0.05)
    raise AssertionError(f"no answer to {words!r}: heard {transcripts(caller)!r}, agent "
                         f"{[h.frame.text for h in caller.frames_of(BotText, since)]}")


async def agent_done(caller: Caller, quiet_s: float = 0.8, timeout_s: float = 30.0) -> None:
    """Until the agent has been silent for ``quiet_s`` (its answer played out): speaking
    earlier would be a barge-in."""
    for _ in range(int(timeout_s / 0.05)):
        last = max((h.at for h in caller.frames_of(AudioOut)), default=0.0)
        if time.monotonic() - last >= quiet_s:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the agent kept talking for {timeout_s:.0f} s")


async def retrying(attempt, pause_s: float = 0.25):
    """``await attempt()`` until it succeeds: JetStream answers again once it has leaders."""
    while True:
        try:
            return await attempt()
        except Exception as e:
            print(f"not yet: {type(e).__name__}: {e}")
            await asyncio.sleep(pause_s)


async def start_all(services) -> None:
    for svc in services:
        await svc.start()


async def stop_all(services) -> None:
    for svc in reversed(services):
        await svc.stop()


async def recorder_leader_since(url: str, prefix: str) -> float:
    """When (on this clock) the recording stream's current leader took over."""
    async with Recorder(url, prefix) as recorder:
        info = await recorder.js.stream_info(recorder.stream)
    since = info.cluster.leader_since
    assert since is not None, info.cluster
    return time.monotonic() - (time.time() - since.timestamp())


async def recorded_turns(url: str, prefix: str, session: str):
    async with Recorder(url, prefix) as recorder:
        rec = await recorder.export(session)
    said = [m for m in rec.messages if m.subject.endswith(".evt.bot")]
    heard = " ".join(m.frame().text for m in rec.messages
                     if m.subject.endswith(".evt.transcript") and m.frame() is not None
                     and getattr(m.frame(), "final", False)).lower()
    return rec, said, heard


async def test_session_moves_to_another_node_when_its_node_is_killed(cluster, prefix,
                                                                     endpoint, speak):
    s = on_cluster(cluster, prefix)
    node0 = cluster.nodes[0]
    survivors = ",".join(cluster.urls[1:])
    async with Recorder(s.nats_url, s.prefix) as recorder:
        await recorder.enable(max_age_s=3600, max_bytes=64 * 2**20, replicas=s.js_replicas)
    orchestrator, services = stages(s, endpoint)
    try:
        await bounded(start_all(services), 180, "starting the services")
        async with Caller(s, "chat") as caller:
            buses = {svc.worker_id: svc.bus for svc in services} | {"caller": caller.bus}
            on = {name: port_of(b) for name, b in buses.items()}
            assert set(on.values()) == {node0.port}, on
            # Node 0 leads the recording stream and the sessions bucket: losing it forces
            # JetStream to elect new leaders, not only the clients to move.
            subjects = Subjects(s.prefix)
            for stream in (subjects.recording_stream(), "KV_" + subjects.sessions_bucket()):
                await lead_on(caller.bus, stream, node0.name)

            start = time.monotonic()
            caller.say(read_wav(speak("Hello there.")))
            await bounded(answer_to(caller, start, "there"), 50, "the first answer")
            await bounded(agent_done(caller), 40, "the first answer played")
            await asyncio.sleep(0.5)  # the state saved after the agent's turn

            killed = time.monotonic()
            await asyncio.to_thread(cluster.kill, 0)

            async def moved() -> None:
                for _ in range(1000):
                    if all(port_of(b) not in (None, node0.port) for b in buses.values()):
                        return
                    await asyncio.sleep(0.02)

            await bounded(moved(), 20, "every service reconnecting to another node")
            reconnected = time.monotonic()
            on = {name: port_of(b) for name, b in buses.items()}
            assert node0.port not in on.values(), on
            assert set(on.values()) <= {n.port for n in cluster.nodes[1:]}, on

            second = time.monotonic()
            caller.say(read_wav(speak("What is the capital of France?")))
            got = await bounded(answer_to(caller, second, "capital of france", 60), 70,
                                "the answer after the node was killed")
            assert orchestrator.runners.get(caller.session), "the session was dropped"
            assert not [e for e in errors(caller) if not e.retryable], errors(caller)
            print(f"\nnode 0 killed: services on other nodes after {reconnected - killed:.2f} s "
                  f"({on}); next turn spoken from {second - killed:.2f} s after the kill: "
                  f"transcript at {got.transcript - killed:.2f} s, agent's words at "
                  f"{got.words - killed:.2f} s, voice at {got.voice - killed:.2f} s")

            # A save that fell into JetStream's leader election is lost, and the next turn's
            # save carries it: after a third turn the state is complete.
            await bounded(agent_done(caller), 40, "the second answer played")
            third = time.monotonic()
            caller.say(read_wav(speak("Thank you very much.")))
            await bounded(answer_to(caller, third, "much"), 50, "the third answer")

            # The session's state is on the surviving nodes, with every turn in it.
            probe = await Bus.connect(survivors, Subjects(s.prefix), "probe", attempts=3)
            try:
                record = await bounded(stored(probe, s.prefix, caller.session, 20,
                                              "much"), 30, "the stored session")
                context = json.dumps(record.messages).lower()
                assert "there" in context and "capital of france" in context, context
                assert record.owner == orchestrator.worker_id, record
                assert record.agent == "chat" and record.turn >= 3, record
                for stream in (subjects.recording_stream(), "KV_" + subjects.sessions_bucket()):
                    print(stream, await replicated(probe, stream, dead=node0.name))
            finally:
                await probe.close()
            assert not orchestrator.store._watch_task.done(), "the store stopped following"

            # The recording stream has its new leader now (``replicated`` waited for it): a
            # turn from here on is stored. (Turns spoken during the election, which took 5 to
            # 11 s on this 2-core box, are answered but not recorded: see below.)
            await bounded(agent_done(caller), 40, "the third answer played")
            fourth = time.monotonic()
            caller.say(read_wav(speak("See you tomorrow.")))
            await bounded(answer_to(caller, fourth, "tomorrow"), 50, "the fourth answer")
            await bounded(agent_done(caller), 40, "the fourth answer played")
            elected = await retrying(lambda: recorder_leader_since(survivors, s.prefix))

        # The recording is read through the stream's new leader, which may still be catching
        # up on what the others stored: read again for a while before judging it.
        deadline = time.monotonic() + 20
        while True:
            rec, said_rec, heard = await recorded_turns(survivors, s.prefix, caller.session)
            if ("there" in heard and "tomorrow" in heard) or time.monotonic() > deadline:
                break
            await asyncio.sleep(1)
        seqs = sorted({m.frame().seq for m in rec.messages
                       if m.subject.endswith(".audio.in") and m.frame() is not None})
        missing = sum(b - a - 1 for a, b in itertools.pairwise(seqs))
        gap_s = max(b.t_us - a.t_us for a, b in itertools.pairwise(rec.messages)) / 1e6
        print(f"recording: {len(rec.messages)} messages, agent texts {len(said_rec)}, user audio "
              f"frames missing {missing} of {seqs[-1] - seqs[0] + 1} ({missing * 0.02:.2f} s), "
              f"longest gap {gap_s:.2f} s, stream leader elected {elected - killed:.1f} s after "
              f"the kill; transcripts {heard!r}")
        # Recorded frames are published without acknowledgement (capture adds nothing to the
        # live path): those sent while JetStream elects the stream's new leader (the killed
        # node led it) are not stored. What was stored before the kill survives on the other
        # nodes, and recording resumes once the stream has its leader.
        assert "there" in heard, heard  # stored before the kill: never lost
        assert "tomorrow" in heard, heard  # spoken after the election: recorded again
        assert len(said_rec) >= 2, [m.subject for m in rec.messages][-20:]
        # The gap is the election, not the rest of the session.
        assert gap_s < elected - killed + 5, (gap_s, elected - killed)
    finally:
        await bounded(stop_all(services), 60, "stopping the services")


async def test_killed_node_restarted_rejoins_and_serves_a_new_session(cluster, prefix,
                                                                      endpoint, speak):
    s = on_cluster(cluster, prefix)
    subjects = Subjects(s.prefix)
    node0 = cluster.nodes[0]
    async with Recorder(s.nats_url, s.prefix) as recorder:
        await recorder.enable(max_age_s=3600, max_bytes=64 * 2**20, replicas=s.js_replicas)
    setup = await Bus.connect(s.nats_url, subjects, "setup", attempts=3)
    store = await SessionStore(setup.nc, s.prefix, replicas=REPLICAS).open()
    await store.close()
    await setup.close()

    await asyncio.to_thread(cluster.kill, 0)
    await asyncio.to_thread(cluster.wait_formed)  # the two left agree on a meta leader
    # While node 0 is down the others store something it must catch up on.
    others = await Bus.connect(",".join(cluster.urls[1:]), subjects, "others", attempts=3)
    try:
        async def write_marker() -> int:
            kv = await others.nc.jetstream().key_value(subjects.sessions_bucket())
            return await kv.put("marker", b"{}")

        await bounded(retrying(write_marker), 40, "a write on the two nodes left")
    finally:
        await others.close()
    restarted = time.monotonic()
    await asyncio.to_thread(cluster.restart, 0)
    print(f"\nnode 0 back in the cluster (routed, healthy) in {time.monotonic() - restarted:.2f} s")
    # Node 0 counts again: with node 1 gone, JetStream's quorum is nodes 0 and 2.
    await asyncio.to_thread(cluster.kill, 1)
    await asyncio.to_thread(cluster.wait_formed)

    orchestrator, services = stages(s, endpoint)
    try:
        await bounded(start_all(services), 180, "starting the services")
        async with Caller(s, "chat") as caller:
            buses = [svc.bus for svc in services] + [caller.bus]
            assert {port_of(b) for b in buses} == {node0.port}, [port_of(b) for b in buses]
            start = time.monotonic()
            caller.say(read_wav(speak("What is the capital of France?")))
            await bounded(answer_to(caller, start, "capital of france", 60), 70,
                          "the answer on the restarted node")
            assert not [e for e in errors(caller) if not e.retryable], errors(caller)
            record = await bounded(stored(caller.bus, s.prefix, caller.session, 20, "capital"),
                                   30, "the stored session")
            assert record.owner == orchestrator.worker_id
            for stream in (subjects.recording_stream(), "KV_" + subjects.sessions_bucket()):
                info = await replicated(caller.bus, stream, dead=cluster.nodes[1].name)
                assert info["leader"] in (node0.name, cluster.nodes[2].name), info
                print(stream, info)
        rec, said_rec, heard = await recorded_turns(cluster.urls[0], s.prefix, caller.session)
        assert said_rec and "capital of france" in heard, heard
    finally:
        await bounded(stop_all(services), 60, "stopping the services")

"""Post-call work against real parts: nats-server with JetStream (tests/conftest.py), the
recording stream on the test's prefix, the LLM stage on the scripted OpenAI-compatible endpoint
(its extraction replies are scripted, its conversation replies too), and a real HTTP webhook
receiver on a free port that checks signatures the way a receiver would."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from aiohttp import web

from services.llm.worker import LlmWorker
from services.post_call.signature import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, verify
from tests.scripted_openai import ScriptedOpenAI, Step
from voxbus.bus import Bus, now_us
from voxbus.recording import Recorder
from voxbus.subjects import Event, Stage, Subjects
from voxbus.wire import BotText, SessionEnd, SessionStart, Transcript, TurnEvent

SECRET = "post-call-test-secret-" + "s" * 24
FIELDS = {"party_size": 4, "day": "Friday", "wants_callback": False}
SCHEMA = {
    "type": "object",
    "properties": {
        "party_size": {"type": "integer", "description": "how many people"},
        "day": {"type": "string", "description": "the day of the booking"},
        "wants_callback": {"type": "boolean"},
    },
    "required": ["party_size", "day"],
}
AGENT_REPLY = "A table for four on Friday, noted."


def is_extraction(body: dict) -> bool:
    return "Fields:" in (body["messages"][0].get("content") or "")


@dataclass
class Scripted:
    """What the scripted model answers: extractions in order (the last one repeats), and
    the agent's line for conversation turns."""

    extractions: list[str] = field(default_factory=lambda: [json.dumps(FIELDS)])
    seen: list[dict] = field(default_factory=list)

    def __call__(self, body: dict) -> Step:
        if not is_extraction(body):
            return Step(text=AGENT_REPLY)
        self.seen.append(body)
        i = min(len(self.seen), len(self.extractions)) - 1
        return Step(text=self.extractions[i])


@pytest.fixture
def script() -> Scripted:
    return Scripted()


@pytest.fixture
async def endpoint(script):
    server = await ScriptedOpenAI(script).start()
    yield server
    await server.stop()


@dataclass
class Receiver:
    """A webhook receiver: answers ``statuses`` in order (then 200), keeps every request."""

    statuses: list[int] = field(default_factory=list)
    requests: list[dict] = field(default_factory=list)
    url: str = ""
    got: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = self.statuses.pop(0) if self.statuses else 200
        try:
            verify(SECRET, body, request.headers.get(SIGNATURE_HEADER))
            valid = True
        except ValueError:
            valid = False
        self.requests.append({"body": json.loads(body), "raw": body, "status": status,
                              "valid": valid, "headers": dict(request.headers),
                              "key": request.headers.get(IDEMPOTENCY_HEADER)})
        if status == 200:
            self.got.set()
        return web.Response(status=status, text="ok" if status == 200 else "down")

    @property
    def delivered(self) -> list[dict]:
        return [r for r in self.requests if r["status"] == 200]


@pytest.fixture
async def receiver():
    hook = Receiver()
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    hook.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/hook"
    yield hook
    await runner.cleanup()


def write_agent(folder: Path, name: str, deliver: dict, **extra) -> None:
    agent = {"name": name, "system_prompt": "You take restaurant bookings. One sentence.",
             "post_call": {"prompt": "Extract the booking.", "schema": SCHEMA,
                           "deliver": deliver, **extra}}
    (folder / f"{name}.json").write_text(json.dumps(agent))


@pytest.fixture
def agents(tmp_path, receiver) -> Path:
    """``booking`` delivers to the webhook receiver, ``booking_nats`` on topic ``crm``."""
    folder = tmp_path / "agents"
    folder.mkdir()
    write_agent(folder, "booking", {"webhook": receiver.url})
    write_agent(folder, "booking_nats", {"nats": "crm"})
    return folder


@pytest.fixture
def pc_settings(settings, agents):
    """The test's settings for every stage: its agents, the signing secret, short backoff."""
    return replace(settings, agents_dir=str(agents), post_call_secret=SECRET,
                   post_call_backoff_s=(0.3, 0.6), llm_model="scripted", post_call_llm_s=10.0)


@pytest.fixture
async def recorder(pc_settings):
    """The recording stream of the test's prefix, as ``voxbus up`` turns it on."""
    async with Recorder(pc_settings.nats_url, pc_settings.prefix) as rec:
        await rec.enable(max_age_s=600, max_bytes=256 * 2**20)
        yield rec
        await rec.js.delete_stream(rec.stream)


@pytest.fixture
async def llm(pc_settings, endpoint, recorder):
    worker = await LlmWorker(pc_settings, base_url=endpoint.base_url).start()
    yield worker
    await worker.stop()


async def played_session(bus: Bus, session: str, agent: str, *, reason: str = "hangup") -> None:
    """A session's frames as the orchestrator and STT stage publish them (for the tests of
    delivery mechanics; tests/post_call/test_real_session.py runs real stages on real
    speech): its start, a user turn, the agent's answer, and its end."""
    s = bus.subjects
    await bus.publish(s.work_copy(session, Stage.ORCHESTRATOR),
                      SessionStart(session=session, agent=agent))
    await bus.publish(s.event(session, Event.TRANSCRIPT), Transcript(
        text="A table for four on Friday, please.", final=True, seq=40, ts_us=now_us()))
    await bus.publish(s.event(session, Event.TURN),
                      TurnEvent(turn=1, state="user_ended", ts_us=now_us()))
    await bus.publish(s.event(session, Event.BOT), BotText(turn=1, text=AGENT_REPLY))
    await bus.publish(s.event(session, Event.TURN),
                      TurnEvent(turn=1, state="bot_stopped", ts_us=now_us()))
    await bus.publish(s.ctl(session), SessionEnd(session=session, reason=reason))
    await bus.nc.flush()


async def until(check, timeout_s: float, what: str, step_s: float = 0.05):
    """Poll ``check()`` (sync or async) until it is truthy; fail saying ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:g} s")
        await asyncio.sleep(step_s)


def subjects_of(settings) -> Subjects:
    return Subjects(settings.prefix)

"""``voxbus up`` and the CLI when things go wrong, as a user sees it: real subprocesses, real
servers, real processes killed; the assertions are on what they print and how they exit."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from voxbus.bus import Bus, NatsRefused
from voxbus.config import NatsAuth
from voxbus.natsd import free_port
from voxbus.subjects import Stage, Subjects
from voxbus.talk import talk
from voxbus.wire import Heartbeat

pytestmark = pytest.mark.slow

READY_S = 300.0
"""Every replica loads Whisper, Piper, Silero and Smart Turn at once on a shared 2-core box."""


class Up:
    """A real ``voxbus up`` subprocess in its own process group, its output read as it comes."""

    def __init__(self, *args: str, env: dict[str, str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "voxbus.cli", "up", *args], env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def expect(self, pattern: str, timeout: float, *, after: int = 0) -> re.Match:
        """The first line from index ``after`` on matching ``pattern``; fails with the output
        if none comes in time or ``voxbus up`` exits first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[after:]:
                if m := rx.search(line):
                    return m
            if self.proc.poll() is not None:
                self._reader.join(2)
                for line in self.lines[after:]:
                    if m := rx.search(line):
                        return m
                pytest.fail(f"voxbus up exited ({self.proc.returncode}) before {pattern!r}:\n"
                            + self.tail())
            time.sleep(0.1)
        pytest.fail(f"no {pattern!r} within {timeout:.0f} s:\n" + self.tail())

    def ready(self) -> str:
        """The NATS URL from ``voxbus ready``."""
        return self.expect(r"voxbus ready: .* nats=(\S+)", READY_S).group(1)

    def pid(self, child: str) -> int:
        """The pid in the latest ``<child> started (pid N)`` line."""
        found = [int(m.group(1)) for line in self.lines
                 if (m := re.fullmatch(rf"{re.escape(child)} started \(pid (\d+)\)", line))]
        assert found, f"no start line for {child}:\n{self.tail()}"
        return found[-1]

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"voxbus up still running after {timeout:.0f} s:\n" + self.tail())
        self._reader.join(5)
        return rc

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.lines[-n:])

    def close(self) -> None:
        """SIGINT as Ctrl-C would, SIGKILL to the group if that is not enough; children die
        with it (they are in their own groups, but get SIGKILL when their parent dies)."""
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(40)
            return
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for line in self.lines:  # children of a hung voxbus up, if the kernel left any
            m = re.search(r" started \(pid (\d+)\)$", line)
            if m and alive(pid := int(m.group(1))) and ours(pid):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def up_env(prefix, tmp_path):
    """The environment of a ``voxbus up`` that starts its own NATS and LLM endpoint (its
    control plane on a free port, its token file in the test's folder)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VOXBUS_NATS_URL", "OPENAI_BASE_URL", "VOXBUS_LLM_MODEL")}
    return dict(env, VOXBUS_PREFIX=prefix, VOXBUS_LOG_LEVEL="INFO", PYTHONUNBUFFERED="1",
                VOXBUS_CONTROL_ADDRESS="127.0.0.1:0",
                VOXBUS_CONTROL_FILE=str(tmp_path / "control.json"))


@pytest.fixture
def shared_env(up_env, nats_server, llm_endpoint):
    """...one that shares the session's nats-server and LLM endpoint instead."""
    return dict(up_env, VOXBUS_NATS_URL=nats_server.url, OPENAI_BASE_URL=llm_endpoint,
                VOXBUS_LLM_MODEL="smollm2")


@pytest.fixture
def run_up():
    """``run_up(*args, env=...)``: an :class:`Up`, closed at the end of the test."""
    running: list[Up] = []

    def start(*args: str, env: dict[str, str]) -> Up:
        running.append(Up(*args, "--http-port", str(free_port()), env=env))
        return running[-1]

    yield start
    for up in running:
        up.close()


def ours(pid: int) -> bool:
    """Still a voxbus child (not a recycled pid of someone else's)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except FileNotFoundError:
        return False
    return any(word in cmd for word in (b"voxbus", b"nats-server", b"llama_cpp"))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


async def test_killed_children_are_restarted_and_a_turn_still_gets_a_reply(
        run_up, up_env, prefix, speech_wav, monkeypatch):
    """A stage replica, nats-server and the LLM endpoint, each SIGKILLed: one line each, back
    on the same port (nats-server with the same JetStream folder), and a whole turn works.
    Its nats-server requires credentials: the CLI finds its own where ``voxbus up`` left them,
    a connection without any is refused."""
    nats_port = free_port()
    up = run_up("--nats-port", str(nats_port), env=up_env)
    nats_url = up.ready()
    assert nats_url == f"nats://127.0.0.1:{nats_port}"
    up.expect(r"^NATS users stt, llm, tts, orchestrator, gateway, control, post_call, client, "
              r"admin with "
              r"per-service permissions .*; the CLI's in " + re.escape(
                  up_env["VOXBUS_CONTROL_FILE"]) + "$", 1)
    with pytest.raises(NatsRefused):
        await Bus.connect(nats_url, Subjects(prefix), "anonymous", attempts=3,
                          auth=NatsAuth.as_user("", ""))
    # This test's own connections are the CLI's: they read the control file voxbus up wrote.
    monkeypatch.setenv("VOXBUS_CONTROL_FILE", up_env["VOXBUS_CONTROL_FILE"])
    for name in [n for n in os.environ if n.startswith("VOXBUS_NATS_")]:
        monkeypatch.delenv(name)
    talked = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "voxbus.cli", "talk", speech_wav, "--json",
                         "--nats", nats_url], env=up_env, capture_output=True, text=True,
        timeout=180)
    assert talked.returncode == 0, talked.stderr
    assert "capital" in talked.stdout.lower() and '"errors": []' in talked.stdout, talked.stdout
    listed = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "voxbus.cli", "sessions", "--nats", nats_url],
        env=up_env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "ended: done" in listed.stdout, listed

    for child in ("stt-1", "post_call-1", "nats-server", "llm-server"):
        pid = up.pid(child)
        mark = len(up.lines)
        os.kill(pid, signal.SIGKILL)
        up.expect(rf"^{child} exited \(signal SIGKILL\) after \d+\.\d s; restarting in 0\.5 s$",
                  30, after=mark)
        up.expect(rf"^{child} started \(pid \d+\)$", 30, after=mark)
        assert up.pid(child) != pid
        deaths = [line for line in up.lines[mark:] if line.startswith(f"{child} exited")]
        assert len(deaths) == 1, up.tail()
        if child == "stt-1":
            up.expect(r"^\[stt-1\] stt-1-\S+ ready$", READY_S, after=mark)
        elif child == "post_call-1":
            up.expect(r"^\[post_call-1\] post_call-1-\S+ ready$", READY_S, after=mark)
        elif child == "llm-server":
            up.expect(r'^\[llm-server\] .*"GET /v1/models HTTP/1.1" 200', 120, after=mark)
        else:  # the stages find the new server on the same port
            up.expect(r"^\[stt-1\] .*reconnected to NATS at " + re.escape(nats_url), 30,
                      after=mark)

    # The same JetStream folder: the recording stream made before the kill is still there.
    bus = await Bus.connect(nats_url, Subjects(prefix), "fault-test")
    try:
        info = await bus.nc.jetstream().stream_info(Subjects(prefix).recording_stream())
        assert info.config.name == Subjects(prefix).recording_stream()
    finally:
        await bus.close()

    results = await asyncio.wait_for(talk(nats_url, [speech_wav], prefix=prefix), 120)
    assert len(results) == 1, results
    turn = results[0]
    assert "capital" in turn.user_text.lower(), turn
    assert turn.bot_text and turn.reply_audio_s > 0.3, turn
    assert up.proc.poll() is None, up.tail()


def test_a_child_that_keeps_dying_stops_up_with_its_output(run_up, shared_env):
    up = run_up(env=dict(shared_env, VOXBUS_STT_MODEL="/nonexistent/whisper-model"))
    rc = up.wait(300)
    assert rc != 0
    deaths = [line for line in up.lines if line.startswith("stt-1 exited (code 1)")]
    delays = [float(re.search(r"restarting in (\d+\.\d) s$", d).group(1)) for d in deaths]
    assert delays == [0.5, 1.0, 2.0, 4.0], up.output
    assert re.search(r"^voxbus up: stt-1 keeps dying \(5 deaths in \d+ s, the last code 1\)$",
                     up.output, re.M), up.output
    report = up.output[up.output.index("voxbus up: stt-1 keeps dying"):]
    assert "last " in report and "  | " in report, report
    assert "/nonexistent/whisper-model" in report, report  # the child's own error, in the tail
    assert "voxbus ready" not in up.output


async def test_scale_runs_that_many_replicas(run_up, shared_env, prefix):
    up = run_up("--scale", "stt=2,tts=2", env=shared_env)
    nats_url = up.ready()
    seen: dict[str, set[str]] = {"stt": set(), "tts": set(), "llm": set()}

    async def beat(frame, _msg) -> None:
        if isinstance(frame, Heartbeat):
            seen[frame.stage].add(frame.worker)

    bus = await Bus.connect(nats_url, Subjects(prefix), "fault-test")
    try:
        for stage in (Stage.STT, Stage.TTS, Stage.LLM):
            await bus.subscribe(Subjects(prefix).heartbeat(stage), beat)
        await asyncio.sleep(3.5)  # three heartbeats at the default 1 s
    finally:
        await bus.close()
    for stage, n in (("stt", 2), ("tts", 2), ("llm", 1)):
        assert len(seen[stage]) == n, seen
        assert sorted(w.rsplit("-", 1)[0] for w in seen[stage]) == [
            f"{stage}-{i}" for i in range(1, n + 1)], seen


@pytest.mark.parametrize("scale, says", [
    ("stt=0", "replicas must be 1 to"), ("stt=two", "'two' is not a whole number"),
    ("speech=2", "expected STAGE=N"), ("gateway=2", "voxbus up runs one gateway")])
def test_bad_scale_is_one_line_and_exit_2(scale, says):
    r = subprocess.run([sys.executable, "-m", "voxbus.cli", "up", "--scale", scale],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1 and says in r.stderr, r.stderr


@pytest.mark.parametrize("taker", ["a plain socket", "another nats-server"])
def test_nats_port_taken_is_one_line_and_fast(run_up, up_env, nats_server, taker):
    with socket.socket() as s:
        if taker == "a plain socket":
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
        else:
            port = nats_server.port
        started = time.monotonic()
        up = run_up("--nats-port", str(port), env=up_env)
        rc = up.wait(30)
    assert rc != 0
    assert up.lines == [f"voxbus up: port {port} is in use by another program: stop it or use "
                        "--nats-port N"], up.output
    assert time.monotonic() - started < 30


def test_unreachable_nats_url_is_one_line(run_up, up_env):
    url = f"nats://127.0.0.1:{free_port()}"
    up = run_up(env=dict(up_env, VOXBUS_NATS_URL=url))
    assert up.wait(30) != 0
    assert len(up.lines) == 1 and up.lines[0].startswith(
        f"voxbus up: cannot reach NATS at {url}: connection refused"), up.output


def test_unreachable_llm_endpoint_stops_up(run_up, up_env, nats_server):
    base = f"http://127.0.0.1:{free_port()}/v1"
    up = run_up(env=dict(up_env, VOXBUS_NATS_URL=nats_server.url, OPENAI_BASE_URL=base))
    rc = up.wait(120)
    assert rc != 0
    assert re.search(rf"^voxbus up: cannot reach the LLM endpoint {re.escape(base)}: "
                     r"connection refused .*OPENAI_BASE_URL$", up.output, re.M), up.output
    assert "voxbus ready" not in up.output


def test_local_llm_endpoint_that_dies_at_start_stops_up(run_up, up_env, nats_server):
    up = run_up(env=dict(up_env, VOXBUS_NATS_URL=nats_server.url,
                         VOXBUS_LLM_GGUF="/nonexistent/model.gguf"))
    rc = up.wait(180)
    assert rc != 0
    assert re.search(r"^voxbus up: llm-server exited \(code \d+\) after \d+\.\d s before it "
                     "was ready$", up.output, re.M), up.output
    report = up.output[up.output.index("voxbus up: llm-server exited"):]
    assert "/nonexistent/model.gguf" in report, report
    assert "voxbus ready" not in up.output


def test_sigterm_while_loading_models_stops_everything(run_up, shared_env):
    up = run_up("--scale", "stt=2", env=shared_env)
    up.expect(r"^loading models\.\.\.$", 60)
    children = [up.pid(name) for name in ("stt-1", "stt-2", "llm-1", "tts-1", "orchestrator-1",
                                          "gateway-1")]
    os.kill(up.proc.pid, signal.SIGTERM)
    assert up.wait(40) == 130
    assert up.lines[-1] == "stopped", up.tail()
    deadline = time.monotonic() + 5
    while any(alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in children if alive(p)], up.tail()


def test_talk_names_a_missing_wav_before_touching_nats(tmp_path):
    missing = tmp_path / "missing.wav"
    started = time.monotonic()
    # A NATS URL nothing listens on: the file check must come first.
    r = subprocess.run([sys.executable, "-m", "voxbus.cli", "talk", str(missing), "--nats",
                        f"nats://127.0.0.1:{free_port()}"], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2
    assert r.stdout == "" and r.stderr.splitlines() == [f"voxbus talk: {missing}: no such file"]
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("command", [["talk", "WAV"], ["sessions"], ["record", "abc123"]])
def test_cli_without_nats_is_one_line(command, speech_wav):
    url = f"nats://127.0.0.1:{free_port()}"
    argv = [speech_wav if a == "WAV" else a for a in command]
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "voxbus.cli", *argv, "--nats", url],
                       capture_output=True, text=True, timeout=30)
    elapsed = time.monotonic() - started
    assert r.returncode == 2
    lines = (r.stdout + r.stderr).splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"voxbus {command[0]}: cannot reach NATS at {url}")
    assert "is `voxbus up` running?" in lines[0]
    assert elapsed < 15, elapsed


@pytest.mark.parametrize("status, says", [
    (401, "refused the API key (401): set OPENAI_API_KEY"),
    (404, "answered 404 for model 'no-such-model': set VOXBUS_LLM_MODEL"),
    (500, "answered 500 to a chat completion for model 'no-such-model'")])
async def test_llm_endpoint_refusing_the_check_stops_up(run_up, up_env, nats_server, status,
                                                        says):
    from tests.scripted_openai import ScriptedOpenAI, Step

    endpoint = await ScriptedOpenAI([Step(status=status)]).start()
    try:
        up = run_up(env=dict(up_env, VOXBUS_NATS_URL=nats_server.url,
                             OPENAI_BASE_URL=endpoint.base_url, VOXBUS_LLM_MODEL="no-such-model"))
        rc = await asyncio.to_thread(up.wait, 120)
    finally:
        await endpoint.stop()
    assert rc != 0
    assert re.search(rf"^voxbus up: the LLM endpoint {re.escape(endpoint.base_url)} "
                     + re.escape(says), up.output, re.M), up.output
    assert len(endpoint.requests) == 1  # one check, not retried
    assert "voxbus ready" not in up.output


async def test_a_local_endpoint_killed_by_sigill_is_explained():
    """A real process dying of a real SIGILL where the llama server would be: the endpoint
    check reports the death, and the hint names the CPU problem and the reinstall command."""
    from voxbus.llm_server import REINSTALL, sigill_hint
    from voxbus.supervisor import Child, ChildFailed, Supervisor
    from voxbus.up import check_endpoint

    lines: list[str] = []
    sup = Supervisor(emit=lines.append)
    suicide = "import os, signal, time; time.sleep(0.3); os.kill(os.getpid(), signal.SIGILL)"
    child = await sup.start(Child("llm-server", [sys.executable, "-c", suicide],
                                  probe=lambda: False, must_start=True, hint=sigill_hint,
                                  emit=lines.append))
    try:
        with pytest.raises(ChildFailed) as failed:
            await asyncio.wait_for(sup.guard(check_endpoint(
                "http://127.0.0.1:9/v1", "sk-local", "smollm2", child)), 30)
    finally:
        await sup.stop()
    assert failed.value.returncode == -signal.SIGILL
    assert "exited (signal SIGILL)" in str(failed.value)
    hint = child.hint(failed.value.returncode)
    assert "compiled for CPU instructions this machine does not run" in hint
    assert REINSTALL in hint
    assert child.hint(1) is None

"""``voxbus up``: everything on one machine, each stage its own process, as deployed.

The composition only: which children (nats-server, the local LLM endpoint, every stage
replica, the control plane, the post-call stage), in what order, and what is checked before
``voxbus ready``; keeping them running is :mod:`voxbus.supervisor`'s job.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import sys
import uuid
from collections.abc import Callable

import openai

from voxbus import nats_auth
from voxbus.bus import Bus
from voxbus.config import NatsAuth, Settings
from voxbus.control.auth import new_token, read_control_file, write_control_file
from voxbus.llm_server import MODEL_ALIAS, LocalLlmServer, sigill_hint
from voxbus.natsd import NatsServer, PortTaken, port_in_use
from voxbus.recording import Recorder
from voxbus.runner import DRAINED_SUFFIX
from voxbus.subjects import Subjects
from voxbus.supervisor import Child, ChildFailed, Supervisor, describe_exit, say

STAGES = ("stt", "llm", "tts", "orchestrator", "gateway")
NATS_AUTH_VARS = ("VOXBUS_NATS_USER", "VOXBUS_NATS_PASSWORD", "VOXBUS_NATS_TOKEN",
                  "VOXBUS_NATS_CREDS", "VOXBUS_NATS_NKEY", "VOXBUS_NATS_TLS_CA",
                  "VOXBUS_NATS_TLS_CERT", "VOXBUS_NATS_TLS_KEY")
"""What a deployment's services authenticate with; ``voxbus up``'s own server sets them."""
MAX_REPLICAS = 16
NATS_START_S = 15.0
LLM_START_S = 180.0
"""Loading the GGUF; a remote endpoint has nothing to load."""
LLM_CHECK_S = 30.0
"""The one chat completion before ``voxbus ready``: a cold remote model may take a while."""
STAGES_READY_S = 600.0
"""Every replica loads its models at once on a small machine: generous, but bounded."""


class UpError(Exception):
    """What stops ``voxbus up`` before or while running, as one line for the user."""


def parse_scale(text: str | None) -> dict[str, int]:
    """``stt=2,tts=2`` → replicas per stage (1 for the rest); ValueError says what is wrong."""
    scale = dict.fromkeys(STAGES, 1)
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        stage, eq, count = item.partition("=")
        stage = stage.strip()
        if not eq or stage not in STAGES:
            raise ValueError(f"--scale {item!r}: expected STAGE=N with STAGE one of "
                             f"{', '.join(STAGES)}")
        try:
            n = int(count)
        except ValueError:
            raise ValueError(f"--scale {item!r}: {count.strip()!r} is not a whole number") from None
        if not 1 <= n <= MAX_REPLICAS:
            raise ValueError(f"--scale {item!r}: replicas must be 1 to {MAX_REPLICAS}")
        if stage == "gateway" and n != 1:
            raise ValueError("--scale gateway: voxbus up runs one gateway (one HTTP port); start "
                             "more with VOXBUS_HTTP_PORT=N voxbus gateway")
        scale[stage] = n
    return scale


async def up(nats_port: int, http_port: int, scale: dict[str, int] | None = None) -> int:
    """Run until SIGINT/SIGTERM (0), a child that cannot be kept running (1), or a failed
    start-up check (1); a signal at any point stops the children first."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    sup = Supervisor()
    signalled: list[int] = []
    ready = stopping = False

    def on_signal(sig: int) -> None:
        if signalled or stopping:  # a second Ctrl-C, or one while stopping: no more grace
            sup.kill_all()
        else:
            main.cancel()
        signalled.append(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    nats: NatsServer | None = None
    try:
        settings = Settings()
        passwords: dict[str, str] = {}
        if not os.environ.get("VOXBUS_NATS_URL"):
            # One folder for the server's whole life: a restarted server keeps its streams;
            # one password per role for its whole life too (a restart keeps the same config).
            passwords = nats_auth.new_passwords()
            nats = NatsServer(nats_port, store_dir=settings.jetstream_dir or None,
                              authorization=nats_auth.server_config(passwords, settings.prefix))

        def on_ready() -> None:
            nonlocal ready
            ready = True

        await _compose(sup, settings, nats, http_port, scale or parse_scale(None), on_ready,
                       passwords)
        return 0
    except asyncio.CancelledError:
        if not signalled:
            raise
        return 0 if ready else 130
    except ChildFailed as failed:
        print(f"voxbus up: {failed.report()}", file=sys.stderr, flush=True)
        if failed.child.hint and (advice := failed.child.hint(failed.returncode)):
            print(f"voxbus up: {advice}", file=sys.stderr, flush=True)
        return 1
    except (UpError, PortTaken) as e:
        print(f"voxbus up: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        stopping = True  # from here a signal hurries the stop instead of cancelling it
        started = bool(sup.children)
        if started:
            print("stopping...", flush=True)
        await sup.stop()
        _forget_control_file()
        if nats:
            nats.stop()  # removes its temporary JetStream folder
        if started:
            print("stopped", flush=True)


async def _compose(sup: Supervisor, settings: Settings, nats: NatsServer | None, http_port: int,
                   scale: dict[str, int], on_ready: Callable[[], None],
                   passwords: dict[str, str] | None = None) -> None:
    env = dict(os.environ)
    passwords = passwords or {}
    admin: NatsAuth | None = None  # our own connections: the environment's credentials
    if passwords:
        # Our own nats-server: each child gets its role's credentials, nothing inherited.
        for name in NATS_AUTH_VARS:
            env.pop(name, None)
        admin = NatsAuth.as_user("admin", passwords["admin"])
    host = env.get("VOXBUS_HTTP_HOST", "127.0.0.1")
    if port_in_use(http_port, "127.0.0.1" if host in ("", "0.0.0.0") else host):
        raise UpError(f"port {http_port} is in use by another program: stop it or use "
                      "--http-port N")
    control_address = _control_address(settings.control_address)
    env["VOXBUS_CONTROL_ADDRESS"] = control_address
    env["VOXBUS_CONTROL_TOKEN"] = settings.control_token or new_token()
    # Written now, so `voxbus ctl` already finds the control plane while models load.
    # (with the CLI's NATS credentials for `voxbus talk`, `sessions`, `record`, `replay`).
    cli_nats = ({"url": nats.url, "user": "client", "password": passwords["client"]}
                if nats is not None and passwords else None)
    control = write_control_file(settings.control_file, address=control_address,
                                 token=env["VOXBUS_CONTROL_TOKEN"], prefix=settings.prefix,
                                 tls_cert=settings.control_tls_cert, nats=cli_nats)
    if nats is not None:
        await start_nats(sup, nats, admin)
        env["VOXBUS_NATS_URL"] = nats.url
        if passwords:
            print(f"NATS users {', '.join(passwords)} with per-service permissions (a "
                  f"connection without credentials is refused); the CLI's in {control}",
                  flush=True)
    else:
        await sup.guard(check_nats(env["VOXBUS_NATS_URL"], " (VOXBUS_NATS_URL; unset it and "
                                                           "voxbus up starts its own)"))
    if settings.record:
        await sup.guard(record_sessions(env["VOXBUS_NATS_URL"], settings, admin))

    local_child = None
    if not env.get("OPENAI_BASE_URL"):
        local = LocalLlmServer()
        print("starting local LLM endpoint (llama-cpp-python, SmolLM2-135M)...", flush=True)
        local_child = await sup.start(Child("llm-server", local.command(), probe=local.is_up,
                                            must_start=True, hint=sigill_hint, tier=1))
        env["OPENAI_BASE_URL"] = local.base_url
        env["VOXBUS_LLM_MODEL"] = env.get("VOXBUS_LLM_MODEL") or MODEL_ALIAS
    env["VOXBUS_HTTP_PORT"] = str(http_port)

    stages = []
    # Post-call work reads session ends and transcripts from the recording: without it
    # (VOXBUS_RECORD=0) there is nothing for it to do.
    post_call = ("post_call",) if settings.record else ()
    for stage in (*STAGES, "control", *post_call):
        for n in range(1, scale.get(stage, 1) + 1):
            replica = dict(env, VOXBUS_WORKER_ID=f"{n}-{uuid.uuid4().hex[:6]}")
            if passwords:
                replica.update(nats_auth.role_env(stage, passwords[stage]))
            stages.append(await sup.start(Child(
                f"{stage}-{n}", [sys.executable, "-m", "voxbus.cli", stage], env=replica,
                ready_suffix=" ready", drained_suffix=DRAINED_SUFFIX, tier=2)))
    print("loading models...", flush=True)
    # The stages load their models meanwhile: the check costs no start-up time.
    await sup.guard(check_endpoint(env["OPENAI_BASE_URL"], env.get("OPENAI_API_KEY", "sk-local"),
                                   env.get("VOXBUS_LLM_MODEL") or settings.llm_model,
                                   local_child))
    async def all_ready() -> None:
        for c in stages:
            await c.ready.wait()

    try:
        await sup.guard(asyncio.wait_for(all_ready(), STAGES_READY_S))
    except TimeoutError:
        late = ", ".join(c.name for c in stages if not c.ready.is_set())
        raise UpError(f"not ready after {STAGES_READY_S:.0f} s: {late} (see their output "
                      "above)") from None
    host = "127.0.0.1" if host in ("", "0.0.0.0") else host
    url = env["VOXBUS_NATS_URL"]
    scheme = "grpcs" if settings.control_tls_cert else "grpc"
    print(f"control plane on {scheme}://{control_address} (token in {control}): "
          "voxbus ctl top", flush=True)
    print(f"voxbus ready: open http://{host}:{http_port}/  nats={url} "
          f"(or: voxbus talk some.wav --nats {url})", flush=True)
    on_ready()
    await sup.guard(asyncio.Event().wait())  # until a child fails or a signal cancels us


def _control_address(address: str) -> str:
    """The control plane's address with a real port (port 0: a free one picked now, so that
    ``voxbus ctl`` can be told it); UpError when the port is taken."""
    host, _, port = address.rpartition(":")
    probe_host = host.strip("[]")
    if probe_host in ("", "0.0.0.0", "::"):
        probe_host = "127.0.0.1"
    if int(port) == 0:
        with socket.socket() as s:
            s.bind((probe_host, 0))
            return f"{host}:{s.getsockname()[1]}"
    if port_in_use(int(port), probe_host):
        raise UpError(f"port {port} (the control plane's) is in use by another program: stop "
                      "it or set VOXBUS_CONTROL_ADDRESS=HOST:PORT")
    return address


def _forget_control_file() -> None:
    """The token of a control plane that is gone is no use to ``voxbus ctl``: remove the file
    if this ``voxbus up`` wrote it (another one may have written it since)."""
    try:
        path = Settings().control_file
    except SystemExit:
        return
    if read_control_file(path).get("pid") == os.getpid():
        with contextlib.suppress(OSError):
            os.remove(path)


async def start_nats(sup: Supervisor, nats: NatsServer, auth: NatsAuth | None = None) -> None:
    """nats-server on its port, and proof that the server answering there is this one."""
    if port_in_use(nats.port):
        raise PortTaken(nats.port)
    child = await sup.start(Child("nats-server", nats.command(), probe=nats.is_ours,
                                  must_start=True, tier=0))
    try:
        await sup.guard(asyncio.wait_for(child.until_ready(), NATS_START_S))
    except ChildFailed as failed:
        if any("address already in use" in line for line in failed.tail):
            raise PortTaken(nats.port) from None
        raise
    except TimeoutError:
        raise UpError(f"nats-server did not answer on port {nats.port} within "
                      f"{NATS_START_S:.0f} s") from None
    if await sup.guard(check_nats(nats.url, auth=auth)) != nats.name:
        raise PortTaken(nats.port)
    print(f"nats-server {nats.name} with JetStream on {nats.url} (store {nats.store_dir})",
          flush=True)


async def check_nats(url: str, hint: str = "", *, auth: NatsAuth | None = None) -> str | None:
    """Connect once; the server's name from the INFO it sent (ours, or a stranger's?).
    UpError when nothing answers or it refuses our credentials."""
    try:
        bus = await Bus.connect(url, Subjects("up"), "up", attempts=3, auth=auth)
    except ConnectionError as e:
        raise UpError(f"{e}{hint}") from None
    try:
        return bus.nc._server_info.get("server_name")  # nats-py keeps the INFO only here
    finally:
        await bus.close()


async def check_endpoint(base_url: str, api_key: str, model: str, local: Child | None) -> None:
    """One real chat completion, bounded; UpError (or the local server's ChildFailed) says
    what is wrong. A local endpoint that dies meanwhile is reported as its death."""
    if local is not None:
        try:
            await asyncio.wait_for(local.until_ready(), LLM_START_S)
        except TimeoutError:
            raise UpError(f"the local LLM endpoint did not answer on {base_url} within "
                          f"{LLM_START_S:.0f} s") from None
        say(f"LLM endpoint on {base_url}")
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=LLM_CHECK_S,
                                max_retries=0)
    ask = asyncio.create_task(client.chat.completions.create(
        model=model, max_tokens=1, messages=[{"role": "user", "content": "Say OK."}]))
    died = asyncio.create_task(local.exited.wait() if local else asyncio.Event().wait())
    try:
        await asyncio.wait([ask, died], return_when=asyncio.FIRST_COMPLETED)
        if died.done():
            raise ChildFailed(local, f"exited ({describe_exit(local.returncode)}) during the "
                                     "endpoint check")
        ask.result()
    except openai.AuthenticationError:
        raise UpError(f"the LLM endpoint {base_url} refused the API key (401): set "
                      "OPENAI_API_KEY") from None
    except openai.NotFoundError:
        raise UpError(f"the LLM endpoint {base_url} answered 404 for model {model!r}: set "
                      "VOXBUS_LLM_MODEL to a model it serves (and check OPENAI_BASE_URL "
                      "ends in its API path, e.g. /v1)") from None
    except openai.APITimeoutError:
        raise UpError(f"the LLM endpoint {base_url} gave no chat completion within "
                      f"{LLM_CHECK_S:.0f} s") from None
    except openai.APIConnectionError as e:
        raise UpError(f"cannot reach the LLM endpoint {base_url}: {_connection_reason(e)}: "
                      "check OPENAI_BASE_URL") from None
    except openai.APIStatusError as e:
        raise UpError(f"the LLM endpoint {base_url} answered {e.status_code} to a chat "
                      f"completion for model {model!r}: {e.message}") from None
    finally:
        for t in (ask, died):
            t.cancel()
        await asyncio.gather(ask, died, return_exceptions=True)
        await client.close()
    say(f"LLM endpoint check passed: model {model!r} answered a chat completion")


def _connection_reason(e: BaseException) -> str:
    """The innermost cause of a failed HTTP connection, e.g. ``connection refused``."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
        if isinstance(e, OSError) and e.errno == errno.ECONNREFUSED:
            return "connection refused (nothing listens there)"
    return str(e) or type(e).__name__


async def record_sessions(nats_url: str, settings: Settings,
                          auth: NatsAuth | None = None) -> None:
    """Turn on the recording stream (on by default; ``VOXBUS_RECORD=0`` leaves it off)."""
    async with Recorder(nats_url, settings.prefix, auth=auth) as recorder:
        await recorder.enable(max_age_s=settings.record_max_age_s,
                              max_bytes=settings.record_max_bytes,
                              replicas=settings.js_replicas)
    age = f"{settings.record_max_age_s / 3600:g} h" if settings.record_max_age_s > 0 else "no"
    size = (f"{settings.record_max_bytes / 2**20:g} MiB" if settings.record_max_bytes > 0
            else "no")
    copies = f", {settings.js_replicas} replicas" if settings.js_replicas > 1 else ""
    print(f"recording sessions in JetStream stream {recorder.stream} ({age} age limit, {size} "
          f"size limit{copies}): voxbus sessions / record / replay", flush=True)

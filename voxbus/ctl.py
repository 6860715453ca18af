"""``voxbus ctl``: the control plane's command-line client (sessions, workers, end, drain,
watch, top), as tables for a person or ``--json`` for a script.

It finds the control service the way an operator expects: ``--address``/``--token``, else
``VOXBUS_CONTROL_ADDRESS``/``VOXBUS_CONTROL_TOKEN``, else the file ``voxbus up`` wrote. An
unreachable service or a refused token is one line and exit status 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc

from voxbus.config import Settings
from voxbus.control.auth import bearer, read_control_file
from voxbus.control.protos import pb, rpc

CALL_S = 10.0
"""Deadline of one call (DrainWorker with --wait gets its own wait on top)."""
LATENCIES = ("eou_delay", "stt_ttfs", "llm_ttft", "tts_ttfa", "e2e_latency")


class CtlError(Exception):
    """One line for the operator, and the exit status it means."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Target:
    address: str
    token: str
    tls_cert: str = ""


def target(address: str | None, token: str | None) -> Target:
    """Flags first, then the environment, then what ``voxbus up`` wrote."""
    settings = Settings()
    written = read_control_file(settings.control_file)
    env = os.environ.get
    address = (address or (env("VOXBUS_CONTROL_ADDRESS") and settings.control_address)
               or written.get("address") or settings.control_address)
    token = token or settings.control_token or written.get("token") or ""
    cert = settings.control_tls_cert or written.get("tls_cert") or ""
    if not token:
        raise CtlError(f"no control token: pass --token, set VOXBUS_CONTROL_TOKEN, or run voxbus "
                       f"up (it writes {settings.control_file})")
    return Target(address, token, cert)


class Client:
    """A blocking stub with the token on every call and gRPC errors turned into CtlError."""

    def __init__(self, where: Target):
        self.where = where
        if where.tls_cert:
            with open(where.tls_cert, "rb") as f:
                creds = grpc.ssl_channel_credentials(root_certificates=f.read())
            self.channel = grpc.secure_channel(where.address, creds)
        else:
            self.channel = grpc.insecure_channel(where.address)
        self.stub = rpc.ControlStub(self.channel)
        self.metadata = bearer(where.token)

    def close(self) -> None:
        self.channel.close()

    def call(self, method: str, request: Any, timeout: float = CALL_S) -> Any:
        try:
            return getattr(self.stub, method)(request, metadata=self.metadata, timeout=timeout)
        except grpc.RpcError as e:
            raise self.error(e) from None

    def stream(self, method: str, request: Any):
        try:
            yield from getattr(self.stub, method)(request, metadata=self.metadata)
        except grpc.RpcError as e:
            raise self.error(e) from None

    def error(self, e: grpc.RpcError) -> CtlError:
        code, text = e.code(), e.details() or ""
        where = self.where.address
        if code == grpc.StatusCode.UNAVAILABLE:
            return CtlError(f"cannot reach the control service at {where} ({text}): is voxbus "
                            "up running? (or pass --address)")
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return CtlError(f"the control service at {where} refused the token: {text}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return CtlError(f"the control service at {where} did not answer in time")
        if code == grpc.StatusCode.CANCELLED:
            return CtlError("cancelled", 130)
        return CtlError(text or code.name, 1)


# --- output -------------------------------------------------------------------------------


def to_dict(msg: Any) -> dict[str, Any]:
    """A message as plain JSON values (int64 as numbers, enums by name, every field present)."""
    out: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        value = getattr(msg, f.name)
        message = f.message_type
        if message is not None and message.GetOptions().map_entry:
            out[f.name] = dict(value)
        elif f.label == f.LABEL_REPEATED:
            out[f.name] = [to_dict(v) if message else v for v in value]
        elif message is not None:
            out[f.name] = to_dict(value) if msg.HasField(f.name) else None
        elif f.enum_type is not None:
            out[f.name] = f.enum_type.values_by_number[value].name
        else:
            out[f.name] = value
    return out


def _ago(unix_ms: int, now_ms: int | None = None) -> str:
    if not unix_ms:
        return "-"
    s = ((now_ms or time.time() * 1000) - unix_ms) / 1000
    return f"{s:.1f}s" if s < 60 else f"{s / 60:.0f}m" if s < 3600 else f"{s / 3600:.1f}h"


def _clock(unix_ms: int) -> str:
    return datetime.fromtimestamp(unix_ms / 1000).strftime("%H:%M:%S.%f")[:-3]


def sessions_table(sessions: list[Any]) -> list[str]:
    lines = [f"{'SESSION':<14} {'AGENT':<12} {'NODE':<18} {'TURNS':>5}  {'STATE':<12} "
             f"{'ORCHESTRATOR':<22} {'STT':<22} {'AGE':>6}"]
    for s in sessions:
        lines.append(f"{s.id:<14} {s.agent or '-':<12} {s.node or '-':<18} {s.turns:>5}  "
                     f"{s.state:<12} {s.orchestrator or '-':<22} {s.stt_worker or '-':<22} "
                     f"{_ago(s.started_unix_ms):>6}")
    if not sessions:
        lines.append("(no live sessions)")
    return lines


def workers_table(workers: list[Any]) -> list[str]:
    lines = [f"{'REPLICA':<24} {'STAGE':<13} {'VERSION':<8} {'SESS':>4} {'INFL':>4} "
             f"{'LOAD':>5} {'CAP':>4}  {'STATE':<9} {'SEEN':>6}"]
    for w in workers:
        lines.append(f"{w.id:<24} {w.stage:<13} {w.version or '-':<8} {len(w.sessions):>4} "
                     f"{w.inflight:>4} {w.load:>5.2f} {w.capacity:>4}  "
                     f"{'draining' if w.draining else 'serving':<9} "
                     f"{_ago(w.last_seen_unix_ms):>6}")
    if not workers:
        lines.append("(no replicas heartbeating)")
    return lines


def session_lines(d: Any) -> list[str]:
    s = d.session
    lines = [f"session {s.id}  agent {s.agent or '-'}  node {s.node or '-'}  turns {s.turns}  "
             f"state {s.state}",
             f"  orchestrator {s.orchestrator or '-'}  stt {s.stt_worker or '-'}  started "
             f"{_clock(s.started_unix_ms)}" + (f"  ended {_clock(s.ended_unix_ms)}"
                                                if s.ended_unix_ms else "")]
    names = list(LATENCIES) + sorted({n for t in d.turns for n in t.latency_ms} - set(LATENCIES))
    lines.append("  turn  " + " ".join(f"{n:>12}" for n in names) + "  state")
    for t in d.turns:
        cells = " ".join(f"{t.latency_ms[n]:>12.0f}" if n in t.latency_ms else f"{'-':>12}"
                         for n in names)
        lines.append(f"  {t.turn:>4}  {cells}  {t.state or '-'}"
                     + (f" @{t.node}" if t.node else ""))
    if not d.turns:
        lines.append("  (no turns yet)")
    for e in d.errors:
        lines.append(f"  error {_clock(e.at_unix_ms)} {e.service}: {e.code}: {e.message}")
    if d.HasField("post_call"):
        p = d.post_call
        lines.append(f"  post-call {p.status} ({p.target or '-'}, {p.attempts} attempts): "
                     + (p.fields_json or f"error: {p.error}")
                     + (f"; last failure: {p.last_failure}" if p.last_failure else ""))
    return lines


def event_line(e: Any) -> str:
    kind = pb.Event.Kind.Name(e.kind).lower()
    return f"{_clock(e.at_unix_ms)}  {kind:<16} {e.detail}"


# --- commands -----------------------------------------------------------------------------


def run(args: Any, out=sys.stdout) -> int:
    """One ``voxbus ctl`` command; CtlError for what the operator must be told."""
    client = Client(target(args.address, args.token))
    try:
        return _COMMANDS[args.ctl_cmd](client, args, out)
    finally:
        client.close()


def _print(out, *lines: str) -> None:
    for line in lines:
        print(line, file=out, flush=True)


def _json(out, msg: Any) -> None:
    _print(out, json.dumps(to_dict(msg) if not isinstance(msg, dict) else msg))


def _sessions(client: Client, args: Any, out) -> int:
    reply = client.call("ListSessions", pb.ListSessionsRequest())
    if args.json:
        _json(out, {"sessions": [to_dict(s) for s in reply.sessions]})
    else:
        _print(out, *sessions_table(list(reply.sessions)))
    return 0


def _session(client: Client, args: Any, out) -> int:
    reply = client.call("GetSession", pb.GetSessionRequest(session=args.id))
    if args.json:
        _json(out, reply)
    else:
        _print(out, *session_lines(reply))
    return 0


def _workers(client: Client, args: Any, out) -> int:
    reply = client.call("ListWorkers", pb.ListWorkersRequest(stage=args.stage or ""))
    if args.json:
        _json(out, {"workers": [to_dict(w) for w in reply.workers]})
    else:
        _print(out, *workers_table(list(reply.workers)))
    return 0


def _end(client: Client, args: Any, out) -> int:
    reply = client.call("EndSession", pb.EndSessionRequest(session=args.id,
                                                          reason=args.reason or ""))
    if args.json:
        _json(out, reply)
    else:
        _print(out, reply.detail)
    return 0 if reply.ended else 1


def _drain(client: Client, args: Any, out) -> int:
    request = pb.DrainWorkerRequest(worker=args.replica, wait=args.wait,
                                    timeout_s=args.timeout)
    if args.wait and not args.json:
        _print(out, f"draining {args.replica}; waiting up to {args.timeout:.0f} s...")
    reply = client.call("DrainWorker", request,
                        timeout=CALL_S + (args.timeout if args.wait else 0))
    if args.json:
        _json(out, reply)
    elif not args.wait:
        _print(out, f"{args.replica} is draining (voxbus ctl drain {args.replica} --wait to "
                    "wait for it)")
    elif reply.drained:
        how = "left" if reply.left else "has no sessions or work left"
        _print(out, f"{args.replica} drained: it {how} after {reply.waited_s:.1f} s")
    else:
        _print(out, f"{args.replica} still has work after {reply.waited_s:.1f} s")
    return 0 if (reply.drained or not args.wait) else 1


def _watch(client: Client, args: Any, out) -> int:
    seen = 0
    for event in client.stream("WatchEvents", pb.WatchEventsRequest(
            replay_current=args.current)):
        if args.json:
            _json(out, event)
        else:
            _print(out, event_line(event))
        seen += 1
        if args.count and seen >= args.count:
            break
    return 0


def _top(client: Client, args: Any, out) -> int:
    """A live view: in place on a terminal (like top), one block per refresh otherwise."""
    live = out.isatty() and not args.json
    shown = 0
    while True:
        workers = client.call("ListWorkers", pb.ListWorkersRequest()).workers
        sessions = client.call("ListSessions", pb.ListSessionsRequest()).sessions
        if args.json:
            _json(out, {"at_unix_ms": int(time.time() * 1000),
                        "workers": [to_dict(w) for w in workers],
                        "sessions": [to_dict(s) for s in sessions]})
        else:
            busy = sum(1 for w in workers if w.load >= 0.999)
            head = (f"voxbus top  {datetime.now():%H:%M:%S}  {client.where.address}  "
                    f"{len(workers)} replicas ({busy} full)  {len(sessions)} sessions")
            block = [head, "", *workers_table(list(workers)), "",
                     *sessions_table(list(sessions))]
            if live:
                out.write("\x1b[H\x1b[2J" + "\n".join(block) + "\n")
                out.flush()
            else:
                _print(out, *block, "")
        shown += 1
        if args.count and shown >= args.count:
            return 0
        time.sleep(args.interval)


_COMMANDS = {"sessions": _sessions, "session": _session, "workers": _workers, "end": _end,
             "drain": _drain, "watch": _watch, "top": _top}

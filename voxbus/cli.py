"""The one entry point: ``voxbus up | talk | record | sessions | transcript | replay | token | ctl |
control | bench | <stage>``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

NATS_HINT = "is `voxbus up` running? (or pass --nats URL / set VOXBUS_NATS_URL)"


def _nats_failed(e: ConnectionError) -> str:
    """One line for a NATS connection that failed: unreachable (is it running?), or refused
    (the credentials: the line already says what to do)."""
    from voxbus.bus import NatsRefused

    return str(e) if isinstance(e, NatsRefused) else f"{e}: {NATS_HINT}"


def _run_service(name: str) -> int:
    from voxbus.runner import configure_logging, run_forever

    level = os.environ.get("VOXBUS_LOG_LEVEL", "INFO").strip().upper() or "INFO"
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        print(f"voxbus: VOXBUS_LOG_LEVEL={level!r} is not a log level: use DEBUG, INFO, "
              "WARNING or ERROR", file=sys.stderr)
        return 2
    configure_logging(level)
    if name == "stt":
        from services.stt.worker import SttWorker as cls
    elif name == "llm":
        from services.llm.worker import LlmWorker as cls
    elif name == "tts":
        from services.tts.worker import TtsWorker as cls
    elif name == "gateway":
        from services.media_gateway.worker import GatewayWorker as cls
    elif name == "control":
        from voxbus.control.service import ControlService as cls
    elif name == "post_call":
        from services.post_call.stage import PostCallStage as cls
    else:
        from services.orchestrator.worker import OrchestratorWorker as cls
    try:
        asyncio.run(run_forever(cls()))
    except ConnectionError as e:  # NATS unreachable or refusing our credentials: one line
        print(f"voxbus {name}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def _recordings(args) -> int:
    """``voxbus sessions | record | replay``: recordings in JetStream and in files."""
    import json
    from dataclasses import asdict
    from datetime import datetime

    from voxbus import recording
    from voxbus.config import Settings
    from voxbus.replay import (
        Replayer,
        format_corpus,
        format_report,
        recording_files,
        replay_paths,
        to_json,
    )
    from voxbus.timeline import write_timeline

    settings = Settings()
    if args.cmd == "sessions":
        from voxbus.post_call_results import ResultStore, describe_result, summary

        async def listed():
            async with recording.Recorder(args.nats, settings.prefix) as rec:
                found = await rec.sessions()
                results = await ResultStore(rec.js, settings.prefix).open()
                return found, (await results.all() if results else {})

        found, post_call = asyncio.run(listed())
        if not found and not args.json:
            print(f"no recorded sessions for prefix {settings.prefix!r}")
        for s in found:
            when = datetime.fromtimestamp(s.started_at_us / 1e6).strftime("%Y-%m-%d %H:%M:%S")
            result = post_call.get(s.session)
            print(json.dumps({**asdict(s), "post_call": summary(result)}) if args.json else
                  f"{s.session:<14} {when}  {s.duration_s:7.1f} s  {s.messages:6d} msgs  "
                  f"agent {s.agent or '-':<12} {'ended: ' + s.ended if s.ended else 'open'}"
                  + (f"  post-call: {describe_result(result)}" if result else ""))
        return 0
    if args.cmd == "transcript":
        from voxbus.transcript import format_text, read_transcript

        async def read():
            async with recording.Recorder(args.nats, settings.prefix) as rec:
                return await read_transcript(rec.js, rec.subjects, args.session)

        lines = asyncio.run(read())
        if args.json:
            print(json.dumps({"session": args.session,
                              "lines": [line.as_dict() for line in lines]}))
        else:
            print(format_text(args.session, lines))
        return 0
    if args.cmd == "record":
        if not args.session and not args.enable:
            print("voxbus record: name a session (see voxbus sessions)", file=sys.stderr)
            return 2

        async def exported():
            async with recording.Recorder(args.nats, settings.prefix) as rec:
                if args.enable:
                    await rec.enable(max_age_s=settings.record_max_age_s,
                                     max_bytes=settings.record_max_bytes,
                                     replicas=settings.js_replicas)
                    print(f"recording sessions of prefix {settings.prefix!r} in {rec.stream}")
                return await rec.export(args.session) if args.session else None

        rec = asyncio.run(exported())
        if rec is not None:
            path = recording.write(args.output or f"{args.session}{recording.SUFFIX}", rec)
            print(f"{path}: session {args.session}, {len(rec.messages)} messages, "
                  f"{rec.duration_s:.1f} s")
        return 0
    target = Path(args.path)
    if args.timeline:
        if target.is_dir():
            print("voxbus replay: --timeline draws one file, not a folder", file=sys.stderr)
            return 2
        rec = recording.read(target)
        out = write_timeline(rec, args.timeline)
        print(f"{out}: timeline of session {rec.header.session}, {rec.duration_s:.1f} s")
        return 0
    files = recording_files(target)
    corpus = target.is_dir()

    def show(report) -> None:
        if not args.json:
            print(format_report(report) + ("\n" if corpus else ""), flush=True)

    async def replayed():
        async with Replayer(args.nats, settings.prefix, speed=args.speed,
                            agent=args.agent) as rp:
            return await replay_paths(rp, files, args.stage or "live", on_report=show)

    reports = asyncio.run(replayed())
    if args.save and not corpus and reports[0].replayed is not None:
        recording.write(args.save, reports[0].replayed)
        print(f"{args.save}: the replayed session {reports[0].replayed_session}",
              file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(to_json(reports))
    elif corpus:
        print(format_corpus(reports))
    if any(r.error for r in reports):
        return 1
    return 3 if args.check and any(r.changed for r in reports) else 0


def _add_ctl_parser(sub) -> None:
    """``voxbus ctl``'s subcommands (here, so that other commands never import gRPC)."""
    p = sub.add_parser("ctl", help="operate a running voxbus over its gRPC control plane")
    p.add_argument("--address", help="control service HOST:PORT (default: what voxbus up "
                                     "wrote, or VOXBUS_CONTROL_ADDRESS)")
    p.add_argument("--token", help="bearer token (default: VOXBUS_CONTROL_TOKEN, or what voxbus "
                                   "up wrote)")
    cmds = p.add_subparsers(dest="ctl_cmd", required=True)

    def command(name: str, help: str):
        c = cmds.add_parser(name, help=help)
        c.add_argument("--json", action="store_true", help="JSON instead of a table")
        return c

    command("sessions", "live sessions")
    command("session", "one session: its turns' latencies and errors").add_argument("id")
    command("workers", "replicas with their load").add_argument(
        "--stage", help="only this stage (stt, llm, tts, orchestrator, gateway, control)")
    c = command("end", "hang up a session everywhere")
    c.add_argument("id")
    c.add_argument("--reason", default="")
    c = command("drain", "make a replica take no new work, finish and exit")
    c.add_argument("replica", help="replica id (see voxbus ctl workers)")
    c.add_argument("--wait", action="store_true", help="return once it has drained or left")
    c.add_argument("--timeout", type=float, default=60.0, help="how long --wait waits (s)")
    c = command("watch", "sessions, replicas and errors as they happen")
    c.add_argument("--current", action="store_true",
                   help="start with the live sessions and replicas")
    c.add_argument("--count", type=int, default=0, help="stop after N events")
    c = command("top", "a live table of replicas and sessions")
    c.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    c.add_argument("--count", type=int, default=0, help="stop after N refreshes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voxbus", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p_up = sub.add_parser("up", help="run everything locally: NATS, LLM endpoint, all stages")
    p_up.add_argument("--nats-port", type=int, default=4222)
    p_up.add_argument("--http-port", type=int, default=None,
                      help="the page's port (default VOXBUS_HTTP_PORT, or 8080)")
    p_up.add_argument("--scale", metavar="STAGE=N,...",
                      help="replicas per stage, e.g. stt=2,llm=2,tts=2,orchestrator=2 (default 1)")

    for name in ("stt", "llm", "tts", "orchestrator", "gateway", "post_call"):
        sub.add_parser(name, help=f"run one {name} replica (configured by environment)")
    sub.add_parser("control", help="run the gRPC control plane (VOXBUS_CONTROL_*)")
    _add_ctl_parser(sub)
    from voxbus.load import add_parser as add_bench_parser

    add_bench_parser(sub)

    p_token = sub.add_parser("token", help="mint a gateway session token (VOXBUS_GATEWAY_SECRET)")
    p_token.add_argument("--agent", default="chat")

    p_talk = sub.add_parser("talk", help="a whole conversation from WAV files, headless")
    p_talk.add_argument("wavs", nargs="+", help="one WAV per user turn")
    p_talk.add_argument("--nats", default=os.environ.get("VOXBUS_NATS_URL",
                                                         "nats://127.0.0.1:4222"))
    p_talk.add_argument("--json", action="store_true", help="one JSON object per turn")
    p_talk.add_argument("--out", help="save the agent's audio to this WAV")
    p_talk.add_argument("--agent", default="chat")

    nats_default = os.environ.get("VOXBUS_NATS_URL", "nats://127.0.0.1:4222")
    p_sessions = sub.add_parser("sessions", help="list the recorded sessions")
    p_sessions.add_argument("--nats", default=nats_default)
    p_sessions.add_argument("--json", action="store_true", help="one JSON object per session")

    p_transcript = sub.add_parser("transcript", help="a recorded session's transcript")
    p_transcript.add_argument("session", help="session id (see voxbus sessions)")
    p_transcript.add_argument("--nats", default=nats_default)
    p_transcript.add_argument("--json", action="store_true",
                              help="JSON: turn, role, text and timestamps per line")

    p_record = sub.add_parser("record", help="export a recorded session to a file")
    p_record.add_argument("session", nargs="?", help="session id (see voxbus sessions)")
    p_record.add_argument("-o", "--output", help="file to write (default SESSION.vxrec)")
    p_record.add_argument("--nats", default=nats_default)
    p_record.add_argument("--enable", action="store_true",
                          help="turn recording on for this NATS and prefix (VOXBUS_RECORD_*)")

    p_replay = sub.add_parser("replay", help="replay a recording (or a folder of them)")
    p_replay.add_argument("path", help="a .vxrec file, or a folder of them (corpus regression)")
    p_replay.add_argument("--nats", default=nats_default)
    p_replay.add_argument("--stage", choices=("stt", "llm", "tts"),
                          help="feed the recorded inputs of this stage only")
    p_replay.add_argument("--speed", type=float, default=1.0,
                          help="feed recorded audio this many times faster (default 1)")
    p_replay.add_argument("--agent", help="run the replay with this agent instead")
    p_replay.add_argument("--timeline", metavar="OUT.html",
                          help="draw the recording as a timeline instead of replaying it")
    p_replay.add_argument("--save", metavar="NEW.vxrec", help="write the replayed session here")
    p_replay.add_argument("--json", action="store_true", help="machine-readable comparison")
    p_replay.add_argument("--check", action="store_true",
                          help="exit 3 when a session changed (for CI)")

    args = parser.parse_args(argv)
    if args.cmd == "ctl":
        from voxbus.ctl import CtlError, run

        try:
            return run(args)
        except CtlError as e:
            print(f"voxbus ctl: {e}", file=sys.stderr, flush=True)
            return e.status
        except KeyboardInterrupt:
            return 0
    if args.cmd == "bench":
        from voxbus.load import run as bench_load

        try:
            return bench_load(args)
        except KeyboardInterrupt:
            return 130
    if args.cmd in ("sessions", "transcript", "record", "replay"):
        from voxbus.errors import VoxbusError
        try:
            return _recordings(args)
        except ConnectionError as e:
            print(f"voxbus {args.cmd}: {_nats_failed(e)}", file=sys.stderr)
            return 2
        except (OSError, ValueError, VoxbusError) as e:
            print(f"voxbus {args.cmd}: {e}", file=sys.stderr)
            return 2
    if args.cmd == "up":
        from voxbus.runner import configure_logging
        from voxbus.up import parse_scale, up

        try:
            scale = parse_scale(args.scale)
        except ValueError as e:
            print(f"voxbus up: {e}", file=sys.stderr)
            return 2
        from voxbus.config import Settings

        http_port = args.http_port if args.http_port is not None else Settings().http_port
        configure_logging("WARNING")
        return asyncio.run(up(args.nats_port, http_port, scale))
    if args.cmd == "token":
        from services.media_gateway.tokens import TokenAuthority
        from voxbus.config import Settings

        settings = Settings()
        if not settings.gateway_secret:
            print("voxbus token: set VOXBUS_GATEWAY_SECRET to the gateway's secret",
                  file=sys.stderr)
            return 2
        token, _ = TokenAuthority(settings.gateway_secret, settings.token_ttl_s).mint(args.agent)
        print(token)
        return 0
    if args.cmd == "talk":
        from voxbus.errors import VoxbusError
        from voxbus.talk import format_turn, talk, to_json

        counter = iter(range(1, 10_000))

        def show(result):
            print(to_json(result) if args.json else format_turn(next(counter), result),
                  flush=True)

        try:
            asyncio.run(talk(args.nats, args.wavs, agent=args.agent, out_wav=args.out,
                             prefix=os.environ.get("VOXBUS_PREFIX", "vox"), on_turn=show))
        except ConnectionError as e:
            print(f"voxbus talk: {_nats_failed(e)}", file=sys.stderr)
            return 2
        except (OSError, ValueError, VoxbusError) as e:
            print(f"voxbus talk: {e}", file=sys.stderr)
            return 2
        return 0
    return _run_service(args.cmd)


if __name__ == "__main__":
    sys.exit(main())

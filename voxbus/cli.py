"""The one entry point: ``voxbus up | talk | token | stt | llm | tts | orchestrator | gateway``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys


def _run_service(name: str) -> int:
    from voxbus.runner import configure_logging, run_forever

    configure_logging(os.environ.get("VOXBUS_LOG_LEVEL", "INFO"))
    if name == "stt":
        from services.stt.worker import SttWorker as cls
    elif name == "llm":
        from services.llm.worker import LlmWorker as cls
    elif name == "tts":
        from services.tts.worker import TtsWorker as cls
    elif name == "gateway":
        from services.media_gateway.worker import GatewayWorker as cls
    else:
        from services.orchestrator.worker import OrchestratorWorker as cls
    asyncio.run(run_forever(cls()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="voxbus", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p_up = sub.add_parser("up", help="run everything locally: NATS, LLM endpoint, all stages")
    p_up.add_argument("--nats-port", type=int, default=4222)
    p_up.add_argument("--http-port", type=int,
                      default=int(os.environ.get("VOXBUS_HTTP_PORT", "8080")))

    for name in ("stt", "llm", "tts", "orchestrator", "gateway"):
        sub.add_parser(name, help=f"run one {name} replica (configured by environment)")

    p_token = sub.add_parser("token", help="mint a gateway session token (VOXBUS_GATEWAY_SECRET)")
    p_token.add_argument("--agent", default="chat")

    p_talk = sub.add_parser("talk", help="a whole conversation from WAV files, headless")
    p_talk.add_argument("wavs", nargs="+", help="one WAV per user turn")
    p_talk.add_argument("--nats", default=os.environ.get("VOXBUS_NATS_URL",
                                                         "nats://127.0.0.1:4222"))
    p_talk.add_argument("--json", action="store_true", help="one JSON object per turn")
    p_talk.add_argument("--out", help="save the agent's audio to this WAV")
    p_talk.add_argument("--agent", default="chat")

    args = parser.parse_args(argv)
    if args.cmd == "up":
        from voxbus.runner import configure_logging
        from voxbus.up import up

        configure_logging("WARNING")
        return asyncio.run(up(args.nats_port, args.http_port))
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
        except (ConnectionError, OSError, VoxbusError) as e:
            print(f"voxbus talk: {e}", file=sys.stderr)
            return 2
        return 0
    return _run_service(args.cmd)


if __name__ == "__main__":
    sys.exit(main())

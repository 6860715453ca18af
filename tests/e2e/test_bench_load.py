"""``voxbus bench load`` run as an operator runs it, against real replicas of every stage (real
Whisper, SmolLM2 on the embedded endpoint, Piper, Silero, Smart Turn) on a real nats-server,
with a real control plane for the replicas' loads: two sessions for a few seconds."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import replace

import pytest

from voxbus.control.service import ControlService
from voxbus.load import format_load

TOKEN = "load-test-token-" + "x" * 20
RUN = ["--sessions", "2", "--for", "3", "--ramp", "1", "--pause", "0.5-1", "--warmup", "0",
       "--quiet"]

pytestmark = pytest.mark.slow


@pytest.fixture
async def deployment(settings, llm_endpoint, tmp_path):
    """Every stage (replies capped at 16 tokens: a run ends once its last reply has played)
    and a control plane; the environment and arguments the CLI is run with."""
    from services.llm.worker import LlmWorker
    from services.orchestrator.worker import OrchestratorWorker
    from services.stt.worker import SttWorker
    from services.tts.worker import TtsWorker
    from voxbus.llm_server import MODEL_ALIAS

    s = replace(settings, llm_model=MODEL_ALIAS, llm_max_tokens=16,
                control_address="127.0.0.1:0", control_token=TOKEN)
    services = [SttWorker(s), TtsWorker(s), LlmWorker(s, base_url=llm_endpoint),
                OrchestratorWorker(s), ControlService(replace(s, worker_id="ctl"))]
    for svc in services:
        await svc.start()
    env = dict(os.environ, VOXBUS_PREFIX=s.prefix,
               VOXBUS_CONTROL_FILE=str(tmp_path / "control.json"))
    env.pop("VOXBUS_CONTROL_TOKEN", None)
    yield env, ["--nats", s.nats_url, "--control-address", services[-1].address,
                "--control-token", TOKEN]
    for svc in reversed(services):
        await svc.stop()


async def bench_load(env: dict, *args: str) -> str:
    """Run the command without blocking this loop (the stages run on it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voxbus.cli", "bench", "load", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out.decode()}\n{err.decode()}"
    return out.decode()


async def test_load_prints_stage_rows_and_json_that_adds_up(deployment):
    env, where = deployment
    text = await bench_load(env, *RUN, *where)
    assert "2/2 sessions" in text, text
    spoken = int(text.split("turns: ")[1].split(" spoken")[0])
    assert spoken >= 2, text  # each session spoke at least once
    rows = {line.split()[0]: line.split() for line in text.splitlines()
            if line.split()[:1] and line.split()[0] in ("eou_delay", "stt_ttfs", "llm_ttft",
                                                        "tts_ttfa", "e2e_latency")}
    assert set(rows) == {"eou_delay", "stt_ttfs", "llm_ttft", "tts_ttfa", "e2e_latency"}, text
    for name in ("stt_ttfs", "llm_ttft", "e2e_latency"):
        assert rows[name][2].isdigit() and int(rows[name][4]) > 0, text  # p50 ms, turns
    assert rows["llm_ttft"][1] == "llm" and rows["llm_ttft"][5] == "1", text  # one replica
    assert "errors by code:" in text and "utilization not measured" not in text, text

    report = json.loads(await bench_load(env, *RUN, "--json", *where))
    turns = report["turns"]
    assert report["sessions"] == 2 and len(report["per_session"]) == 2, report
    assert turns["spoken"] == sum(s["turns"] for s in report["per_session"]) >= 2, report
    assert turns["answered"] == sum(s["answered"] for s in report["per_session"]), report
    assert turns["answered"] + turns["unanswered"] == turns["spoken"], report
    assert 0 < turns["declared_over"] <= turns["spoken"], report
    for name, fig in report["latency_ms"].items():
        assert fig["n"] <= turns["spoken"], (name, report)
        if fig["n"]:
            assert 0 <= fig["p50"] <= fig["p95"], (name, report)
    assert 0 < report["latency_ms"]["e2e_latency"]["n"] <= turns["answered"], report
    assert sum(report["errors"].values()) >= turns["with_errors"], report
    for stage in ("orchestrator", "stt", "llm", "tts"):
        use = report["stages"][stage]
        assert use["replicas"] == 1 and use["samples"] > 0, (stage, report)
        assert 0 <= use["utilization"] <= use["peak"] <= 1, (stage, report)
    # Two sessions held by the one orchestrator and STT replica all along (capacity 16).
    assert report["stages"]["orchestrator"]["peak"] == pytest.approx(2 / 16, abs=0.07)
    # The tables are drawn from the same JSON: a saved run shows again, figures unchanged.
    shown = format_load(report)
    assert f"turns: {turns['spoken']} spoken, {turns['answered']} answered" in shown, shown

"""``voxbus bench load``: N concurrent conversations through a running deployment, measured
per stage, and ``--find-capacity``: the most sessions it serves with e2e p95 under a bound.

Each session is a :class:`voxbus.caller.Caller` on the bus, as ``voxbus talk`` is: it speaks
its utterances in a loop, in real time, waits for the agent's reply to finish playing, pauses
like a person, and speaks again until the run is over. Latencies are the figures the
orchestrator and the STT stage publish on the session (``Metric``), and e2e is the first agent
audio heard minus the end of the user's speech, as ``voxbus talk`` computes it. Each stage's
utilization is its replicas' heartbeat ``load`` (work in progress over declared capacity),
read through the control plane, which hears every heartbeat (the CLI's NATS role may not).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from voxbus.errors import VoxbusError

if TYPE_CHECKING:  # the caller pulls in NATS and the wire schema: not for every CLI start
    from voxbus.caller import Caller, Turn, Utterance

DEFAULT_PAUSE_S = (1.5, 4.0)
"""A person's pause after the agent's reply before speaking again (uniform, seconds)."""
TURN_TIMEOUT_S = 25.0
"""A question with no agent audio this long after the speech ended is unanswered."""
SAMPLE_S = 1.0
"""How often replica loads are read (replicas heartbeat every second by default)."""
FIGURE_STAGE = {"eou_delay": "orchestrator", "stt_ttfs": "stt", "llm_ttft": "llm",
                "tts_ttfa": "tts", "e2e_latency": ""}
"""The stage whose work each figure times (e2e: all of them)."""
STAGES = ("orchestrator", "stt", "llm", "tts")


def default_ramp_s(sessions: int) -> float:
    """Two seconds between session starts, at most ten in all: callers that all speak at the
    same instant measure a burst, not a load."""
    return min(10.0, 2.0 * (sessions - 1))


@dataclass
class LoadConfig:
    nats_url: str
    prefix: str = "vox"
    agent: str = "chat"
    sessions: int = 1
    ramp_s: float | None = None
    """Sessions start evenly over this many seconds (None: :func:`default_ramp_s`)."""
    for_s: float = 60.0
    """After the ramp, every session keeps talking this long; a turn begun finishes."""
    pause_s: tuple[float, float] = DEFAULT_PAUSE_S
    turn_timeout_s: float = TURN_TIMEOUT_S
    seed: int = 7
    control_address: str | None = None
    control_token: str | None = None

    @property
    def ramp(self) -> float:
        return default_ramp_s(self.sessions) if self.ramp_s is None else self.ramp_s


# --- utilization ---------------------------------------------------------------------------


@dataclass
class StageUse:
    """One stage over a run: its replicas and how loaded they were."""

    replicas: int = 0
    capacity: list[int] = field(default_factory=list)
    utilization: float | None = None
    """Mean over samples of the replicas' mean ``load`` (0-1)."""
    peak: float | None = None
    full: float | None = None
    """Share of samples with every replica at its capacity (load 1)."""
    samples: int = 0


class ReplicaLoads:
    """Samples every replica's heartbeat load from the control plane's ``ListWorkers``, found
    the way ``voxbus ctl`` finds it (flags, environment, the file ``voxbus up`` wrote)."""

    def __init__(self, address: str | None = None, token: str | None = None):
        self.address, self.token = address, token
        self.client = None
        self.note = ""
        """Why utilization is not measured, when it is not."""
        self.samples: list[dict[str, list[tuple[float, int]]]] = []
        """Per sample: stage → (load, capacity) of each live replica that takes work."""

    def connect(self) -> ReplicaLoads:
        from voxbus.ctl import Client, CtlError, target

        try:
            where = target(self.address, self.token)
        except CtlError:
            self.note = ("utilization not measured: no control plane found (voxbus up writes "
                         "where it is; or pass --control-address and --control-token)")
            return self
        self.client = Client(where)
        try:
            self._read()
        except CtlError as e:
            self.note = f"utilization not measured: {e}"
            self.close()
        return self

    def _read(self) -> dict[str, list[tuple[float, int]]]:
        from voxbus.control.protos import pb

        workers = self.client.call("ListWorkers", pb.ListWorkersRequest()).workers
        out: dict[str, list[tuple[float, int]]] = {}
        for w in workers:
            if w.stage in STAGES and not w.draining:
                out.setdefault(w.stage, []).append((float(w.load), int(w.capacity)))
        return out

    async def sample(self, until: float) -> None:
        """Until ``until`` (monotonic), every ``SAMPLE_S``; a failed read is skipped."""
        from voxbus.ctl import CtlError

        if self.client is None:
            return
        while time.monotonic() < until:
            tick = time.monotonic()
            try:
                self.samples.append(await asyncio.to_thread(self._read))
            except CtlError as e:
                self.note = f"utilization partly missing: {e}"
            await asyncio.sleep(max(0.0, min(until, tick + SAMPLE_S) - time.monotonic()))

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def stages(self) -> dict[str, StageUse]:
        out = {}
        for stage in STAGES:
            use = StageUse()
            means, full = [], 0
            for sample in self.samples:
                reps = sample.get(stage, [])
                if not reps:
                    continue
                use.replicas = max(use.replicas, len(reps))
                use.capacity = sorted({*use.capacity, *(c for _, c in reps)})
                means.append(sum(load for load, _ in reps) / len(reps))
                full += all(load >= 0.999 for load, _ in reps)
            if means:
                use.samples = len(means)
                use.utilization = sum(means) / len(means)
                use.peak = max(means)
                use.full = full / len(means)
            out[stage] = use
        return out


# --- one run -------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear between closest ranks (numpy's default); a miss (``inf``) among the two ranks
    used makes it ``inf``, so unanswered turns count as over any bound."""
    vals = sorted(values)
    if not vals:
        return None
    pos = (len(vals) - 1) * q / 100
    lo, hi = vals[math.floor(pos)], vals[math.ceil(pos)]
    if math.isinf(lo) or math.isinf(hi):
        return math.inf
    return lo + (hi - lo) * (pos - math.floor(pos))


@dataclass
class LoadResult:
    config: LoadConfig
    corpus: str
    turns: list[Turn] = field(default_factory=list)
    sessions: list[dict] = field(default_factory=list)
    """Per started session: its id, the turns it spoke and had answered, seconds it talked."""
    start_errors: list[str] = field(default_factory=list)
    stages: dict[str, StageUse] = field(default_factory=dict)
    utilization_note: str = ""
    wall_s: float = 0.0
    cpu_share: float = 0.0
    """The load generator's own CPU time over the run's wall time (1.0 = one core)."""

    def figures(self) -> dict[str, dict[str, float | int | None]]:
        from voxbus.caller import FIGURES

        out = {}
        for name in FIGURES:
            vals = [v for t in self.turns if (v := t.latency_ms()[name]) is not None]
            out[name] = {"p50": percentile(vals, 50), "p95": percentile(vals, 95),
                         "n": len(vals)}
        return out

    def errors(self) -> Counter[str]:
        """Turns' error events by stage and code, and sessions that could not start."""
        codes: Counter[str] = Counter()
        for t in self.turns:
            for e in t.errors:
                service, code = (e.split(": ") + [""])[:2]
                codes[f"{service}: {code}"] += 1
        for e in self.start_errors:
            codes[f"session start: {e.split(': ')[0]}"] += 1
        return codes

    def error_examples(self) -> list[str]:
        """One message of each kind (the first three words: service, code, what)."""
        shapes: dict[str, str] = {}
        for e in [e for t in self.turns for e in t.errors] + self.start_errors:
            shapes.setdefault(" ".join(e.split()[:3]), e[:200])
        return list(shapes.values())

    @property
    def answered(self) -> int:
        return sum(t.answered for t in self.turns)

    @property
    def fallback(self) -> int:
        return sum(t.fallback for t in self.turns)

    def e2e_p95_with_misses(self) -> float | None:
        """e2e p95 where a turn without a real answer (no agent audio, or the fallback line)
        counts as a miss: over any bound."""
        vals = [math.inf if (t.first_audio_at is None or t.fallback) else
                t.latency_ms()["e2e_latency"] for t in self.turns]
        return percentile(vals, 95)

    def to_dict(self) -> dict:
        c = self.config
        return {
            "sessions": c.sessions, "ramp_s": c.ramp, "for_s": c.for_s, "agent": c.agent,
            "pause_s": list(c.pause_s),
            "corpus": self.corpus, "wall_s": round(self.wall_s, 1),
            "turns": {"spoken": len(self.turns), "answered": self.answered,
                      "unanswered": len(self.turns) - self.answered,
                      "declared_over": sum(t.user_ended for t in self.turns),
                      "with_errors": sum(bool(t.errors) for t in self.turns),
                      "fallback": self.fallback},
            "latency_ms": {k: {q: _round(v) for q, v in f.items()}
                           for k, f in self.figures().items()},
            "e2e_p95_with_misses_ms": _round(self.e2e_p95_with_misses()),
            "errors": dict(self.errors().most_common()),
            "error_examples": self.error_examples(),
            "start_errors": self.start_errors,
            "stages": {s: {"replicas": u.replicas, "capacity": u.capacity,
                           "utilization": _round(u.utilization, 3), "peak": _round(u.peak, 3),
                           "full": _round(u.full, 3), "samples": u.samples}
                       for s, u in self.stages.items()},
            "utilization_note": self.utilization_note,
            "per_session": self.sessions,
            "load_generator_cpu": round(self.cpu_share, 3),
        }


def _round(v: float | None, digits: int = 1) -> float | None:
    if v is None or math.isinf(v):
        return None if v is None else float("inf")
    return round(v, digits)


async def converse(caller: Caller, utterances: list[Utterance], until: float,
                   rng: random.Random, *, pause_s: tuple[float, float] = DEFAULT_PAUSE_S,
                   turn_timeout_s: float = TURN_TIMEOUT_S,
                   on_turn: Callable[[Caller, Turn, Utterance], None] | None = None) -> None:
    """Speak the utterances in a loop (from a random one on) until ``until`` (monotonic):
    each waits for the reply to finish playing, then a pause; a turn begun is finished."""
    i = rng.randrange(len(utterances))
    while time.monotonic() < until and not caller.ended:
        u = utterances[i % len(utterances)]
        i += 1
        turn = await caller.say(u, turn_timeout_s=turn_timeout_s)
        if on_turn:
            on_turn(caller, turn, u)
        pause = rng.uniform(*pause_s)
        if time.monotonic() + pause < until:
            await asyncio.sleep(pause)


async def run_load(config: LoadConfig, utterances: list[Utterance], *, corpus: str = "",
                   log: Callable[[str], None] | None = None) -> LoadResult:
    """``config.sessions`` callers, started evenly over the ramp, each talking until the ramp
    plus ``config.for_s`` are over; loads sampled from the end of the ramp to the end."""
    from voxbus.caller import Caller

    if not utterances:
        raise ValueError("no utterances to speak")
    result = LoadResult(config, corpus)
    rng = random.Random(config.seed)
    loads = await asyncio.to_thread(
        ReplicaLoads(config.control_address, config.control_token).connect)
    n, ramp = config.sessions, config.ramp
    t0, cpu0 = time.monotonic(), time.process_time()
    until = t0 + ramp + config.for_s
    callers: list[Caller] = []
    live: dict[str, float] = {}
    """Session → seconds it talked for."""

    async def session(k: int, seed: float) -> None:
        await asyncio.sleep(max(0.0, t0 + k * ramp / max(1, n - 1) - time.monotonic()))
        caller = Caller(config.nats_url, config.prefix, config.agent, f"load{k}",
                        keep_audio=False)
        try:
            await caller.start()
        except (VoxbusError, ConnectionError, TimeoutError) as e:
            code = getattr(e, "code", None) or type(e).__name__
            result.start_errors.append(f"{code}: {e}")
            if log:
                log(f"  load{k}: the session did not start: {e}")
            return
        callers.append(caller)
        began = time.monotonic()
        try:
            await converse(caller, utterances, until, random.Random(seed),
                           pause_s=config.pause_s, turn_timeout_s=config.turn_timeout_s,
                           on_turn=_logger(log))
        finally:
            await caller.stop()
            live[caller.session] = time.monotonic() - began

    async def sample() -> None:
        await asyncio.sleep(max(0.0, t0 + ramp - time.monotonic()))
        await loads.sample(until)

    sampler = asyncio.create_task(sample())
    try:
        await asyncio.gather(*(session(k, rng.random()) for k in range(n)))
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        loads.close()
        for c in callers:
            await c.stop()
    result.wall_s = time.monotonic() - t0
    result.cpu_share = (time.process_time() - cpu0) / result.wall_s
    for c in callers:
        c.judge()
        result.turns += c.turns
        result.sessions.append({"session": c.session, "turns": len(c.turns),
                                "answered": sum(t.answered for t in c.turns),
                                "live_s": round(live.get(c.session, 0.0), 1)})
    result.stages = loads.stages()
    result.utilization_note = loads.note
    return result


def _logger(log):
    if log is None:
        return None

    def said(caller: Caller, turn: Turn, u: Utterance) -> None:
        heard = caller.last_audio_at >= turn.started_at
        log(f"  {caller.name} [{u.voice}] {u.text!r} -> {'answer' if heard else 'NO AUDIO'}")

    return said


async def warm_up(config: LoadConfig, utterance: Utterance) -> None:
    """One session, one turn, not measured: the first turn after a start pays for caches and
    lazy set-up a running deployment has long paid for."""
    from voxbus.caller import Caller

    caller = await Caller(config.nats_url, config.prefix, config.agent, "load-warmup",
                          keep_audio=False).start()
    try:
        await caller.say(utterance, turn_timeout_s=config.turn_timeout_s)
    finally:
        await caller.stop()


# --- the report ----------------------------------------------------------------------------


def table(head: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Fixed width, the first ``left`` columns left-aligned, the rest right-aligned."""
    rows = [head, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "-" if v is None else "miss" if math.isinf(v) else f"{v:.0f}"


def _share(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def format_load(report: dict) -> str:
    """The tables of a run, from its JSON form (:meth:`LoadResult.to_dict`): what ``--json``
    prints and what the tables say cannot disagree, and a saved run can be shown again."""
    head = ["figure", "stage", "p50 ms", "p95 ms", "turns", "replicas", "cap", "util", "peak",
            "full"]
    rows = []
    for name, f in report["latency_ms"].items():
        stage = FIGURE_STAGE[name]
        use = report["stages"].get(stage) if stage else None
        rows.append([name, stage or "(all)", _ms(f["p50"]), _ms(f["p95"]), str(f["n"]),
                     *(([str(use["replicas"] or "-"),
                         "/".join(map(str, use["capacity"])) or "-",
                         _share(use["utilization"]), _share(use["peak"]),
                         "-" if use["full"] is None else f"{use['full']:.0%}"]) if use else
                       ["", "", "", "", ""])])
    t = report["turns"]
    pause = report["pause_s"]
    lines = [
        f"voxbus bench load: {len(report['per_session'])}/{report['sessions']} sessions for "
        f"{report['for_s']:g} s after a {report['ramp_s']:g} s ramp (agent {report['agent']}; "
        f"{report['corpus']})", "", table(head, rows, 2), "",
        f"turns: {t['spoken']} spoken, {t['answered']} answered ({t['unanswered']} unanswered), "
        f"{t['fallback']} fallback lines, {t['with_errors']} with errors",
        "errors by code: " + (", ".join(f"{k} x{v}" for k, v in report["errors"].items())
                              or "none"),
        *(f"  e.g. {e}" for e in report["error_examples"]),
        f"* each session speaks in a loop, waits for the reply to finish, pauses "
        f"{pause[0]:g}-{pause[1]:g} s; e2e: first agent audio heard minus the end of the "
        "user's speech",
        "* util: each stage's heartbeat load (work in progress / declared capacity, 0-1), the "
        "replicas' mean, averaged over samples every 1 s after the ramp; peak: highest sample; "
        "full: samples with every replica at capacity",
        f"* load generator: {report['load_generator_cpu']:.0%} of one core; wall "
        f"{report['wall_s']:.0f} s",
    ]
    if report["utilization_note"]:
        lines.append(f"* {report['utilization_note']}")
    return "\n".join(lines)


# --- the capacity search -------------------------------------------------------------------


@dataclass
class Step:
    """One fixed-duration run of the search."""

    sessions: int
    ok: bool
    p95_ms: float | None
    """e2e p95 with misses (unanswered turns, fallback lines) counted as over the bound."""
    result: LoadResult | None = None
    why: str = ""


@dataclass
class Capacity:
    bound_ms: float
    sessions: int
    """The most concurrent sessions that kept e2e p95 within the bound (0: not even one)."""
    first_bad: int | None
    """The fewest that did not (None: the search's ceiling was never missed)."""
    steps: list[Step] = field(default_factory=list)


async def find_capacity(measure: Callable[[int], Awaitable[Step]], bound_ms: float, *,
                        max_sessions: int = 64) -> Capacity:
    """Double the sessions from 1 (capped at ``max_sessions``) until a step misses the bound,
    then bisect between the last good and the first bad count; ``measure`` runs one step.
    Assumes more sessions never make it faster, as queueing does."""
    steps: list[Step] = []
    good, bad, n = 0, None, 1
    while True:
        step = await measure(n)
        steps.append(step)
        if not step.ok:
            bad = n
            break
        good = n
        if n >= max_sessions:
            break
        n = min(2 * n, max_sessions)
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        step = await measure(mid)
        steps.append(step)
        good, bad = (mid, bad) if step.ok else (good, mid)
    return Capacity(bound_ms, good, bad, steps)


def judge(result: LoadResult, bound_ms: float) -> Step:
    """A step is good when every session started, some turn was answered, and e2e p95 (misses
    counted as over) is within the bound."""
    p95 = result.e2e_p95_with_misses()
    n = result.config.sessions
    if result.start_errors:
        why = f"{len(result.start_errors)} of {n} sessions did not start"
    elif p95 is None:
        why = "no turn was spoken"
    elif p95 > bound_ms:
        why = "e2e p95 over the bound"
    else:
        why = ""
    return Step(n, not why, p95, result, why)


def format_capacity(cap: Capacity) -> str:
    head = ["sessions", "turns", "answered", "fallback", "e2e p50", "e2e p95", "busiest stage",
            "util", "full", "its p95", "verdict"]
    own = {stage: name for name, stage in FIGURE_STAGE.items() if stage}
    rows = []
    for s in cap.steps:
        r = s.result
        verdict = "ok" if s.ok else f"over: {s.why}"
        if r is None:
            rows.append([str(s.sessions), "", "", "", "", _ms(s.p95_ms), "", "", "", "",
                         verdict])
            continue
        used = {k: u for k, u in r.stages.items() if u.utilization is not None}
        busiest = max(used, key=lambda k: used[k].utilization, default="")
        use = used.get(busiest)
        figures = r.figures()
        rows.append([str(s.sessions), str(len(r.turns)), str(r.answered), str(r.fallback),
                     _ms(figures["e2e_latency"]["p50"]), _ms(s.p95_ms),
                     f"{busiest} x{use.replicas}" if use else "-",
                     _share(use.utilization if use else None),
                     "-" if use is None else f"{use.full:.0%}",
                     f"{own[busiest]} {_ms(figures[own[busiest]]['p95'])}" if use else "-",
                     verdict])
    bad = (f"; {cap.first_bad} did not" if cap.first_bad is not None
           else " (the search's ceiling; more were not tried)")
    return "\n".join([
        table(head, rows), "",
        f"capacity: {cap.sessions} concurrent sessions keep e2e p95 <= {cap.bound_ms:g} ms{bad}",
        "* e2e p95 counts unanswered turns and fallback lines as misses (over any bound); "
        "steps double from 1, then bisect between the last good and the first bad count; "
        "its p95: the busiest stage's own figure (a queue in front of it shows there)",
    ])


def capacity_dict(cap: Capacity) -> dict:
    return {"p95_bound_ms": cap.bound_ms, "capacity": cap.sessions, "first_bad": cap.first_bad,
            "steps": [{"sessions": s.sessions, "ok": s.ok, "e2e_p95_ms": _round(s.p95_ms),
                       "why": s.why, "run": s.result.to_dict() if s.result else None}
                      for s in cap.steps]}


def to_json(obj: dict) -> str:
    """``inf`` (a miss) as the string ``"miss"``: JSON has no infinity."""
    def clean(v):
        if isinstance(v, float) and math.isinf(v):
            return "miss"
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj))


# --- the command ---------------------------------------------------------------------------


def add_parser(sub) -> None:
    """``voxbus bench load``'s arguments (``voxbus bench`` holds the benchmarks that need only
    a running deployment)."""
    import os

    bench = sub.add_parser("bench", help="measure a running deployment")
    kinds = bench.add_subparsers(dest="bench_cmd", required=True)
    p = kinds.add_parser("load", help="N concurrent conversations: per-stage latency, errors "
                                      "and utilization; or --find-capacity")
    p.add_argument("corpus", nargs="*", help="WAV files (one user turn each), .vxrec "
                   "recordings (their user turns) or folders of them; default: questions "
                   "spoken by espeak-ng voices")
    p.add_argument("--sessions", type=int, default=1, help="concurrent sessions (default 1)")
    p.add_argument("--ramp", type=float, default=None, metavar="S",
                   help="start the sessions evenly over S seconds (default 2 s apart, 10 s "
                        "at most)")
    p.add_argument("--for", dest="for_s", type=float, default=None, metavar="S",
                   help="talk this long after the ramp (default 60; 30 per capacity step)")
    p.add_argument("--pause", default=f"{DEFAULT_PAUSE_S[0]:g}-{DEFAULT_PAUSE_S[1]:g}",
                   metavar="MIN-MAX", help="seconds a caller pauses after each reply")
    p.add_argument("--turn-timeout", type=float, default=TURN_TIMEOUT_S, metavar="S",
                   help="no agent audio this long after the question: unanswered")
    p.add_argument("--agent", default="chat")
    p.add_argument("--warmup", type=int, default=1, metavar="TURNS",
                   help="unmeasured turns on one session first (default 1; 0: none)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--nats", default=os.environ.get("VOXBUS_NATS_URL", "nats://127.0.0.1:4222"))
    p.add_argument("--control-address", help="control plane HOST:PORT, for utilization "
                   "(default: as voxbus ctl finds it)")
    p.add_argument("--control-token", help="its bearer token (default: as voxbus ctl)")
    p.add_argument("--find-capacity", action="store_true",
                   help="the most concurrent sessions keeping e2e p95 within --p95")
    p.add_argument("--p95", type=float, metavar="MS", help="the e2e p95 bound, ms")
    p.add_argument("--max-sessions", type=int, default=32,
                   help="the capacity search's ceiling (default 32)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    p.add_argument("--quiet", action="store_true", help="no line per turn on stderr")


def parse_pause(text: str) -> tuple[float, float]:
    lo, sep, hi = text.partition("-")
    try:
        pause = (float(lo), float(hi if sep else lo))
    except ValueError:
        raise ValueError(f"--pause {text!r}: expected MIN-MAX seconds, e.g. 1.5-4") from None
    if not 0 <= pause[0] <= pause[1]:
        raise ValueError(f"--pause {text!r}: expected 0 <= MIN <= MAX")
    return pause


def run(args) -> int:
    """``voxbus bench load``: 0 done; 2 for a bad argument, corpus or connection (one line)."""
    import os
    import sys
    import tempfile
    from pathlib import Path

    from voxbus.caller import CorpusError, load_corpus, make_utterances

    def fail(message: str) -> int:
        print(f"voxbus bench load: {message}", file=sys.stderr, flush=True)
        return 2

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    if args.sessions < 1:
        return fail("--sessions must be 1 or more")
    if args.find_capacity and not args.p95:
        return fail("--find-capacity needs --p95 MS, the e2e p95 bound")
    if args.p95 and not args.find_capacity:
        return fail("--p95 is the bound of --find-capacity")
    try:
        pause = parse_pause(args.pause)
        if args.corpus:
            utterances = load_corpus(args.corpus)
            corpus = f"{len(utterances)} turns from {len(args.corpus)} file(s)"
        else:
            with tempfile.TemporaryDirectory(prefix="voxbus-load-") as tmp:
                utterances, _ = make_utterances(Path(tmp), piper=False)
            voices = sorted({u.voice.split(":")[-1] for u in utterances})
            corpus = f"{len(utterances)} questions in espeak-ng voices {', '.join(voices)}"
    except (CorpusError, ValueError) as e:
        return fail(str(e))
    config = LoadConfig(args.nats, os.environ.get("VOXBUS_PREFIX", "vox"), args.agent,
                        args.sessions, args.ramp,
                        args.for_s if args.for_s is not None else
                        (30.0 if args.find_capacity else 60.0),
                        pause, args.turn_timeout, args.seed, args.control_address,
                        args.control_token)

    async def main() -> dict:
        from dataclasses import replace

        from voxbus.bus import Bus
        from voxbus.subjects import Subjects

        await (await Bus.connect(config.nats_url, Subjects(config.prefix), "load",
                                 attempts=3)).close()  # unreachable: one line, not N
        for _ in range(args.warmup):
            log("warm-up turn (not measured)")
            await warm_up(config, utterances[0])
        if not args.find_capacity:
            log(f"{config.sessions} sessions for {config.for_s:g} s after a {config.ramp:g} s "
                "ramp")
            report = (await run_load(config, utterances, corpus=corpus, log=log)).to_dict()
            if not args.json:
                print(format_load(report), flush=True)
            return report

        async def measure(n: int) -> Step:
            log(f"step: {n} sessions for {config.for_s:g} s")
            step = judge(await run_load(replace(config, sessions=n), utterances,
                                        corpus=corpus, log=log), args.p95)
            if not args.json:
                print(f"{n} sessions: e2e p95 {_ms(step.p95_ms)} ms, "
                      f"{len(step.result.turns)} turns -> {'ok' if step.ok else step.why}",
                      flush=True)
            await asyncio.sleep(3.0)  # sessions let go before the next step
            return step

        cap = await find_capacity(measure, args.p95, max_sessions=args.max_sessions)
        if not args.json:
            print(format_capacity(cap), flush=True)
        return capacity_dict(cap)

    try:
        out = asyncio.run(main())
    except ConnectionError as e:
        from voxbus.cli import _nats_failed

        return fail(_nats_failed(e))
    except VoxbusError as e:
        return fail(f"{e} (is the deployment at {args.nats} serving sessions?)")
    if args.json:
        print(to_json(out), flush=True)
    return 0

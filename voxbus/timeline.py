"""``voxbus replay FILE --timeline OUT.html``: one session drawn over time, for a person to read.

A single self-contained HTML file (inline SVG and CSS, nothing fetched): one lane per thing that
happens in a turn, on the recording's clock, with the exact values in tooltips and a table.
"""

from __future__ import annotations

import html
from pathlib import Path

from voxbus.audio import rms
from voxbus.recording import Recording
from voxbus.turns import STAGES, SessionView

LABEL_W = 120
LANE_H = 34
TEXT_LANE_H = 56
TOP = 30
ENVELOPE_S = 0.1
"""Audio loudness is drawn in buckets this long."""

LANES = ("user audio", "VAD", "turns", "transcripts", "LLM", "TTS", "agent audio",
         "interruptions", "errors", "latency")
"""Top to bottom, in the order a turn goes through the system."""

COLORS = {"user": "#2b6cb0", "vad": "#63b3ed", "turn": "#2c5282", "bot": "#2f855a",
          "llm": "#805ad5", "tts": "#d69e2e", "interrupt": "#e53e3e", "error": "#c53030",
          "latency": "#718096"}


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _short(text: str, n: int = 48) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


class _Svg:
    def __init__(self, duration_s: float):
        self.duration = max(duration_s, 1.0)
        self.pps = max(20.0, min(120.0, 24000.0 / self.duration))
        self.items: list[str] = []
        self.y: dict[str, tuple[float, float]] = {}
        y = TOP
        for lane in LANES:
            h = TEXT_LANE_H if lane in ("transcripts", "LLM", "TTS", "latency") else LANE_H
            self.y[lane] = (y, h)
            y += h
        self.height = y + 10
        self.width = LABEL_W + self.duration * self.pps + 40

    def x(self, t: float) -> float:
        return LABEL_W + max(0.0, t) * self.pps

    def add(self, item: str) -> None:
        self.items.append(item)

    def rect(self, lane: str, t0: float, t1: float, color: str, title: str, *, frac: float = 1.0,
             row: int = 0, rows: int = 1, opacity: float = 0.85) -> None:
        y, h = self.y[lane]
        sub = (h - 8) / rows
        bar_h = max(1.0, sub * frac)
        top = y + 4 + row * sub + (sub - bar_h)
        w = max(1.5, (t1 - t0) * self.pps)
        self.add(f'<rect x="{self.x(t0):.1f}" y="{top:.1f}" width="{w:.1f}" height="{bar_h:.1f}" '
                 f'fill="{color}" fill-opacity="{opacity}"><title>{_esc(title)}</title></rect>')

    def text(self, lane: str, t: float, label: str, color: str, title: str = "", *,
             row: int = 0) -> None:
        y, _ = self.y[lane]
        self.add(f'<text x="{self.x(t) + 2:.1f}" y="{y + 15 + row * 16:.1f}" fill="{color}" '
                 f'class="t">{_esc(label)}<title>{_esc(title or label)}</title></text>')

    def mark(self, lane: str, t: float, color: str, title: str, label: str = "") -> None:
        y, h = self.y[lane]
        self.add(f'<line x1="{self.x(t):.1f}" x2="{self.x(t):.1f}" y1="{y + 3}" y2="{y + h - 3}" '
                 f'stroke="{color}" stroke-width="2"><title>{_esc(title)}</title></line>')
        if label:
            self.add(f'<text x="{self.x(t) + 3:.1f}" y="{y + 13}" fill="{color}" class="t">'
                     f'{_esc(label)}</text>')

    def guide(self, t: float, color: str) -> None:
        self.add(f'<line x1="{self.x(t):.1f}" x2="{self.x(t):.1f}" y1="{TOP}" '
                 f'y2="{self.height - 10}" stroke="{color}" stroke-opacity="0.25" '
                 'stroke-dasharray="3,3"/>')

    def frame(self) -> str:
        step = 1 if self.duration <= 60 else 5 if self.duration <= 300 else 30
        axis = []
        for s in range(0, int(self.duration) + 1, step):
            x = self.x(s)
            axis.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP - 6}" y2="{self.height - 10}" '
                        'stroke="#e2e8f0"/>'
                        f'<text x="{x + 2:.1f}" y="{TOP - 10}" class="axis">{s} s</text>')
        lanes = []
        for lane in LANES:
            y, h = self.y[lane]
            lanes.append(f'<rect x="0" y="{y}" width="{self.width:.0f}" height="{h}" '
                         f'fill="{"#f7fafc" if LANES.index(lane) % 2 else "#ffffff"}"/>'
                         f'<text x="6" y="{y + h / 2 + 4:.0f}" class="lane">{_esc(lane)}</text>')
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width:.0f}" '
                f'height="{self.height:.0f}" data-lanes="{_esc(",".join(LANES))}">'
                + "".join(lanes) + "".join(axis) + "".join(self.items) + "</svg>")


def _envelope(svg: _Svg, lane: str, frames: list[tuple[float, bytes]], color: str,
              what: str) -> None:
    buckets: dict[int, list[bytes]] = {}
    for t, pcm in frames:
        buckets.setdefault(int(t / ENVELOPE_S), []).append(pcm)
    for b, chunks in sorted(buckets.items()):
        level = max(rms(p) for p in chunks)
        if level < 30:
            continue
        svg.rect(lane, b * ENVELOPE_S, (b + 1) * ENVELOPE_S, color,
                 f"{what} at {b * ENVELOPE_S:.1f} s: RMS {level:.0f}",
                 frac=min(1.0, 0.08 + level / 4000))


def render(recording: Recording) -> str:
    """The HTML page for one recording."""
    view = SessionView(recording)
    h = recording.header
    svg = _Svg(view.duration_s)

    _envelope(svg, "user audio", [(t, f.pcm) for t, f in view.audio_in], COLORS["user"],
              "user audio")
    _envelope(svg, "agent audio", [(t, f.pcm) for t, f in view.audio_out], COLORS["bot"],
              "agent audio")

    started = None
    for t, e in view.vad:
        if e.state == "started":
            started = t
        elif started is not None:
            svg.rect("VAD", started, t, COLORS["vad"],
                     f"VAD speech {started:.2f}-{t:.2f} s (stopped at audio seq {e.seq})")
            started = None
    if started is not None:
        svg.rect("VAD", started, view.duration_s, COLORS["vad"], f"VAD speech from {started:.2f} s")

    for t, e in view.turn_events:
        if e.state == "user_ended":
            svg.mark("turns", t, COLORS["turn"], f"turn {e.turn}: user turn ended at {t:.2f} s",
                     f"turn {e.turn}")
            svg.guide(t, COLORS["turn"])
        elif e.state == "bot_stopped":
            calls = f" (tool calls: {', '.join(e.tool_calls)})" if e.tool_calls else ""
            svg.mark("turns", t, COLORS["bot"], f"turn {e.turn}: agent done{calls}"
                     + (f", node {e.node}" if e.node else ""), "done")
    for t, turn in view.barge_ins:
        svg.mark("interruptions", t, COLORS["interrupt"],
                 f"turn {turn}: the user interrupted the agent at {t:.2f} s", "barge-in")
        flushed = [f for tf, f in view.flushes if f.turn == turn and abs(tf - t) < 0.5]
        if flushed:
            svg.mark("interruptions", t, COLORS["interrupt"],
                     f"agent audio of turn {turn} flushed")

    for i, (t, tr) in enumerate(x for x in view.transcripts if x[1].text.strip()):
        color = COLORS["user"] if tr.final else "#a0aec0"
        svg.text("transcripts", t, _short(tr.text, 40), color,
                 f"{'final' if tr.final else 'interim'} transcript at {t:.2f} s: {tr.text}",
                 row=i % 2)

    for lane, works, color in (("LLM", view.llm, COLORS["llm"]), ("TTS", view.tts, COLORS["tts"])):
        for i, w in enumerate(works):
            end = w.done_t if w.done_t is not None else view.duration_s
            done = w.done
            if lane == "LLM":
                said = w.text or ", ".join(w.tool_calls) or "(nothing)"
                first = getattr(done, "ttft_ms", None)
                title = (f"turn {w.request.turn}: completion {w.t:.2f}-{end:.2f} s, "
                         f"first token {first if first is None else round(first)} ms, "
                         f"{len(w.replies) - 1} deltas: {said}")
            else:
                said = w.request.text
                first = getattr(done, "ttfa_ms", None)
                title = (f"turn {w.request.turn} sentence {w.request.index}: "
                         f"{w.t:.2f}-{end:.2f} s, first audio "
                         f"{first if first is None else round(first)} ms, "
                         f"{w.audio_s:.2f} s of audio: {said}")
            if done is not None and done.error:
                title += f" [error: {done.error}]"
            svg.rect(lane, w.t, end, color, title, rows=2, row=0, opacity=0.35)
            for t, _ in w.replies:
                svg.rect(lane, t, t + 0.01, color, title, rows=2, row=0)
            svg.text(lane, w.t, _short(said, 36), color, title, row=1 + i % 2)

    for t, e in view.errors:
        svg.mark("errors", t, COLORS["error"], f"{e.service}: {e.code}: {e.message}", e.code)
    for t, e in view.ends:
        svg.mark("turns", t, "#4a5568", f"session ended: {e.reason}", "end")

    for turn in view.turns:
        if turn.ended_at_s is None:
            continue
        lat = turn.latency_ms
        speech_end = view.speech_end_before(turn.ended_at_s)
        figures = " · ".join(f"{s.split('_')[0]} {lat[s]:.0f}" for s in STAGES
                             if lat.get(s) is not None)
        title = f"turn {turn.turn}: " + ", ".join(
            f"{s} {lat[s]:.0f} ms" for s in STAGES if lat.get(s) is not None)
        if speech_end is not None and lat.get("e2e_latency") is not None:
            svg.rect("latency", speech_end, speech_end + lat["e2e_latency"] / 1000,
                     COLORS["latency"], title, rows=2, row=0, opacity=0.5)
        svg.text("latency", speech_end if speech_end is not None else turn.ended_at_s,
                 figures or "no figures", COLORS["latency"], title, row=1)

    rows = "".join(
        f"<tr><td>{_esc(t.turn if t.turn is not None else '-')}</td>"
        f"<td>{t.boundary_s:.2f}</td><td>{_esc(t.user_text)}</td><td>{_esc(t.bot_text)}</td>"
        + "".join(f"<td>{'' if t.latency_ms.get(s) is None else round(t.latency_ms[s])}</td>"
                  for s in STAGES)
        + f"<td>{'yes' if t.interrupted else ''}</td></tr>" for t in view.turns)
    meta = (f"session <b>{_esc(h.session)}</b> · prefix {_esc(h.prefix)} · agent "
            f"{_esc(h.agent or '?')} · {view.duration_s:.1f} s · "
            f"{len(recording.messages)} messages · source {_esc(h.source)}")
    bad = f" · {view.bad_frames} undecodable frames" if view.bad_frames else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>voxbus session {_esc(h.session)}</title>
<style>
body {{ font: 13px system-ui, sans-serif; margin: 16px; color: #1a202c; }}
.scroll {{ overflow-x: auto; border: 1px solid #e2e8f0; }}
svg .t {{ font-size: 11px; }} svg .lane {{ font-size: 12px; font-weight: 600; fill: #2d3748; }}
svg .axis {{ font-size: 10px; fill: #718096; }}
table {{ border-collapse: collapse; margin-top: 14px; }}
td, th {{ border: 1px solid #e2e8f0; padding: 3px 6px; text-align: left; vertical-align: top; }}
</style></head><body>
<h2>voxbus session timeline</h2>
<p>{meta}{bad}</p>
<div class="scroll">{svg.frame()}</div>
<table><tr><th>turn</th><th>boundary s</th><th>user</th><th>agent</th>
{"".join(f"<th>{s} ms</th>" for s in STAGES)}<th>interrupted</th></tr>{rows}</table>
<p>Times are seconds since the recording started; the boundary is where the user's turn ended in
their audio. Hover a mark for its exact values.</p>
</body></html>
"""


def write_timeline(recording: Recording, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(render(recording), encoding="utf-8")
    return path

// voxbus page: one WebRTC session with the media gateway. Audio goes both ways on the peer
// connection; conversation events arrive as JSON on the "events" data channel.
"use strict";

const $ = (id) => document.getElementById(id);
const FIGURES = ["eou_delay", "stt_ttfs", "llm_ttft", "tts_ttfa", "e2e_latency"];
let pc = null, mic = null, meterStop = null;
const lines = new Map();   // "user:3" / "bot:3" → <li>
const turns = new Map();   // turn → <tr>

function setStatus(text) { $("status").textContent = text || ""; }

function setState(state) {
  $("state").textContent = state;
  $("state").dataset.state = state;
}

function line(role, turn) {
  const key = `${role}:${turn}`;
  let li = lines.get(key);
  if (!li) {
    li = document.createElement("li");
    li.dataset.role = role;
    li.dataset.turn = String(turn);
    li.dataset.final = "false";
    $("transcript").appendChild(li);
    lines.set(key, li);
  }
  return li;
}

function onTranscript(ev) {
  const li = line(ev.role, ev.turn);
  if (ev.role === "bot") {
    // The agent's reply arrives sentence by sentence; the turn is final when it is spoken.
    li.textContent = (li.textContent ? li.textContent + " " : "") + ev.text;
  } else if (ev.final) {
    li.textContent = (li.dataset.final === "true" ? li.textContent + " " : "") + ev.text;
    li.dataset.final = "true";
  } else {
    li.textContent = ev.text;
  }
}

function onMetric(ev) {
  let tr = turns.get(ev.turn);
  if (!tr) {
    tr = document.createElement("tr");
    tr.dataset.turn = String(ev.turn);
    tr.innerHTML = `<td>${ev.turn}</td>` + FIGURES.map((f) => `<td data-figure="${f}">–</td>`).join("");
    $("latency").tBodies[0].appendChild(tr);
    turns.set(ev.turn, tr);
  }
  const td = tr.querySelector(`[data-figure="${ev.name}"]`);
  if (td) td.textContent = `${Math.round(ev.ms)} ms`;
}

function onEvent(ev) {
  switch (ev.type) {
    case "transcript": onTranscript(ev); break;
    case "state":
      setState(ev.state);
      if (ev.state === "listening") {
        for (const [key, li] of lines) if (key.startsWith("bot:")) li.dataset.final = "true";
      }
      break;
    case "metric": onMetric(ev); break;
    case "turn": {
      const li = lines.get(`bot:${ev.turn}`);
      if (li && ev.state === "interrupted") li.dataset.interrupted = "true";
      break;
    }
    case "error": setStatus(`${ev.service}: ${ev.message}`); break;
    case "session": document.body.dataset.session = ev.session; break;
  }
}

function startMeter(stream) {
  const ctx = new AudioContext();
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 512;
  ctx.createMediaStreamSource(stream).connect(analyser);
  const buf = new Float32Array(analyser.fftSize);
  let running = true;
  (function tick() {
    if (!running) return;
    analyser.getFloatTimeDomainData(buf);
    let sum = 0;
    for (const v of buf) sum += v * v;
    const rms = Math.sqrt(sum / buf.length);
    $("level").style.width = `${Math.min(100, rms * 400).toFixed(0)}%`;
    requestAnimationFrame(tick);
  })();
  return () => { running = false; ctx.close(); $("level").style.width = "0"; };
}

async function postJSON(url, body) {
  const res = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" },
                                 body: JSON.stringify(body) });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(data.error || `${url}: HTTP ${res.status}`);
  return data;
}

function iceGathered(conn) {
  if (conn.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (conn.iceGatheringState === "complete") resolve(); };
    conn.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, 3000);  // host candidates are enough on a LAN
  });
}

async function connect() {
  const button = $("connect");
  button.disabled = true;
  setStatus("");
  try {
    mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true } });
    meterStop = startMeter(mic);
    const { token } = await postJSON("/api/token", { agent: $("agent").value.trim() || "chat" });
    pc = new RTCPeerConnection();
    const channel = pc.createDataChannel("events");
    channel.onmessage = (m) => onEvent(JSON.parse(m.data));
    pc.addTransceiver(mic.getAudioTracks()[0], { direction: "sendrecv" });
    pc.ontrack = (e) => { $("agent-audio").srcObject = e.streams[0] || new MediaStream([e.track]); };
    pc.onconnectionstatechange = () => {
      if (pc && ["failed", "closed", "disconnected"].includes(pc.connectionState)) {
        setStatus(`connection ${pc.connectionState}`);
        if (pc.connectionState !== "disconnected") hangup();
      }
    };
    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc);
    const answer = await postJSON("/api/offer", { sdp: pc.localDescription.sdp, type: "offer", token });
    await pc.setRemoteDescription(answer);
    button.textContent = "Hang up";
    button.classList.add("live");
    setState("connecting");
  } catch (err) {
    setStatus(String(err.message || err));
    hangup();
  } finally {
    button.disabled = false;
  }
}

function hangup() {
  if (pc) { pc.close(); pc = null; }
  if (mic) { mic.getTracks().forEach((t) => t.stop()); mic = null; }
  if (meterStop) { meterStop(); meterStop = null; }
  $("connect").textContent = "Connect";
  $("connect").classList.remove("live");
  setState("idle");
}

$("connect").addEventListener("click", () => (pc ? hangup() : connect()));
// For diagnostics from the console (and the browser tests): the live peer connection.
window.voxbus = { get pc() { return pc; } };

// Pipecat's own JS client SDK, unchanged, as an app built on it would use it against voxbus.
// window.__events records what the SDK's callbacks report, for tests/browser/test_pipecat_client.py.
import { PipecatClient, RTVIEvent } from "@pipecat-ai/client-js";
import { SmallWebRTCTransport, WavMediaManager } from "@pipecat-ai/small-webrtc-transport";

const events = (window.__events = []);
const record = (type, data) => events.push({ type, data: data ?? null, t: performance.now() });

window.__start = async (agent) => {
  // WavMediaManager: the default one loads Daily's call bundle from a CDN (this test is offline).
  const transport = new SmallWebRTCTransport({ mediaManager: new WavMediaManager() });
  window.__transport = transport;
  const client = new PipecatClient({
    transport,
    enableMic: true,
    enableCam: false,
    callbacks: {
      onConnected: () => record("connected"),
      onDisconnected: () => record("disconnected"),
      onBotReady: (data) => record("bot-ready", data),
      onUserStartedSpeaking: () => record("user-started-speaking"),
      onUserStoppedSpeaking: () => record("user-stopped-speaking"),
      onUserTranscript: (data) => record("user-transcription", data),
      onBotStartedSpeaking: () => record("bot-started-speaking"),
      onBotStoppedSpeaking: () => record("bot-stopped-speaking"),
      onBotLlmText: (data) => record("bot-llm-text", data),
      onBotTtsText: (data) => record("bot-tts-text", data),
      onBotTranscript: (data) => record("bot-transcription", data),
      onMetrics: (data) => record("metrics", data),
      onServerMessage: (data) => record("server-message", data),
      onError: (message) => record("error", message?.data ?? message),
      onTrackStarted: (track, participant) => {
        record("track-started", { kind: track.kind, local: !!participant?.local });
        if (track.kind === "audio" && !participant?.local) {
          const audio = document.createElement("audio");
          audio.autoplay = true;
          audio.srcObject = new MediaStream([track]);
          document.body.appendChild(audio);
        }
      },
    },
  });
  window.__client = client;
  client.on(RTVIEvent.BotInterrupted, () => record("bot-interrupted"));
  try {
    await client.startBotAndConnect({ endpoint: "/start", requestData: { agent } });
    record("start-resolved");
  } catch (e) {
    record("start-failed", String(e?.message ?? e));
  }
};

// The agent's audio as the browser received it (WebRTC's own statistics).
window.__inboundAudio = async () => {
  const pc = window.__transport?.pc;
  if (!pc) return null;
  for (const s of (await pc.getStats()).values()) {
    if (s.type === "inbound-rtp" && s.kind === "audio")
      return { packets: s.packetsReceived, energy: s.totalAudioEnergy || 0 };
  }
  return null;
};

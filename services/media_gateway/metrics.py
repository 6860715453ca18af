"""The gateway's own Prometheus series (the shared ones are in ``voxbus.metrics``)."""

from prometheus_client import Counter

AUDIO_UNDERRUNS = Counter(
    "voxbus_audio_underruns_total",
    "Gaps the user heard inside the agent's reply: playback ran dry and resumed within "
    "LISTEN_AFTER_S (the next audio came late)")

"""The orchestrator's Prometheus metrics, in one place so every module counts the same series."""

from prometheus_client import Counter

STAGE_ERRORS = Counter("voxbus_stage_errors_total",
                       "Stage calls a session could not get done, by stage and code",
                       ["stage", "code"])
STT_HANDOVERS = Counter("voxbus_stt_handovers_total",
                        "Sessions handed to another STT replica (the claimed one died or drained)")
FALLBACKS = Counter("voxbus_fallback_lines_total",
                    "Turns answered with the agent's fallback line, by the stage that failed",
                    ["stage"])
INTERRUPTIONS = Counter("voxbus_interruptions_total",
                        "Times the user spoke over the agent and the agent stopped")
ADOPTIONS = Counter("voxbus_adoptions_total",
                    "Sessions this replica took over from an owner that went silent")

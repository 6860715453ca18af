"""The post-call stage's Prometheus metrics, in one place."""

from prometheus_client import Counter, Histogram

SESSIONS = Counter("voxbus_post_call_sessions_total",
                   "Ended sessions the post-call stage finished with, by outcome (delivered, "
                   "given_up: every redelivery failed, skipped: the agent has no post_call)",
                   ["outcome"])
DELIVERIES = Counter("voxbus_post_call_deliveries_total",
                     "Delivery attempts of post-call results, by target kind and result",
                     ["target", "result"])
EXTRACTION_RETRIES = Counter("voxbus_post_call_extraction_retries_total",
                             "Extractions asked again because the model's JSON was invalid")
DELAY = Histogram("voxbus_post_call_delay_seconds",
                  "From a session's end (as recorded) to its post-call result delivered",
                  buckets=(0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 3600, 86400))

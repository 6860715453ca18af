"""Delivering a session's post-call result: a signed webhook POST, or a frame on NATS.

One call is one attempt; retries are the session end's JetStream redeliveries (with the
stage's backoff), so an attempt that fails while the stage dies is retried by another replica.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from services.post_call.config import Delivery
from services.post_call.metrics import DELIVERIES
from services.post_call.signature import (
    EVENT_HEADER,
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    sign,
)
from voxbus import __version__
from voxbus.bus import Bus
from voxbus.wire import PostCallResult

EVENT = "post_call.completed"


class DeliveryFailed(Exception):
    """This attempt did not get the result delivered; the message says why."""


def webhook_body(result: PostCallResult) -> bytes:
    """The JSON a webhook receives: the frame's fields, ``type`` first."""
    return json.dumps({"type": EVENT, **result.model_dump()}, ensure_ascii=False).encode()


async def deliver(bus: Bus, http: aiohttp.ClientSession, target: Delivery,
                  result: PostCallResult, *, secret: str, timeout_s: float) -> str:
    """Deliver once; returns a description of where it went, or raises DeliveryFailed."""
    if target.nats:
        subject = bus.subjects.post_call_delivery(target.nats)
        try:
            await bus.publish(subject, result)
            await bus.nc.flush(timeout=5)
        except Exception as e:
            DELIVERIES.labels("nats", "failed").inc()
            raise DeliveryFailed(f"publish on {subject}: {type(e).__name__}: {e}") from None
        DELIVERIES.labels("nats", "ok").inc()
        return f"nats {subject}"
    assert target.webhook
    if not secret:
        DELIVERIES.labels("webhook", "failed").inc()
        raise DeliveryFailed("VOXBUS_POST_CALL_SECRET is not set: webhooks are never sent "
                             "unsigned")
    body = webhook_body(result)
    headers: dict[str, Any] = {
        "Content-Type": "application/json", "User-Agent": f"voxbus/{__version__}",
        SIGNATURE_HEADER: sign(secret, body), IDEMPOTENCY_HEADER: result.id,
        EVENT_HEADER: EVENT}
    try:
        async with http.post(target.webhook, data=body, headers=headers,
                             timeout=aiohttp.ClientTimeout(total=timeout_s),
                             allow_redirects=False) as res:
            if not 200 <= res.status < 300:
                text = (await res.text())[:200]
                raise DeliveryFailed(f"webhook {target.webhook} answered {res.status}: {text}")
    except DeliveryFailed:
        DELIVERIES.labels("webhook", "failed").inc()
        raise
    except (aiohttp.ClientError, TimeoutError) as e:
        DELIVERIES.labels("webhook", "failed").inc()
        raise DeliveryFailed(f"webhook {target.webhook}: {type(e).__name__}: {e}") from None
    DELIVERIES.labels("webhook", "ok").inc()
    return f"webhook {target.webhook}"

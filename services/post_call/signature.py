"""Webhook signatures, as Stripe signs its events: ``Voxbus-Signature: t=<unix s>,v1=<hex>``
where ``v1`` is HMAC-SHA256 over ``"<t>.<raw body>"`` with the shared secret.

The timestamp inside the signed bytes is what stops a captured request being replayed later:
a receiver refuses signatures older than its tolerance. :func:`verify` is what a receiver runs
(a receiver in another language does the same three steps; the README shows them).
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "Voxbus-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
"""The same on every delivery of one session's result: a receiver that saw it already
answers 2xx and does nothing."""
EVENT_HEADER = "Voxbus-Event"
TOLERANCE_S = 300
"""How old a signature a receiver accepts by default (Stripe's default too)."""


class SignatureError(ValueError):
    """A request whose signature is missing, malformed, stale or wrong."""


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``Voxbus-Signature`` header value for ``body`` sent at ``timestamp`` (now)."""
    t = int(time.time()) if timestamp is None else int(timestamp)
    return f"t={t},v1={_mac(secret, t, body)}"


def verify(secret: str, body: bytes, header: str | None, *, tolerance_s: float = TOLERANCE_S,
           now: float | None = None) -> int:
    """The signed timestamp if ``header`` signs ``body`` with ``secret`` within
    ``tolerance_s`` of ``now``; else :class:`SignatureError` saying which check failed."""
    if not header:
        raise SignatureError(f"no {SIGNATURE_HEADER} header")
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, eq, value = item.strip().partition("=")
        if eq:
            parts.setdefault(key, []).append(value)
    try:
        t = int(parts["t"][0])
    except (KeyError, ValueError):
        raise SignatureError(f"{SIGNATURE_HEADER} has no t=<unix seconds>") from None
    if not parts.get("v1"):
        raise SignatureError(f"{SIGNATURE_HEADER} has no v1=<hex HMAC-SHA256>")
    now = time.time() if now is None else now
    if abs(now - t) > tolerance_s:
        raise SignatureError(f"signature timestamp {t} is {abs(now - t):.0f} s from now "
                             f"(tolerance {tolerance_s:g} s)")
    expected = _mac(secret, t, body)
    # Several v1 values are allowed (a secret being rotated signs with both).
    if not any(hmac.compare_digest(expected, v) for v in parts["v1"]):
        raise SignatureError("signature does not match the body and secret")
    return t


def _mac(secret: str, t: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()

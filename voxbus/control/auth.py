"""Who may call the control plane: one bearer token on every call, and where ``voxbus up``
leaves it (with the address) for ``voxbus ctl``.

The health service stays open so that probes (``grpc_health_probe``, a load balancer) need no
secret; it says only SERVING or NOT_SERVING. Reflection needs the token like everything else.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
"""Methods answered without a token."""
MISSING = "no bearer token: pass --token, set VOXBUS_CONTROL_TOKEN, or run voxbus up"
WRONG = "the bearer token is not this control service's"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata a client sends."""
    return (("authorization", f"Bearer {token}"),)


class BearerAuth(grpc.aio.ServerInterceptor):
    """Refuses (UNAUTHENTICATED) every call whose ``authorization`` is not ``Bearer <token>``;
    compared in constant time, so the refusal's timing says nothing about the token."""

    def __init__(self, token: str):
        if not token:
            raise ValueError("the control plane needs a token")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        given = dict(details.invocation_metadata or ()).get("authorization")
        if given is not None and hmac.compare_digest(str(given).encode(), self._expected):
            return handler
        return _refusal(handler, WRONG if given else MISSING)


def _refusal(handler: Any, message: str) -> Any:
    """A handler of the same shape as ``handler`` that only refuses."""

    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


# --- the control file ---------------------------------------------------------------------


def write_control_file(path: str | Path, *, address: str, token: str, prefix: str,
                       tls_cert: str = "", nats: dict[str, str] | None = None) -> Path:
    """Write where the control service is and its token, readable by this user only (0600,
    in a 0700 folder), atomically: ``voxbus ctl`` never reads half a file.

    ``nats``: the CLI's NATS credentials (``url``, ``user``, ``password``) for a nats-server
    ``voxbus up`` started with authentication; ``voxbus talk`` and the recording commands
    use them (:func:`voxbus.bus.connection_auth`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fields: dict[str, Any] = {"address": address, "token": token, "prefix": prefix,
                              "tls_cert": tls_cert, "pid": os.getpid()}
    if nats:
        fields["nats"] = dict(nats)
    body = json.dumps(fields, indent=2)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_control_file(path: str | Path) -> dict[str, Any]:
    """What ``voxbus up`` wrote, or ``{}`` when there is no such file (or it is unreadable)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}

"""The gateway's JSON over HTTP: bodies read with limits, refusals that say why, as JSON."""

from __future__ import annotations

import json
import re

from aiohttp import web

MAX_BODY = 256 * 1024  # an SDP offer is a few KB
AGENT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""An agent is named by its file name (services/orchestrator/agent.py)."""


def error(status: int, message: str) -> web.Response:
    # ``detail`` too: Pipecat's client shows a refusal's ``info`` or ``detail`` (FastAPI's key).
    return web.json_response({"error": message, "detail": message}, status=status)


def shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:40] + "..."


async def json_body(request: web.Request, *, required: bool) -> dict | web.Response:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return error(413, f"request body over {MAX_BODY} bytes")
    if not raw.strip():
        return error(400, "expected a JSON body") if required else {}
    if request.content_type != "application/json":
        return error(415, f"expected Content-Type: application/json, not "
                           f"{request.content_type or 'none'}")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return error(400, f"body is not JSON: {e}")
    except RecursionError:
        return error(400, "body is not JSON this gateway reads: nested too deeply")
    if not isinstance(body, dict):
        return error(400, "body must be a JSON object")
    return body

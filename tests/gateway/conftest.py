"""A gateway with nothing behind it (the one in front of the stages is in tests/conftest.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.media_gateway.worker import GatewayWorker


@pytest.fixture
async def lone_gateway(settings):
    """A gateway with no stages behind it: for what it must refuse on its own."""
    gw = GatewayWorker(replace(settings, http_port=0))
    await gw.start()
    yield gw
    await gw.stop()

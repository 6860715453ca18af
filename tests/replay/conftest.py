"""Recording on for the test's own prefix."""

from __future__ import annotations

import pytest

from voxbus.recording import Recorder


@pytest.fixture
async def recorder(system):
    """The recording stream of the test's prefix, as ``voxbus up`` turns it on."""
    async with Recorder(system.nats_url, system.prefix) as rec:
        await rec.enable(max_age_s=600, max_bytes=256 * 2**20)
        yield rec
        await rec.js.delete_stream(rec.stream)


"""The shipped ``restaurant`` agent walks a booking through its flow, tool calls over the bus."""

from __future__ import annotations

import json
import re

import pytest

from services.orchestrator.worker import OrchestratorWorker
from tests.conftest import bounded
from tests.e2e.conftest import SAYS, WALK
from voxbus.talk import talk

pytestmark = pytest.mark.slow


async def test_booking_walks_the_flow_to_the_end(waiter_stages, answers):
    s, endpoint = waiter_stages.settings, waiter_stages.endpoint
    async with OrchestratorWorker(s):
        turns = await bounded(talk(s.nats_url, answers, prefix=s.prefix, agent="restaurant",
                                   turn_timeout_s=30), 240, "the booking")
    summary = [(t.node, t.tool_calls) for t in turns]
    assert summary == WALK, [(t.user_text, t.bot_text, t.errors) for t in turns]
    assert turns[0].bot_text == SAYS["record_party_size"] and turns[0].reply_audio_s > 1
    assert "four" in turns[1].user_text.lower() or "4" in turns[1].user_text
    assert turns[3].bot_text == SAYS[None]
    # The agent hung up after goodbye: the fourth recording was never needed.
    assert len(turns) == 4
    # confirm_booking ran: the goodbye node's prompt carries the reference it stored.
    goodbye = json.dumps(endpoint.requests[-1]["messages"])
    assert re.search(r"reference CV[0-9A-F]{5}", goodbye), goodbye[-600:]

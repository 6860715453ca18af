"""A session ended on the bus (the agent's end_conversation, ``voxbus ctl end``) hangs up the
browser's peer too, instead of leaving it connected to a session no stage holds."""

from __future__ import annotations

import asyncio

from services.media_gateway.client import GatewayClient
from voxbus.wire import SessionEnd


async def test_session_end_on_the_bus_closes_the_peer(gateway, stages, bus):
    client = GatewayClient(gateway.url)
    try:
        session = await client.connect()
        assert await client.wait_for(lambda c: any(e["type"] == "state" for e in c.events), 10)
        peer = gateway.peers[session]
        closed = asyncio.Event()

        @client.pc.on("connectionstatechange")
        def _on_state():
            if client.pc.connectionState in ("closed", "failed", "disconnected"):
                closed.set()

        await bus.publish(bus.subjects.ctl(session), SessionEnd(session=session,
                                                                reason="operator"))
        await asyncio.wait_for(closed.wait(), 15)
        assert session not in gateway.sessions()
        assert peer.closed.is_set() and peer.end_reason == "ended on the bus: operator"
    finally:
        await client.close()

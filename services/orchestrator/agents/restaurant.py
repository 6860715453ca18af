"""Functions of the ``restaurant`` agent's flow (restaurant.flow.yaml).

Each is a Pipecat Flows direct function: its docstring describes it to the LLM, its result goes
back into the context, and the flow config decides the next node (``TRANSITION_IN_YAML``).
"""

from __future__ import annotations

import hashlib

from pipecat.flows import TRANSITION_IN_YAML, FlowManager

MAX_PARTY = 12


async def record_party_size(flow_manager: FlowManager, party_size: int):
    """Record how many people the table is for.

    Args:
        party_size: Number of people, from 1 to 12.
    """
    size = max(1, min(int(party_size), MAX_PARTY))
    flow_manager.state["party_size"] = size
    return {"party_size": size}, TRANSITION_IN_YAML


async def record_date_time(flow_manager: FlowManager, date: str, time: str):
    """Record the date and time the caller wants the table.

    Args:
        date: The day of the booking as the caller said it, e.g. "Friday" or "June 3".
        time: The time of the booking as the caller said it, e.g. "7:30 pm".
    """
    flow_manager.state["date"] = date.strip()
    flow_manager.state["time"] = time.strip()
    return {"date": date, "time": time}, TRANSITION_IN_YAML


async def confirm_booking(flow_manager: FlowManager):
    """Book the table the caller has just confirmed."""
    state = flow_manager.state
    key = f"{state.get('party_size')}|{state.get('date')}|{state.get('time')}"
    reference = "CV" + hashlib.sha1(key.encode()).hexdigest()[:5].upper()
    state["reference"] = reference
    flow_manager.state["booked"] = True
    return {"status": "booked", "reference": reference}, TRANSITION_IN_YAML

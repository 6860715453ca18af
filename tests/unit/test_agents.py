"""Agents load by name from files; a bad file is refused with its name and the problem."""

from __future__ import annotations

import pytest

from services.orchestrator.agent import AgentError, available_agents, load_agent


def test_shipped_agents_load():
    assert {"chat", "restaurant"} <= available_agents()
    chat = load_agent("chat")
    assert chat.flow is None and "voice assistant" in chat.system_prompt
    restaurant = load_agent("restaurant")
    assert restaurant.flow is not None and restaurant.llm_request_settings()["max_tokens"] == 60


def test_custom_dir_comes_first(tmp_path):
    (tmp_path / "chat.yaml").write_text("system_prompt: Talk like a pirate.\n")
    assert load_agent("chat", str(tmp_path)).system_prompt == "Talk like a pirate."


def test_json_agents(tmp_path):
    (tmp_path / "terse.json").write_text('{"system_prompt": "Be terse.", "llm": {"max_tokens": 9}}')
    assert load_agent("terse", str(tmp_path)).llm_request_settings() == {"max_tokens": 9}


@pytest.mark.parametrize("text, problem", [
    ("system_prompt: [unclosed", "cannot read"),
    ("- just\n- a list\n", "expected a mapping"),
    ("system_prompt: hi\nllm:\n  temperature: 7\n", "llm.temperature"),
    ("system_prompt: hi\ncolour: blue\n", "colour"),
    ("description: no prompt\n", "system_prompt"),
    ("name: other\nsystem_prompt: hi\n", "does not match"),
    ("system_prompt: hi\nflow:\n  config: missing.yaml\n  handlers: x\n", "not found"),
])
def test_invalid_agent_files_name_file_and_problem(tmp_path, text, problem):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(AgentError) as err:
        load_agent("broken", str(tmp_path))
    assert str(path) in str(err.value) and problem in str(err.value)


def test_flow_referring_to_missing_function(tmp_path):
    (tmp_path / "f.flow.yaml").write_text(
        "initial_node: a\nnodes:\n  a:\n    functions:\n      - name: nowhere\n")
    (tmp_path / "f.yaml").write_text(
        "system_prompt: hi\nflow:\n  config: f.flow.yaml\n"
        "  handlers: services.orchestrator.agents.restaurant\n")
    with pytest.raises(AgentError, match="nowhere"):
        load_agent("f", str(tmp_path))


def test_unknown_agent_lists_the_known_ones():
    with pytest.raises(AgentError, match="available: .*chat"):
        load_agent("nobody")
    with pytest.raises(AgentError, match="invalid agent name"):
        load_agent("../etc/passwd")

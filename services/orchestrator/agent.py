"""Agents as configuration: one YAML (or JSON) file per agent, loaded by name.

An agent names its system prompt, voice, LLM settings, turn-taking settings and, optionally, a
Pipecat flow (a ``FlowConfig`` file beside it, joined to the Python module that implements its
functions). Files are looked up in ``VOXBUS_AGENTS_DIR`` first, then among the shipped agents;
a file that does not parse or validate is an ``AgentError`` naming the file and the problem.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.post_call.config import PostCallConfig

SHIPPED_DIR = Path(__file__).parent / "agents"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class AgentError(ValueError):
    """An agent that cannot be used; the message names the file and what is wrong."""

    code = "bad_agent"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LlmSettings(_Strict):
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, gt=0, le=4096)


RESUME_PROMPT = (
    "Something that sounded like the user cut you off, but they said nothing that could be "
    "understood. Carry on from where you were cut off, without apologising and without "
    "repeating what you had already said.")
IDLE_PROMPT = (
    "The user has been silent for a while. In one short sentence, check whether they are still "
    "there, or repeat your last question more simply.")
IDLE_GOODBYE = "I'll hang up now as I can't hear you. Goodbye!"
FALLBACK_LINE = "Sorry, I'm having trouble answering right now. Could you say that again?"


class TurnSettings(_Strict):
    vad_stop_s: float | None = Field(default=None, gt=0, le=2)
    """Silence before the VAD says the user stopped (transcription starts then)."""
    vad_start_s: float | None = Field(default=None, gt=0, le=2)
    """Speech before the VAD says the user started, which cuts the agent off: longer is
    deafer to coughs and clicks, and slower to barge in."""
    turn_stop_s: float | None = Field(default=None, gt=0, le=10)
    """Smart Turn's fallback: end an incomplete-sounding turn after this much silence."""
    question_stop_s: float | None = Field(default=None, gt=0, le=10)
    """Silence that ends a turn whose transcript ends a question (even when Smart Turn
    heard it as unfinished)."""
    statement_stop_s: float | None = Field(default=None, gt=0, le=10)
    """Silence that ends a turn whose transcript ends a finished statement."""
    interruption_min_words: int = Field(default=0, ge=0, le=20)
    """Words the user must say before they interrupt the agent (0 = any speech interrupts).
    Counted on transcripts, so it trades barge-in speed for not stopping at "mm-hm"."""
    false_interruption_prompt: str | None = RESUME_PROMPT
    """What the LLM is told when an interruption turns out to be no speech (a cough, a door):
    by default it resumes where it was cut off; null leaves the agent silent."""
    idle_timeout_s: float = Field(default=0, ge=0, le=600)
    """Silence from the user after the agent finished, before it prompts them (0 = never)."""
    idle_prompts: int = Field(default=2, ge=0, le=10)
    """How many times the agent prompts a silent user before it hangs up."""
    idle_prompt: str = IDLE_PROMPT
    idle_goodbye: str = IDLE_GOODBYE
    """Said before hanging up on a user who stayed silent through every prompt."""
    echo_gate: bool = True
    """Ignore the agent's own voice coming back in the user's audio (speakerphones, no AEC),
    judged against the agent's audio on the bus, so it cannot interrupt itself."""


class FlowRef(_Strict):
    config: str
    """Path of a Pipecat FlowConfig (YAML/JSON), relative to the agent file."""
    handlers: str
    """Python module with the flow's functions and actions."""


class AgentConfig(_Strict):
    name: str = Field(pattern=_NAME.pattern)
    description: str = ""
    system_prompt: str = Field(min_length=1)
    voice: str | None = None
    """Piper voice for this agent (an .onnx path); null = the TTS stage's default voice."""
    fallback_line: str = Field(default=FALLBACK_LINE, min_length=1, max_length=300)
    """Said, without the LLM, when a stage fails a turn, so the user never waits in silence."""
    llm: LlmSettings = LlmSettings()
    turn: TurnSettings = TurnSettings()
    flow: FlowRef | None = None
    post_call: PostCallConfig | None = None
    """Fields to extract from the ended conversation and where to deliver them (the
    post-call stage, services/post_call/)."""
    source: Path | None = Field(default=None, exclude=True)

    def llm_request_settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.llm.model_dump().items() if v is not None}


def agent_dirs(custom: str = "") -> list[Path]:
    dirs = [Path(p).expanduser() for p in custom.split(":") if p] if custom else []
    return [*dirs, SHIPPED_DIR]


def _candidates(name: str, dirs: list[Path]) -> list[Path]:
    return [d / f"{name}{ext}" for d in dirs for ext in (".yaml", ".yml", ".json")]


def load_agent(name: str, custom_dirs: str = "") -> AgentConfig:
    if not _NAME.match(name or ""):
        raise AgentError(f"invalid agent name {name!r}: use 1-64 of [A-Za-z0-9_-]")
    dirs = agent_dirs(custom_dirs)
    for path in _candidates(name, dirs):
        if path.is_file():
            return load_agent_file(path)
    known = sorted(available_agents(custom_dirs))
    raise AgentError(f"no agent {name!r} in {', '.join(map(str, dirs))} "
                     f"(available: {', '.join(known) or 'none'})")


def load_agent_file(path: Path) -> AgentConfig:
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        raise AgentError(f"{path}: cannot read: {e}") from None
    if not isinstance(raw, dict):
        raise AgentError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    try:
        agent = AgentConfig.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(top)'}: {err['msg']}"
                             for err in e.errors())
        raise AgentError(f"{path}: {problems}") from None
    if agent.name != path.stem:
        raise AgentError(f"{path}: name {agent.name!r} does not match the file name")
    if agent.flow and not (path.parent / agent.flow.config).is_file():
        raise AgentError(f"{path}: flow.config {agent.flow.config!r} not found beside it")
    agent = agent.model_copy(update={"source": path})
    if agent.flow:
        load_flow(agent)  # a broken flow is the agent file's problem: say so at load time
    return agent


def load_flow(agent: AgentConfig):
    """The agent's Pipecat flow: its FlowConfig joined to its functions module."""
    import importlib

    from pipecat.flows import Flow, FlowConfig
    from pipecat.flows.exceptions import FlowError

    assert agent.flow is not None and agent.source is not None
    path = agent.source.parent / agent.flow.config
    try:
        config = FlowConfig.from_file(path)
        handlers = importlib.import_module(agent.flow.handlers)
        return Flow(config, handlers=handlers)
    except (FlowError, ValueError, ImportError, OSError) as e:
        raise AgentError(f"{path}: {type(e).__name__}: {e}") from None


def available_agents(custom_dirs: str = "") -> set[str]:
    names: set[str] = set()
    for d in agent_dirs(custom_dirs):
        if d.is_dir():
            names |= {p.stem for p in d.iterdir() if p.suffix in (".yaml", ".yml", ".json")
                      and not p.name.endswith((".flow.yaml", ".flow.json"))}
    return names

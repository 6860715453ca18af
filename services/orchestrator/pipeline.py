"""A session's Pipecat pipeline, built in one place.

    audio in → VADProcessor(Silero) → STT → user aggregator (Smart Turn + words, turn_end.py)
             → LLM → TTS (first clause, then sentences) → output → [taps] → assistant

The orchestrator builds it with its stages on the bus (``RemoteSTT``, ``RemoteLLM``,
``RemoteTTS``, ``BusAudioOutput``); ``bench/e2e.py`` builds the very same one with the stages
in its own process, so what it measures as the bus's cost is the bus and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipecat.audio.turn.smart_turn.base_smart_turn import SmartTurnParams
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMAssistantAggregator,
    LLMContextAggregatorPair,
    LLMUserAggregator,
    LLMUserAggregatorParams,
)
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameProcessor
from pipecat.services.tts_service import TTSService
from pipecat.turns.empty_user_turn import EmptyUserTurnConfig
from pipecat.turns.user_start.min_words_user_turn_start_strategy import (
    MinWordsUserTurnStartStrategy,
)
from pipecat.turns.user_turn_strategies import UserTurnStrategies

from services.orchestrator.agent import TurnSettings
from services.orchestrator.first_clause import speak_first_clause
from services.orchestrator.turn_end import WordsAndAudioTurnStop, WordsFirstSmartTurn
from voxbus.config import Settings


@dataclass
class Conversation:
    processors: list[FrameProcessor]
    aggregators: LLMContextAggregatorPair
    """What a FlowManager drives (it needs the pair, not the processors)."""
    turn_stop: WordsAndAudioTurnStop

    @property
    def user(self) -> LLMUserAggregator:
        return self.aggregators.user()

    @property
    def assistant(self) -> LLMAssistantAggregator:
        return self.aggregators.assistant()


def conversation(*, context: LLMContext, turn: TurnSettings, settings: Settings,
                 stt: FrameProcessor, llm: FrameProcessor, tts: FrameProcessor,
                 output: FrameProcessor, taps: list[FrameProcessor] | None = None) -> Conversation:
    """The processors of one conversation, in order, around the given stages."""
    turn_stop_s = turn.turn_stop_s or settings.turn_stop_s
    vad_stop_s = turn.vad_stop_s or settings.vad_stop_s
    stop = WordsAndAudioTurnStop(
        turn_analyzer=WordsFirstSmartTurn(params=SmartTurnParams(stop_secs=turn_stop_s)),
        question_stop_s=turn.question_stop_s or settings.turn_question_stop_s,
        statement_stop_s=turn.statement_stop_s or settings.turn_statement_stop_s,
        fallback_stop_s=turn_stop_s, speculate=settings.speculate)
    # Pipecat's strategies: by default speech starts a turn (and interrupts); with a word
    # minimum only transcripts do, one word when the agent is quiet, N while it speaks.
    start = ([MinWordsUserTurnStartStrategy(min_words=turn.interruption_min_words)]
             if turn.interruption_min_words > 1 else None)
    aggregators = LLMContextAggregatorPair(context, user_params=LLMUserAggregatorParams(
        user_turn_strategies=UserTurnStrategies(start=start, stop=[stop]),
        user_idle_timeout=turn.idle_timeout_s,
        empty_user_turn=EmptyUserTurnConfig(interrupted_prompt=turn.false_interruption_prompt)))
    if isinstance(tts, TTSService) and settings.tts_first_clause:
        speak_first_clause(tts)
    vad = SileroVADAnalyzer(params=VADParams(
        start_secs=turn.vad_start_s or settings.vad_start_s, stop_secs=vad_stop_s,
        min_volume=settings.vad_min_volume))
    processors = [VADProcessor(vad_analyzer=vad), stt, aggregators.user(), llm, tts, output,
                  *(taps or []), aggregators.assistant()]
    return Conversation(processors, aggregators, stop)

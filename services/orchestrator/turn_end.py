"""When the user's turn is over: Smart Turn's audio verdict, checked against the words.

Smart Turn v3 judges the last seconds of audio. Alone, it calls about half of the bench's short
questions "incomplete" (then only its silence fallback, ``turn_stop_s`` = 1.5 s, ends them),
and a sentence parted by a pause ("I'd like to book a table ... for four") "complete". The
transcript tells these apart, Whisper having punctuated what it heard:

* words that dangle ("...a table for", "and", "um,", "..."): wait the whole fallback;
* words that end a question ("...in Tokyo?"): end after ``question_stop_s`` of silence,
  unless it only leads in to one ("Can you tell me?"), which waits like a statement; a
  request ("Tell me a fun fact about cats.") is a question with a full stop;
* anything else: after ``statement_stop_s`` if Smart Turn heard an end, else the fallback.
  Whisper ends a fragment with a full stop too, so a statement waits out a pause longer
  than the ones people make inside a sentence (0.4-1.0 s).

While the turn is undecided but the words are in, the answer is started speculatively
(Pipecat's speculation machinery: the LLM's reply is held by its ``SpeculationGate`` until
the turn ends, and dropped if the user goes on), so the wait costs the LLM nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

from pipecat.audio.turn.base_turn_analyzer import EndOfTurnState
from pipecat.audio.turn.smart_turn.local_smart_turn_v3 import LocalSmartTurnAnalyzerV3
from pipecat.frames.frames import (
    EagerEndOfTurnCancelFrame,
    Frame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.turns.types import ProcessFrameResult, UserTurnSpeculation
from pipecat.turns.user_stop.eager_match_policy import NormalizedMatch
from pipecat.turns.user_stop.turn_analyzer_user_turn_stop_strategy import (
    TurnAnalyzerUserTurnStopStrategy,
)

DANGLING = frozenset("""
a an the and or but so because if then than that which who whose whom to of for with in on at
by from into about as my your his her our their its this these those is are was were be am
i'm it's i'd i'll we're you're um uh er hmm like very really just
""".split())
"""Words a finished sentence seldom ends on: after them, the person is still talking."""

LEAD_INS = frozenset("me us you know if whether wondering think".split())
"""Last words of a question that usually introduces the real one ("Can you tell me...")."""

REQUEST_VERBS = frozenset("""
tell give show explain describe list name recommend suggest read play sing say find teach
help remind translate summarize summarise define spell repeat
""".split())
"""First words of a request ("Tell me a fun fact about cats."): finished the way a question
is, though Whisper ends it with a full stop."""

REQUEST_OPENERS = frozenset("please okay ok so now just".split())
"""Words a request may start with before its verb ("Please tell me...")."""

_WORDS = re.compile(r"[a-z0-9']+")


def _is_request(words: list[str]) -> bool:
    while words and words[0] in REQUEST_OPENERS:
        words = words[1:]
    return len(words) >= 4 and words[0] in REQUEST_VERBS


def words_wait(text: str, audio_complete: bool, *, question_s: float, statement_s: float,
               fallback_s: float) -> float | None:
    """Seconds of silence (from the end of speech) before the turn ends, by the words and
    Smart Turn's verdict; None: no words to judge, Smart Turn alone decides."""
    text = text.strip()
    words = _WORDS.findall(text.lower())
    if not words:
        return None
    if text.endswith(("...", "…", ",", ";", ":", "-", "—")) or words[-1] in DANGLING:
        return fallback_s  # the sentence goes on, whatever the audio sounded like
    if text.endswith("?"):
        # "Can you tell me?" ... "what the weather is like": a lead-in, not the question.
        return statement_s if words[-1] in LEAD_INS else question_s
    if text.endswith((".", "!")) and _is_request(words):
        return question_s  # "Tell me a fun fact about cats.": asked, as a question is
    # A statement, or words Whisper left unpunctuated. Whisper ends a fragment with a full
    # stop too ("I'd like to book a table." before "...for four"), and Smart Turn called
    # that one complete at 0.94: a statement waits out a pause of a second either way.
    return statement_s if audio_complete else fallback_s


WORDS_GRACE_S = 0.06
"""How long Smart Turn waits, after the VAD's stop, for the segment's transcript to say
whether its verdict matters (an early transcript is there within a few ms)."""


class WordsFirstSmartTurn(LocalSmartTurnAnalyzerV3):
    """Smart Turn v3 that runs its model only when the words leave the verdict open.

    A question ("...in Tokyo?") or a request ends on its words whatever the audio sounded
    like; its ~100 ms of inference would only take a core from the LLM, which is evaluating
    the speculated answer's prompt at that very moment.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.verdict_needed = lambda: True
        """Set by the stop strategy: False when the transcript alone decides."""
        self.skipped = 0

    async def analyze_end_of_turn(self):
        if self.verdict_needed():
            return await super().analyze_end_of_turn()
        self.skipped += 1
        self.clear()  # as a "complete" verdict clears the segment's audio
        return EndOfTurnState.COMPLETE, None


class WordsAndAudioTurnStop(TurnAnalyzerUserTurnStopStrategy):
    """Smart Turn's stop strategy, with the transcript's say (see the module docstring)."""

    def __init__(self, *, question_stop_s: float, statement_stop_s: float,
                 fallback_stop_s: float, speculate: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.question_stop_s = question_stop_s
        self.statement_stop_s = statement_stop_s
        self.fallback_stop_s = fallback_stop_s
        self.speculate = speculate
        self._match = NormalizedMatch()
        self._speech_ended_at: float | None = None
        """Wall time (the VAD's frame clock) the user's speech ended: VAD stop - stop_secs."""
        self._turn_text = ""
        """Every transcript of this turn, in order: what the LLM will be given."""
        self._words_timer: asyncio.Task | None = None
        self._words_deadline = 0.0
        """When the running words timer ends the turn (time.time())."""
        self._analysis: asyncio.Task | None = None
        """Smart Turn's verdict on the segment that just ended, being worked out."""
        self._words_in = asyncio.Event()
        """This segment's final transcript has arrived (cleared when the user speaks)."""
        if isinstance(self._turn_analyzer, WordsFirstSmartTurn):
            self._turn_analyzer.verdict_needed = self._verdict_needed
        self._speculation: UserTurnSpeculation | None = None
        self._unspeculable = ""
        """Words the LLM refused to answer speculatively (a tool call): not tried twice."""
        self._register_event_handler("on_speculation_confirmed", sync=True)
        """The turn ended as speculated: the held answer is the turn's answer."""

    async def process_frame(self, frame: Frame) -> ProcessFrameResult:
        if isinstance(frame, VADUserStoppedSpeakingFrame):
            self._speech_ended_at = frame.timestamp - frame.stop_secs
        elif isinstance(frame, EagerEndOfTurnCancelFrame):
            # The LLM withdrew our speculation itself (it wanted to call a tool): these words
            # are answered at the turn's end, not speculated on again.
            if self._speculation:
                self._unspeculable = self._speculation.text
            self._speculation = None
        result = await super().process_frame(frame)
        if isinstance(frame, VADUserStartedSpeakingFrame):
            self._words_in.clear()
            await self._withdraw()
        return result

    async def _handle_transcription(self, frame) -> None:
        if frame.text.strip():
            # Not only finalized ones: a segment transcribed after the user went on is not
            # final for the turn, but the user aggregator gives it to the LLM all the same.
            self._turn_text = f"{self._turn_text} {frame.text.strip()}".strip()
            if frame.finalized:
                self._words_in.set()
        await super()._handle_transcription(frame)

    async def _reset(self) -> None:
        self._turn_text = ""
        self._unspeculable = ""
        await super()._reset()
        await self._withdraw()

    async def _discard_pending_end_of_turn(self) -> None:
        await self._cancel_words_timer()
        await self._cancel_analysis()  # a verdict on speech the user has since gone on from
        await super()._discard_pending_end_of_turn()

    async def _handle_vad_user_stopped_speaking(self, frame: VADUserStoppedSpeakingFrame):
        # Smart Turn's inference takes 0.1-0.15 s on two busy cores, and Pipecat awaits it
        # inline: every frame behind the VAD's stop waited, the transcript too, and a question
        # the words alone settle was answered that much later. Its verdict now comes in the
        # background; the words are judged the moment they arrive.
        await self._cancel_analysis()
        self._vad_user_speaking = False
        self._vad_stopped = True
        self._analysis = self.task_manager.create_task(
            self._analyze(frame), f"{self}::end_of_turn")

    async def _analyze(self, frame: VADUserStoppedSpeakingFrame) -> None:
        try:
            if not self._words_in.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._words_in.wait(), WORDS_GRACE_S)
            await super()._handle_vad_user_stopped_speaking(frame)
        finally:
            if self._analysis is asyncio.current_task():
                self._analysis = None

    def _words_wait(self, text: str, audio_complete: bool) -> float | None:
        return words_wait(text, audio_complete, question_s=self.question_stop_s,
                          statement_s=self.statement_stop_s, fallback_s=self.fallback_stop_s)

    def _verdict_needed(self) -> bool:
        """Whether Smart Turn's verdict could change how long this turn waits."""
        if not (self._words_in.is_set() and self._turn_text):
            return True
        waits = {self._words_wait(self._turn_text, complete) for complete in (True, False)}
        return len(waits) != 1 or None in waits

    async def _cancel_analysis(self) -> None:
        task, self._analysis = self._analysis, None
        if task is not None and task is not asyncio.current_task():
            await self.task_manager.cancel_task(task)

    async def _maybe_trigger_user_turn_stopped(self) -> None:
        decided = self._vad_stopped and self._transcript_finalized and self._text
        if not decided or self._speech_ended_at is None:
            return await super()._maybe_trigger_user_turn_stopped()
        silence = time.time() - self._speech_ended_at
        if silence >= self.fallback_stop_s - 0.05:
            # Smart Turn's own silence fallback (or ours) has run out: the turn is over.
            return await super()._maybe_trigger_user_turn_stopped()
        # The whole turn: a request's verb may be in its first segment ("Tell me a fact." ...
        # "about cats."), a dangling end is in its last.
        wait = self._words_wait(self._turn_text or self._text, self._turn_complete)
        if wait is None:
            if not self._turn_complete:
                await self._speculate()  # Smart Turn's silence fallback will decide
            return await super()._maybe_trigger_user_turn_stopped()
        if wait <= silence:
            self._turn_complete = True
            return await super()._maybe_trigger_user_turn_stopped()
        # Not yet: hold the turn open (even if the audio said complete) for the rest.
        self._turn_complete = False
        await self._speculate()
        deadline = self._speech_ended_at + wait
        if self._words_timer is not None and deadline < self._words_deadline - 0.01:
            await self._cancel_words_timer()  # Smart Turn's verdict came in and shortens it
        if self._words_timer is None:
            self._words_deadline = deadline
            self._words_timer = self.task_manager.create_task(
                self._end_after(wait - silence), f"{self}::words_timer")

    async def _end_after(self, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            return
        self._words_timer = None
        self._turn_complete = True
        await super()._maybe_trigger_user_turn_stopped()

    async def _cancel_words_timer(self) -> None:
        if self._words_timer:
            task, self._words_timer = self._words_timer, None
            await self.task_manager.cancel_task(task)

    # --- speculation -------------------------------------------------------------------

    async def _speculate(self) -> None:
        if not self.speculate or self._speculation or not self._turn_text:
            return
        if self._unspeculable and self._match.matches(self._unspeculable, self._turn_text):
            return
        self._speculation = UserTurnSpeculation(text=self._turn_text)
        await self.trigger_user_turn_inference_triggered(speculation=self._speculation)

    async def _withdraw(self) -> None:
        """The user went on (or the turn ended another way): the held answer is void."""
        if self._speculation:
            self._speculation = None
            await self.trigger_user_turn_speculation_cancelled()

    async def trigger_user_turn_stopped(self, *, enable_user_speaking_frames: bool | None = None):
        await self._cancel_words_timer()
        speculation, self._speculation = self._speculation, None
        if speculation and self._match.matches(speculation.text, self._turn_text):
            # The held answer answers this very turn: release it, run nothing again.
            await self._call_event_handler("on_speculation_confirmed")
            await self.trigger_user_turn_finalized(
                enable_user_speaking_frames=enable_user_speaking_frames,
                confirms_speculation=True)
            return
        if speculation:
            await self.trigger_user_turn_speculation_cancelled()
        await super().trigger_user_turn_stopped(
            enable_user_speaking_frames=enable_user_speaking_frames)

"""The first words of a speculated answer, synthesized while the turn is still undecided.

Pipecat's ``SpeculationGate`` holds a speculated reply inside the LLM service, so TTS would
start only once the turn is confirmed, and the person would wait for Piper anyway. Instead,
while the reply is held, its first clause (cut exactly as the TTS service will cut it: the
same aggregator) is sent to the TTS stage; when the turn is confirmed and ``RemoteTTS`` is
asked for that text, it plays the audio already here. A withdrawn speculation cancels it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from pipecat.utils.text.base_text_aggregator import BaseTextAggregator

from voxbus.errors import StageFailed, StageUnavailable
from voxbus.stage_call import StageCall
from voxbus.subjects import Stage
from voxbus.wire import TtsAudio, TtsDone, TtsRequest

if TYPE_CHECKING:
    from services.orchestrator.session import SessionRunner

log = logging.getLogger("voxbus.orchestrator")

PREFETCH_INDEX = 2_000_000
"""Sentence index of a prefetch's synthesis (apart from the ones RemoteTTS numbers)."""


class Prefetch:
    """One sentence being synthesized ahead of need; iterate it for its audio, as it comes."""

    def __init__(self, session: SessionRunner, text: str, turn: int, index: int):
        self.s = session
        self.text = text
        self.turn = turn
        self.audio: list[TtsAudio] = []
        self.complete = False
        """Every chunk of the sentence arrived (False: failed or cancelled part-way)."""
        self.finished = asyncio.Event()
        self._more = asyncio.Event()
        self._request = TtsRequest(session=session.session, turn=turn, index=index, text=text,
                                   voice=session.agent.voice)
        self.task = session.worker.spawn(self._synthesize(), name=f"prefetch-{session.session}")

    async def _synthesize(self) -> None:
        try:
            async with StageCall(self.s.bus, Stage.TTS, self._request,
                                 policy=self.s.worker.policy,
                                 retry_to=self.s.retry_target(Stage.TTS),
                                 can_hedge=self.s.hedge_when(Stage.TTS)) as call:
                async for item in call:
                    if isinstance(item, TtsAudio):
                        self.audio.append(item)
                        self._more.set()
                self.complete = not (isinstance(call.done, TtsDone) and call.done.error)
        except (StageUnavailable, StageFailed) as e:
            log.info("%s turn %d: prefetch of %r failed (%s); said the normal way",
                     self.s.session, self.turn, self.text[:40], e)
        finally:
            self.finished.set()
            self._more.set()

    async def chunks(self) -> AsyncIterator[TtsAudio]:
        sent = 0
        while True:
            while sent < len(self.audio):
                sent += 1
                yield self.audio[sent - 1]
            if self.finished.is_set():
                return
            self._more.clear()
            await self._more.wait()

    def cancel(self) -> None:
        self.task.cancel()


class SpeechPrefetcher:
    """Watches a speculated reply's text and prefetches its first aggregate."""

    def __init__(self, session: SessionRunner, aggregator: BaseTextAggregator):
        self.s = session
        self._aggregator = aggregator
        self._watching = False
        self._pending: Prefetch | None = None
        self._count = 0

    async def begin(self) -> None:
        """A speculated reply starts: watch its text."""
        self.drop()
        await self._aggregator.reset()
        self._watching = True

    async def text(self, text: str) -> None:
        if not self._watching:
            return
        async for aggregate in self._aggregator.aggregate(text):
            self._prefetch(aggregate.text)  # the first only: playback hides the rest's
            return

    async def reply_ended(self) -> None:
        """A reply shorter than a clause is cut at its end, as the TTS service cuts it."""
        if self._watching and (rest := await self._aggregator.flush()) and rest.text.strip():
            self._prefetch(rest.text)
        self._watching = False

    def stop_watching(self) -> None:
        """The reply is released: the text from here on reaches TTS itself."""
        self._watching = False

    def _prefetch(self, text: str) -> None:
        self._watching = False
        self._count += 1
        self._pending = Prefetch(self.s, text, self.s.turn, PREFETCH_INDEX + self._count)

    def take(self, text: str, turn: int) -> Prefetch | None:
        """The prefetch of ``text`` in ``turn``, once: RemoteTTS plays it instead of asking."""
        pending = self._pending
        if pending and pending.turn == turn and pending.text.strip() == text.strip():
            self._pending = None
            return pending
        return None

    def drop(self) -> None:
        """The speculation was withdrawn (or superseded): its audio is never played."""
        self._watching = False
        if self._pending:
            self._pending.cancel()
            self._pending = None

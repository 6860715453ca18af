"""Run a Pipecat pipeline inside a voxbus service, fed from and draining to NATS.

Stage workers and the orchestrator both host Pipecat processors this way: frames from the bus are
queued into the pipeline, and a :class:`FrameTap` at its end hands chosen frames back to us.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from pipecat.frames.frames import EndFrame, Frame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

log = logging.getLogger("voxbus.pipecat")

OnFrame = Callable[[Frame], Awaitable[None]]


class FrameTap(FrameProcessor):
    """Pass frames through, calling ``on_frame`` for the types we care about."""

    def __init__(self, types: tuple[type[Frame], ...], on_frame: OnFrame, **kwargs):
        super().__init__(**kwargs)
        self._types = types
        self._on_frame = on_frame

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, self._types):
            await self._on_frame(frame)
        await self.push_frame(frame, direction)


class HostedPipeline:
    """One Pipecat pipeline with an explicit start/stop; ``queue`` feeds it in order."""

    def __init__(
        self,
        processors: Sequence[FrameProcessor],
        *,
        name: str,
        sample_rate: int = 16000,
        out_sample_rate: int = 16000,
        enable_metrics: bool = True,
    ):
        self.worker = PipelineWorker(
            Pipeline(list(processors)),
            name=name,
            params=PipelineParams(
                audio_in_sample_rate=sample_rate,
                audio_out_sample_rate=out_sample_rate,
                enable_metrics=enable_metrics,
            ),
            idle_timeout_secs=None,
            check_dangling_tasks=False,
            enable_rtvi=False,
        )
        self._runner = WorkerRunner(handle_sigint=False, check_dangling_tasks=False)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self._runner.add_workers(self.worker)
        self._task = asyncio.create_task(self._runner.run(), name="pipecat-runner")
        await asyncio.sleep(0)

    async def queue(self, frame: Frame) -> None:
        await self.worker.queue_frame(frame)

    async def stop(self, *, graceful: bool = False, timeout: float = 5.0) -> None:
        """End the pipeline (``graceful``: let queued frames finish first), never waiting on it
        for more than a few ``timeout``s: a processor that will not stop is logged and left."""
        if self._task is None:
            return
        task, self._task = self._task, None
        if graceful:
            await self.worker.queue_frame(EndFrame())
            await asyncio.wait({task}, timeout=timeout)
        if not task.done():
            await self.worker.cancel()
            await asyncio.wait({task}, timeout=timeout)
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=timeout)
        if not task.done():
            log.error("pipeline %s did not stop within %.0f s; abandoning it",
                      self.worker.name, (3 if graceful else 2) * timeout)

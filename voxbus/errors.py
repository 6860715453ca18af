"""The small error hierarchy; turned into ``ErrorEvent`` frames at exactly one place (bus)."""

from __future__ import annotations


class VoxbusError(Exception):
    code = "internal"
    retryable = False


class StageUnavailable(VoxbusError):
    """No replica of a stage answered in time: another try may find one."""

    code = "unavailable"
    retryable = True


class StageFailed(VoxbusError):
    """A stage reported a failure for one piece of work."""

    code = "stage_failed"
    retryable = True

"""The small error hierarchy; turned into ``ErrorEvent`` frames at exactly one place (bus)."""

from __future__ import annotations


class VoxbusError(Exception):
    code = "internal"
    retryable = False


class StageUnavailable(VoxbusError):
    """No replica of a stage answered in time: another try may find one."""

    code = "unavailable"
    retryable = True

    def __init__(self, message: str, *, reason: str = "timeout"):
        super().__init__(message)
        self.reason = reason
        """``no_responders`` (nobody got the request) or ``timeout`` (someone may have)."""


class StageFailed(VoxbusError):
    """A stage reported a failure for one piece of work."""

    code = "stage_failed"
    retryable = True


class Full(VoxbusError):
    """A replica is at its declared capacity and takes no new session: another one may."""

    code = "full"
    retryable = True

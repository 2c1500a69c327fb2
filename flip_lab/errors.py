"""FLIP Lab's exceptions: one root, a few subclasses with structured fields and a next step in the message."""

from __future__ import annotations

from flip_common.errors import FlipError


class PlanError(FlipError):
    """The plan cannot be sent: it names what is wrong and where, before anything leaves the notebook."""

    def __init__(self, message: str, *, name: str | None = None, line: int | None = None, cell: str | None = None):
        self.name = name
        self.line = line
        self.cell = cell
        where = ""
        if cell is not None and line is not None:
            where = f" ({cell}, line {line})"
        elif line is not None:
            where = f" (line {line})"
        super().__init__(message + where)


class PlanCheckFailed(PlanError):
    """The dry run before submit (``BuiltPlan.check``) failed: ``role`` is the plan function that failed, ``cell``
    and ``line`` where in the researcher's cells; the plan's own exception, if any, is chained as the cause."""

    def __init__(self, message: str, *, role: str, line: int | None = None, cell: str | None = None):
        self.role = role
        super().__init__(message, name=role)  # the message names the cell and line itself, with the line's text
        self.line, self.cell = line, cell


class PlanCheckWarning(UserWarning):
    """The dry run passed, but the plan's numbers on synthetic data were not finite (the sites would withhold them)."""


class ConfigError(FlipError):
    """A study setting has the wrong type or value."""

    def __init__(self, key: str, expected: str, got: object):
        self.key = key
        self.expected = expected
        self.got = got
        super().__init__(f"config[{key!r}] must be {expected}, got {got!r}")


class HubUnreachable(FlipError):
    def __init__(self, address: str, detail: str = ""):
        self.address = address
        super().__init__(
            f"cannot reach the FLIP hub at {address}: {detail or 'no answer'}. "
            "Is the federation up? (`flip-lab status`, or `flip-lab up` for a local one)"
        )


class FederationError(FlipError):
    """Starting, finding or stopping a federation failed; the message says what was left behind (nothing)."""


class JobNotFound(FederationError):
    """The hub knows no job by that id, and no job folder here recorded one."""

    def __init__(self, job_id: int, address: str):
        self.job_id = job_id
        self.address = address
        super().__init__(f"no job {job_id} on the hub at {address}; fed.jobs() lists the jobs there")


class NoModelReleased(FlipError):
    """``final_weights()`` of a job that has no released global model; the message says why and what to do."""

    def __init__(self, job_id: int, status: str, message: str):
        self.job_id = job_id
        self.status = status
        super().__init__(message)


class JobFailed(FlipError):
    def __init__(self, job_id: int, message: str):
        self.job_id = job_id
        super().__init__(f"job {job_id} failed: {message}")


class JobTimeout(FlipError):
    def __init__(self, job_id: int, timeout: float, status: str):
        self.job_id = job_id
        super().__init__(
            f"job {job_id} is still {status} after {timeout:g} s; it keeps running: wait again, or `job.cancel()`"
        )

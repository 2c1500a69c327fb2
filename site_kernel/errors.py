"""The site kernel's exception hierarchy: the errors a data owner reads.

Errors about the site's own state (policy, approvals, audit, sandbox, settings, and beside them
:mod:`site_kernel.data.errors`, :class:`~site_kernel.secagg.SecAggError` and
:class:`~site_kernel.privacy.PrivacyLedgerError`) derive from :class:`SiteKernelError`, so the
``flip-site`` commands catch one root and print its message. Messages say what went wrong and what
to do next. They are written for the data owner at the site; none of them may carry patient data,
and none of them is ever sent to the hub as is (errors that leave the site go through
:func:`site_kernel.egress.safe_error`). A job's internal signals (``request.Refusal``,
``jobs.WorkerFailure``, ``_flower_runtime.TaskLost``) are not part of this tree: the site turns them
into a safe reply or a log line.
"""

from __future__ import annotations

from flip_common.errors import FlipError


class SiteKernelError(FlipError):
    """Root of every error raised by the site kernel (a :class:`~flip_common.errors.FlipError`)."""


class PolicyError(SiteKernelError):
    """``policy.toml`` exists but a key is unknown, missing or of the wrong type.

    ``key`` is the dotted key at fault (``"limits.memory_mb"``), or ``""`` when the file as a whole
    is at fault.
    """

    def __init__(self, message: str, *, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class PolicyMissing(PolicyError):
    """The site has no ``policy.toml``: nothing runs until the data owner writes one."""


class ApprovalError(SiteKernelError):
    """An approval request or decision could not be recorded or read."""


class UnknownPlan(ApprovalError):
    """No plan in the approval store matches the given hash or prefix."""


class AmbiguousPlan(ApprovalError):
    """A hash prefix matches more than one plan; ``matches`` lists their full hashes."""

    def __init__(self, message: str, *, matches: list[str]) -> None:
        super().__init__(message)
        self.matches = matches


class AuditError(SiteKernelError):
    """The audit log could not be written, or an entry was malformed before it was written."""


class SandboxError(SiteKernelError):
    """Confinement could not be applied as asked (bad arguments, or a mechanism failed half way).

    A process that sees this from :func:`site_kernel.sandbox.confine` may be partly confined and
    must exit without running plan code.
    """


class SandboxUnavailable(SandboxError):
    """The kernel lacks a sandbox mechanism and the policy does not accept weaker isolation.

    ``missing`` names the mechanisms (keys of :func:`site_kernel.sandbox.probe_isolation`).
    """

    def __init__(self, message: str, *, missing: list[str]) -> None:
        super().__init__(message)
        self.missing = missing

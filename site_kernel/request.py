"""One task as the site's executor has read it, and the refusal that answers it.

The executor (:mod:`site_kernel.executor`) reads each message from the hub once: the plan from its bundle, the
site's policy, the run and study it belongs to, its round, config and arrays. It hands that on as one
:class:`Request` to whatever checks the task next (the privacy gate, :mod:`site_kernel.privacy_gate`; the
secure-aggregation gate, :mod:`site_kernel.secagg_gate`), so no step re-reads the message and none needs a list of
loose arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message

from .policy import SitePolicy


class Refusal(Exception):
    """A request the site declines; ``kind`` and ``message`` are safe to send to the hub as they are."""

    def __init__(self, kind: str, message: str, *, audit: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.audit = audit


@dataclass(frozen=True)
class Request:
    """What one task carries, read once: see the module docstring."""

    message: Message
    op: str  # the message kind: "query", "train" or "evaluate"
    run_id: int
    study: int  # the study's first run: a resumed study keeps its privacy spend
    site: str  # the site's name as its settings say while this request is served
    policy: SitePolicy
    source: str  # the plan's source, as approved
    spec: dict[str, Any]  # the plan's spec (flip_lab.plan.BuiltPlan.spec)
    digest: str  # the plan's hash
    config: dict[str, Any] = field(default_factory=dict)  # the message's "config" record
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # the weights the hub sent, as the plan declares them

    @property
    def round(self) -> int:
        return int(self.config.get("server-round", 0))

    @property
    def query_op(self) -> str:
        """What a query asks ("hello", "directory", "secagg_keys", ...)."""
        return query_op(self.message)

    @property
    def secure(self) -> bool:
        """Whether the study uses secure aggregation (its setting; the site's bound is :mod:`secagg_gate`'s)."""
        return bool(self.spec.get("config", {}).get("secure_aggregation", False))


def query_op(message: Message) -> str:
    config = message.content.config_records.get("config")
    return str(config.get("op", "hello")) if config is not None else "hello"

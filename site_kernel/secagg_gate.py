"""The executor's secure-aggregation gate: the study's setting, the site's bound.

A study that asks for secure aggregation is joined only by a site that can bound its update (its policy's
``[secure_aggregation] max_update_norm``, or its ``[dp]``), since the hub cannot screen a masked one
(:meth:`SecAggGate.refusal_at_hello`). The gate keeps each run's key state (:class:`~site_kernel.secagg.SecAggClient`),
answers the hub's key-setup and unmasking queries (:meth:`SecAggGate.answer`), bounds a trained update before the
egress check sees it (:meth:`SecAggGate.bound`) and masks it, the only form in which it leaves
(:meth:`SecAggGate.mask`). The protocol itself is :mod:`site_kernel.secagg`'s.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from flip_common import secagg as shared_secagg

from . import secagg
from .audit import AuditLog
from .request import Refusal, Request


class SecAggGate:
    """See the module docstring; one per site, holding each run's secure-aggregation state."""

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self._clients: dict[int, secagg.SecAggClient] = {}
        self._lock = threading.Lock()

    def forget(self, run_id: int) -> None:
        """Drop a run's key state (its worker stopped, or its run did)."""
        with self._lock:
            self._clients.pop(run_id, None)

    def limit(self, request: Request) -> float | None:
        """The site's bound on an update's norm for this plan's model, or ``None`` when it has none."""
        dims = sum(int(np.prod(shape, dtype=np.int64)) for shape in request.spec["model_shapes"].values())
        return secagg.update_bound(request.policy.secagg_max_update_norm, request.policy.dp, dims)

    def refusal_at_hello(self, request: Request) -> str | None:
        """Why this site cannot join a secure-aggregation job (it has no update bound), else ``None``."""
        if not request.secure or self.limit(request) is not None:
            return None
        reason = (
            f"site {request.site} has no update bound for secure aggregation (under it the hub "
            "cannot screen updates); its data owner can set [secure_aggregation] max_update_norm or [dp]"
        )
        self.audit.append("secagg_refused", run_id=request.run_id, op="query", reason=reason)
        return reason

    def _client(self, request: Request) -> secagg.SecAggClient:
        client = self._clients.get(request.run_id)
        if client is None:
            bound = self.limit(request)
            if bound is None:
                raise Refusal("secure_aggregation", self.refusal_at_hello(request) or "")
            client = secagg.SecAggClient(request.message.metadata.dst_node_id, bound)
            with self._lock:
                self._clients[request.run_id] = client
        return client

    def answer(self, request: Request) -> dict[str, Any]:
        """The ``secagg`` record answering one of the hub's key-setup or unmasking queries."""
        op, round_ = request.query_op, request.round
        if not request.secure:
            raise Refusal(
                "secure_aggregation",
                f"site {request.site}: this job does not use secure aggregation",
                audit="secagg_refused",
            )
        client = self._client(request)
        record = dict(request.message.content.config_records.get("secagg", {}))
        try:
            answer = secagg.answer(client, op, round_, record)
        except shared_secagg.SecAggError as err:
            raise Refusal("secure_aggregation", f"site {request.site}: {err}", audit="secagg_refused") from None
        if op == "secagg_unmask":  # what the hub may now rebuild, for the data owner's record
            self.audit.append(
                "secagg_reveal",
                run_id=request.run_id,
                round=round_,
                seeds=sum(k.startswith("seed.") for k in answer),
                keys=sum(k.startswith("key.") for k in answer),
            )
        return answer

    def bound(self, request: Request, trained: dict) -> tuple[dict, dict]:
        """The trained arrays with the update scaled to the site's bound, and that update."""
        bound = self.limit(request)
        if bound is None:
            raise Refusal("secure_aggregation", self.refusal_at_hello(request) or "")
        arrays, update, clipped = secagg.bound_update(request.arrays, trained, bound)
        self.audit.append("secagg_bound", run_id=request.run_id, round=request.round, bound=bound, clipped=clipped)
        return arrays, update

    def mask(self, request: Request, update: dict, weight: int) -> np.ndarray:
        """The masked vector that leaves in the update's place."""
        round_ = request.round
        client = self._clients.get(request.run_id)
        record = dict(request.message.content.config_records.get("secagg", {}))
        if client is None or not record:
            raise Refusal(
                "secure_aggregation",
                f"site {request.site}: no secure-aggregation key setup for round {round_}; nothing was sent",
                audit="secagg_refused",
            )
        try:
            return client.mask(
                round_,
                shared_secagg.parse_nodes(record.get("participants", "")),
                shared_secagg.unkeyed("ct", record),
                secagg.flatten(update, shared_secagg.float_keys(request.arrays)),
                weight,
            )
        except shared_secagg.SecAggError as err:
            raise Refusal("secure_aggregation", f"site {request.site}: {err}", audit="secagg_refused") from None

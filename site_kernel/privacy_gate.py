"""The executor's differential-privacy gate: the site's ``[dp]``, never the plan's, decides.

At a study's hello the gate says whether the study's rounds fit the site's epsilon budget (:meth:`PrivacyGate.
refusal_at_hello`). Before a train round it finds the ledger to charge, or the update released before for the same
round and weights, which leaves again at no cost (:meth:`PrivacyGate.before_train`). After training it clips and
noises the update (:meth:`PrivacyGate.privatize`) and, once egress allowed the reply, records the spend before the
reply leaves (:meth:`PrivacyGate.record`). The ledger and the noise are :mod:`site_kernel.privacy`'s; this module is
what the executor asks of them, one :class:`~site_kernel.request.Request` at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .audit import AuditLog
from .privacy import PrivacyLedger, PrivacyLedgerError, Release, privatize, weights_digest
from .request import Refusal, Request

log = logging.getLogger("flip.site")


@dataclass
class Charge:
    """What a train round owes the site's ledger: ``again`` is the update released before, when there is one."""

    ledger: PrivacyLedger
    again: Release | None = None
    clipped: bool = False

    def site_metrics(self) -> dict[str, float]:
        """What the site says of its spend beside the plan's metrics."""
        spent = self.ledger.spent() if self.again is not None else self.ledger.epsilon_after(1)
        return {"dp_epsilon": spent, "dp_clip_norm": self.ledger.rules.clip_norm}


class PrivacyGate:
    """See the module docstring; one per site, shared by every run."""

    def __init__(self, site_dir: Path, audit: AuditLog) -> None:
        self.site_dir = site_dir
        self.audit = audit

    def ledger(self, request: Request) -> PrivacyLedger | None:
        """The site's epsilon ledger when its policy has ``[dp]``; a Refusal when the ledger is unreadable."""
        if request.policy.dp is None:
            return None
        try:
            return PrivacyLedger(self.site_dir, request.policy.dp)
        except PrivacyLedgerError as err:
            log.error("%s", err)  # the repair instructions are for the data owner, not the hub
            raise Refusal(
                "dp_ledger",
                f"site {request.site} cannot account for differential privacy "
                "until its data owner repairs the site's privacy ledger",
                audit="dp_refused",
            ) from err

    def refusal_at_hello(self, request: Request) -> str | None:
        """Why this job cannot run under the site's privacy budget, or ``None`` when it can (or there is no [dp]).
        A resumed job needs only the rounds its study has not released yet."""
        try:
            ledger = self.ledger(request)
            if ledger is None:
                return None
            rounds = max(0, int(request.spec["config"].get("rounds", 0)) - ledger.rounds_of(request.study))
            if not ledger.would_exceed(rounds):
                return None
            reason = _budget_message(request.site, ledger, rounds)
        except Refusal as refusal:
            reason = refusal.message
        self.audit.append("dp_refused", run_id=request.run_id, op="query", reason=reason)
        return reason

    def before_train(self, request: Request) -> Charge | None:
        """The ledger to charge, with the update to send again when this round of the study was released before
        from the same weights; a refusal when the budget cannot pay for the round, or when it was released from
        other weights (fresh noise would spend again). ``None`` when the site has no ``[dp]``."""
        ledger = self.ledger(request)
        if ledger is None:
            return None
        study, round_ = request.study, request.round
        if ledger.has(study, round_):
            again = ledger.released(study, round_, weights_digest(request.arrays))
            if again is None:
                raise Refusal("dp_repeat", _repeat_message(request), audit="dp_refused")
            self.audit.append("dp_replay", run_id=request.run_id, round=round_, plan=request.digest, study=study)
            return Charge(ledger, again)
        if ledger.would_exceed(1):
            left = max(1, int(request.spec["config"].get("rounds", 1)) - ledger.rounds_of(study))
            raise Refusal("dp_budget", _budget_message(request.site, ledger, left), audit="dp_refused")
        return Charge(ledger)

    def privatize(self, charge: Charge, request: Request, trained: dict[str, Any]) -> dict[str, Any]:
        """Clip and noise a freshly trained update; an update sent again is returned as it was released."""
        if charge.again is not None:
            return trained
        arrays, charge.clipped = privatize(request.arrays, trained, charge.ledger.rules)
        return arrays

    def record(
        self, charge: Charge, request: Request, arrays: dict[str, np.ndarray], metrics: dict[str, Any], examples: int
    ) -> None:
        """Record the spend before the reply leaves: a crash in between can only over-count. Another reply to the
        same round recorded first (a request repeated while this one trained) means this one must not leave. An
        update sent again was paid for when it was first released."""
        if charge.again is not None:
            return
        ledger, study, round_ = charge.ledger, request.study, request.round
        release = Release(arrays, dict(metrics), examples, weights_digest(request.arrays))
        if not ledger.record(study, round_, plan=request.digest, release=release):
            raise Refusal("dp_repeat", _repeat_message(request), audit="dp_refused")
        rules = ledger.rules
        self.audit.append(
            "dp_spend",
            study=study,
            round=round_,
            plan=request.digest,
            epsilon=ledger.spent(),
            budget=rules.epsilon_budget,
            noise_multiplier=rules.noise_multiplier,
            clip_norm=rules.clip_norm,
            clipped=charge.clipped,
        )


def _budget_message(site: str, ledger: PrivacyLedger, rounds: int) -> str:
    return (
        f"site {site}: this study's {rounds} round(s) would take its privacy spend to epsilon "
        f"{ledger.epsilon_after(rounds):.3g} (budget {ledger.rules.epsilon_budget:g}, already spent "
        f"{ledger.spent():.3g}; {ledger.rounds_that_fit(rounds)} round(s) would fit); ask the data owner "
        "or run fewer rounds"
    )


def _repeat_message(request: Request) -> str:
    return (
        f"site {request.site} already sent its update for round {request.round} of this study, from other "
        "weights; it trains each round once, since a second noisy update would spend privacy budget"
    )

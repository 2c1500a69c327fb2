"""Approval by hash: a plan runs at a site only once its data owner approved exactly that plan.

The hash covers the plan's source text, its data contract and its declared model shapes, so
changing one character of any of them makes a new plan that waits for a new approval. Requests live
as plain files that the data owner can read::

    SITE/approvals/<hash>/plan.py        the researcher's source, exactly as hashed
    SITE/approvals/<hash>/request.json   contract, model shapes, submission metadata
    SITE/approvals/<hash>/decision.json  absent while pending, then {"state", "by", "note", "at"}

Every submission and decision is written to the site's audit log.

Example::

    h = plan_hash(source, contract, shapes)
    store = ApprovalStore(site_dir)
    store.submit(h, source, contract, shapes, {"job": "42"})    # -> "pending"
    store.approve(h[:8], by="dr-jones", note="reviewed")         # the CLI may use a prefix
    assert store.state(h) == "approved"                          # the executor uses the full hash
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from flip_common.planhash import model_shapes_of, plan_hash

from .audit import AuditLog
from .errors import AmbiguousPlan, ApprovalError, UnknownPlan
from .policy import SitePolicy
from .run_settings import settings_hash

State = Literal["pending", "approved", "rejected", "unknown"]
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class PlanRecord:
    """One plan in the store, with its decision if any."""

    hash: str
    state: State
    source: str
    contract: dict[str, Any]
    model_shapes: dict[str, list[int]]
    meta: dict[str, Any]
    submitted_at: str
    decided_by: str | None = None
    decided_at: str | None = None
    note: str = ""


class ApprovalStore:
    """The site's approvals under ``SITE/approvals/``, audited in ``SITE/audit.jsonl``.

    With a policy whose ``approval`` is ``"automatic"`` (demo sites only), :meth:`submit` approves
    on arrival.
    """

    def __init__(self, site_dir: Path, *, policy: SitePolicy | None = None, audit: AuditLog | None = None):
        self.site_dir = Path(site_dir)
        self.root = self.site_dir / "approvals"
        self.policy = policy
        self.audit = audit if audit is not None else AuditLog(self.site_dir / "audit.jsonl")

    def submit(
        self,
        hash: str,
        source: str,
        contract: dict[str, Any],
        model_shapes: dict[str, list[int]],
        meta: dict[str, Any] | None = None,
    ) -> State:
        """Record a plan as pending (idempotent) and return its state; the hash must match."""
        if plan_hash(source, contract, model_shapes) != hash:
            raise ApprovalError("the plan's hash does not match its source, contract and shapes; refusing it")
        if self.state(hash) != "unknown":
            return self.state(hash)
        self.root.mkdir(parents=True, exist_ok=True)
        request = {
            "hash": hash,
            "contract": contract,
            "model_shapes": model_shapes_of(model_shapes),
            "meta": dict(meta or {}),
            "submitted_at": _now(),
        }
        staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.root))
        # newline="" keeps line endings as sent: the stored file is exactly what was hashed.
        (staging / "plan.py").write_text(source, encoding="utf-8", newline="")
        (staging / "request.json").write_text(json.dumps(request, indent=2, sort_keys=True), encoding="utf-8")
        try:
            staging.chmod(0o755)
            # Atomic: of two concurrent submissions of one plan, the second fails here cleanly.
            os.rename(staging, self.root / hash)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if self.state(hash) == "unknown":
                raise
            return self.state(hash)
        self.audit.append("plan_submitted", plan=hash, meta=request["meta"])
        if self.policy is not None and self.policy.approval == "automatic":
            self._decide(hash, "approved", by="policy", note=self.policy.label)
        return self.state(hash)

    def state(self, hash: str) -> State:
        """The state of the plan with exactly this full hash: the executor's check, no prefixes."""
        if not _HEX64.fullmatch(hash) or not (self.root / hash / "request.json").is_file():
            return "unknown"
        decision = self._decision(hash)
        return decision["state"] if decision else "pending"

    def list(self, state: State | None = None) -> list[PlanRecord]:
        """Every plan, oldest submission first, optionally only those in ``state``."""
        if not self.root.is_dir():
            return []
        records = [self._record(p.name) for p in self.root.iterdir() if _HEX64.fullmatch(p.name)]
        records.sort(key=lambda r: r.submitted_at)
        return [r for r in records if state is None or r.state == state]

    def show(self, hash_or_prefix: str) -> PlanRecord:
        """The full record, source included, once the stored files are checked against the hash."""
        hash = self.resolve(hash_or_prefix)
        record = self._record(hash)
        if plan_hash(record.source, record.contract, record.model_shapes) != hash:
            raise ApprovalError(
                f"the stored files of plan {hash[:12]} no longer match its hash (edited on "
                "disk); reject it and ask the researcher to submit again"
            )
        return record

    def approve(self, hash_or_prefix: str, *, by: str, note: str = "") -> PlanRecord:
        """Approve a plan (a unique prefix of 4+ hex digits will do) and audit the decision.

        The approval also covers the run settings of every study of the plan on record now (what
        ``plans show`` lists); the policy decides whether other settings need approving again.
        """
        hash = self.resolve(hash_or_prefix)
        self.show(hash)  # never approve files that no longer match the hash
        settings = {r["settings_hash"]: r["settings"] for r in self.runs(hash)}
        return self._decide(hash, "approved", by=by, note=note, settings=settings)

    def record_run(
        self, hash: str, run_id: int, settings: dict[str, Any], *, submitter: dict[str, str] | None = None
    ) -> bool:
        """Keep a study's run settings (and its verified submitter) beside its plan and audit them, once per run;
        True if new."""
        folder = self.root / hash / "runs"
        folder.mkdir(exist_ok=True)
        digest = settings_hash(settings)
        body = {"run_id": int(run_id), "settings": settings, "settings_hash": digest, "at": _now()}
        if submitter:
            body["submitter"] = dict(submitter)
        try:
            with open(folder / f"{int(run_id)}.json", "x", encoding="utf-8") as fh:
                json.dump(body, fh, indent=2, sort_keys=True)
        except FileExistsError:  # every message of a run passes here; the first one records it
            return False
        self.audit.append("study_settings", plan=hash, run_id=int(run_id), settings_hash=digest, settings=settings)
        return True

    def runs(self, hash: str) -> list[dict[str, Any]]:
        """The run settings of every study of this plan on record, oldest first."""
        folder = self.root / hash / "runs"
        runs = []
        for path in folder.glob("*.json") if folder.is_dir() else []:
            try:
                runs.append(json.loads(path.read_text(encoding="utf-8")))
            except ValueError:
                continue  # being written; read on the next call
        return sorted(runs, key=lambda r: (str(r.get("at")), int(r.get("run_id", 0))))

    def approved_settings(self, hash: str) -> dict[str, dict[str, Any]]:
        """Settings hash -> settings the data owner approved along with the plan (empty if none)."""
        decision = self._decision(hash) or {}
        if decision.get("state") != "approved":
            return {}
        return dict(decision.get("settings") or {})

    def reject(self, hash_or_prefix: str, *, by: str, reason: str) -> PlanRecord:
        """Reject (or revoke) a plan; a reason is required, as the researcher is told of it."""
        if not reason.strip():
            raise ApprovalError("a rejection needs a reason (--reason)")
        return self._decide(self.resolve(hash_or_prefix), "rejected", by=by, note=reason)

    def resolve(self, hash_or_prefix: str) -> str:
        """The one full hash starting with ``hash_or_prefix``, else UnknownPlan or AmbiguousPlan."""
        prefix = hash_or_prefix.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{4,64}", prefix):
            raise UnknownPlan(f"{hash_or_prefix!r} is not a plan hash or a prefix of at least 4 hex digits")
        names = [p.name for p in self.root.iterdir()] if self.root.is_dir() else []
        matches = sorted(n for n in names if _HEX64.fullmatch(n) and n.startswith(prefix))
        if not matches:
            raise UnknownPlan(f"no plan starts with {prefix}; `flip-site plans list` shows them all")
        if len(matches) > 1:
            raise AmbiguousPlan(f"{prefix} matches {len(matches)} plans; give more digits", matches=matches)
        return matches[0]

    def _decide(
        self,
        hash: str,
        state: State,
        *,
        by: str,
        note: str,
        settings: dict[str, dict[str, Any]] | None = None,
    ) -> PlanRecord:
        previous = self.state(hash)
        decision: dict[str, Any] = {"state": state, "by": by, "note": note, "at": _now()}
        if settings:
            decision["settings"] = settings
        path = self.root / hash / "decision.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(decision, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
        event = "plan_approved" if state == "approved" else "plan_rejected"
        self.audit.append(event, plan=hash, by=by, note=note, previous=previous, settings=sorted(settings or {}))
        return self._record(hash)

    def _decision(self, hash: str) -> dict[str, Any] | None:
        path = self.root / hash / "decision.json"
        if not path.is_file():
            return None
        decision = json.loads(path.read_text(encoding="utf-8"))
        if decision.get("state") not in ("approved", "rejected"):
            raise ApprovalError(f"{path} is damaged; decide the plan again with `flip-site plans`")
        return dict(decision)

    def _record(self, hash: str) -> PlanRecord:
        folder = self.root / hash
        request = json.loads((folder / "request.json").read_text(encoding="utf-8"))
        decision = self._decision(hash) or {}
        return PlanRecord(
            hash=hash,
            state=decision.get("state", "pending"),
            source=(folder / "plan.py").read_bytes().decode("utf-8"),  # no newline translation
            contract=request["contract"],
            model_shapes=request["model_shapes"],
            meta=request.get("meta", {}),
            submitted_at=request["submitted_at"],
            decided_by=decision.get("by"),
            decided_at=decision.get("at"),
            note=decision.get("note", ""),
        )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")

"""Who is asking: every study's signature, verified by this site with its own copy of the federation's CA.

The site never takes the hub's word for who submitted a study. For each run it checks, once, the researcher's
signature over the study (:mod:`flip_common.identity`) against ``federation_ca`` (or, on a provisioned site that
predates it, ``root_certificates``: the same CA) and ``revocation_list``, both read from the site's own folder and
re-read when they change (so a new ``crl.pem`` copied in takes effect at the next study). A submission id is bound to
the first run that carried it (``SITE/submissions.jsonl``): the same signed study under another run is a replay.

Refused, by name and with an audit entry each: ``unsigned``, ``no_ca`` (this site has no CA configured: it refuses
every study until its data owner runs ``flip-site trust SITE --ca ca.pem``), ``unknown_ca``, ``expired``,
``revoked``, ``forged``, ``altered`` (a genuine signature over other settings: e.g. an old one replayed with more
rounds) and ``replayed``. Directory requests carry no plan and are answered unsigned.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from flip_common.identity import ReplayGuard, Trust, Verified, verify

from .audit import AuditLog
from .settings import SiteSettings, site_path

SEEN = "submissions.jsonl"


class SubmitterCheck:
    """``check(run_config, run_id)``: the run's verified submitter, or ``SubmissionRefused``."""

    def __init__(self, site_dir: Path, audit: AuditLog) -> None:
        self.site_dir = site_dir
        self.audit = audit
        self.replays = ReplayGuard(site_dir / SEEN)
        self._lock = threading.Lock()
        self._verified: dict[int, Verified] = {}  # run -> its submitter, for the run's later messages
        self._trust: tuple[tuple[Any, ...], Trust | None] | None = None

    def trust(self, settings: SiteSettings) -> Trust | None:
        """The site's own CA and revocation list, or None when it has no CA configured."""
        ca_value = settings.federation_ca or settings.root_certificates
        if not ca_value:
            return None
        ca = site_path(self.site_dir, ca_value)
        crl = site_path(self.site_dir, settings.revocation_list) if settings.revocation_list else None
        stamp = (*(_mtime(p) for p in (ca, crl) if p is not None), ca, crl)
        cached = self._trust
        if cached is not None and cached[0] == stamp:
            return cached[1]
        trust = Trust.load(ca, crl)  # IdentityError: the site's own trouble, said in its log
        self._trust = (stamp, trust)
        return trust

    def check(self, run_config: dict[str, Any], run_id: int, settings: SiteSettings) -> Verified:
        with self._lock:
            known = self._verified.get(run_id)
            if known is not None:
                return known
            verified = verify(run_config, self.trust(settings))  # SubmissionRefused, or IdentityError (the site's)
            self.replays.claim(verified.submission_id, run_id)
            self._verified = {**dict(list(self._verified.items())[-31:]), run_id: verified}
        who = verified.submitter
        self.audit.append(
            "submission_verified",
            run_id=run_id,
            submission_id=verified.submission_id,
            submitter=who.person,
            organisation=who.organisation,
            organisation_kind=who.kind,
            certificate_serial=who.serial,
            project=str(verified.statement.get("project", "")),
        )
        return verified


def submitter_meta(verified: Verified) -> dict[str, str]:
    """What ``flip-site plans list/show`` shows of who submitted a plan."""
    who = verified.submitter
    return {
        "submitter": who.person,
        "organisation": who.organisation,
        "organisation_kind": who.kind,
        "project": str(verified.statement.get("project", "")),
    }


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0

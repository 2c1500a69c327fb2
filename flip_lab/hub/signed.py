"""The hub admits signed studies only: Flower's Control API has no accounts, so the signature is the gate.

Each study's process checks the researcher's signature over the bundle (:func:`flip_common.identity.verify`) against
the federation's CA and revocation list in ``HUB/trust`` (``ca.pem``, ``crl.pem``; a local federation and ``flip-lab
up --certs`` put them there). A hub without them refuses every study. The sites verify again with their own copies and
also refuse replays: the hub's check keeps strangers from starting runs, it is not what a site relies on.
"""

from __future__ import annotations

from pathlib import Path

from flip_common.bundle import BundleRefused, PlanBundle
from flip_common.identity import IdentityError, SubmissionRefused, Trust, Verified, verify

TRUST_DIR = "trust"


def check_signed(bundle: PlanBundle, hub_dir: str | Path | None) -> Verified:
    """The study's verified submitter, or ``BundleRefused`` with the reason by name (``unsigned: ...``)."""
    trust = None
    folder = Path(hub_dir) / TRUST_DIR if hub_dir else None
    if folder is not None and (folder / "ca.pem").is_file():
        try:
            trust = Trust.load(folder / "ca.pem", folder / "crl.pem")
        except IdentityError as err:
            raise BundleRefused(f"no_ca: the hub's trust files cannot be used ({err})") from err
    try:
        return verify(bundle.run_config, trust)
    except SubmissionRefused as err:
        raise BundleRefused(f"{err.reason}: {err.message}") from err

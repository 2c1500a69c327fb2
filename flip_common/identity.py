"""Who submitted a study: researchers' certificates, the signed submission, and its verification.

The federation's CA (``flip-lab provision``) issues each researcher a certificate naming the person (common name),
their organisation (organisation name) and its kind (business category: ``nhs_trust``, ``university``,
``company``, ...). The lab signs every study it submits: the *statement* below, which binds the plan hash, the data
contract, the run settings (strategy, rounds, config), the initial weights' hash, the project, a fresh submission
id and the time, and the SHA-256 of the whole run config. Statement, signature and certificate travel in the
bundle's run config (``SIGNATURE_KEYS``). Each site checks them with its own copy of the CA and its revocation list,
never trusting the hub; the hub checks them too, so a stranger on the open Control API cannot start a run.

Example::

    me = Identity.load("fed/researchers/alice")
    run_config.update(sign(me, run_config, project="chest-xray"))
    verified = verify(run_config, Trust.load("ca.pem", "crl.pem"))       # or SubmissionRefused
    print(verified.submitter.label)                                     # Alice (KCL, university)

The chain is one level deep (federation CA -> researcher), so it is checked with ``verify_directly_issued_by``
plus the certificate's validity, its key use and the CA's signed revocation list; every signature operation is the
``cryptography`` library's (ECDSA P-384, SHA-384).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes

from .errors import FlipError

VERSION = "flip-submission-v1"
STATEMENT_KEY, SIGNATURE_KEY, CERTIFICATE_KEY = "flip-submission", "flip-signature", "flip-certificate"
SIGNATURE_KEYS = frozenset({STATEMENT_KEY, SIGNATURE_KEY, CERTIFICATE_KEY})
ORG_KINDS = ("nhs_trust", "hospital", "university", "company", "charity", "government", "other")
RESEARCHER_DAYS = 365
CRL_DAYS = 365
CLOCK_SKEW = datetime.timedelta(minutes=5)

# Why a submission is refused, by name (the audit log's ``reason`` and the researcher's message say which).
UNSIGNED, NO_CA, UNKNOWN_CA, EXPIRED, REVOKED, FORGED, ALTERED, REPLAYED = (
    "unsigned",
    "no_ca",
    "unknown_ca",
    "expired",
    "revoked",
    "forged",
    "altered",
    "replayed",
)


class IdentityError(FlipError):
    """A credential or trust file is missing or unreadable; the message says which and how to make it."""


class SubmissionRefused(FlipError):
    """A submission whose signature does not stand. ``reason`` is one of the names above; ``message`` is safe to show
    and to send back (it quotes certificate names and settings, never plan code or data)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Submitter:
    """What a verified certificate says about who signed."""

    person: str
    organisation: str
    kind: str
    serial: str  # hex
    not_after: str  # ISO 8601

    @classmethod
    def of(cls, cert: x509.Certificate) -> Submitter:
        return cls(
            person=_attr(cert, NameOID.COMMON_NAME),
            organisation=_attr(cert, NameOID.ORGANIZATION_NAME),
            kind=_attr(cert, NameOID.BUSINESS_CATEGORY),
            serial=f"{cert.serial_number:x}",
            not_after=cert.not_valid_after_utc.isoformat(),
        )

    @property
    def label(self) -> str:
        return f"{self.person} ({self.organisation}, {self.kind})"

    def as_dict(self) -> dict[str, str]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Verified:
    submitter: Submitter
    statement: dict[str, Any]

    @property
    def submission_id(self) -> str:
        return str(self.statement["submission_id"])


def _attr(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str:
    values = cert.subject.get_attributes_for_oid(oid)
    return str(values[0].value) if values else ""


# -- issuing (run by ``flip-lab provision`` with the CA's key) ---------------------------------------------------------
def researcher_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    *,
    person: str,
    organisation: str,
    kind: str,
    days: int = RESEARCHER_DAYS,
    not_before: datetime.datetime | None = None,
) -> x509.Certificate:
    """A researcher's certificate: names in standard subject fields, good for signing submissions (code signing) and
    for client TLS, never a CA."""
    if kind not in ORG_KINDS:
        raise IdentityError(f"organisation kind {kind!r} is not one of {', '.join(ORG_KINDS)}")
    for what, value in (("person", person), ("organisation", organisation)):
        if not value.strip() or len(value) > 64:
            raise IdentityError(f"the researcher's {what} must be 1 to 64 characters")
    start = not_before or datetime.datetime.now(datetime.UTC) - CLOCK_SKEW
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, person),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation),
            x509.NameAttribute(NameOID.BUSINESS_CATEGORY, kind),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def revocation_list(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    revoked: dict[int, datetime.datetime],
    *,
    days: int = CRL_DAYS,
) -> x509.CertificateRevocationList:
    """The CA's signed list of revoked certificate serials (``revoked``: serial -> when)."""
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(now + datetime.timedelta(days=days))
    )
    for serial, when in sorted(revoked.items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return builder.sign(ca_key, hashes.SHA384())


# -- the researcher's side ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    """A researcher's key and certificate (``DIR/researchers/NAME`` from ``flip-lab provision``)."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    folder: Path | None = None

    @classmethod
    def load(cls, folder: str | Path) -> Identity:
        folder = Path(folder).expanduser()
        certs, keys = sorted(folder.glob("*.cert.pem")), sorted(folder.glob("*.key"))
        if len(certs) != 1 or len(keys) != 1:
            raise IdentityError(
                f"{folder} is not a researcher identity (one NAME.cert.pem and one NAME.key); make one with "
                f"`flip-lab provision DIR --hub-address HOST:PORT --researcher 'id:Person:Organisation:kind'` and "
                f"pass DIR/researchers/ID"
            )
        try:
            key = serialization.load_pem_private_key(keys[0].read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(certs[0].read_bytes())
        except ValueError as err:
            raise IdentityError(f"{folder}: the key or certificate is not readable PEM ({err})") from err
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
            raise IdentityError(f"{folder}: the private key does not belong to the certificate; provision it again")
        return cls(key, cert, folder)

    @property
    def submitter(self) -> Submitter:
        return Submitter.of(self.certificate)


def statement(run_config: dict[str, str], *, project: str, submission_id: str, at: float) -> dict[str, Any]:
    """What a researcher signs for one study: read from the bundle's run config, so a site recomputes it the same
    way. The readable fields are for people and refusals; ``run_config_sha256`` binds everything else exactly."""
    fields = _bound_fields(run_config)
    return {"version": VERSION, "submission_id": submission_id, "time": float(at), "project": project, **fields}


def _bound_fields(run_config: dict[str, Any]) -> dict[str, Any]:
    try:
        spec = json.loads(str(run_config.get("flip-plan-spec", "")))
    except ValueError:
        spec = {}
    spec = spec if isinstance(spec, dict) else {}
    found = spec.get("config")
    config: dict[str, Any] = found if isinstance(found, dict) else {}
    raw = str(run_config.get("flip-init-weights", ""))
    try:
        weights = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        weights = raw.encode()
    unsigned = {k: str(v) for k, v in sorted(run_config.items()) if k not in SIGNATURE_KEYS}
    return {
        "plan_hash": str(spec.get("plan_hash", "")),
        "contract": spec.get("contract"),
        "strategy": config.get("strategy"),
        "rounds": config.get("rounds"),
        "config": config,
        "init_weights_sha256": hashlib.sha256(weights).hexdigest(),
        "resume_from": str(run_config.get("flip-resume-from", "")),
        "study": str(run_config.get("flip-study", "")),
        "run_config_sha256": hashlib.sha256(_canonical(unsigned)).hexdigest(),
    }


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _signed_bytes(text: str) -> bytes:
    return VERSION.encode() + b"\n" + text.encode()


def sign(
    identity: Identity, run_config: dict[str, str], *, project: str = "", at: float | None = None
) -> dict[str, str]:
    """The three run-config entries that sign ``run_config`` for ``identity`` (add them to it)."""
    body = statement(run_config, project=project, submission_id=uuid.uuid4().hex, at=time.time() if at is None else at)
    text = _canonical(body).decode()
    signature = identity.key.sign(_signed_bytes(text), ec.ECDSA(hashes.SHA384()))
    return {
        STATEMENT_KEY: text,
        SIGNATURE_KEY: base64.b64encode(signature).decode(),
        CERTIFICATE_KEY: identity.certificate.public_bytes(serialization.Encoding.PEM).decode(),
    }


# -- the verifying side (every site, and the hub) ----------------------------------------------------------------------
@dataclass(frozen=True)
class Trust:
    """A verifier's own trust: the federation's CA certificate and, when it has one, the CA's revocation list."""

    ca: x509.Certificate
    crl: x509.CertificateRevocationList | None = None

    @classmethod
    def load(cls, ca: str | Path, crl: str | Path | None = None) -> Trust:
        ca_path = Path(ca)
        try:
            ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
        except (OSError, ValueError) as err:
            raise IdentityError(f"the federation's CA certificate {ca_path} cannot be read: {err}") from err
        revoked = None
        if crl is not None and Path(crl).exists():
            try:
                revoked = x509.load_pem_x509_crl(Path(crl).read_bytes())
            except ValueError as err:
                raise IdentityError(f"the revocation list {crl} is not a readable PEM CRL: {err}") from err
            if revoked.issuer != ca_cert.subject or not revoked.is_signature_valid(
                cast("CertificateIssuerPublicKeyTypes", ca_cert.public_key())  # the CA's key signs certificates
            ):
                raise IdentityError(
                    f"the revocation list {crl} is not signed by the federation's CA {ca_path}; copy the one "
                    f"`flip-lab provision` wrote (DIR/ca/crl.pem)"
                )
        return cls(ca_cert, revoked)


def verify(run_config: dict[str, Any], trust: Trust | None, *, now: datetime.datetime | None = None) -> Verified:
    """The verified submitter of a plan bundle's run config, or ``SubmissionRefused`` naming why not."""
    present = SIGNATURE_KEYS & set(run_config)
    if not present:
        raise SubmissionRefused(
            UNSIGNED, "the study is not signed; submit it from FLIP Lab with a researcher identity (connect(identity=))"
        )
    if present != SIGNATURE_KEYS:
        raise SubmissionRefused(FORGED, "the study's signature is incomplete (statement, signature and certificate)")
    if trust is None:
        raise SubmissionRefused(NO_CA, "no federation CA is configured here to verify who signed the study")
    now = now or datetime.datetime.now(datetime.UTC)
    try:
        cert = x509.load_pem_x509_certificate(str(run_config[CERTIFICATE_KEY]).encode())
    except ValueError as err:
        raise SubmissionRefused(FORGED, "the study's certificate is not a readable X.509 certificate") from err
    who = Submitter.of(cert)
    try:
        cert.verify_directly_issued_by(trust.ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise SubmissionRefused(
            UNKNOWN_CA, f"the study is signed by {who.label}, whose certificate this federation's CA did not issue"
        ) from err
    if not (cert.not_valid_before_utc - CLOCK_SKEW <= now <= cert.not_valid_after_utc):
        raise SubmissionRefused(
            EXPIRED,
            f"{who.label}'s certificate is valid from {cert.not_valid_before_utc:%Y-%m-%d} "
            f"to {cert.not_valid_after_utc:%Y-%m-%d}; ask the federation for a new one",
        )
    if trust.crl is not None and trust.crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
        raise SubmissionRefused(REVOKED, f"{who.label}'s certificate (serial {who.serial}) has been revoked")
    _check_use(cert, who)
    text = str(run_config[STATEMENT_KEY])
    try:
        signature = base64.b64decode(str(run_config[SIGNATURE_KEY]), validate=True)
        public = cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise InvalidSignature
        public.verify(signature, _signed_bytes(text), ec.ECDSA(hashes.SHA384()))
    except (binascii.Error, ValueError, InvalidSignature) as err:
        raise SubmissionRefused(
            FORGED, f"the study's signature does not verify with {who.label}'s certificate: forged or altered"
        ) from err
    try:
        signed = json.loads(text)
        if not isinstance(signed, dict) or signed.get("version") != VERSION:
            raise ValueError(VERSION)
    except ValueError as err:
        raise SubmissionRefused(FORGED, f"the signed statement is not a {VERSION} statement") from err
    at = datetime.datetime.fromtimestamp(float(signed.get("time", 0)), datetime.UTC)
    if not (cert.not_valid_before_utc - CLOCK_SKEW <= at <= cert.not_valid_after_utc):
        raise SubmissionRefused(
            EXPIRED, f"the study was signed at {at:%Y-%m-%d %H:%M} UTC, outside {who.label}'s certificate's validity"
        )
    actual = _bound_fields(run_config)
    changed = [k for k in actual if signed.get(k) != actual[k]]
    if changed:
        raise SubmissionRefused(
            ALTERED,
            f"the study differs from what {who.label} signed ({_changes(signed, actual, changed)}): an old signature "
            "replayed with other settings, or a bundle altered after signing",
        )
    return Verified(who, signed)


def _check_use(cert: x509.Certificate, who: Submitter) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        constraints, usage = None, None
    if constraints is None or constraints.ca or usage is None or ExtendedKeyUsageOID.CODE_SIGNING not in usage:
        raise SubmissionRefused(
            UNKNOWN_CA, f"{who.label}'s certificate is not a researcher's (it may not sign submissions)"
        )


def _changes(signed: dict[str, Any], actual: dict[str, Any], keys: list[str]) -> str:
    shown = []
    for key in keys:
        before, after = signed.get(key), actual[key]
        if key in ("rounds", "strategy", "project", "resume_from", "study"):
            shown.append(f"{key} {before} -> {after}")
        else:
            shown.append(f"{key} changed")
    return "; ".join(shown)


class ReplayGuard:
    """Submission ids already seen, each bound to the run that first carried it (a JSON-lines file)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def claim(self, submission_id: str, run_id: int) -> None:
        """Bind ``submission_id`` to ``run_id``, or ``SubmissionRefused(REPLAYED)`` when another run has it."""
        seen = self._seen()
        first = seen.get(submission_id)
        if first is not None and first != int(run_id):
            raise SubmissionRefused(
                REPLAYED, f"submission {submission_id[:12]} was already run as job {first}: a replayed study"
            )
        if first is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"submission_id": submission_id, "run_id": int(run_id), "t": time.time()}) + "\n")

    def _seen(self) -> dict[str, int]:
        seen: dict[str, int] = {}
        if not self.path.exists():
            return seen
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                seen.setdefault(str(entry["submission_id"]), int(entry["run_id"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash: the others stand
        return seen

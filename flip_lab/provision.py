"""A federation's identities: its certificate authority, the hub's certificate and each site's key pair.

``flip-lab provision DIR --hub-address HOST:PORT --site NAME ...`` runs once on a trusted machine and lays out::

    DIR/ca/ca.pem, ca.key            the federation's CA (keep ca.key offline; it signs the hub's certificate)
    DIR/hub/ca.pem, hub.pem, hub.key  what the hub serves TLS with
    DIR/hub/sites.toml                the registration file: each site's public key, the only nodes the hub admits
    DIR/sites/NAME/                   one bundle per hospital: ca.pem, NAME.key, NAME.pub, bundle.toml
    DIR/researcher/ca.pem             what a researcher's notebook verifies the hub with
    DIR/researchers/ID/               one researcher's identity: ID.key (0600), ID.cert.pem, ca.pem
                                      -> flip_lab.connect(..., identity="DIR/researchers/ID")
    DIR/ca/crl.pem, revoked.toml      the CA's signed revocation list (copied as crl.pem to hub/ and each site)

A researcher's certificate names the person (common name), the organisation (organisation name) and its kind
(business category, e.g. ``university``); the lab signs every study with it and each site verifies the signature
with its own copy of ``ca.pem`` and ``crl.pem`` (:mod:`flip_common.identity`). ``revoke(DIR, ID)`` (``flip-lab
revoke``) adds the researcher's certificate to the revocation list; rotating a key is a revocation followed by a
new ``--researcher`` with the same ID.

Site keys are ECDSA P-384 in OpenSSH format, the form Flower 1.42's SuperNode loads
(``--auth-supernode-private-key``) and its Control API registers (a NIST-curve public key). Files holding a private
key are written 0600. Running the command again is safe: what exists is kept, missing sites are added, and anything
that would replace an identity already handed out (a new CA, a hub certificate for another address) needs
``force=True``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flip_common.identity import IdentityError, researcher_certificate, revocation_list

from .errors import FlipError

if TYPE_CHECKING:
    from ._flower import ControlClient

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
VALID_DAYS = 825  # the longest lifetime browsers and most TLS stacks still accept for a server certificate
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class ProvisionError(FlipError):
    """Provisioning refused or failed; the message says how to proceed."""


@dataclass(frozen=True)
class HubCerts:
    """What a hub needs to serve TLS and admit only registered sites (``DIR/hub``)."""

    ca: Path
    cert: Path
    key: Path
    sites: dict[str, bytes]  # site name -> OpenSSH public key line

    @classmethod
    def load(cls, folder: str | Path) -> HubCerts:
        """Read ``folder`` (a provision folder or its ``hub`` subfolder) and check that every file is there."""
        folder = Path(folder).resolve()  # the hub runs in its own working folder: relative paths would break there
        if (folder / "hub" / "hub.pem").exists():
            folder = folder / "hub"
        paths = {name: folder / name for name in ("ca.pem", "hub.pem", "hub.key", "sites.toml")}
        missing = [name for name, path in paths.items() if not path.is_file()]
        if missing:
            raise ProvisionError(
                f"{folder} is not a hub folder made by `flip-lab provision` (missing "
                f"{', '.join(missing)}); run `flip-lab provision DIR --hub-address HOST:PORT "
                f"--site NAME ...` and pass DIR/hub"
            )
        registry = tomllib.loads(paths["sites.toml"].read_text()).get("sites", {})
        return cls(
            ca=paths["ca.pem"],
            cert=paths["hub.pem"],
            key=paths["hub.key"],
            sites={name: entry["public_key"].encode() for name, entry in registry.items()},
        )


@dataclass(frozen=True)
class Provision:
    """The folders ``provision`` wrote: ``hub`` for the hub, ``sites[name]`` for each hospital."""

    root: Path
    hub_address: str
    hub: Path
    researcher_ca: Path
    sites: dict[str, Path]
    researchers: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Researcher:
    """Who a researcher credential names: ``id`` (its folder), the person, the organisation and its kind."""

    id: str
    person: str
    organisation: str
    kind: str

    @classmethod
    def parse(cls, text: str) -> Researcher:
        """``ID:Person:Organisation:kind``, as ``--researcher`` takes it."""
        parts = [part.strip() for part in text.split(":")]
        if len(parts) != 4 or not all(parts):
            raise ProvisionError(
                f"--researcher {text!r} must be ID:Person:Organisation:kind, e.g. "
                f"'alice:Alice Smith:King's College London:university'"
            )
        return cls(*parts)


DEFAULT_RESEARCHER = Researcher("default", "Local researcher", "This machine", "other")


def provision(
    root: str | Path,
    *,
    hub_address: str,
    sites: list[str],
    researchers: list[Researcher] = (),  # type: ignore[assignment]
    force: bool = False,
) -> Provision:
    """Create (or complete) the federation's identities under ``root``; see the module docstring for the layout.

    ``hub_address`` is the ``HOST:PORT`` sites and researchers dial; the hub's certificate names that host plus
    127.0.0.1 and localhost (the hub's own helpers connect over loopback). ``force=True`` starts over with a new CA,
    which invalidates every bundle already handed out.
    """
    root = Path(root)
    host, _port = split_address(hub_address)
    for name in [*sites, *(r.id for r in researchers)]:
        if not SITE_NAME.match(name):
            raise ProvisionError(
                f"site name {name!r} must be letters, digits, '-', '_' or '.' (at most 63), "
                f"starting with a letter or digit: it names the site's folder and key files"
            )
    if len(set(sites)) != len(sites):
        raise ProvisionError("each --site name must be given once")
    meta_path = root / "federation.toml"
    if force:
        for sub in ("ca", "hub", "sites", "researcher", "researchers"):
            shutil.rmtree(root / sub, ignore_errors=True)
        meta_path.unlink(missing_ok=True)
    elif meta_path.exists():
        recorded = tomllib.loads(meta_path.read_text()).get("hub_address")
        if recorded != hub_address:
            raise ProvisionError(
                f"{root} was provisioned for hub {recorded}, not {hub_address}; a new address "
                f"needs a new hub certificate: rerun with --force (every site then needs its new "
                f"bundle) or use another folder"
            )
    for sub in ("ca", "hub", "sites", "researcher"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    ca_key, ca_cert = _ensure_ca(root / "ca")
    _ensure_hub_cert(root / "hub", host, ca_key, ca_cert)
    shutil.copyfile(root / "ca" / "ca.pem", root / "hub" / "ca.pem")
    shutil.copyfile(root / "ca" / "ca.pem", root / "researcher" / "ca.pem")
    for name in sites:
        _ensure_site(root / "sites" / name, name, hub_address, root / "ca" / "ca.pem")
    for researcher in researchers:
        _ensure_researcher(root, researcher, ca_key, ca_cert)
    _publish_crl(root, ca_key, ca_cert)
    all_sites = sorted(p.name for p in (root / "sites").iterdir() if (p / f"{p.name}.pub").is_file())
    registry = {
        "sites": {
            name: {"public_key": (root / "sites" / name / f"{name}.pub").read_text().strip()} for name in all_sites
        }
    }
    (root / "hub" / "sites.toml").write_text(
        "# Sites this hub admits (written by `flip-lab provision`): the hub registers each public key at start.\n"
        + tomli_w.dumps(registry)
    )
    meta_path.write_text(tomli_w.dumps({"hub_address": hub_address, "sites": all_sites}))
    return Provision(
        root=root,
        hub_address=hub_address,
        hub=root / "hub",
        researcher_ca=root / "researcher" / "ca.pem",
        sites={name: root / "sites" / name for name in all_sites},
        researchers=_researchers(root),
    )


def ensure_trust(root: str | Path, researcher: Researcher = DEFAULT_RESEARCHER) -> Path:
    """A CA, its revocation list and one researcher, without a hub certificate: what a local federation on
    loopback needs so that its studies are signed and verified like any other. Returns the researcher's folder."""
    root = Path(root)
    (root / "ca").mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _ensure_ca(root / "ca")
    folder = _ensure_researcher(root, researcher, ca_key, ca_cert)
    _publish_crl(root, ca_key, ca_cert)
    return folder


def revoke(root: str | Path, researcher_id: str) -> Path:
    """Revoke a researcher's certificate: its serial joins the CA's revocation list (``DIR/ca/crl.pem``, copied to
    ``DIR/hub`` and every site bundle) and its folder is renamed ``ID.revoked-SERIAL``, so that provisioning the same
    ID again issues a new key pair (a rotation). Sites refuse the old certificate once they hold the new list."""
    root = Path(root)
    folder = root / "researchers" / researcher_id
    cert_path = folder / f"{researcher_id}.cert.pem"
    if not cert_path.is_file():
        raise ProvisionError(f"no researcher {researcher_id!r} in {root / 'researchers'}; nothing was revoked")
    ca_key, ca_cert = _ensure_ca(root / "ca")
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    revoked = _revoked(root)
    revoked[f"{cert.serial_number:x}"] = {
        "researcher": researcher_id,
        "at": datetime.datetime.now(datetime.UTC).isoformat(),
    }
    (root / "ca" / "revoked.toml").write_text(tomli_w.dumps({"revoked": revoked}))
    folder.rename(folder.with_name(f"{researcher_id}.revoked-{cert.serial_number:x}"))
    return _publish_crl(root, ca_key, ca_cert)


def _revoked(root: Path) -> dict[str, dict[str, str]]:
    path = root / "ca" / "revoked.toml"
    return dict(tomllib.loads(path.read_text()).get("revoked", {})) if path.exists() else {}


def _publish_crl(root: Path, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate) -> Path:
    """The CA's revocation list, signed again when its revocations changed or it has under 30 days left, copied
    wherever ``ca.pem`` was handed out (an unchanged list stays byte for byte what the sites already hold)."""
    serials = {
        int(serial, 16): datetime.datetime.fromisoformat(entry["at"]) for serial, entry in _revoked(root).items()
    }
    path = root / "ca" / "crl.pem"
    if not _crl_current(path, ca_cert, set(serials)):
        path.write_bytes(revocation_list(ca_key, ca_cert, serials).public_bytes(serialization.Encoding.PEM))
    for holder in [root / "hub", *(root / "sites").glob("*"), *(root / "researchers").glob("*")]:
        if (holder / "ca.pem").is_file():
            shutil.copyfile(path, holder / "crl.pem")
    return path


def _crl_current(path: Path, ca_cert: x509.Certificate, serials: set[int]) -> bool:
    if not path.is_file():
        return False
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
    except ValueError:
        return False
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30)
    return (
        crl.issuer == ca_cert.subject
        and crl.is_signature_valid(ca_cert.public_key())
        and crl.next_update_utc is not None
        and crl.next_update_utc > soon
        and {r.serial_number for r in crl} == serials
    )


def _researchers(root: Path) -> dict[str, Path]:
    folder = root / "researchers"
    return (
        {p.name: p for p in sorted(folder.iterdir()) if (p / f"{p.name}.cert.pem").is_file()} if folder.is_dir() else {}
    )


def _ensure_researcher(
    root: Path, who: Researcher, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> Path:
    """``DIR/researchers/ID``: a key pair and a certificate from the CA naming the person and organisation. An
    existing identity is kept when it names the same person and organisation; another needs ``revoke`` first."""
    folder = root / "researchers" / who.id
    key_path, cert_path = folder / f"{who.id}.key", folder / f"{who.id}.cert.pem"
    if key_path.exists() and cert_path.exists():
        existing = x509.load_pem_x509_certificate(cert_path.read_bytes())
        names = {a.oid: a.value for a in existing.subject}
        wanted = {
            NameOID.COMMON_NAME: who.person,
            NameOID.ORGANIZATION_NAME: who.organisation,
            NameOID.BUSINESS_CATEGORY: who.kind,
        }
        if names != wanted or existing.issuer != ca_cert.subject:
            raise ProvisionError(
                f"researcher {who.id} already names someone else or another CA; revoke it first "
                f"(`flip-lab revoke {root} {who.id}`) to issue a new identity under that ID"
            )
    else:
        folder.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP384R1())
        try:
            cert = researcher_certificate(
                ca_key, ca_cert, key.public_key(), person=who.person, organisation=who.organisation, kind=who.kind
            )
        except IdentityError as err:
            raise ProvisionError(str(err)) from err
        _write_private(key_path, _pem_key(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    shutil.copyfile(root / "ca" / "ca.pem", folder / "ca.pem")
    return folder


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` to ``(host, port)``, with an error that shows the expected form."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ProvisionError(f"address {address!r} must be HOST:PORT, e.g. hub.example.org:9093 or 10.0.0.5:9093")
    return host, int(port)


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by its owner only, from the first byte (no window in which it is world-readable)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _ensure_ca(folder: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = folder / "ca.key", folder / "ca.pem"
    if key_path.exists() and cert_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FLIP Lab federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, "FLIP Lab federation CA"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write_private(key_path, _pem_key(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _san_entries(host: str) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys([host, *LOOPBACK_NAMES]):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def _ensure_hub_cert(folder: Path, host: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate) -> None:
    cert_path, key_path = folder / "hub.pem", folder / "hub.key"
    wanted = _san_entries(host)
    if cert_path.exists() and key_path.exists():
        existing = x509.load_pem_x509_certificate(cert_path.read_bytes())
        names = existing.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if all(entry in names for entry in wanted) and existing.issuer == ca_cert.subject:
            return
        raise ProvisionError(f"{cert_path} does not name {host} or was signed by another CA; rerun with --force")
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(wanted), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(key_path, _pem_key(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _ensure_site(folder: Path, name: str, hub_address: str, ca_pem: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = folder / f"{name}.key", folder / f"{name}.pub"
    if not (key_path.exists() and pub_path.exists()):
        key = ec.generate_private_key(ec.SECP384R1())
        _write_private(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
        )
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        pub_path.write_bytes(public + f" flip-site-{name}\n".encode())
    shutil.copyfile(ca_pem, folder / "ca.pem")
    (folder / "bundle.toml").write_text(
        "# Copy this folder to the hospital and run: flip-site init SITE --certs THIS_FOLDER\n"
        + tomli_w.dumps(
            {
                "name": name,
                "hub": hub_address,
                "root_certificates": "ca.pem",
                "auth_key": f"{name}.key",
                "federation_ca": "ca.pem",
                "revocation_list": "crl.pem",
            }
        )
    )


def register_sites(client: ControlClient, certs: HubCerts) -> dict[str, int]:
    """Register every provisioned site's public key with a hub that runs ``--enable-supernode-auth``.

    With node authentication on, Flower 1.42's SuperLink refuses self-registration over the Fleet API; a node is
    admitted only if its public key was registered through the Control API (what ``flwr supernode register`` does).
    The hub keeps its state in memory, so this runs at every hub start. A key the hub already knows is kept, so
    calling it twice is harmless. Returns each site's node id (0 where the key was already registered).
    """
    import httpx
    from flwr.supercore.error import ApiErrorCode, FlowerError

    node_ids: dict[str, int] = {}
    for name, openssh in sorted(certs.sites.items()):
        key = serialization.load_ssh_public_key(openssh)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ProvisionError(f"site {name}'s public key is not an ECDSA key; provision it again")
        # Flower's Control API takes the key as PEM SubjectPublicKeyInfo (its ``public_key_to_bytes``).
        pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        try:
            node_ids[name] = client.register_node(pem, name)
        except httpx.HTTPStatusError as err:
            flower = FlowerError.from_json(err.response.text)
            if flower is not None and flower.code == ApiErrorCode.PUBLIC_KEY_ALREADY_IN_USE:
                node_ids[name] = 0
                continue
            raise ProvisionError(
                f"the hub refused to register site {name}: {flower.message if flower else err}"
            ) from err
    return node_ids

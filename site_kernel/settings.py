"""A site's own settings (``SITE/site.toml``): who it is, where its hub is, which dataset plans train on.

Data paths live here and only here: a plan never names a path, the site resolves its dataset from these settings.
"""

from __future__ import annotations

import os
import shutil
import stat
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import tomli_w

from flip_common.net import DEFAULT_HUB

from .errors import SiteKernelError

FILE = "site.toml"


class SettingsError(SiteKernelError):
    pass


@dataclass(frozen=True)
class SiteSettings:
    """``name``: shown to researchers. ``hub``: the SuperLink's address. ``dataset``: the registered dataset plans
    train on. ``threads``: torch threads for a job. ``poll_interval``: seconds between the SuperNode's polls of the
    hub while idle. ``root_certificates``: the federation's CA certificate, which verifies a TLS hub (none on
    loopback). ``auth_key``: the site's private key (OpenSSH, ECDSA P-384) that authenticates it to a hub with node
    authentication. Both are made by ``flip-lab provision``, and a relative path is relative to the site folder.
    ``federation_ca``: the CA certificate that issued the researchers whose signed studies this site verifies (it
    falls back to ``root_certificates``; a site with neither refuses every study), ``revocation_list``: that CA's
    signed list of revoked researchers (:mod:`site_kernel.submitters`).
    ``site_steps``: site-specific harmonisation applied before the contract's own (e.g. a CT window).
    ``worker_idle_s``: a job's sandboxed worker is stopped after this many idle seconds. ``sandbox``: false turns the
    sandbox off, honoured only under a demo policy (used to measure what the sandbox costs); every job's audit entry
    says which. ``egress_capture``: a file to which the site appends every reply it sends (for audits and tests of what
    leaves the site)."""

    name: str
    hub: str = DEFAULT_HUB
    dataset: str = "default"
    threads: int = 1
    poll_interval: float = 0.1
    root_certificates: str = ""
    auth_key: str = ""
    federation_ca: str = ""
    revocation_list: str = ""
    site_steps: list[dict[str, Any]] = field(default_factory=list)
    worker_idle_s: float = 120.0
    sandbox: bool = True
    egress_capture: str = ""


def load_settings(site_dir: Path) -> SiteSettings:
    path = site_dir / FILE
    if not path.exists():
        raise SettingsError(f"{path} is missing: create the site with `flip-site init {site_dir} --name NAME`")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise SettingsError(f"{path} is not valid TOML: {err}") from err
    known = set(SiteSettings.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise SettingsError(f"{path}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
    if not isinstance(values.get("name"), str) or not values["name"]:
        raise SettingsError(f"{path}: `name` must be a non-empty string")
    return SiteSettings(**values)


def write_settings(site_dir: Path, settings: SiteSettings) -> Path:
    site_dir.mkdir(parents=True, exist_ok=True)
    values = {k: v for k, v in settings.__dict__.items() if v not in ("", [], None)}
    path = site_dir / FILE
    path.write_text(tomli_w.dumps(values))
    return path


CERTS_DIR = "certs"


def site_path(site_dir: Path, value: str) -> Path:
    """A path from ``site.toml``: absolute as written, or relative to the site folder."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else site_dir / path


def check_identity(site_dir: Path, settings: SiteSettings) -> None:
    """Refuse to start with a CA or key file that is missing, or a private key that others can read (as ssh does):
    a key readable by other accounts on the site's machine lets them pose as the site."""
    for key, value in (
        ("root_certificates", settings.root_certificates),
        ("auth_key", settings.auth_key),
        ("federation_ca", settings.federation_ca),
    ):
        if value and not site_path(site_dir, value).is_file():
            raise SettingsError(
                f"{site_dir / FILE}: {key} = {value!r} is not a file; copy the site's bundle from "
                f"`flip-lab provision` and run `flip-site init {site_dir} --certs BUNDLE`"
            )
    if settings.auth_key:
        mode = site_path(site_dir, settings.auth_key).stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SettingsError(
                f"the site's private key {settings.auth_key} can be read by other accounts; "
                f"run `chmod 600 {site_path(site_dir, settings.auth_key)}`"
            )


def install_certs(site_dir: Path, bundle: Path) -> dict[str, str]:
    """Copy a site bundle from ``flip-lab provision`` (CA certificate, the site's key pair) into ``SITE/certs``.

    Returns what the bundle says about the site (``name``, ``hub``) and the ``site.toml`` keys pointing at the copies
    (``root_certificates``, ``auth_key``, relative to the site folder). The private key keeps mode 0600.
    """
    meta_path = bundle / "bundle.toml"
    if not meta_path.is_file():
        raise SettingsError(
            f"{bundle} is not a site bundle (no bundle.toml): pass the folder `flip-lab provision` "
            f"wrote for this site, DIR/sites/NAME"
        )
    meta = tomllib.loads(meta_path.read_text())
    target = site_dir / CERTS_DIR
    target.mkdir(parents=True, exist_ok=True)
    target.chmod(0o700)
    names = {"root_certificates": meta["root_certificates"], "auth_key": meta["auth_key"]}
    for value in names.values():
        if not (bundle / value).is_file():
            raise SettingsError(f"the bundle {bundle} lacks {value}; provision the site again")
    shutil.copyfile(bundle / names["root_certificates"], target / names["root_certificates"])
    key_target = target / names["auth_key"]
    key_target.unlink(missing_ok=True)
    fd = os.open(key_target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "wb") as fh:
        fh.write((bundle / names["auth_key"]).read_bytes())
    public = Path(names["auth_key"]).with_suffix(".pub").name
    if (bundle / public).is_file():
        shutil.copyfile(bundle / public, target / public)
    identity = {
        "name": str(meta["name"]),
        "hub": str(meta["hub"]),
        "root_certificates": f"{CERTS_DIR}/{names['root_certificates']}",
        "auth_key": f"{CERTS_DIR}/{names['auth_key']}",
    }
    crl = str(meta.get("revocation_list", "crl.pem"))
    return {**identity, **install_trust(site_dir, bundle / names["root_certificates"], bundle / crl)}


def install_trust(site_dir: Path, ca: Path, crl: Path | None = None) -> dict[str, str]:
    """Copy the federation's CA certificate (and its revocation list, when there is one) into ``SITE/certs``, where the
    site verifies researchers' signatures with them; returns the ``site.toml`` keys that point at the copies."""
    if not ca.is_file():
        raise SettingsError(f"{ca} is not a file: pass the federation's ca.pem from `flip-lab provision`")
    target = site_dir / CERTS_DIR
    target.mkdir(parents=True, exist_ok=True)
    if ca.resolve() != (target / "ca.pem").resolve():
        shutil.copyfile(ca, target / "ca.pem")
    keys = {"federation_ca": f"{CERTS_DIR}/ca.pem", "revocation_list": ""}
    if crl is not None and crl.is_file():
        shutil.copyfile(crl, target / "crl.pem")
        keys["revocation_list"] = f"{CERTS_DIR}/crl.pem"
    return keys


def record_identity(site_dir: Path, identity: dict[str, str]) -> SiteSettings:
    """Point ``site.toml`` at the certificates that :func:`install_certs` copied (``identity`` is what it returned)."""
    settings = replace(
        load_settings(site_dir),
        **{
            k: v
            for k, v in identity.items()
            if k in ("root_certificates", "auth_key", "federation_ca", "revocation_list")
        },
    )
    write_settings(site_dir, settings)
    return settings

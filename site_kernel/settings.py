"""A site's own settings (``SITE/site.toml``): who it is, where its hub is, which dataset plans train on.

Data paths live here and only here: a plan never names a path, the site resolves its dataset from these settings.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from .errors import SiteKernelError

FILE = "site.toml"


class SettingsError(SiteKernelError):
    pass


@dataclass(frozen=True)
class SiteSettings:
    """``name``: shown to researchers. ``hub``: the SuperLink's address. ``dataset``: the registered dataset plans
    train on. ``threads``: torch threads for a job. ``poll_interval``: seconds between the SuperNode's polls of the
    hub while idle. ``root_certificates``: CA file for a TLS hub (none on loopback). ``site_steps``: site-specific
    harmonisation applied before the contract's own (e.g. a CT window). ``worker_idle_s``: a job's sandboxed worker
    is stopped after this many idle seconds. ``sandbox``: false turns the sandbox off, honoured only under a demo
    policy (used to measure what the sandbox costs); every job's audit entry says which. ``egress_capture``: a file
    to which the site appends every reply it sends (for audits and tests of what leaves the site)."""

    name: str
    hub: str = "127.0.0.1:9093"
    dataset: str = "default"
    threads: int = 1
    poll_interval: float = 0.1
    root_certificates: str = ""
    auth_key: str = ""
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

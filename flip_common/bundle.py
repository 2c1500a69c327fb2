"""Read a submitted bundle (FAB) as data, the same way at the hub and at every site.

A bundle is a zip file, so its compressed size says nothing about what it holds: a 50 MB plan
deflates to a few kilobytes. Every entry is therefore read through a bounded stream and refused once
it passes its cap, whatever its header declares, before it is decoded or parsed. Only FLIP's own
files and components are accepted; nothing in a bundle is ever imported or executed.

FLIP sends two kinds of bundle, each with its own exact set of files and run-config keys: a plan
(a study) and a directory request (``flip-request = "directory"``: each site's name and public
catalogue, no plan and no code). ``read_bundle`` tells them apart by their files.
"""

from __future__ import annotations

import io
import tomllib
import zipfile
from dataclasses import dataclass
from typing import Any

from .identity import SIGNATURE_KEYS
from .protocol import RUN_CONFIG_KEYS

SERVER_APP = "flip_lab.hub.server_app:app"
CLIENT_APP = "flip_lab.hub.client_app:app"
COMPONENTS = {"serverapp": SERVER_APP, "clientapp": CLIENT_APP}
PUBLISHER = "flip-lab"
CONFIG_KEYS = RUN_CONFIG_KEYS  # flip_common.protocol.RunConfig
# A signed plan carries these three more (flip_common.identity: statement, signature, certificate); whether a plan
# must be signed is the reader's caller's decision (the hub and every site refuse unsigned ones).
SIGNED_CONFIG_KEYS = CONFIG_KEYS | SIGNATURE_KEYS

DIRECTORY_PROJECT = "flip-directory"  # the project name of every directory request, and of no plan
DIRECTORY_CONFIG = {"flip-request": "directory"}
MAX_DIRECTORY_BYTES = {"pyproject.toml": 64 << 10, "README.md": 64 << 10}

MAX_PLAN_BYTES = 1 << 20  # a plan is a module of source text; 1 MiB is some 20,000 lines
# The pyproject carries the plan's source, its spec and the initial weights in base64: 64 MiB holds
# a model of about 45 MiB (some 11 million float32 parameters), and parsing that much TOML costs a
# site a few hundred MiB at most, where a 50 MB plan once took 1.4 GB.
MAX_ENTRY_BYTES = {"pyproject.toml": 64 << 20, "plan.py": MAX_PLAN_BYTES, "README.md": 64 << 10}
# Flower writes a manifest of the files' hashes into every bundle it builds.
FLOWER_MANIFEST = ".info/CONTENT"
MAX_MANIFEST_BYTES = 64 << 10


class BundleRefused(ValueError):
    """A bundle that is not exactly a FLIP plan's.

    ``reason`` is safe to show and to log: it quotes nothing from the bundle."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PlanBundle:
    """What a valid bundle carries: its run config (read as TOML data) and its plan source."""

    run_config: dict[str, str]
    plan_source: str


def _check_declared(info: zipfile.ZipInfo, cap: int) -> None:
    if info.file_size > cap:
        raise BundleRefused(
            f"bundle entry {info.filename!r} unpacks to {info.file_size} bytes, more than its "
            f"limit of {cap} bytes; shrink the plan or its initial weights"
        )


def _read_capped(zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int) -> bytes:
    with zf.open(info) as fh:
        # the size in the zip header is the sender's word: the stream itself is cut off at the cap
        data = fh.read(cap + 1)
    if len(data) > cap:
        raise BundleRefused(
            f"bundle entry {info.filename!r} unpacks to more than its limit of {cap} bytes; "
            "shrink the plan or its initial weights"
        )
    return data


@dataclass(frozen=True)
class DirectoryRequest:
    """A valid directory request: it carries nothing but its kind (``DIRECTORY_CONFIG``)."""

    run_config: dict[str, str]


def read_entries(fab: bytes, allowed: dict[str, int] | None = None) -> dict[str, bytes]:
    """Exactly the files of ``allowed`` (by default a plan's: pyproject.toml, plan.py, README.md), each
    read within its cap."""
    allowed = MAX_ENTRY_BYTES if allowed is None else allowed
    try:
        zf = zipfile.ZipFile(io.BytesIO(fab))
    except zipfile.BadZipFile as err:
        raise BundleRefused("the bundle is not a readable zip file") from err
    with zf:
        infos = zf.infolist()
        names = [i.filename for i in infos if i.filename != FLOWER_MANIFEST]
        if sorted(names) != sorted(allowed) or len(infos) - len(names) > 1:
            raise BundleRefused(
                f"the bundle's files are not exactly FLIP's ({', '.join(sorted(allowed))})"
                f": it holds {len(infos)} entries"
            )
        caps = {i.filename: allowed.get(i.filename, MAX_MANIFEST_BYTES) for i in infos}
        # every declared size first, so that nothing is unpacked for a bundle refused
        for info in infos:
            _check_declared(info, caps[info.filename])
        try:
            return {i.filename: _read_capped(zf, i, caps[i.filename]) for i in infos}
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as err:
            raise BundleRefused("the bundle is not a readable zip file") from err


def _entry_names(fab: bytes) -> set[str]:
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as zf:
            return {name for name in zf.namelist() if name != FLOWER_MANIFEST}
    except zipfile.BadZipFile as err:
        raise BundleRefused("the bundle is not a readable zip file") from err


def read_bundle(fab: bytes) -> PlanBundle | DirectoryRequest:
    """Either kind of FLIP bundle read as data (a directory request holds exactly its two files, anything
    else is read as a plan), or ``BundleRefused`` saying why it is neither."""
    if _entry_names(fab) == set(MAX_DIRECTORY_BYTES):
        return read_directory_request(fab)
    return read_plan_bundle(fab)


def read_directory_request(fab: bytes) -> DirectoryRequest:
    """A FLIP directory request read as data: FLIP's components, publisher and project name, and a run
    config of exactly ``DIRECTORY_CONFIG``."""
    entries = read_entries(fab, MAX_DIRECTORY_BYTES)
    try:
        project = tomllib.loads(entries["pyproject.toml"].decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise BundleRefused("the bundle's pyproject.toml is not valid UTF-8 TOML") from err
    app = _flip_app(project)
    if _project_name(project) != DIRECTORY_PROJECT:
        raise BundleRefused(f"a directory request's project name is {DIRECTORY_PROJECT!r}")
    if app.get("config") != DIRECTORY_CONFIG:
        raise BundleRefused("the bundle's run config is not exactly a FLIP directory request's (flip-request)")
    return DirectoryRequest(run_config=dict(DIRECTORY_CONFIG))


def _project_name(project: dict[str, Any]) -> Any:
    meta = project.get("project")
    return meta.get("name") if isinstance(meta, dict) else None


def _flip_app(project: dict[str, Any]) -> dict[str, Any]:
    """``[tool.flwr.app]`` of a bundle that names FLIP's own components and publisher."""
    app: Any = project.get("tool", {}).get("flwr", {}).get("app", {})
    if not isinstance(app, dict) or app.get("components") != COMPONENTS:
        raise BundleRefused(f"the bundle asks to run components other than FLIP's own ({SERVER_APP}, {CLIENT_APP})")
    if app.get("publisher") != PUBLISHER:
        raise BundleRefused(f"the bundle's publisher is not {PUBLISHER!r}")
    return app


def read_plan_bundle(fab: bytes) -> PlanBundle:
    """A FLIP plan bundle read as data, or ``BundleRefused`` saying why it is not one."""
    entries = read_entries(fab)
    try:
        project = tomllib.loads(entries["pyproject.toml"].decode())
        plan_source = entries["plan.py"].decode()
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise BundleRefused("the bundle's pyproject.toml or plan.py is not valid UTF-8 TOML/text") from err
    app = _flip_app(project)
    if _project_name(project) == DIRECTORY_PROJECT:  # it would pass for one in run lists
        raise BundleRefused(f"a plan's project name is not {DIRECTORY_PROJECT!r}")
    config = app.get("config")
    if not isinstance(config, dict) or set(config) not in (CONFIG_KEYS, SIGNED_CONFIG_KEYS):
        raise BundleRefused(
            f"the bundle's run config keys are not exactly FLIP's ({', '.join(sorted(CONFIG_KEYS))}, and for a "
            f"signed study {', '.join(sorted(SIGNATURE_KEYS))})"
        )
    if not all(isinstance(v, str) for v in config.values()):
        raise BundleRefused("the bundle's run config values must all be text")
    if len(config["flip-plan-source"].encode()) > MAX_PLAN_BYTES:
        raise BundleRefused(f"the plan is larger than its limit of {MAX_PLAN_BYTES} bytes")
    if config["flip-plan-source"] != plan_source:
        raise BundleRefused("the bundle's plan.py differs from the plan in its run config (flip-plan-source)")
    return PlanBundle(run_config=dict(config), plan_source=plan_source)

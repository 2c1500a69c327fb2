"""Three installable parts from this one repository: flip-common (the shared core), flip-site (what a hospital
installs) and flip-lab (the researcher's lab and the hub). Each part's project file, ``parts/PART/pyproject.toml``,
declares exactly what the part imports; ``scripts/build-wheels`` builds the wheels; the site part runs on its own.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
import zipfile
from importlib.metadata import Distribution, PackageNotFoundError, distribution, packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from test_boundaries import _imports

ROOT = Path(__file__).resolve().parents[1]
BUILD_WHEELS = ROOT / "scripts" / "build-wheels"
PACKAGES = {"flip-common": "flip_common", "flip-site": "site_kernel", "flip-lab": "flip_lab"}
# What a part needs without importing it, and why.
NOT_IMPORTED = {
    "flip-site": {"scipy": "plans may import it at the site"},
    "flip-lab": {
        "jupyterlab": "the side panel is a JupyterLab extension",
        "ipykernel": "papermill runs study notebooks on the Python kernel",
        "flip-site": "a local federation runs `flip-site` processes; the lab imports none of the site's code",
    },
}
# What a hospital never installs.
NOT_AT_A_HOSPITAL = ("jupyterlab", "papermill", "matplotlib", "ipywidgets", "flip_lab")


def _project(part: str) -> dict:
    return tomllib.loads((ROOT / "parts" / part / "pyproject.toml").read_text())["project"]


def _declared(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def _imported(part: str) -> set[str]:
    """The distributions ``part`` imports from, by the installed distributions' record of what they provide."""
    providers = packages_distributions()
    own = {package: name for name, package in PACKAGES.items()}
    names = set().union(*_imports(PACKAGES[part]).values()) - set(sys.stdlib_module_names) - {"__future__"}
    return {canonicalize_name(own.get(n) or providers[n][0]) for n in names} - {part}


# -- the declarations ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("part", sorted(PACKAGES))
def test_each_part_declares_exactly_what_it_imports(part: str) -> None:
    declared = _declared(_project(part)["dependencies"])
    assert declared - set(NOT_IMPORTED.get(part, {})) == _imported(part)


def test_the_development_install_is_the_union_of_the_parts() -> None:
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    parts = {Requirement(r) for part in PACKAGES for r in _project(part)["dependencies"]}
    outside = {r for r in parts if canonicalize_name(r.name) not in PACKAGES}
    assert _declared(dev["dependencies"]) == {canonicalize_name(r.name) for r in outside}
    # the same bounds everywhere (flwr's `dp` extra is the site's, and the union's)
    bounds = {canonicalize_name(r.name): str(r.specifier) for r in map(Requirement, dev["dependencies"])}
    assert {r.name: str(r.specifier) for r in outside if bounds[canonicalize_name(r.name)] != str(r.specifier)} == {}


def test_the_parts_are_released_together() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert {part: _project(part)["version"] for part in PACKAGES} == dict.fromkeys(PACKAGES, version)
    pins = {(part, str(r)) for part in PACKAGES for r in map(Requirement, _project(part)["dependencies"])}
    assert {p for p in pins if p[1].startswith("flip-")} == {
        ("flip-site", f"flip-common=={version}"),
        ("flip-lab", f"flip-common=={version}"),
        ("flip-lab", f"flip-site=={version}"),
    }


def test_the_site_part_installs_every_package_a_plan_may_import() -> None:
    from flip_lab._capture import SITE_PACKAGES

    providers = packages_distributions()
    site = _declared(_project("flip-site")["dependencies"]) | _declared(_project("flip-common")["dependencies"])
    needed = {canonicalize_name(providers[p][0]) for p in SITE_PACKAGES if p not in sys.stdlib_module_names}
    assert needed - site == set()


def test_the_site_part_holds_no_researcher_tool() -> None:
    site = _declared(_project("flip-site")["dependencies"]) | _declared(_project("flip-common")["dependencies"])
    assert not site & {canonicalize_name(n) for n in NOT_AT_A_HOSPITAL}


# -- the site part alone, in a fresh virtual environment ------------------------------------------------------------
def _closure(requirements: list[str], provided: set[str]) -> dict[str, Distribution]:
    """The installed distributions ``requirements`` need, with what they need in turn (markers and extras
    evaluated), leaving out ``provided``."""
    found: dict[str, Distribution] = {}
    extras_of: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in provided or (name in found and req.extras <= extras_of[name]):
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            pytest.fail(f"{req} is needed but not installed here")
        assert dist.version in req.specifier or not req.specifier, f"{name} {dist.version} does not satisfy {req}"
        found[name] = dist
        extras = extras_of.setdefault(name, set()) | set(req.extras)
        extras_of[name] = extras
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras | {""}):
                todo.append(sub)
    return found


def _link(dist: Distribution, site_packages: Path) -> int:
    """Link the files ``dist`` installed in site-packages into ``site_packages``; returns how many."""
    assert dist.files is not None, f"{dist.metadata['Name']} lists no files"
    count = 0
    for file in dist.files:
        if ".." in file.parts:  # scripts and data outside site-packages: none is needed to import or run a site
            continue
        source, target = Path(str(dist.locate_file(file))), site_packages / file
        if source.exists() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)
            count += 1
    return count


def _run(*cmd: str | Path, env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env, check=False)


@pytest.mark.e2e
def test_the_site_part_alone_runs_a_site_against_a_hub(tmp_path: Path) -> None:
    import psutil

    import flip_lab
    from flip_common.net import free_port
    from flip_lab.cli import main as flip_lab_main
    from flip_lab.supervisor import stop_pids

    started = time.monotonic()
    wheels = tmp_path / "wheels"
    built = _run(sys.executable, BUILD_WHEELS, wheels, "flip-common", "flip-site", timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    assert "Deprecat" not in built.stdout + built.stderr, built.stdout + built.stderr
    common, site_wheel = (Path(p) for p in built.stdout.split())
    with zipfile.ZipFile(site_wheel) as whl:
        metadata = whl.read(next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    needed = re.findall(r"^Requires-Dist: (.+)$", metadata, flags=re.MULTILINE)

    # a virtual environment with the base Python only, then the site's dependency closure linked in
    venv = tmp_path / "site-venv"
    made = _run(sys.executable, "-m", "venv", "--without-pip", venv)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    site_packages = Path(
        _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip()
    ).resolve()
    closure = _closure(needed, provided=set(PACKAGES))
    linked = sum(_link(dist, site_packages) for dist in closure.values())
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--python", str(python)]
    installed = _run(*pip, "install", "--no-index", "--no-deps", common, site_wheel)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    checked = _run(*pip, "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    listed = _run(*pip, "list", "--format=freeze").stdout.split()
    assert {canonicalize_name(line.split("==")[0]) for line in listed} == set(closure) | {"flip-common", "flip-site"}
    print(f"flip-site and its closure of {len(closure)} distributions ({linked} files) in {venv}")

    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin"
    probe = "import importlib.util as u, site_kernel, torch, monai, highdicom; " + "; ".join(
        f"print({name!r}, u.find_spec({name!r}) is not None)" for name in NOT_AT_A_HOSPITAL
    )
    imported = _run(python, "-I", "-c", probe, env=env)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.split() == [w for name in NOT_AT_A_HOSPITAL for w in (name, "False")]

    # a hub from the development install, and a site from the fresh environment
    hub = f"127.0.0.1:{free_port()}"
    site = tmp_path / "site"
    init = _run(venv / "bin" / "flip-site", "init", site, "--name", "lone-site", "--hub", hub, env=env)
    assert init.returncode == 0, init.stdout + init.stderr
    assert flip_lab_main(["up", "--sites", "0", "--listen", hub, "--workdir", str(tmp_path / "hub")]) == 0
    daemon = None
    try:
        with open(tmp_path / "site.out", "wb") as out:
            daemon = subprocess.Popen(
                [str(venv / "bin" / "flip-site"), "run", str(site)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        with flip_lab.connect(hub, workdir=tmp_path / "lab") as fed:
            deadline = time.monotonic() + 60
            while not any(n.status == "online" for n in fed.nodes()):
                assert daemon.poll() is None, (tmp_path / "site.out").read_text()
                assert time.monotonic() < deadline, f"the site did not come online: see {site / 'logs'}"
                time.sleep(0.5)
            assert [s["site"] for s in fed.sites()] == ["lone-site"]
        family = [daemon.pid, *(p.pid for p in psutil.Process(daemon.pid).children(recursive=True))]
        pythons = {psutil.Process(pid).cmdline()[0] for pid in family}
        assert pythons == {str(python)}, f"the site's processes ran {pythons}, not the fresh environment's Python"
    finally:
        if daemon is not None:
            stop_pids([daemon.pid])
        flip_lab_main(["down", "--workdir", str(tmp_path / "hub")])
    print(f"built, installed and served in {time.monotonic() - started:.1f} s")

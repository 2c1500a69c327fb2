"""Create site folders: an empty site for a hospital, or simulated demo hospitals for a local federation."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from .policy import write_default_policy
from .settings import SiteSettings, load_settings, write_settings


def init_site(site_dir: Path, *, name: str, hub: str, demo: bool = False) -> Path:
    """Lay out ``site_dir`` with its settings and the documented default policy (manual approval).

    Running it again on an existing site changes only its name and hub: its own harmonisation steps, certificates
    and other settings stay as the data owner left them.
    """
    for sub in ("data", "approvals", "logs", "cache"):
        (site_dir / sub).mkdir(parents=True, exist_ok=True)
    settings = SiteSettings(name=name, hub=hub)
    if (site_dir / "site.toml").exists():
        settings = dataclasses.replace(load_settings(site_dir), name=name, hub=hub)
    write_settings(site_dir, settings)
    if not (site_dir / "policy.toml").exists():
        write_default_policy(site_dir, demo=demo)
    return site_dir


#: The minimum cohort of the 3D demo's site policies (see :func:`create_demo_sites`).
VOLUME_MIN_COHORT = 3


def create_demo_sites(
    root: Path,
    *,
    n_sites: int,
    seed: int,
    hub: str,
    approval: str = "automatic",
    scale: float = 1.0,
    cache: Path | None = None,
    volumes: bool = False,
) -> list[Path]:
    """Generate ``n_sites`` simulated hospitals under ``root`` and make each a ready site folder.

    ``approval="automatic"`` writes the demo policy (labelled "automatic approval (demo only)" everywhere);
    ``"manual"`` keeps the secure default, so a data owner approves each plan with ``flip-site plans approve``.
    Each hospital's own harmonisation steps (e.g. its CT window) go into its ``site.toml``, where only the site sees
    them. ``volumes=True`` writes the 3D demo hospitals (whole volumes, for ``dims=3`` studies).

    With ``cache`` the hospitals' archives (their image files and registered datasets) are generated once per seed,
    size and generator version under ``cache`` and each site folder registers that archive, as a hospital registers
    its PACS export: a second federation with the same seed starts without generating anything (and without
    importing torch).
    """
    root.mkdir(parents=True, exist_ok=True)
    hospitals = _cached_hospitals(cache, n_sites=n_sites, seed=seed, scale=scale, volumes=volumes) if cache else None
    if hospitals is None:
        from .data import generate_demo_hospitals

        generated = generate_demo_hospitals(
            root, n_sites=n_sites, seed=seed, scale=scale, register=True, volumes=volumes
        )
        hospitals = [(h.name, h.site_dir, list(h.site_steps)) for h in generated]
    sites = []
    for name, source, site_steps in hospitals:
        site_dir = root / name
        if source != site_dir:  # the cached archive's registered datasets, whose files stay in the cache
            shutil.copytree(source / "data", site_dir / "data", dirs_exist_ok=True)
            (site_dir / "logs").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / "logs" / "data.log", site_dir / "logs" / "data.log")
        for sub in ("approvals", "logs", "cache"):
            (site_dir / sub).mkdir(parents=True, exist_ok=True)
        write_settings(site_dir, SiteSettings(name=name, hub=hub, site_steps=site_steps))
        if not (site_dir / "policy.toml").exists():
            # A dims=3 study's examples are whole patients: the 3D demo's hospitals hold 3-6 test patients each, so
            # their (demo) policy lowers the minimum cohort from 10 to 3.
            write_default_policy(
                site_dir, demo=approval == "automatic", min_cohort=VOLUME_MIN_COHORT if volumes else None
            )
        sites.append(site_dir)
    return sites


_CACHE_INDEX = "hospitals.json"  # written last: a cache entry without it is unfinished


def _cached_hospitals(
    cache: Path, *, n_sites: int, seed: int, scale: float, volumes: bool = False
) -> list[tuple[str, Path, list[dict[str, Any]]]]:
    """The simulated hospitals for (seed, n_sites, scale, 2D or 3D) from ``cache``, generated there first if missing.

    The entry's name hashes the data layer's source, so a change to the generator or to registration never reuses
    an old archive. One generator at a time per entry (a lock file); an entry left half-written is made again.
    """
    digest = hashlib.sha256(f"{seed}/{n_sites}/{scale!r}/{'3d' if volumes else '2d'}".encode())
    for source in sorted((Path(__file__).parent / "data").glob("*.py")):
        digest.update(source.name.encode() + source.read_bytes())
    entry = cache / f"seed{seed}-n{n_sites}{'-3d' if volumes else ''}-{digest.hexdigest()[:16]}"
    index = entry / _CACHE_INDEX
    if not index.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / f"{entry.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not index.is_file():
                from .data import generate_demo_hospitals

                shutil.rmtree(entry, ignore_errors=True)
                generated = generate_demo_hospitals(
                    entry, n_sites=n_sites, seed=seed, scale=scale, register=True, volumes=volumes
                )
                rows = [{"name": h.name, "site_steps": list(h.site_steps)} for h in generated]
                tmp = entry / (_CACHE_INDEX + ".tmp")
                tmp.write_text(json.dumps(rows))
                tmp.replace(index)
    rows = json.loads(index.read_text())
    return [(row["name"], entry / row["name"], row["site_steps"]) for row in rows]

"""Create site folders: an empty site for a hospital, or simulated demo hospitals for a local federation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

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
    volumes: bool = False,
) -> list[Path]:
    """Generate ``n_sites`` simulated hospitals under ``root`` and make each a ready site folder.

    ``approval="automatic"`` writes the demo policy (labelled "automatic approval (demo only)" everywhere);
    ``"manual"`` keeps the secure default, so a data owner approves each plan with ``flip-site plans approve``.
    Each hospital's own harmonisation steps (e.g. its CT window) go into its ``site.toml``, where only the site sees
    them. ``volumes=True`` writes the 3D demo hospitals (whole volumes, for ``dims=3`` studies).
    """
    from .data import generate_demo_hospitals

    root.mkdir(parents=True, exist_ok=True)
    hospitals = generate_demo_hospitals(root, n_sites=n_sites, seed=seed, scale=scale, register=True, volumes=volumes)
    sites = []
    for hospital in hospitals:
        site_dir = hospital.site_dir
        for sub in ("approvals", "logs", "cache"):
            (site_dir / sub).mkdir(parents=True, exist_ok=True)
        write_settings(site_dir, SiteSettings(name=hospital.name, hub=hub, site_steps=list(hospital.site_steps)))
        if not (site_dir / "policy.toml").exists():
            # A dims=3 study's examples are whole patients: the 3D demo's hospitals hold 3-6 test patients each, so
            # their (demo) policy lowers the minimum cohort from 10 to 3.
            write_default_policy(
                site_dir, demo=approval == "automatic", min_cohort=VOLUME_MIN_COHORT if volumes else None
            )
        sites.append(site_dir)
    return sites

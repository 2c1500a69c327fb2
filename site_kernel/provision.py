"""Create site folders: an empty site for a hospital, or simulated demo hospitals for a local federation."""

from __future__ import annotations

from pathlib import Path

from .policy import write_default_policy
from .settings import SiteSettings, write_settings


def init_site(site_dir: Path, *, name: str, hub: str, demo: bool = False) -> Path:
    """Lay out ``site_dir`` with its settings and the documented default policy (manual approval)."""
    for sub in ("data", "approvals", "logs", "cache"):
        (site_dir / sub).mkdir(parents=True, exist_ok=True)
    write_settings(site_dir, SiteSettings(name=name, hub=hub))
    if not (site_dir / "policy.toml").exists():
        write_default_policy(site_dir, demo=demo)
    return site_dir


def create_demo_sites(root: Path, *, n_sites: int, seed: int, hub: str, approval: str = "automatic"
                      ) -> list[Path]:
    """Generate ``n_sites`` simulated hospitals under ``root`` and make each a ready site folder.

    ``approval="automatic"`` writes the demo policy (labelled "automatic approval (demo only)" everywhere);
    ``"manual"`` keeps the secure default, so a data owner approves each plan with ``flip-site plans approve``.
    """
    from .data import generate_demo_hospitals, register_dataset

    root.mkdir(parents=True, exist_ok=True)
    raw_root = root / "_raw"
    hospitals = generate_demo_hospitals(raw_root, n_sites=n_sites, seed=seed)
    sites = []
    for hospital in hospitals:
        site_dir = root / hospital.name
        init_site(site_dir, name=hospital.name, hub=hub, demo=approval == "automatic")
        register_dataset(site_dir, "default", hospital.path, seed=seed)
        sites.append(site_dir)
    return sites

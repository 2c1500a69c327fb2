"""``flip-site``: what a hospital's data owner runs.

flip-site init SITE --name NAME --hub HOST:PORT    lay out a site folder (manual approval by default)
flip-site init SITE --certs BUNDLE                 ... for a provisioned hub: TLS + the site's own key
flip-site data add NAME PATH --site SITE           register a folder of DICOM series or NIfTI images
    [--labels DIR|CSV] [--modality M] [--test-fraction F] [--seed N]
flip-site data catalogue --site SITE [--site ...]  what researchers may see of the site's data
flip-site data harmonisation --site SITE ...       a contract's aggregate harmonisation report (contract on stdin)
flip-site demo ROOT --sites N --hub HOST:PORT      simulated hospitals as ready site folders (a local federation)
flip-site trust SITE --ca CA.pem [--crl CRL.pem]   the federation CA that verifies researchers' signatures
flip-site run SITE                                 serve the hub: SuperNode + the site's executor
flip-site status SITE                              is the site running, and under which policy
flip-site plans list|show|approve|reject ...       decide which plans may run
flip-site audit show|verify ...                    read and check the hash-chained audit log
flip-site policy show|init ...                     the site's governance policy
flip-site privacy --site SITE                      differential privacy budget, spent and per job
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from flip_common.textsafe import shown

from .errors import SiteKernelError


def _cmd_init(args: argparse.Namespace) -> int:
    from flip_common.net import DEFAULT_HUB

    from .settings import SettingsError, install_certs, record_identity
    from .site_folders import init_site

    site_dir = Path(args.site)
    identity: dict[str, str] = {}
    if args.certs:
        identity = install_certs(site_dir, Path(args.certs))
    name = args.name or identity.get("name")
    hub = args.hub or identity.get("hub") or DEFAULT_HUB
    if not name:
        raise SettingsError("give the site a name (--name NAME), or pass its bundle (--certs BUNDLE), which names it")
    site = init_site(site_dir, name=name, hub=hub, demo=args.demo)
    if identity:
        settings = record_identity(site, identity)
        print(f"identity: TLS with {site / settings.root_certificates}, key {site / settings.auth_key} (mode 0600)")
    print(f"site {name} created in {site}, hub {hub}")
    print(f"policy: {site / 'policy.toml'} ({'automatic approval (demo only)' if args.demo else 'manual approval'})")
    print(f"next: flip-site data add default /path/to/images --site {site}")
    return 0


def _cmd_trust(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .settings import install_trust, load_settings, site_path, write_settings

    site = Path(args.site)
    settings = load_settings(site)
    ca = Path(args.ca) if args.ca else site_path(site, settings.federation_ca or settings.root_certificates or "-")
    keys = install_trust(site, ca, Path(args.crl) if args.crl else None)
    if not keys["revocation_list"]:
        keys["revocation_list"] = settings.revocation_list
    write_settings(site, replace(settings, **keys))
    print(f"studies are verified with {site / keys['federation_ca']}", end="")
    print(f" and the revocation list {site / keys['revocation_list']}" if keys["revocation_list"] else "")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .daemon import run_site

    return run_site(Path(args.site), hub=args.hub, parent_pid=args.parent_pid)


def _cmd_status(args: argparse.Namespace) -> int:
    from .policy import load_policy
    from .settings import load_settings

    site = Path(args.site)
    settings = load_settings(site)
    state_file = site / "run" / "state.json"
    running = False
    if state_file.exists():
        state = json.loads(state_file.read_text())
        try:
            os.kill(int(state["pid"]), 0)
            running = True
        except (ProcessLookupError, PermissionError):
            running = False
    try:
        policy_label = load_policy(site).label
    except SiteKernelError as err:
        policy_label = f"NO VALID POLICY ({err})"
    print(f"site:    {settings.name}")
    print(f"hub:     {settings.hub}")
    print(f"running: {'yes' if running else 'no'}")
    print(f"policy:  {policy_label}")
    return 0 if running else 3


def _cmd_data_add(args: argparse.Namespace) -> int:
    from .data import register_dataset
    from .data.errors import REASON_TEXT

    summary = register_dataset(
        Path(args.site),
        args.name,
        Path(args.path),
        labels=Path(args.labels) if args.labels else None,
        seed=args.seed,
        test_fraction=args.test_fraction,
        modality=args.modality,
    )
    # Modalities and label classes are read from the files: shown with visible escapes.
    print(
        f"dataset {shown(summary.name)}: {summary.num_cases} cases ({summary.num_train} train, "
        f"{summary.num_test} test), {shown('/'.join(summary.modalities))}, {shown(summary.task)}"
        f"{'' if summary.labelled else ', unlabelled'}"
    )
    if summary.label_classes:
        classes = ", ".join(f"{shown(c)} ({n})" for c, n in summary.label_classes.items())
        print("label classes (cases): " + classes)
    for reason, count in summary.skipped.items():
        print(f"skipped: {count} file{'s' if count != 1 else ''}, {REASON_TEXT.get(reason, reason)} ({reason})")
    print(f"manifest: {summary.manifest_path}; reasons per file in {Path(args.site) / 'logs' / 'data.log'}")
    return 0


def _cmd_data_catalogue(args: argparse.Namespace) -> int:
    from .data import public_catalogue

    if len(args.site) == 1 and not args.by_site:
        print(json.dumps(public_catalogue(Path(args.site[0])), indent=1, default=str))
    else:  # several sites at once (a local federation's own): keyed by site folder as given
        print(json.dumps({site: public_catalogue(Path(site)) for site in args.site}, default=str))
    return 0


def _cmd_data_harmonisation(args: argparse.Namespace) -> int:
    """Each site's published harmonisation report for the contract read from stdin (JSON), keyed by site folder:
    aggregate histograms only, the numbers a data owner publishes."""
    from .data import harmonisation_report
    from .settings import SettingsError, load_settings

    try:
        contract = json.loads(sys.stdin.read())
    except ValueError as err:
        raise SettingsError(
            f"the contract on stdin is not JSON ({err}); pass a plan's contract as a JSON object"
        ) from None
    if not isinstance(contract, dict):
        raise SettingsError("the contract on stdin must be a JSON object (a plan's contract)")
    reports = {
        site: harmonisation_report(Path(site), contract, site_steps=load_settings(Path(site)).site_steps)
        for site in args.site
    }
    print(json.dumps(reports, default=str))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Simulated hospitals as site folders under ROOT; with --certs, site i takes bundle i (TLS and its key)."""
    from .settings import SettingsError, install_certs, install_trust, record_identity
    from .site_folders import create_demo_sites

    if args.certs and len(args.certs) != args.sites:
        raise SettingsError(f"{args.sites} simulated sites need as many --certs bundles, got {len(args.certs)}")
    sites = create_demo_sites(
        Path(args.root),
        n_sites=args.sites,
        seed=args.seed,
        hub=args.hub,
        approval=args.approval,
        scale=args.scale,
        cache=Path(args.cache) if args.cache else None,
        volumes=args.volumes,
    )
    for site_dir, bundle in zip(sites, args.certs or [], strict=False):  # no --certs: none to install
        record_identity(site_dir, install_certs(site_dir, Path(bundle)))
    if args.trust_ca and not args.certs:
        for site_dir in sites:
            crl = Path(args.trust_crl) if args.trust_crl else None
            record_identity(site_dir, install_trust(site_dir, Path(args.trust_ca), crl))
    if args.json:
        print(json.dumps({"sites": {site.name: str(site.absolute()) for site in sites}}))
    else:
        for site in sites:
            print(f"site {site.name}: {site} (start it with `flip-site run {site}`)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flip-site", description="Run and govern a FLIP Lab site.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create a site folder")
    p.add_argument("site")
    p.add_argument("--name", help="shown to researchers (default: the name in --certs' bundle)")
    p.add_argument("--hub", help="the hub's HOST:PORT (default: the bundle's hub, else 127.0.0.1:9093)")
    p.add_argument(
        "--certs",
        metavar="BUNDLE",
        help="this site's folder from `flip-lab provision` (CA certificate and key pair): copied into "
        "SITE/certs and used for TLS and node authentication",
    )
    p.add_argument("--demo", action="store_true", help="demo policy: automatic approval, labelled as such")
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("trust", help="the federation CA (and revocation list) that verifies who submits studies")
    p.add_argument("site")
    p.add_argument("--ca", help="the federation's ca.pem (default: the one the site already has)")
    p.add_argument("--crl", help="the CA's revocation list, crl.pem from `flip-lab provision` or `flip-lab revoke`")
    p.set_defaults(func=_cmd_trust)

    p = sub.add_parser("run", help="serve the hub until stopped")
    p.add_argument("site")
    p.add_argument("--hub", help="override the hub address in site.toml")
    p.add_argument("--parent-pid", type=int, help="stop when this process exits")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("status", help="is the site running")
    p.add_argument("site")
    p.set_defaults(func=_cmd_status)

    data = sub.add_parser("data", help="register and describe datasets").add_subparsers(dest="data", required=True)
    p = data.add_parser("add", help="register a folder of DICOM series or NIfTI images")
    p.add_argument("name", help="the dataset's name, which plans ask for (e.g. default, liver_ct)")
    p.add_argument("path", help="folder of DICOM series and/or NIfTI images (and DICOM SEG files)")
    p.add_argument("--site", required=True)
    p.add_argument(
        "--labels",
        metavar="PATH",
        help="folder of NIfTI label maps / DICOM SEG files, or a CSV 'case,label' of per-case classes "
        "(a classification dataset)",
    )
    p.add_argument("--modality", help="modality of images whose files do not say (NIfTI without sidecar): CT, MR, ...")
    p.add_argument("--test-fraction", type=float, default=0.25, help="share of cases held out for testing")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    p.set_defaults(func=_cmd_data_add)
    p = data.add_parser("catalogue", help="what researchers may see")
    p.add_argument("--site", required=True, action="append", help="repeat for several sites (JSON keyed by SITE)")
    p.add_argument("--by-site", action="store_true", help="JSON keyed by SITE even for one site")
    p.set_defaults(func=_cmd_data_catalogue)
    p = data.add_parser("harmonisation", help="aggregate harmonisation report for a contract read from stdin")
    p.add_argument("--site", required=True, action="append", help="repeat for several sites (JSON keyed by SITE)")
    p.set_defaults(func=_cmd_data_harmonisation)

    p = sub.add_parser("demo", help="simulated hospitals as ready site folders, for a local federation")
    p.add_argument("root", help="folder to create the sites in (one subfolder per hospital)")
    p.add_argument("--sites", type=int, required=True, help="number of hospitals")
    p.add_argument("--hub", required=True, help="the hub's HOST:PORT")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies each hospital's number of patients")
    p.add_argument("--approval", choices=("automatic", "manual"), default="automatic")
    p.add_argument("--volumes", action="store_true", help="the 3D demo hospitals (whole volumes, dims=3 studies)")
    p.add_argument("--cache", help="generate each seed's hospitals once here and reuse them")
    p.add_argument("--certs", action="append", metavar="BUNDLE", help="site i's provisioned bundle (repeat)")
    p.add_argument("--trust-ca", metavar="CA.pem", help="without --certs: the federation CA verifying studies")
    p.add_argument("--trust-crl", metavar="CRL.pem", help="... and its revocation list")
    p.add_argument("--json", action="store_true", help='print {"sites": {NAME: FOLDER}}')
    p.set_defaults(func=_cmd_demo)

    from .governance_cli import add_governance_commands

    add_governance_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SiteKernelError as err:
        print(f"flip-site: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

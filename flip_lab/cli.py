"""``flip-lab``: the researcher's and teacher's command line.

flip-lab demo [--sites 4 --rounds 3]      start a local federation, run the demo study, print the metrics
flip-lab up [--sites 3] [--workdir DIR]   start a local federation in the background
flip-lab up --sites 0 --listen HOST:PORT --certs DIR/hub   a hub alone, for sites on other machines (TLS)
flip-lab provision DIR --hub-address HOST:PORT --site NAME ...   CA, hub certificate, site key pairs
    [--researcher ID:Person:Organisation:kind ...]                researcher identities that sign studies
flip-lab revoke DIR ID                    revoke a researcher (the CA's revocation list; sites refuse them)
flip-lab status [--workdir DIR]           hub, sites and jobs of a local federation
flip-lab down [--workdir DIR]             stop it by PID; nothing is left running
flip-lab jobs / cancel JOB                list or stop studies on the local federation
flip-lab study run NOTEBOOK -p NAME VALUE  run a parameterised study notebook and keep a run record
flip-lab study verify RECORD              re-check every checksum of a run record
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from .errors import FlipError


def _workdir(args: argparse.Namespace) -> Path:
    from .local import default_workdir

    return Path(args.workdir) if args.workdir else default_workdir()


def _cmd_up(args: argparse.Namespace) -> int:
    from .local import LocalFederation

    workdir = _workdir(args)
    listen = args.listen or _default_listen(args.sites)
    print(f"starting a hub and {args.sites} simulated hospitals in {workdir} ...", flush=True)
    fed = LocalFederation.start(
        args.sites,
        workdir=workdir,
        seed=args.seed,
        watch_parent=False,
        approval="manual" if args.manual else "automatic",
        listen=listen,
        certs=args.certs,
        durable=True if args.durable else None,
    )
    transport = "TLS, node authentication" if fed.state.get("ca") else "plain HTTP, loopback only"
    print(f"hub:   {fed.address} listening on {fed.state['hub_host']}:{fed.state['hub_port']} ({transport})")
    if args.sites == 0:
        from flip_common.net import DEFAULT_HUB

        if not args.listen and fed.address != DEFAULT_HUB:
            print(f"note:  {DEFAULT_HUB}, where sites look for their hub by default, was taken")
        hint = "" if fed.address == DEFAULT_HUB else f" --hub {fed.address}"
        print(f"sites: none yet; a site joins with `flip-site init SITE{hint}`, then `flip-site run SITE`")
    for name, node_id in sorted(fed.state.get("registered", {}).items()):
        print(f"registered site: {name}" + (f" (node {node_id})" if node_id else ""))
    for site in fed.sites():
        where = f"pid {site['pid']}" if site.get("pid") else f"node {site['node_id']}"  # pid: a site started here
        print(f"site:  {site['site']:<12} {'online' if site['online'] else 'offline'}  {where}")
    print(f"stop it with: flip-lab down --workdir {workdir}")
    return 0


def _default_listen(sites: int) -> str:
    """A hub alone listens where a site looks by default (127.0.0.1:9093) while that address is free; a hub with
    simulated sites, which are told its address, takes any free port, so that several can run side by side."""
    from flip_common.net import DEFAULT_HUB

    from .local import _listening

    host, _, port = DEFAULT_HUB.rpartition(":")
    if sites == 0 and not _listening(int(port), host):
        return DEFAULT_HUB
    return "127.0.0.1:0"


def _cmd_provision(args: argparse.Namespace) -> int:
    from .provision import Researcher, provision

    researchers = [Researcher.parse(text) for text in args.researcher]
    result = provision(
        args.dir, hub_address=args.hub_address, sites=args.site, researchers=researchers, force=args.force
    )
    print(f"federation CA:     {result.root / 'ca'}  (keep ca.key offline)")
    print(
        f"hub:               {result.hub}  -> the hub machine: flip-lab up --sites 0 --listen HOST:PORT "
        f"--certs {result.hub.name}"
    )
    print(
        f"researcher:        {result.researcher_ca}  -> flip_lab.connect('{result.hub_address}', "
        f"root_certificates='ca.pem')"
    )
    for name, folder in result.sites.items():
        print(f"site {name + ':':<12} {folder}  -> that hospital: flip-site init SITE --certs {folder.name}")
    for name, folder in result.researchers.items():
        print(
            f"researcher {name + ':':<6} {folder}  -> flip_lab.connect('{result.hub_address}', "
            f"root_certificates='ca.pem', identity='{folder.name}')"
        )
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    from .provision import revoke

    crl = revoke(args.dir, args.researcher)
    print(f"revoked researcher {args.researcher}; the CA's revocation list is now {crl}")
    print(
        f"copy it to the hub (`{Path(args.dir) / 'hub' / 'crl.pem'}` is updated: restart the hub) and to every "
        f"site: flip-site trust SITE --crl crl.pem"
    )
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .local import LocalFederation, read_state, running_state

    workdir = _workdir(args)
    if running_state(workdir) is None:
        print(f"no local federation is running in {workdir}" + (" (stale state file)" if read_state(workdir) else ""))
        return 3
    fed = LocalFederation.attach(workdir)
    print(f"hub:   {fed.address}  (pid {fed.state['hub_pid']})")
    for site in fed.sites():
        print(f"site:  {site['site']:<12} {'online' if site['online'] else 'OFFLINE'}  last seen {site['last_seen']}")
    for run in fed.jobs():
        print(f"job:   {run.run_id}  {run.job_status}")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    from .local import STATE, read_state, stop_pids

    workdir = _workdir(args)
    state = read_state(workdir)
    if state is None:
        print(f"no local federation in {workdir}; nothing to stop")
        return 0
    stop_pids(list(state.get("pids", [])))
    (workdir / STATE).unlink(missing_ok=True)
    print(f"stopped the hub and {len(state.get('sites', {}))} sites in {workdir}")
    return 0


def _cmd_jobs(args: argparse.Namespace) -> int:
    from .local import LocalFederation

    fed = LocalFederation.attach(_workdir(args))
    for run in fed.jobs():
        print(f"{run.run_id}  {run.job_status:<10} submitted {run.pending_at}")
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from .local import LocalFederation

    fed = LocalFederation.attach(_workdir(args))
    fed.job(args.job).cancel()
    print(f"job {args.job} cancelled")
    return 0


def progress_bar(job: Any, stream: Any = None) -> None:
    """A terminal progress line per event: round x/N, which sites replied, the aggregated metrics, on ``stream``
    (standard output as it is when the bar starts, not when this module was imported)."""
    stream = stream if stream is not None else sys.stdout

    def on_event(event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "job_started":
            print(f"job {job.id}: {event['rounds']} rounds of {event['strategy']}", file=stream, flush=True)
        elif kind == "site_state" and event["state"] in ("waiting_approval", "failed"):
            print(f"  {event['site']}: {event['state']} {event.get('detail', '')}", file=stream, flush=True)
        elif kind == "aggregate":
            metrics = "  ".join(f"{k}={v:.4f}" for k, v in sorted(event["metrics"].items()))
            bar = "#" * event["round"] + "." * max(0, (job.rounds or 0) - event["round"])
            print(
                f"  [{bar}] round {event['round']}/{job.rounds} {event['phase']:<8} {metrics}  "
                f"({len(event['contributors'])} sites)",
                file=stream,
                flush=True,
            )
        elif kind in ("site_error", "update_rejected", "round_discarded"):
            where = event.get("site", "")
            print(
                f"  ! round {event['round']} {where}: {event.get('kind', kind)}: "
                f"{event.get('message') or event.get('reason')}",
                file=stream,
                flush=True,
            )
        elif kind == "job_finished":
            print(f"job {job.id} {event['status']}: {event['message']}", file=stream, flush=True)

    job.subscribe(on_event)


def demo_plan() -> Any:
    """The default study: lesion segmentation with a small BatchNorm UNet (``flip_lab/examples``)."""
    from . import examples
    from .plan import Plan

    return Plan.from_file(Path(examples.__file__).parent / "segmentation_plan.py", name="lesion-segmentation")


def _cmd_demo(args: argparse.Namespace) -> int:
    from .local import LocalFederation

    t0 = time.monotonic()
    workdir = Path(args.workdir) if args.workdir else None
    print(f"starting a local federation: 1 hub + {args.sites} simulated hospitals on 127.0.0.1 ...", flush=True)
    with LocalFederation.start(args.sites, workdir=workdir, seed=args.seed) as fed:
        print(
            f"federation up in {time.monotonic() - t0:.1f} s (hub 127.0.0.1:{fed.state['hub_port']}, "
            f"work folder {fed.workdir})",
            flush=True,
        )
        for name, cat in fed.catalogue().items():
            print(f"  {name}: {_catalogue_line(cat)}")
        job = fed.submit(
            demo_plan(),
            rounds=args.rounds,
            strategy=args.strategy,
            seed=args.seed,
            lr=args.lr,
            min_sites=min(2, args.sites),
            expected_sites=args.sites,
        )
        progress_bar(job)
        job.wait(timeout=args.timeout)
        table = job.history
        final = table[
            (table["round"] == table["round"].max())
            & (table["phase"] == "evaluate")
            & (table["metric"] != "num_examples")
        ]
        print("\nfinal round, evaluation on each site's held-out test set:")
        print(final.pivot_table(index="site", columns="metric", values="value").round(4).to_string())
        print(f"\ndone in {time.monotonic() - t0:.1f} s; history and final model in {job.store}")
    return 0


def _catalogue_line(cat: dict[str, Any]) -> str:
    parts = []
    for name, info in cat.get("datasets", {}).items():
        modality = "/".join(info.get("modality", [])) or "?"
        vendors = ", ".join(info.get("vendors", [])) or "vendor not shown"
        parts.append(
            f"{name}: {modality}, {info.get('cases', '?')} cases ({info.get('train_cases', '?')} train / "
            f"{info.get('test_cases', '?')} test), {vendors}"
        )
    return "; ".join(parts) or "no datasets registered"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flip-lab", description="Federated learning on medical images.")
    sub = parser.add_subparsers(dest="command", required=True)

    def workdir(p: argparse.ArgumentParser) -> None:
        p.add_argument("--workdir", help="the federation's folder (default ~/.flip-lab/federations/default)")

    p = sub.add_parser("demo", help="local federation + demo study, end to end")
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--strategy", default="fedavg")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--workdir")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("up", help="start a local federation in the background")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--manual", action="store_true", help="sites require manual approval (flip-site plans approve)")
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="the hub's address (default: 127.0.0.1:9093, where sites look, for a hub alone (--sites 0) "
        "if free, else a free port on 127.0.0.1); beyond loopback --certs is required",
    )
    p.add_argument(
        "--certs",
        metavar="DIR",
        help="a folder from `flip-lab provision` (or its hub/ subfolder): TLS, node authentication, and "
        "registration of the provisioned sites",
    )
    p.add_argument(
        "--durable",
        action="store_true",
        help="keep the hub's state in WORKDIR/hub so that a restarted hub gets its sites back and its jobs "
        "can resume (the default with --certs; costs about 3 s per round)",
    )
    workdir(p)
    p.set_defaults(func=_cmd_up)

    p = sub.add_parser("provision", help="create a federation's CA, hub certificate and site key pairs")
    p.add_argument("dir", help="where to write them (ca/, hub/, sites/NAME/, researcher/)")
    p.add_argument(
        "--hub-address",
        required=True,
        metavar="HOST:PORT",
        help="the address sites and researchers dial (named in the hub's certificate)",
    )
    p.add_argument("--site", action="append", default=[], metavar="NAME", help="a site to provision (repeat)")
    p.add_argument(
        "--researcher",
        action="append",
        default=[],
        metavar="ID:PERSON:ORGANISATION:KIND",
        help="a researcher identity to issue (repeat), e.g. 'alice:Alice Smith:King's College London:university'; "
        "KIND is one of nhs_trust, hospital, university, company, charity, government, other",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="start over: a new CA, hub certificate and site keys (every bundle handed out is void)",
    )
    p.set_defaults(func=_cmd_provision)
    p = sub.add_parser("revoke", help="revoke a researcher's certificate (rotate: revoke, then provision again)")
    p.add_argument("dir", help="the provision folder (its ca/ca.key signs the revocation list)")
    p.add_argument("researcher", help="the researcher's ID (its folder under DIR/researchers)")
    p.set_defaults(func=_cmd_revoke)
    for name, func, help_ in (
        ("status", _cmd_status, "show the local federation"),
        ("down", _cmd_down, "stop the local federation"),
        ("jobs", _cmd_jobs, "list jobs"),
    ):
        p = sub.add_parser(name, help=help_)
        workdir(p)
        p.set_defaults(func=func)
    p = sub.add_parser("cancel", help="cancel a job")
    p.add_argument("job", type=int)
    workdir(p)
    p.set_defaults(func=_cmd_cancel)

    from .study import add_study_commands

    add_study_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except FlipError as err:
        print(f"flip-lab: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flip-lab: interrupted; everything it started has been stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The embedded default: a real hub and N real site kernels on 127.0.0.1, one command away.

The hub is ``flower-superlink``; each site is ``flip-site run`` (a SuperNode plus the site's executor) holding a
simulated hospital generated offline. Ports are picked free, so two federations can coexist. Every process starts
in its own session and is recorded in ``WORKDIR/federation.json``; ``shutdown`` (or ``flip-lab down``) stops them
by PID. A federation started from a notebook also gets a reaper process that stops it if the kernel dies.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from flip_common.net import free_port

from . import supervisor
from .errors import FederationError, HubUnreachable
from .federation import Federation, _default_home
from .hub.signed import TRUST_DIR
from .provision import HubCerts
from .supervisor import STATE, alive, dial_host, join, listening, running_state, write_state

log = logging.getLogger("flip_lab.local")

# The Jupyter server extension names its state folder in this variable, so the kernels it starts can find the local
# federation its panel runs; the folder's PANEL_CONNECTION says which federation that is.
PANEL_ENV = "FLIP_LAB_PANEL_STATE"
PANEL_CONNECTION = "connection.json"
DEMO_CACHE = "demo-hospitals"  # under FLIP_LAB_HOME: each seed's simulated hospitals, generated once


class LocalFederation(Federation):
    """A hub and N site kernels on this machine. Use as a context manager or call ``shutdown()``."""

    def __init__(self, workdir: Path, state: dict[str, Any], *, owner: bool) -> None:
        ca = state.get("ca")
        super().__init__(
            state.get("hub_address") or f"127.0.0.1:{state['hub_port']}",
            workdir=workdir,
            root_certificates=Path(ca).read_bytes() if ca else None,
            identity=state.get("identity"),
        )
        self.state = state
        self.site_dirs = {name: Path(p) for name, p in state["sites"].items()}
        self._owner = owner
        self.joined = False  # found running by ``local_federation()`` (the Lab panel's): ``shutdown`` leaves it running
        self.exited: dict[str, float] = {}  # site name -> when its process was seen to end
        self._catalogue_cache: tuple[list[tuple[str, int]], dict[str, Any]] | None = None
        self._watch = supervisor.ExitWatch(self._site_exited)
        for name, pid in state.get("site_pids", {}).items():
            self._watch.watch(name, pid)
        if owner:
            atexit.register(self.shutdown)

    def _site_exited(self, name: str) -> None:
        """A site's process ended (crash, kill or stop; its SuperNode ends with it): tell the hub now, so that it
        lists the site as gone and a running round counts it out at once rather than when Flower's heartbeat
        expires (about 40 s). A hub with node authentication takes that only from the site itself: there the
        heartbeat still decides."""
        self.exited[name] = time.time()
        node_id = _node_id(self.site_dirs[name])
        if node_id is None or self.state.get("ca"):
            return
        try:
            self._client.unregister_node(node_id)
        except HubUnreachable as err:  # the hub is gone too, or knew already: the heartbeat remains the backstop
            log.info("could not tell the hub that site %s (node %s) has gone: %s", name, node_id, err)

    @classmethod
    def start(
        cls,
        n_sites: int = 3,
        *,
        workdir: str | Path | None = None,
        seed: int = 0,
        approval: str = "automatic",
        watch_parent: bool = True,
        scale: float = 1.0,
        volumes: bool = False,
        listen: str = "127.0.0.1:0",
        certs: str | Path | None = None,
        durable: bool | None = None,
    ) -> LocalFederation:
        """Start the hub and ``n_sites`` simulated hospitals (``scale`` < 1 makes each hospital smaller).

        ``volumes=True`` gives the hospitals the 3D demo's whole abdominal volumes, for ``dims=3`` studies; the
        default 2D demo's thin slabs are quicker to harmonise and train on.

        ``approval="manual"`` gives every site the secure default policy: each plan waits for its data owner
        (``flip-site plans approve HASH --site SITE``). ``watch_parent`` stops the federation when this process
        exits, however it exits.

        ``listen`` is the hub's ``HOST:PORT`` (port 0: any free port). ``certs``, a folder from ``flip-lab
        provision`` (or its ``hub`` subfolder), turns on TLS and node authentication and registers the provisioned
        sites; without it the hub listens only on loopback. ``n_sites=0`` starts a hub alone, for sites that connect
        from other machines; simulated sites of a provisioned hub take the provisioned sites' bundles in name order.

        ``durable`` keeps the hub's state (its sites and runs) in ``WORKDIR/hub/superlink.db``, so that a hub that
        stopped can be started again with its sites (``restart_hub``) and its jobs resumed (``fed.resume``). It is
        the default with ``certs``; a local federation keeps its hub's state in memory by default, because Flower's
        SQL state costs about 3 s per round (measured with ``bench/spine_overhead.py``: 4.5 s of platform overhead
        per round instead of 1.4 s on 2 cores).
        """
        from .provision import ProvisionError

        if n_sites < 0:
            raise FederationError("n_sites must be 0 (a hub alone) or more")
        if n_sites:  # their node ids are read from their SuperNodes' logs
            from ._flower import check_supernode_id_log

            check_supernode_id_log()
        listen_host, listen_port = supervisor.parse_listen(listen)
        try:
            hub_certs = HubCerts.load(Path(certs).absolute()) if certs is not None else None
        except ProvisionError as err:
            raise FederationError(str(err)) from err
        supervisor.hub_command(
            listen_host, listen_port, hub_certs
        )  # refuses plain HTTP beyond loopback before anything starts
        bundles = _site_bundles(Path(certs), n_sites) if certs is not None and n_sites else []
        # absolute: the hub's processes run in its own folder, where a relative path would point elsewhere
        temporary = not workdir
        workdir = Path(workdir).absolute() if workdir else Path(tempfile.mkdtemp(prefix="flip-federation-"))
        workdir.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o755)  # site workers run as unprivileged users and must reach their job folders
        if (existing := running_state(workdir)) is not None:
            raise FederationError(
                f"a federation is already running in {workdir} (hub at "
                f"{existing.get('hub_address') or join('127.0.0.1', existing['hub_port'])}); "
                f"use it with `flip_lab.attach('{workdir}')`, or stop it with `flip-lab down --workdir {workdir}`"
            )
        pids: list[int] = []
        fed: LocalFederation | None = None
        state: dict[str, Any] = {
            "workdir": str(workdir),
            "pids": pids,
            "sites": {},
            "site_pids": {},
            "started": time.time(),
            "owner_pid": os.getpid(),
            "temporary": temporary,
        }
        try:
            hub_port = listen_port or free_port(listen_host)
            dial = dial_host(listen_host)
            address = join(dial, hub_port)
            state.update(
                hub_port=hub_port,
                hub_host=listen_host,
                hub_address=address,
                ca=str(hub_certs.ca.resolve()) if hub_certs else None,
            )
            hub_dir = workdir / "hub"
            hub_dir.mkdir(exist_ok=True)
            trust_ca, trust_crl, state["identity"] = _trust(workdir, Path(certs).absolute() if certs else None)
            install_hub_trust(hub_dir, trust_ca, trust_crl)
            durable = hub_certs is not None if durable is None else durable
            state["durable"] = durable
            # The hospitals' folders are made (or taken from the cache) while the hub starts.
            making = (
                supervisor.make_demo_sites(
                    workdir / "sites",
                    n_sites=n_sites,
                    seed=seed,
                    hub=address,
                    approval=approval,
                    scale=scale,
                    cache=_default_home() / DEMO_CACHE,
                    bundles=bundles,
                    trust=None if bundles else (trust_ca, trust_crl),
                    volumes=volumes,
                )
                if n_sites
                else None
            )
            if making is not None:
                pids.append(making.pid)
            hub, runner = supervisor.launch_hub(hub_dir, listen_host, hub_port, hub_certs, durable)
            pids += [hub.pid, runner.pid]
            state.update(hub_pid=hub.pid, runner_pid=runner.pid)
            write_state(workdir, state)
            parent = os.getpid() if watch_parent else None

            def launch_sites() -> None:
                site_dirs = supervisor.demo_sites(making) if making is not None else {}
                if making is not None:
                    pids.remove(making.pid)
                for name, site_dir in site_dirs.items():
                    proc = supervisor.launch_site(site_dir, parent)
                    pids.append(proc.pid)
                    state["sites"][name] = str(site_dir)
                    state["site_pids"][name] = proc.pid
                write_state(workdir, state)

            if hub_certs is None:  # the sites start while the hub does; each waits for it to listen
                launch_sites()
            supervisor.wait_for(
                lambda: listening(hub_port, dial),
                supervisor.HUB_START_TIMEOUT,
                hub,
                f"the hub did not start listening on {join(listen_host, hub_port)}",
                hub_dir / "superlink.log",
            )
            if hub_certs is not None:  # provisioned sites connect only once the hub has registered their keys
                state["registered"] = _register(address, hub_certs, hub, hub_dir)
                write_state(workdir, state)
                launch_sites()
            fed = cls(workdir, state, owner=watch_parent)

            def sites_ready() -> bool:
                for name in fed.exited:
                    raise FederationError(
                        f"site {name} stopped while starting; see "
                        f"{workdir / 'sites' / name / 'logs'}. Nothing was left running."
                    )
                return sum(n.status == "online" for n in fed.nodes()) >= n_sites

            supervisor.wait_for(
                sites_ready,
                supervisor.SITE_START_TIMEOUT,
                hub,
                f"{n_sites} sites did not all connect to the hub",
                workdir / "sites",
            )
            if watch_parent:
                supervisor.start_reaper(workdir, os.getpid(), pids)
            return fed
        except BaseException:  # KeyboardInterrupt included: nothing half-started is left behind
            if fed is not None:
                fed._watch.close()
            supervisor.stop_pids(pids)
            (workdir / STATE).unlink(missing_ok=True)
            if temporary:
                remove(workdir)
            raise

    @classmethod
    def attach(cls, workdir: str | Path) -> LocalFederation:
        workdir = Path(workdir)
        state = running_state(workdir)
        if state is None:
            raise FederationError(f"no running federation in {workdir}; start one with `flip-lab up`")
        hub_pid, dial = state.get("hub_pid"), dial_host(state.get("hub_host", "127.0.0.1"))
        if not (hub_pid and alive(hub_pid) and listening(int(state["hub_port"]), dial)):
            # Sites outlive their hub for a while (they retry), so a live site alone is no federation to use.
            raise FederationError(
                f"the federation in {workdir} has no running hub (pid {hub_pid} is gone or not listening on "
                f"{join(dial, int(state['hub_port']))}): stop what is left with `flip-lab down --workdir "
                f"{workdir}` and start it again with `flip-lab up`"
            )
        return cls(workdir, state, owner=False)

    def sites(self) -> list[dict[str, Any]]:
        """The sites this federation started (read from their folders) and, after them, any other site that
        joined its hub (e.g. with ``flip-site run``), by the name it gives (see ``Federation.sites``)."""
        online = {n.node_id: n for n in self.nodes()}
        rows = []
        for name, site_dir in self.site_dirs.items():
            node_id = _node_id(site_dir)
            node = online.get(node_id) if node_id is not None else None
            pid = self.state["site_pids"].get(name)
            rows.append(
                {
                    "site": name,
                    "node_id": node_id,
                    "online": bool(node and node.status == "online" and pid and alive(pid)),
                    "last_seen": node.last_seen if node else "",
                    "pid": pid,
                }
            )
        return rows + [row for row in super().sites() if row["site"] not in self.site_dirs]

    def catalogue(self) -> dict[str, Any]:
        """Each site's public catalogue: counts (small ones suppressed), modality, shapes; no identifiers. Its own
        sites' are read from their folders, other sites' asked through the hub."""
        own = self._own_catalogues()
        return {**own, **{k: v for k, v in super().catalogue().items() if k not in own}}

    def _catalogues(self) -> dict[str, dict[str, Any]] | None:
        foreign, complete = self._foreign_catalogues(self.nodes())
        if not complete:
            return None  # a site of another machine did not answer: its catalogue is not known here
        own = self._own_catalogues()
        return {**own, **{k: v for k, v in foreign.items() if k not in own}} or None

    def _own_catalogues(self) -> dict[str, Any]:
        """Its own sites' catalogues, as each site's data owner publishes them (``flip-site data catalogue``)."""
        if not self.site_dirs:
            return {}
        # Asked again only when a site's datasets or settings changed: every submit checks the catalogues, and a
        # call of the site's command line costs a Python start.
        signature = [
            (p.name, p.stat().st_mtime_ns)
            for site_dir in self.site_dirs.values()
            for p in sorted([*site_dir.glob("data/*/*.json"), site_dir / "policy.toml", site_dir / "site.toml"])
            if p.exists()
        ]
        if self._catalogue_cache is None or self._catalogue_cache[0] != signature:
            answer = self._ask_sites(["data", "catalogue", "--by-site"], None, "catalogues")
            own = {name: answer[str(site_dir)] for name, site_dir in self.site_dirs.items()}
            self._catalogue_cache = (signature, own)
        return self._catalogue_cache[1]

    def _ask_sites(self, command: list[str], stdin: str | None, what: str) -> dict[str, Any]:
        """One ``flip-site`` call for all of this federation's own sites; its JSON answer, keyed by site folder."""
        cmd = [*supervisor.flip_site(), *command]
        for site_dir in self.site_dirs.values():
            cmd += ["--site", str(site_dir)]
        done = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
            raise FederationError(f"the sites' {what} could not be read: {reason}")
        return json.loads(done.stdout)

    def _own_nodes(self) -> set[int]:
        return {n for n in map(_node_id, self.site_dirs.values()) if n is not None}

    def harmonisation_report(self, plan_or_contract: Any) -> dict[str, Any]:
        """Each site's published, aggregate view of what harmonisation did to its intensities (histograms before
        and after, numbers only) for a plan's contract: the input of ``flip_lab.plots.harmonisation_distributions``.

        On a local federation the sites' reports are read directly; the numbers are the same aggregates a site's
        data owner publishes, never images or per-patient values.
        """
        contract = getattr(plan_or_contract, "contract", plan_or_contract)
        answer = self._ask_sites(["data", "harmonisation"], json.dumps(contract), "harmonisation reports")
        return {name: answer[str(site_dir)] for name, site_dir in self.site_dirs.items()}

    def kill_site(self, name: str) -> None:
        """Stop one site kernel abruptly (SIGKILL, its SuperNode included), as a crash would: for fault drills and
        tests."""
        supervisor.kill_family([self.state["site_pids"][name]])

    def kill_hub(self) -> None:
        """Stop the hub abruptly (SIGKILL, its runner and studies included), as a crash would: for fault drills
        and tests."""
        supervisor.kill_family([self.state["hub_pid"], self.state.get("runner_pid")])

    def restart_hub(self, timeout: float = 120.0) -> None:
        """Start the hub again on its port and state (after a crash or ``kill_hub``); waits until every site is
        back online. Jobs that were running are not restarted by themselves: ``fed.resume(job_id)`` continues one from
        its last released round."""
        if alive(self.state["hub_pid"]):
            raise FederationError(f"the hub of {self.workdir} is still running (pid {self.state['hub_pid']})")
        if self.state.get("ca"):
            raise FederationError("restarting a hub with certificates: use `flip-lab up --certs` on its folder")
        if not self.state.get("durable"):
            raise FederationError(
                f"the hub of {self.workdir} kept its state in memory, so a new hub would not know its sites; start "
                "the federation with `durable=True` (`flip-lab up --durable`) to restart its hub and resume its jobs"
            )
        hub_dir = self.workdir / "hub"
        port = int(self.state["hub_port"])
        old = {self.state["hub_pid"], self.state.get("runner_pid")}
        supervisor.stop_pids([p for p in old if p is not None and alive(p)])  # a runner left without its SuperLink
        hub, runner = supervisor.launch_hub(hub_dir, self.state.get("hub_host", "127.0.0.1"), port, None, durable=True)
        pids = [p for p in self.state["pids"] if p not in old] + [hub.pid, runner.pid]
        self.state.update(hub_pid=hub.pid, runner_pid=runner.pid, pids=pids)
        write_state(self.workdir, self.state)
        dial = dial_host(self.state.get("hub_host", "127.0.0.1"))
        supervisor.wait_for(
            lambda: listening(port, dial),
            supervisor.HUB_START_TIMEOUT,
            hub,
            "the hub did not start listening again",
            hub_dir / "superlink.log",
        )
        supervisor.wait_for(
            lambda: all(site["online"] for site in self.sites()),
            timeout,
            hub,
            "the sites did not all reconnect to the restarted hub",
            self.workdir / "sites",
        )

    def shutdown(self) -> None:
        """Stop the hub and every site by PID; nothing is left listening. A folder that ``start`` created for
        itself (no ``workdir`` given) is removed with everything in it; a folder given by its caller is kept.

        A federation that ``flip_lab.local_federation()`` joined (the one the JupyterLab panel runs) is only let
        go of: it keeps running for the panel, which stops it.
        """
        self._watch.close()  # what follows stops the sites on purpose: nothing to report
        if self.joined:
            self.close()
            return
        supervisor.stop_pids(list(self.state.get("pids", [])))
        (self.workdir / STATE).unlink(missing_ok=True)
        self.close()
        if self.state.get("temporary"):
            remove(self.workdir)

    def close(self) -> None:
        """Let go of the hub connection and stop watching the sites' processes; the federation keeps running."""
        self._watch.close()
        super().close()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _site_bundles(certs: Path, n_sites: int) -> list[Path]:
    """The first ``n_sites`` site bundles of a provision folder, for simulated sites of a provisioned hub."""
    root = certs.parent if (certs / "hub.pem").exists() else certs
    bundles = sorted(p for p in (root / "sites").glob("*") if (p / "bundle.toml").is_file())
    if len(bundles) < n_sites:
        raise FederationError(
            f"{n_sites} simulated sites need {n_sites} provisioned site bundles, {root / 'sites'} holds "
            f"{len(bundles)}: provision more sites (`flip-lab provision {root} --hub-address ... --site NAME`), or "
            f"start the hub alone (n_sites=0) and run each site with `flip-site run`"
        )
    return bundles[:n_sites]


def _trust(workdir: Path, certs: Path | None) -> tuple[Path, Path, str | None]:
    """The federation CA and revocation list that the hub and the simulated sites verify studies with, and the
    researcher identity this federation signs with: a provision folder's own (its ``researchers/default``, issued
    when its CA key is at hand), else a CA and a default researcher made for this federation (``WORKDIR/trust``),
    so that a local federation's studies are signed and verified as any other's, in one call."""
    from .provision import ensure_trust

    if certs is None:
        identity = ensure_trust(workdir / "trust")
        return workdir / "trust" / "ca" / "ca.pem", workdir / "trust" / "ca" / "crl.pem", str(identity)
    root = certs.parent if (certs / "hub.pem").exists() else certs
    if (root / "ca" / "ca.key").is_file():
        identity: Path | None = ensure_trust(root)
    else:  # a hub's folder alone: it verifies, and whoever submits brings their own identity
        identity = root / "researchers" / "default" if (root / "researchers" / "default").is_dir() else None
    hub = root / "hub" if (root / "hub" / "ca.pem").is_file() else certs
    return hub / "ca.pem", hub / "crl.pem", str(identity) if identity else None


def install_hub_trust(hub_dir: Path, ca: Path, crl: Path) -> None:
    """Copy the CA and revocation list into ``HUB/trust``, where each study's process verifies its signature."""
    target = hub_dir / TRUST_DIR
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ca, target / "ca.pem")
    if crl.is_file():
        shutil.copyfile(crl, target / "crl.pem")


def _register(address: str, certs: HubCerts, hub: subprocess.Popen[bytes], hub_dir: Path) -> dict[str, int]:
    """Register the provisioned sites once the hub's Control API answers over TLS."""
    from ._flower import ControlClient
    from .provision import ProvisionError, register_sites

    client = ControlClient(address, root_certificates=certs.ca.read_bytes())
    registered: dict[str, int] = {}
    try:

        def attempt() -> bool:
            try:
                registered.update(register_sites(client, certs))
            except ProvisionError as err:  # a refusal is an answer: waiting longer will not change it
                raise FederationError(f"{err}; see {hub_dir / 'superlink.log'}. Nothing was left running.") from err
            return True

        supervisor.wait_for(
            attempt,
            supervisor.HUB_START_TIMEOUT,
            hub,
            f"the hub at {address} did not accept the sites' keys",
            hub_dir / "superlink.log",
        )
    finally:
        client.close()
    return registered


def _node_id(site_dir: Path) -> int | None:
    from ._flower import supernode_id

    supernode_log = site_dir / "logs" / "supernode.log"
    if not supernode_log.exists():
        return None
    return supernode_id(supernode_log.read_text(errors="replace"))


def panel_federation() -> LocalFederation | None:
    """The local federation that the FLIP panel of this kernel's JupyterLab runs, or None (no Lab, as under
    papermill or plain Python; a panel connected to a remote hub; nothing running)."""
    store = os.environ.get(PANEL_ENV)
    if not store:
        return None
    try:
        saved = json.loads((Path(store) / PANEL_CONNECTION).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("kind") != "local" or saved.get("stopped") or not saved.get("workdir"):
        return None
    try:
        fed = LocalFederation.attach(saved["workdir"])
    except FederationError:
        return None
    fed.joined = True
    return fed


def default_workdir(name: str = "default") -> Path:
    return _default_home() / "federations" / name


def remove(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)

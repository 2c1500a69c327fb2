"""The embedded default: a real hub and N real site kernels on 127.0.0.1, one command away.

The hub is ``flower-superlink``; each site is ``flip-site run`` (a SuperNode plus the site's executor) holding a
simulated hospital generated offline. Ports are picked free, so two federations can coexist. Every process starts
in its own session and is recorded in ``WORKDIR/federation.json``; ``shutdown`` (or ``flip-lab down``) stops them
by PID. A federation started from a notebook also gets a reaper process that stops it if the kernel dies.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flip_common.net import alive, free_port, is_loopback

from .errors import FederationError
from .federation import Federation, _default_home
from .hub.signed import TRUST_DIR
from .provision import HubCerts

STATE = "federation.json"
HUB_START_TIMEOUT = 30.0
HUB_DATABASE = "superlink.db"  # the hub's state (sites, runs), so that a restarted hub knows its sites
SITE_START_TIMEOUT = 60.0
# The Jupyter server extension names its state folder in this variable, so the kernels it starts can find the local
# federation its panel runs; the folder's PANEL_CONNECTION says which federation that is.
PANEL_ENV = "FLIP_LAB_PANEL_STATE"
PANEL_CONNECTION = "connection.json"


def _listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise FederationError(
            f"listen address {listen!r} must be HOST:PORT (port 0: any free port), e.g. 127.0.0.1:0 or 10.0.0.5:9093"
        )
    return host.strip("[]"), int(port)


def _dial_host(listen_host: str) -> str:
    """Where this machine reaches a hub listening on ``listen_host``: a wildcard address is reached on loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen_host, listen_host)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def hub_command(
    host: str, port: int, certs: HubCerts | None, database: Path | None = None, secret_file: Path | None = None
) -> list[str]:
    """``flower-superlink`` for a hub on ``host:port``: TLS and node authentication with ``certs``, plain HTTP only
    on loopback.

    Beyond loopback the hub carries model updates between hospitals, so it refuses to listen there without TLS.
    The SuperLink runs nothing itself (``--isolation process``): FLIP's runner (:mod:`flip_lab.hub.runner`)
    executes its studies, and ``secret_file`` is the secret that runner proves itself with.
    """
    if certs is None and not is_loopback(host):
        raise FederationError(
            f"refusing to listen on {host} without TLS: beyond loopback a hub needs the federation's certificates "
            f"and node authentication. Create them with `flip-lab provision DIR --hub-address {_join(host, port)} "
            f"--site NAME ...` and start the hub with `--certs DIR/hub`"
        )
    cmd = [
        str(Path(sys.executable).with_name("flower-superlink")),
        "--host",
        host,
        "--port",
        str(port),
        "--isolation",
        "process",
    ]
    if secret_file is not None:
        cmd += ["--superexec-auth-secret-file", str(secret_file)]
    if database is not None:
        # Sites keep their node ids across a hub restart only if the SuperLink's state outlives its process: with
        # Flower's default in-memory state, a restarted hub no longer knows its sites and they never come back.
        cmd += ["--database", str(database)]
    if certs is None:
        return [*cmd, "--insecure"]
    return [
        *cmd,
        "--ssl-certfile",
        str(certs.cert),
        "--ssl-keyfile",
        str(certs.key),
        "--ssl-ca-certfile",
        str(certs.ca),
        "--enable-supernode-auth",
    ]


# How the hub's runner is started: the interpreter's arguments before the runner's own.
RUNNER: tuple[str, ...] = ("-m", "flip_lab.hub.runner")


def _launch_hub(
    hub_dir: Path, host: str, port: int, certs: HubCerts | None, durable: bool
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """Start ``flower-superlink`` and FLIP's runner beside it, each in a session of its own; their output in the
    hub's one log, superlink.log (as when Flower ran the ServerApps), and, when ``durable``, the SuperLink's state
    in ``hub_dir``."""
    secret = _runtime_secret(hub_dir)
    with open(hub_dir / "superlink.log", "ab") as out:
        hub = subprocess.Popen(
            hub_command(host, port, certs, hub_dir / HUB_DATABASE if durable else None, secret),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=_flower_env(hub_dir),
            cwd=hub_dir,
        )
    cmd = [
        sys.executable,
        *RUNNER,
        "--runtime-api-address",
        _join(_dial_host(host), port),
        "--secret-file",
        str(secret),
        "--hub-dir",
        str(hub_dir),
    ]
    if certs is not None:
        cmd += ["--root-certificates", str(certs.ca)]
    with open(hub_dir / "superlink.log", "ab") as out:
        runner = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=_flower_env(hub_dir),
            cwd=hub_dir,
        )
    return hub, runner


def _runtime_secret(hub_dir: Path) -> Path:
    """The secret FLIP's runner shows the SuperLink to take its studies (0600): kept across restarts."""
    path = hub_dir / "runtime.secret"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
    return path


def _flower_env(hub_dir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(
        {
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1",
            # A model travels as one object per array; Flower moves two at a time by default.
            "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PULLS": "8",
            "FLWR_PRIVATE_MAX_CONCURRENT_OBJ_PUSHES": "8",
        }
    )
    if hub_dir is not None:
        env["FLIP_HUB_DIR"] = str(hub_dir)
    return env


def stop_pids(pids: list[int], timeout: float = 8.0) -> None:
    """Stop each process, its process group and every descendant (Flower starts some helpers in sessions of
    their own): SIGTERM first, SIGKILL for whatever is left after ``timeout``."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs[pid] = root
            procs.update({c.pid: c for c in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    for proc in procs.values():
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in procs):
        _reap()
        time.sleep(0.1)
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for proc in procs.values():
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    _reap()


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def read_state(workdir: Path) -> dict[str, Any] | None:
    path = workdir / STATE
    if not path.exists():
        return None
    return json.loads(path.read_text())


def running_state(workdir: Path) -> dict[str, Any] | None:
    state = read_state(workdir)
    if state and any(alive(p) for p in state.get("pids", [])):
        return state
    return None


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
        if owner:
            atexit.register(self.shutdown)

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
        from site_kernel.site_folders import create_demo_sites

        from .provision import ProvisionError

        if n_sites < 0:
            raise FederationError("n_sites must be 0 (a hub alone) or more")
        if n_sites:  # their node ids are read from their SuperNodes' logs
            from ._flower import check_supernode_id_log

            check_supernode_id_log()
        listen_host, listen_port = _parse_listen(listen)
        try:
            hub_certs = HubCerts.load(Path(certs).absolute()) if certs is not None else None
        except ProvisionError as err:
            raise FederationError(str(err)) from err
        hub_command(listen_host, listen_port, hub_certs)  # refuses plain HTTP beyond loopback before anything starts
        bundles = _site_bundles(Path(certs), n_sites) if certs is not None and n_sites else []
        # absolute: the hub's processes run in its own folder, where a relative path would point elsewhere
        temporary = not workdir
        workdir = Path(workdir).absolute() if workdir else Path(tempfile.mkdtemp(prefix="flip-federation-"))
        workdir.mkdir(parents=True, exist_ok=True)
        workdir.chmod(0o755)  # site workers run as unprivileged users and must reach their job folders
        if (existing := running_state(workdir)) is not None:
            raise FederationError(
                f"a federation is already running in {workdir} (hub at "
                f"{existing.get('hub_address') or _join('127.0.0.1', existing['hub_port'])}); "
                f"use it with `flip_lab.attach('{workdir}')`, or stop it with `flip-lab down --workdir {workdir}`"
            )
        pids: list[int] = []
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
            dial = _dial_host(listen_host)
            address = _join(dial, hub_port)
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
            hub, runner = _launch_hub(hub_dir, listen_host, hub_port, hub_certs, durable)
            pids += [hub.pid, runner.pid]
            state.update(hub_pid=hub.pid, runner_pid=runner.pid)
            _write_state(workdir, state)
            _wait_for(
                lambda: _listening(hub_port, dial),
                HUB_START_TIMEOUT,
                hub,
                f"the hub did not start listening on {_join(listen_host, hub_port)}",
                hub_dir / "superlink.log",
            )
            if hub_certs is not None:
                state["registered"] = _register(address, hub_certs, hub, hub_dir)
                _write_state(workdir, state)
            site_dirs = (
                create_demo_sites(
                    workdir / "sites",
                    n_sites=n_sites,
                    seed=seed,
                    approval=approval,
                    hub=address,
                    scale=scale,
                    volumes=volumes,
                )
                if n_sites
                else []
            )
            for i, site_dir in enumerate(site_dirs):
                if bundles:
                    _adopt_bundle(site_dir, bundles[i])
                else:
                    _trust_site(site_dir, trust_ca, trust_crl)
                cmd = [sys.executable, "-m", "site_kernel.cli", "run", str(site_dir)]
                if watch_parent:
                    cmd += ["--parent-pid", str(os.getpid())]
                with open(site_dir / "daemon.log", "ab") as out:
                    proc = subprocess.Popen(
                        cmd,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                        env=_flower_env(),
                    )
                pids.append(proc.pid)
                state["sites"][site_dir.name] = str(site_dir)
                state["site_pids"][site_dir.name] = proc.pid
                _write_state(workdir, state)
            fed = cls(workdir, state, owner=watch_parent)

            def sites_ready() -> bool:
                for name, pid in state["site_pids"].items():
                    if not alive(pid):
                        raise FederationError(
                            f"site {name} stopped while starting; see "
                            f"{workdir / 'sites' / name / 'logs'}. Nothing was left running."
                        )
                return sum(n.status == "online" for n in fed.nodes()) >= n_sites

            _wait_for(
                sites_ready,
                SITE_START_TIMEOUT,
                hub,
                f"{n_sites} sites did not all connect to the hub",
                workdir / "sites",
            )
            if watch_parent:
                _start_reaper(workdir, os.getpid(), pids)
            return fed
        except BaseException:  # KeyboardInterrupt included: nothing half-started is left behind
            stop_pids(pids)
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
        hub_pid, dial = state.get("hub_pid"), _dial_host(state.get("hub_host", "127.0.0.1"))
        if not (hub_pid and alive(hub_pid) and _listening(int(state["hub_port"]), dial)):
            # Sites outlive their hub for a while (they retry), so a live site alone is no federation to use.
            raise FederationError(
                f"the federation in {workdir} has no running hub (pid {hub_pid} is gone or not listening on "
                f"{_join(dial, int(state['hub_port']))}): stop what is left with `flip-lab down --workdir "
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
        from site_kernel.data import public_catalogue

        return {name: public_catalogue(site_dir) for name, site_dir in self.site_dirs.items()}

    def _own_nodes(self) -> set[int]:
        return {n for n in map(_node_id, self.site_dirs.values()) if n is not None}

    def harmonisation_report(self, plan_or_contract: Any) -> dict[str, Any]:
        """Each site's published, aggregate view of what harmonisation did to its intensities (histograms before
        and after, numbers only) for a plan's contract: the input of ``flip_lab.plots.harmonisation_distributions``.

        On a local federation the sites' reports are read directly; the numbers are the same aggregates a site's
        data owner publishes, never images or per-patient values.
        """
        from site_kernel.data import harmonisation_report
        from site_kernel.settings import load_settings

        contract = getattr(plan_or_contract, "contract", plan_or_contract)
        return {
            name: harmonisation_report(site_dir, contract, site_steps=load_settings(site_dir).site_steps)
            for name, site_dir in self.site_dirs.items()
        }

    def kill_site(self, name: str) -> None:
        """Stop one site kernel abruptly (SIGKILL), as a crash would: for fault drills and tests."""
        import psutil

        pid = self.state["site_pids"][name]
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        for proc in family:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        _reap()

    def kill_hub(self) -> None:
        """Stop the hub abruptly (SIGKILL, its runner and studies included), as a crash would: for fault drills
        and tests."""
        import psutil

        family = []
        for pid in (self.state["hub_pid"], self.state.get("runner_pid")):
            try:
                family += [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
            except (psutil.NoSuchProcess, TypeError):
                pass
        for proc in family:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(family, timeout=10)  # reaps the hub when this process started it
        _reap()

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
        stop_pids([p for p in old if p is not None and alive(p)])  # a runner left without its SuperLink
        hub, runner = _launch_hub(hub_dir, self.state.get("hub_host", "127.0.0.1"), port, None, durable=True)
        pids = [p for p in self.state["pids"] if p not in old] + [hub.pid, runner.pid]
        self.state.update(hub_pid=hub.pid, runner_pid=runner.pid, pids=pids)
        _write_state(self.workdir, self.state)
        dial = _dial_host(self.state.get("hub_host", "127.0.0.1"))
        _wait_for(
            lambda: _listening(port, dial),
            HUB_START_TIMEOUT,
            hub,
            "the hub did not start listening again",
            hub_dir / "superlink.log",
        )
        _wait_for(
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
        if self.joined:
            self.close()
            return
        stop_pids(list(self.state.get("pids", [])))
        (self.workdir / STATE).unlink(missing_ok=True)
        self.close()
        if self.state.get("temporary"):
            remove(self.workdir)

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


def _adopt_bundle(site_dir: Path, bundle: Path) -> None:
    """Give a simulated site a provisioned identity: its CA certificate and key pair, as `flip-site init --certs`."""
    from site_kernel.settings import install_certs, record_identity

    record_identity(site_dir, install_certs(site_dir, bundle))


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


def _trust_site(site_dir: Path, ca: Path, crl: Path) -> None:
    """A simulated site's own copy of the federation CA and revocation list (``flip-site trust``)."""
    from site_kernel.settings import install_trust, record_identity

    record_identity(site_dir, install_trust(site_dir, ca, crl))


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

        _wait_for(
            attempt,
            HUB_START_TIMEOUT,
            hub,
            f"the hub at {address} did not accept the sites' keys",
            hub_dir / "superlink.log",
        )
    finally:
        client.close()
    return registered


def _node_id(site_dir: Path) -> int | None:
    from ._flower import supernode_id

    log = site_dir / "logs" / "supernode.log"
    if not log.exists():
        return None
    return supernode_id(log.read_text(errors="replace"))


def _write_state(workdir: Path, state: dict[str, Any]) -> None:
    tmp = workdir / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(workdir / STATE)


def _wait_for(ready: Any, timeout: float, proc: subprocess.Popen[bytes], what: str, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except FederationError:
            raise
        except Exception:  # the hub's API is not answering yet
            pass
        if proc.poll() is not None:
            raise FederationError(f"{what}: the hub process exited with code {proc.returncode}; see {logs}")
        time.sleep(0.1)
    raise FederationError(f"{what} within {timeout:g} s; see {logs}. Nothing was left running.")


def _start_reaper(workdir: Path, parent: int, pids: list[int]) -> None:
    subprocess.Popen(
        [sys.executable, "-m", "flip_lab._reaper", str(parent), str(workdir), *map(str, pids)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


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

"""The site daemon: a Flower SuperNode process plus the site's own executor, stopped together.

``flip-site run SITE`` starts the SuperNode (``--isolation process``, so it runs no bundle code) as a child process
and serves its tasks with ``site_kernel.executor``. It writes ``SITE/run/state.json`` (PIDs, ports) for
``flip-site status``; SIGTERM or SIGINT, or the death of an optional parent process, stops both.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from flip_common.net import alive, free_port, is_loopback

from .settings import SettingsError, check_identity, load_settings, site_path

log = logging.getLogger("flip.site")


def _is_loopback(hub: str) -> bool:
    return is_loopback(hub.rpartition(":")[0].strip("[]") or hub)


def supernode_command(
    site_dir: Path,
    hub: str,
    runtime_port: int,
    poll_s: float,
    name: str,
    root_certificates: str = "",
    auth_key: str = "",
) -> list[str]:
    """The SuperNode's command line. With a CA certificate it dials the hub over TLS, with a key it authenticates
    as the site; without them only a hub on loopback is allowed (the local demo). The SuperNode only ever connects
    out to the hub: a site opens no port beyond its own loopback."""
    if not root_certificates and not _is_loopback(hub):
        raise SettingsError(
            f"the hub {hub} is not on this machine, and the site has no CA certificate: traffic "
            f"would travel unencrypted. Provision the federation (`flip-lab provision`) and run "
            f"`flip-site init {site_dir} --certs BUNDLE`"
        )
    if not auth_key and not _is_loopback(hub):
        raise SettingsError(
            f"the hub {hub} is not on this machine, and the site has no key to authenticate with; "
            f"run `flip-site init {site_dir} --certs BUNDLE` with the site's bundle"
        )
    cmd = [
        sys.executable,
        "-m",
        "site_kernel._supernode",
        str(poll_s),
        "--superlink",
        hub,
        "--isolation",
        "process",
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
        "--node-config",
        f'site-name="{name}"',
        "--max-wait-time",
        "60",
    ]
    if root_certificates:
        cmd += ["--root-certificates", str(site_path(site_dir, root_certificates))]
    else:
        cmd += ["--insecure"]
    if auth_key:
        cmd += ["--auth-supernode-private-key", str(site_path(site_dir, auth_key))]
    return cmd


def supernode_env() -> dict[str, str]:
    """The SuperNode's environment: a site never reports telemetry or checks for Flower updates (it may have no
    route to the internet, and must not phone home where it has one)."""
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def _wait_until_listening(port: int, process: subprocess.Popen[bytes], stop: threading.Event) -> None:
    """Return once ``port`` on loopback accepts connections, ``process`` has exited, or ``stop`` is set."""
    while not stop.is_set() and process.poll() is None:
        with socket.socket() as probe:
            probe.settimeout(0.2)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        stop.wait(0.05)


def _hub_answers(hub: str, timeout: float = 1.0) -> bool:
    """Whether anything accepts a connection at ``hub`` (HOST:PORT, an IPv6 host in brackets)."""
    host, _, port = hub.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _announce(hub: str, name: str, supernode_pid: int, stop: threading.Event) -> None:
    """Log that the site serves ``hub`` once the hub answers; until then, one line saying that the site waits for
    it (the SuperNode retries on its own, and its log says the same in one line per outage)."""
    if not _hub_answers(hub):
        log.warning(
            "waiting for the hub at %s: nothing answers there yet. The site connects as soon as it does; "
            "if the hub runs, check the address (site.toml, or `flip-site run SITE --hub HOST:PORT`)",
            hub,
        )
        wait = 0.2
        while not stop.wait(wait):
            if _hub_answers(hub):
                break
            wait = min(wait * 2, 5.0)
        else:
            return
    log.info("site %s serving hub %s (SuperNode pid %s)", name, hub, supernode_pid)


def run_site(site_dir: Path, *, hub: str | None = None, parent_pid: int | None = None) -> int:
    """Serve the site until told to stop. Returns the process exit code."""
    from ._flower_runtime import one_line_retries
    from .executor import Executor

    site_dir = site_dir.resolve()
    settings = load_settings(site_dir)
    hub = hub or settings.hub
    check_identity(site_dir, settings)
    runtime_port = free_port()
    command = supernode_command(
        site_dir,
        hub,
        runtime_port,
        settings.poll_interval,
        settings.name,
        settings.root_certificates,
        settings.auth_key,
    )  # refuses before anything starts
    (site_dir / "logs").mkdir(parents=True, exist_ok=True)
    (site_dir / "run").mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        filename=site_dir / "logs" / "site.log", level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll would drown the site's own log
    one_line_retries(f"the site's SuperNode at 127.0.0.1:{runtime_port}")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with open(site_dir / "logs" / "supernode.log", "ab") as out:
        supernode = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,  # same group: dies with us
            env=supernode_env(),
        )
    state = {
        "pid": os.getpid(),
        "supernode_pid": supernode.pid,
        "runtime_port": runtime_port,
        "hub": hub,
        "name": settings.name,
        "started": time.time(),
    }
    (site_dir / "run" / "state.json").write_text(json.dumps(state))
    executor = Executor(site_dir, settings, f"127.0.0.1:{runtime_port}")

    def serve() -> None:
        # The executor polls the SuperNode's runtime API; started before that port listens, Flower's retry logs
        # a "Connection attempt failed" warning per try and backs off, for up to 20 s, before the site serves.
        _wait_until_listening(runtime_port, supernode, stop)
        executor.serve(stop)

    serving = threading.Thread(target=serve, name="executor", daemon=True)
    serving.start()
    threading.Thread(
        target=_announce, args=(hub, settings.name, supernode.pid, stop), name="announce", daemon=True
    ).start()
    code = 0
    try:
        while not stop.wait(0.5):
            if supernode.poll() is not None:
                log.error("the SuperNode exited with code %s; stopping the site", supernode.returncode)
                code = 1
                break
            if parent_pid is not None and not alive(parent_pid):
                log.info("parent process %s is gone; stopping the site", parent_pid)
                break
    finally:
        stop.set()
        if supernode.poll() is None:
            supernode.terminate()
            try:
                supernode.wait(timeout=5)
            except subprocess.TimeoutExpired:
                supernode.kill()
                supernode.wait()
        serving.join(timeout=10)
        executor.close()
        (site_dir / "run" / "state.json").unlink(missing_ok=True)
    return code

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

from .settings import load_settings

log = logging.getLogger("flip.site")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def supernode_command(site_dir: Path, hub: str, runtime_port: int, poll_s: float, name: str,
                      root_certificates: str = "", auth_key: str = "") -> list[str]:
    cmd = [sys.executable, "-m", "site_kernel._supernode", str(poll_s), "--superlink", hub,
           "--isolation", "process", "--host", "127.0.0.1", "--port", str(runtime_port),
           "--node-config", f'site-name="{name}"', "--max-wait-time", "60"]
    if root_certificates:
        cmd += ["--root-certificates", root_certificates]
    else:
        cmd += ["--insecure"]
    if auth_key:
        cmd += ["--auth-supernode-private-key", auth_key]
    return cmd


def run_site(site_dir: Path, *, hub: str | None = None, parent_pid: int | None = None) -> int:
    """Serve the site until told to stop. Returns the process exit code."""
    from .executor import Executor

    site_dir = site_dir.resolve()
    settings = load_settings(site_dir)
    hub = hub or settings.hub
    (site_dir / "logs").mkdir(parents=True, exist_ok=True)
    (site_dir / "run").mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=site_dir / "logs" / "site.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll would drown the site's own log
    runtime_port = free_port()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with open(site_dir / "logs" / "supernode.log", "ab") as out:
        supernode = subprocess.Popen(
            supernode_command(site_dir, hub, runtime_port, settings.poll_interval, settings.name,
                              settings.root_certificates, settings.auth_key),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,  # same process group: dies with us
        )
    state = {"pid": os.getpid(), "supernode_pid": supernode.pid, "runtime_port": runtime_port, "hub": hub,
             "name": settings.name, "started": time.time()}
    (site_dir / "run" / "state.json").write_text(json.dumps(state))
    executor = Executor(site_dir, settings, f"127.0.0.1:{runtime_port}")
    serving = threading.Thread(target=executor.serve, args=(stop,), name="executor", daemon=True)
    serving.start()
    log.info("site %s serving hub %s (SuperNode pid %s)", settings.name, hub, supernode.pid)
    code = 0
    try:
        while not stop.wait(0.5):
            if supernode.poll() is not None:
                log.error("the SuperNode exited with code %s; stopping the site", supernode.returncode)
                code = 1
                break
            if parent_pid is not None and not _alive(parent_pid):
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

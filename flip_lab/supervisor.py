"""Process supervision for local federations: start the hub and site processes, wait until they are ready, watch
them, stop them by PID.

Nothing here imports the hospital's code: simulated hospitals are made by one ``flip-site demo`` call, and each site
is a ``flip-site run`` process. ``flip_lab.local`` builds its ``Federation`` on these pieces:

- the hub (``flower-superlink`` and FLIP's runner) and the hospitals' folders are made at the same time;
- each simulated hospital's archive is generated once per seed and size in ``FLIP_LAB_HOME/demo-hospitals`` and
  registered again by later federations, so a second start generates nothing;
- every wait is for a condition (a port that listens, a site the hub lists as online), checked every few tens of
  milliseconds, never a fixed sleep;
- :class:`ExitWatch` wakes as soon as a watched process ends (Linux pidfds), so a federation knows a dead site at
  once instead of after Flower's heartbeat timeout.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flip_common.net import alive, is_loopback

from .errors import FederationError
from .provision import HubCerts

log = logging.getLogger("flip_lab.supervisor")

STATE = "federation.json"
HUB_START_TIMEOUT = 30.0
HUB_DATABASE = "superlink.db"  # the hub's state (sites, runs), so that a restarted hub knows its sites
SITE_START_TIMEOUT = 60.0
DEMO_START_TIMEOUT = 600.0  # a first start generates the hospitals' images: minutes on a loaded 2-core machine
READY_POLL_S = 0.05  # how often a readiness condition is checked while waiting for it
# How the hub's runner is started: the interpreter's arguments before the runner's own.
RUNNER: tuple[str, ...] = ("-m", "flip_lab.hub.runner")


# -- addresses ---------------------------------------------------------------------------------------------------
def listening(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise FederationError(
            f"listen address {listen!r} must be HOST:PORT (port 0: any free port), e.g. 127.0.0.1:0 or 10.0.0.5:9093"
        )
    return host.strip("[]"), int(port)


def dial_host(listen_host: str) -> str:
    """Where this machine reaches a hub listening on ``listen_host``: a wildcard address is reached on loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen_host, listen_host)


def join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- the hub -----------------------------------------------------------------------------------------------------
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
            f"and node authentication. Create them with `flip-lab provision DIR --hub-address {join(host, port)} "
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


def launch_hub(
    hub_dir: Path, host: str, port: int, certs: HubCerts | None, durable: bool
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """Start ``flower-superlink`` and FLIP's runner beside it, each in a session of its own; their output in the
    hub's one log, superlink.log (as when Flower ran the ServerApps), and, when ``durable``, the SuperLink's state
    in ``hub_dir``."""
    secret = _runtime_secret(hub_dir)
    hub = _spawn(
        hub_command(host, port, certs, hub_dir / HUB_DATABASE if durable else None, secret),
        hub_dir / "superlink.log",
        flower_env(hub_dir),
        cwd=hub_dir,
    )
    cmd = [
        sys.executable,
        *RUNNER,
        "--runtime-api-address",
        join(dial_host(host), port),
        "--secret-file",
        str(secret),
        "--hub-dir",
        str(hub_dir),
    ]
    if certs is not None:
        cmd += ["--root-certificates", str(certs.ca)]
    runner = _spawn(cmd, hub_dir / "superlink.log", flower_env(hub_dir), cwd=hub_dir)
    return hub, runner


def _runtime_secret(hub_dir: Path) -> Path:
    """The secret FLIP's runner shows the SuperLink to take its studies (0600): kept across restarts."""
    path = hub_dir / "runtime.secret"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
    return path


def flower_env(hub_dir: Path | None = None) -> dict[str, str]:
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


# -- the sites, through the hospital's own command line -----------------------------------------------------------
def flip_site() -> list[str]:
    """The ``flip-site`` command installed beside this interpreter (the hospital's command line)."""
    beside = Path(sys.executable).with_name("flip-site")
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "site_kernel.cli"]


def make_demo_sites(
    root: Path,
    *,
    n_sites: int,
    seed: int,
    hub: str,
    approval: str,
    scale: float,
    cache: Path | None,
    bundles: list[Path],
    trust: tuple[Path, Path] | None = None,
    volumes: bool = False,
) -> subprocess.Popen[str]:
    """Start ``flip-site demo``, which lays out ``n_sites`` simulated hospitals under ``root`` (from ``cache``
    when they were generated before), each with provisioned bundle i or with ``trust`` (CA, revocation list);
    :func:`demo_sites` collects its answer. It runs while the hub starts."""
    cmd = [*flip_site(), "demo", str(root), "--sites", str(n_sites), "--seed", str(seed), "--hub", hub]
    cmd += ["--approval", approval, "--scale", repr(scale), "--json"]
    if cache is not None:
        cmd += ["--cache", str(cache)]
    if volumes:
        cmd.append("--volumes")
    for bundle in bundles:
        cmd += ["--certs", str(bundle)]
    if trust is not None:  # the federation CA and revocation list the sites verify studies with
        cmd += ["--trust-ca", str(trust[0]), "--trust-crl", str(trust[1])]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
        env=flower_env(),
    )


def demo_sites(proc: subprocess.Popen[str], timeout: float = DEMO_START_TIMEOUT) -> dict[str, Path]:
    """The site folders ``flip-site demo`` made, by site name; its own error, in its words, if it failed."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_pids([proc.pid])
        raise FederationError(f"the simulated hospitals were not ready within {timeout:g} s") from None
    if proc.returncode != 0:
        reason = (err.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise FederationError(f"the simulated hospitals could not be made: {reason}")
    return {name: Path(path) for name, path in json.loads(out)["sites"].items()}


def launch_site(site_dir: Path, parent_pid: int | None) -> subprocess.Popen[bytes]:
    """``flip-site run SITE`` in a session of its own, its output in ``SITE/daemon.log``; with ``parent_pid`` it
    stops when that process exits."""
    cmd = [*flip_site(), "run", str(site_dir)]
    if parent_pid is not None:
        cmd += ["--parent-pid", str(parent_pid)]
    return _spawn(cmd, site_dir / "daemon.log", flower_env())


def _spawn(cmd: list[str], log_file: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
    with open(log_file, "ab") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            cwd=cwd,
        )


# -- waiting, watching, stopping ----------------------------------------------------------------------------------
def wait_for(ready: Callable[[], bool], timeout: float, proc: subprocess.Popen[bytes], what: str, logs: Path) -> None:
    """Return once ``ready()`` holds; fail as soon as ``proc`` (the hub) exits, or after ``timeout``. ``ready`` may
    raise :class:`FederationError` to fail at once; any other error means "not yet" (an API not answering yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except FederationError:
            raise
        except Exception:
            pass
        if proc.poll() is not None:
            raise FederationError(f"{what}: the hub process exited with code {proc.returncode}; see {logs}")
        time.sleep(READY_POLL_S)
    raise FederationError(f"{what} within {timeout:g} s; see {logs}. Nothing was left running.")


class ExitWatch:
    """Calls ``on_exit(name)`` the moment a watched process ends: one thread blocked on the processes' pidfds (a
    file descriptor that becomes readable when its process exits, Linux 5.3+), so nothing polls."""

    def __init__(self, on_exit: Callable[[str], None]) -> None:
        self._on_exit = on_exit
        self._wake_r, self._wake_w = os.pipe()
        self._lock = threading.Lock()
        self._pending: list[tuple[str, int]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="flip-lab-exit-watch", daemon=True)
        self._thread.start()

    def watch(self, name: str, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._on_exit(name)
            return
        with self._lock:
            self._pending.append((name, fd))
        os.write(self._wake_w, b"w")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        os.close(self._wake_w)  # here, not in the thread: written to above after the thread may have ended

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        names: dict[int, str] = {}
        try:
            while True:
                with self._lock:
                    if self._closed:
                        return
                    for name, fd in self._pending:
                        names[fd] = name
                        poller.register(fd, select.POLLIN)
                    self._pending.clear()
                for fd, _ in poller.poll():
                    if fd == self._wake_r:
                        os.read(fd, 64)
                        continue
                    poller.unregister(fd)
                    os.close(fd)
                    name = names.pop(fd)
                    try:
                        self._on_exit(name)
                    except Exception:  # a failed report must not end the watch of the other sites
                        log.exception("reporting the exit of %s failed", name)
        finally:
            for fd in names:
                os.close(fd)
            with self._lock:
                for _, fd in self._pending:
                    os.close(fd)
            os.close(self._wake_r)


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
        reap()
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
    reap()


def kill_family(pids: list[int | None]) -> None:
    """SIGKILL each process and all its descendants at once, as a crash would; reaps what this process started."""
    import psutil

    family = []
    for pid in pids:
        try:
            family += [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]  # type: ignore[arg-type]
        except (psutil.NoSuchProcess, TypeError, ValueError):
            pass
    for proc in family:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)
    reap()


def reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def start_reaper(workdir: Path, parent: int, pids: list[int]) -> None:
    subprocess.Popen(
        [sys.executable, "-m", "flip_lab._reaper", str(parent), str(workdir), *map(str, pids)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


# -- the state file ---------------------------------------------------------------------------------------------
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


def write_state(workdir: Path, state: dict[str, Any]) -> None:
    tmp = workdir / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(workdir / STATE)

"""A real Jupyter server (or JupyterLab) process on 127.0.0.1 for the server-extension and browser tests.

Started on a free port with a token, in a folder of its own, with FLIP_LAB_HOME pointing into that folder, so the
panel's saved connection and its local federation stay inside the test. Stopped by PID (SIGTERM, so the extension
stops the local federation it started; SIGKILL if it lingers), and whatever federation is left is stopped by PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from flip_common.net import free_port
from flip_lab.supervisor import read_state, stop_pids

BIN = Path(sys.executable).parent


@dataclass
class Jupyter:
    proc: subprocess.Popen[bytes]
    url: str
    token: str
    root: Path
    home: Path
    log: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def local_workdir(self) -> Path:
        return self.home / "lab" / "local"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        state = read_state(self.local_workdir())
        if state:
            stop_pids(list(state.get("pids", [])))


def start_jupyter(
    root: Path,
    *,
    app: str = "server",
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
    port: int | None = None,
    timeout: float = 90.0,
) -> Jupyter:
    """Start ``jupyter server`` (or ``jupyter lab``) serving ``root`` and wait until it answers.

    Starting again with the same ``root`` and ``port`` is a server restart: same token, same cookie secret, same
    saved panel state.
    """
    root.mkdir(parents=True, exist_ok=True)
    home = root / ".flip-home"
    port, token = port or free_port(), "flip-test-token"
    env = dict(
        os.environ,
        FLIP_LAB_HOME=str(home),
        JUPYTER_CONFIG_DIR=str(root / ".jupyter-config"),
        JUPYTER_RUNTIME_DIR=str(root / ".jupyter-runtime"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **(env or {}),
    )
    log = root / f"jupyter-{app}.log"
    cmd = [
        str(BIN / "jupyter"),
        app,
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--allow-root",
        f"--ServerApp.root_dir={root}",
        f"--IdentityProvider.token={token}",
        "--ServerApp.jpserver_extensions=flip_lab.server=True",
        "--FlipLabApp.local_scale=0.3",
        "--ServerApp.shutdown_no_activity_timeout=0",
        *(extra or []),
    ]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=root)
    jupyter = Jupyter(proc, f"http://127.0.0.1:{port}", token, root, home, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter {app} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{jupyter.url}/api/status", headers=jupyter.headers(), timeout=2).status_code == 200:
                return jupyter
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    jupyter.stop()
    raise RuntimeError(f"jupyter {app} did not answer within {timeout:g} s: {log.read_text()[-2000:]}")

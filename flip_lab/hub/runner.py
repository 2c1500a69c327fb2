"""The hub's trusted executor: the only process that starts studies on the hub.

The SuperLink runs with ``--isolation process``, so it executes nothing itself: each submitted run
becomes a SERVER_APP task on its Runtime API, waiting for an executor. Flower's own executor would
install the run's bundle and import the ServerApp it names, with the bundle's folder first on
``sys.path``: any submitter's code would run as the hub. This runner is that executor instead. It
proves itself to the SuperLink with the hub's SuperExec secret (``--superexec-auth-secret-file``),
so nobody else reaching the port can take the hub's tasks, and starts one :mod:`flip_lab.hub.study`
process per task, which reads the bundle as data and runs FLIP's installed ServerApp or refuses the
run. Started as root, each study drops to :data:`~flip_lab.hub.study.STUDY_UID` before it reads its
bundle, so it cannot read the hub's TLS key nor this runner's secret (both 0600, root's).

    python -m flip_lab.hub.runner --runtime-api-address 127.0.0.1:9093 \\
        --secret-file HUB/runtime.secret --hub-dir HUB [--root-certificates CA.pem]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient

from .study import REFUSALS, STUDY_UID

log = logging.getLogger("flip.hub")

POLL_S = 0.25


def _prepare_hub_dir(hub_dir: Path) -> None:
    """What a study writes (its events and checkpoints, the refusals record), owned by its uid."""
    runs = hub_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    (hub_dir / REFUSALS).touch()
    if os.geteuid() != 0:
        return
    for path in [runs, *runs.rglob("*"), hub_dir / REFUSALS]:
        os.chown(path, STUDY_UID, STUDY_UID, follow_symlinks=False)


# How a study is started: the interpreter's arguments before the study's own.
STUDY: tuple[str, ...] = ("-m", "flip_lab.hub.study")


def launch_study(address: str, token: str, root_certificates: bytes | None, hub_dir: Path) -> subprocess.Popen:
    """One study's process. The task token and the CA certificate travel on its stdin, never on a
    command line; ``-I`` keeps the working folder and ``PYTHON*`` variables out of its imports."""
    cmd = [sys.executable, "-I", *STUDY, "--runtime-api-address", address]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["FLIP_HUB_DIR"] = str(hub_dir)
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, env=env, cwd="/")
    assert proc.stdin is not None
    proc.stdin.write(
        json.dumps({"token": token, "ca": root_certificates.decode() if root_certificates else None}).encode()
    )
    proc.stdin.close()
    return proc


def serve(
    address: str,
    secret: bytes,
    hub_dir: Path,
    root_certificates: bytes | None,
    stop: threading.Event,
) -> None:
    """Take the SuperLink's ServerApp tasks and start a study process for each, until ``stop``."""
    _prepare_hub_dir(hub_dir)
    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=root_certificates is None,
        root_certificates=root_certificates,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="SuperExec"),
            SuperExecAuthHttpInterceptor(
                master_secret=secret,
                protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}),
            ),
        ],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    studies: list[subprocess.Popen] = []
    try:
        while not stop.is_set():
            studies = [p for p in studies if p.poll() is None]
            try:
                response = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.SERVER_APP]))
            except Exception as err:  # the SuperLink is starting or restarting: keep asking
                log.debug("runtime API not ready: %s", err)
                stop.wait(0.5)
                continue
            if response.HasField("task") and response.token:
                log.info("starting a study for task %s", response.task.task_id)
                try:
                    studies.append(launch_study(address, str(response.token), root_certificates, hub_dir))
                except OSError:  # the SuperLink fails the task when its heartbeat stops; the hub keeps serving
                    log.exception("could not start a study for task %s", response.task.task_id)
            else:
                stop.wait(POLL_S)
    finally:
        client.close()
        for proc in studies:
            proc.terminate()
        for proc in studies:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flip_lab.hub.runner", description=__doc__.split("\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperLink's HOST:PORT")
    parser.add_argument("--secret-file", required=True, type=Path, help="the SuperLink's SuperExec secret")
    parser.add_argument("--hub-dir", required=True, type=Path, help="the hub's folder (runs, refusals)")
    parser.add_argument("--root-certificates", type=Path, help="the federation's CA; plain HTTP without it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ca = args.root_certificates.read_bytes() if args.root_certificates else None
    serve(args.runtime_api_address, args.secret_file.read_bytes(), args.hub_dir.resolve(), ca, stop)


if __name__ == "__main__":
    main()

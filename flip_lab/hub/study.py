"""One study on the hub, in a process of its own, started by :mod:`flip_lab.hub.runner` per task.

It does what Flower's ``flwr-serverapp`` does (pull the task's input, keep its heartbeat, upload its
output to the SuperLink's logs, push the task's result) except the one step that ran a submitter's
code: instead of installing the bundle and importing the ServerApp it names, it reads the bundle as
data (:mod:`flip_common.bundle`) and calls FLIP's installed ServerApp with the run config found
there, or, for a directory request, asks the sites for their names and catalogues
(:mod:`flip_lab.hub.directory`). A bundle that is not exactly FLIP's is refused, and so is a study that no researcher
of the federation's CA signed (:mod:`flip_lab.hub.signed`): the run ends failed with the reason, the hub's log says so
and ``HUB/refusals.jsonl`` records it. Output goes through Flower's log uploader because that is how researchers' jobs
receive their events.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from queue import Queue

from flwr.app import RecordDict
from flwr.common.constant import SubStatus
from flwr.common.serde import context_from_proto, context_to_proto, fab_from_proto, run_from_proto
from flwr.proto.runtime_pb2 import PullTaskInputRequest, PushTaskOutputRequest
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.logger import (
    flush_logs,
    mirror_output_to_queue,
    start_log_uploader,
    stop_log_uploader,
)
from flwr.superlink.grid import HttpGrid

from flip_common.bundle import BundleRefused, DirectoryRequest, PlanBundle, read_bundle

from .._flower import check_study, set_task_identity, stop_retrying, study_runtime
from .signed import check_signed

log = logging.getLogger("flip.hub")
REFUSALS = "refusals.jsonl"
# Outside the site workers' range (100,000-150,000, site_kernel.jobs.worker_uid), so that stopping a
# site's worker never touches a study on a hub of the same host.
STUDY_UID = 99_000


def _drop_privileges() -> None:
    """Run as :data:`STUDY_UID` from here on when started as root: the hub's TLS key and the
    runner's secret (0600, root's) are then out of this process's reach.

    The interpreter may live where that uid cannot read (e.g. under /root), so everything the study
    imports later is imported first, as the site's sandboxed worker does before it confines itself.
    """
    if os.geteuid() != 0:
        return
    import encodings.cp437  # noqa: F401  (zip file names)
    import tomllib  # noqa: F401
    import zipfile  # noqa: F401

    import safetensors
    import safetensors.numpy  # noqa: F401

    import flip_common.flower  # noqa: F401

    from .. import _flower  # noqa: F401
    from . import directory, server_app  # noqa: F401

    # the hub's folder may lie below folders only root may pass (e.g. /tmp/pytest-of-root): the
    # study works in it by relative paths from its working folder, entered while it still can
    if hub_dir := os.environ.get("FLIP_HUB_DIR"):
        os.chdir(hub_dir)
        os.environ["FLIP_HUB_DIR"] = "."
    os.setgroups([])
    os.setresgid(STUDY_UID, STUDY_UID, STUDY_UID)
    os.setresuid(STUDY_UID, STUDY_UID, STUDY_UID)


def _record_refusal(run_id: int, fab_hash: str, reason: str) -> None:
    hub_dir = os.environ.get("FLIP_HUB_DIR")
    if not hub_dir:
        return
    line = json.dumps({"t": time.time(), "run_id": run_id, "fab_hash": fab_hash, "reason": reason})
    try:
        with open(Path(hub_dir) / REFUSALS, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
    except OSError as err:  # the refusal stands and the log says so; only its record is missing
        log.error("could not record the refusal of run %s in %s: %s", run_id, REFUSALS, err)


def run_task(address: str, token: str, root_certificates: bytes | None) -> None:
    log_queue: Queue[str | None] = Queue()
    mirror_output_to_queue(log_queue)
    grid = HttpGrid(
        runtime_api_address=address,
        insecure=root_certificates is None,
        root_certificates=root_certificates,
        token=token,
    )
    check_study(grid)
    runtime = study_runtime(grid)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(runtime))
    heartbeat.start()
    uploader = None
    context = None
    status, details = SubStatus.FAILED, "the hub could not start this run"
    try:
        res = runtime.PullTaskInput(PullTaskInputRequest())
        # Flower's grid names its messages by the task it belongs to, as flwr-serverapp sets it
        set_task_identity(res.task_id, res.run.run_id, res.context.node_id)
        context, run, fab = (
            context_from_proto(res.context),
            run_from_proto(res.run),
            fab_from_proto(res.fab),
        )
        _drop_privileges()  # before anything of the submitter's bundle is read
        grid.set_run(run)
        uploader = start_log_uploader(log_queue=log_queue, node_id=0, run_id=run.run_id, client=runtime)
        try:
            bundle = read_bundle(fab.content)
            if run.override_config:
                raise BundleRefused("a FLIP run takes its settings from its plan, not from run-config overrides")
            if isinstance(bundle, PlanBundle):
                who = check_signed(bundle, os.environ.get("FLIP_HUB_DIR")).submitter
                log.info("run %s signed by %s", run.run_id, who.label)
        except BundleRefused as err:
            details = f"refused by the hub: {err.reason}"
            log.warning("run %s %s", run.run_id, details)
            _record_refusal(run.run_id, fab.hash_str, err.reason)
            return
        context.run_config = dict(bundle.run_config)
        if isinstance(bundle, DirectoryRequest):
            from .directory import answer_directory
            from .events import EventSink

            answer_directory(grid, EventSink())
        else:
            from .server_app import app

            app(grid=grid, context=context)
        context.state = RecordDict()  # as flwr-serverapp: the study's state stays on the hub
        status, details = SubStatus.COMPLETED, ""
    except KeyboardInterrupt:  # Flower's heartbeat interrupts a study whose run was stopped
        status, details = SubStatus.STOPPED, "the run was stopped"
    except Exception as err:  # the run ends failed with a reason instead of a vanished process
        log.exception("the hub's ServerApp failed")
        details = f"the hub's ServerApp failed: {type(err).__name__}"
    finally:
        stop_retrying(grid)  # the SuperLink may be gone: do not wait on it at exit
        if uploader is not None:
            flush_logs(log_queue)
        try:
            runtime.PushTaskOutput(
                PushTaskOutputRequest(
                    context=context_to_proto(context) if context is not None else None,
                    sub_status=status,
                    details=details,
                )
            )
        except Exception as err:  # the SuperLink fails the task once its heartbeat stops
            log.error("could not report the run's end to the SuperLink: %s", err)
        if uploader is not None:
            stop_log_uploader(log_queue, uploader)
        if heartbeat.is_running:
            heartbeat.stop()
        grid.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flip_lab.hub.study")
    parser.add_argument("--runtime-api-address", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    payload = json.loads(sys.stdin.read())
    ca = payload.get("ca")
    run_task(args.runtime_api_address, str(payload["token"]), ca.encode() if ca else None)


if __name__ == "__main__":
    main()

"""One job's sandboxed worker, seen from the trusted side.

``JobWorker`` prepares the job's harmonised dataset (site code, cached by contract), starts the worker process as
soon as the plan is approved so the first round does not wait for torch to import, and turns everything the worker
says (untrusted: it ran researcher code) into either checked arrays and metrics or a ``WorkerFailure`` whose
message the executor composed itself from a kind, a function name, an exception type name and a line number.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flip_common.protocol import LoadRequest, read_worker_reply

from . import _pipe
from ._output import copy_to_log
from .audit import AuditLog
from .policy import SitePolicy
from .settings import SiteSettings

log = logging.getLogger("flip.site")


class WorkerFailure(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class StepResult:
    arrays: dict[str, np.ndarray]
    metrics: dict[str, Any]
    compute_s: float
    started_at: float


def _describe(site: str, reply: dict[str, Any], source: str, *, lines: bool) -> WorkerFailure:
    """Compose a safe message from the worker's failure report: the worker ran plan code, so every field is
    re-checked by ``describe_failure`` and none of its free text is used. The plan's line number only with
    ``lines`` (the policy's ``error_line_numbers``): the plan picks the line it fails on, a byte per failure."""
    from .egress import describe_failure

    kind = str(reply.get("kind", "plan_error"))
    role = reply.get("role") if reply.get("role") in ("model", "train", "evaluate") else "the plan"
    if kind == "model_mismatch":
        return WorkerFailure("model_mismatch", f"the weights sent do not fit model() at site {site}")
    if kind == "sandbox_unavailable":
        return WorkerFailure(
            "sandbox_unavailable",
            f"site {site} cannot isolate plans on this host and its policy does not accept weaker isolation",
        )
    if reply.get("not_a_dict"):
        return WorkerFailure("plan_error", f"{role}() must return a dict of metrics (at site {site})")
    fields = reply.get("fields") if isinstance(reply.get("fields"), dict) else {}
    allowed = {k: fields.get(k) for k in ("function", "exc_type", "exc_base", "library", "line")}
    if not lines:
        allowed["line"] = None
    safe_kind, message = describe_failure("plan_error", **allowed, plan_source=source)
    return WorkerFailure(
        safe_kind, f"{message} in {role}() at site {site}" if role != "the plan" else f"{message} at site {site}"
    )


def _preparation_failure(site: str, answer: bytes) -> WorkerFailure:
    """The researcher's message for a failed preparation: the data layer's own message where it sent one (it names
    datasets, contract keys and reasons only), with whose action fixes it; a generic one otherwise."""
    from flip_common.textsafe import shown

    try:
        failure = json.loads(answer)["failure"]
        fixed_by, message = str(failure["fixed_by"]), shown(str(failure["message"]))[:180]
    except (ValueError, KeyError, TypeError):
        return WorkerFailure(
            "site_error",
            f"site {site} could not prepare its data for this plan's contract; its data owner has the details",
        )
    # The hub keeps 300 characters of a site's message; each ends "at site NAME" so the lab can group sites.
    if fixed_by == "researcher":
        return WorkerFailure("contract_error", f"{message} (for the researcher to fix) at site {site}")
    return WorkerFailure(
        "data_error", f"{message} (for the data owner to fix; cause in the site's data.log) at site {site}"
    )


class JobWorker:
    """The sandboxed process serving one run at this site."""

    def __init__(
        self,
        site_dir: Path,
        settings: SiteSettings,
        run_id: int,
        source: str,
        spec: dict[str, Any],
        digest: str,
        policy: SitePolicy,
        audit: AuditLog,
    ) -> None:
        self.site_dir = site_dir
        self.settings = settings
        self.run_id = run_id
        self.source = source
        self.spec = spec
        self.digest = digest
        self.policy = policy
        self.audit = audit
        self.job_dir = site_dir / "jobs" / str(run_id)
        self.proc: subprocess.Popen[bytes] | None = None
        self._to_worker = self._from_worker = -1
        self._ready = threading.Event()
        self._failure: WorkerFailure | None = None
        self._preparing: subprocess.Popen[bytes] | None = None
        self.num_train = self.num_test = 0
        self.device = "cpu"
        self._lock = threading.Lock()
        self.last_used = time.monotonic()
        self._stopping = False

    @property
    def uid(self) -> int:
        return worker_uid(self.site_dir, self.run_id)

    @property
    def alive(self) -> bool:
        return self._failure is None and (self.proc is None or self.proc.poll() is None)

    def start(self) -> None:
        threading.Thread(target=self._start, name=f"worker-{self.run_id}", daemon=True).start()

    def _start(self) -> None:
        try:
            self._prepare_and_load()
        except WorkerFailure as failure:
            self._failure = failure
            self.stop()  # a worker still waiting for its data would wait for ever
        except Exception as err:  # site-side trouble (e.g. unreadable dataset): a safe, generic message
            log.exception("preparing job %s failed", self.run_id)
            self._failure = WorkerFailure(
                "site_error",
                f"site {self.settings.name} could not prepare its data "
                f"({type(err).__name__}); its data owner has the details",
            )
            self.stop()
        finally:
            self._ready.set()

    def _prepare_and_load(self) -> None:
        scratch = self.job_dir / "scratch"
        for d in (scratch, self.site_dir / "logs"):
            d.mkdir(parents=True, exist_ok=True)
        self._grant(scratch)
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "site_kernel.worker", str(to_r), str(from_w)],
            pass_fds=(to_r, from_w),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=scratch,
            env=_worker_env(scratch),
            start_new_session=True,  # stop() ends every process it made
        )
        assert self.proc.stdout is not None
        copy_to_log(os.dup(self.proc.stdout.fileno()), self.site_dir / "logs" / f"researcher-{self.run_id}.log")
        self.proc.stdout.close()
        os.close(to_r)
        os.close(from_w)
        self._to_worker, self._from_worker = to_w, from_r
        # While the worker imports torch, a separate process of the site's prepares the data: the worker, which
        # runs the plan, only ever holds the harmonised arrays, never the manifest, paths or file headers.
        prepared = self._prepare_data()
        self.num_train, self.num_test = int(prepared["num_train"]), int(prepared["num_test"])
        limits = self.policy.limits
        # dims=3: the worker reads its cases lazily from this one cache entry, which the sandbox lets it read (and
        # nothing else of the site: not the other entries of the cache, not the raw data, not the manifests).
        cases = prepared.get("cases")
        header: LoadRequest = {
            "op": "load",
            "source": self.source,
            "arrays": prepared.get("arrays"),
            "cases": cases,
            "scratch": str(scratch),
            "readable": [cases] if cases else [],
            "devices": list(self.policy.devices),
            "threads": self.settings.threads,
            "seed": int(self.spec["config"].get("seed", 0)),
            "limits": {k: getattr(limits, k) for k in limits.__dataclass_fields__},
            "confine": self.settings.sandbox or not self.policy.demo,
            "accept_weaker": self.policy.accept_weaker_isolation,
            "uid": self.uid,
            "protected": [
                str(self.site_dir / p)
                for p in ("policy.toml", "approvals", "audit.jsonl", "audit.head", "site.toml", "keys")
            ],
        }
        # First frame: the arrays loaded by trusted code, before the sandbox and the plan exist.
        loaded, _ = self._exchange(header, b"", timeout=600.0, what="loading the prepared data")
        if not loaded.get("ok"):
            raise WorkerFailure(
                "site_error",
                f"site {self.settings.name} could not prepare its data for this "
                "plan's contract; its data owner has the details",
            )
        reply = self._receive(timeout=120.0, what="model()")
        if not reply.get("ok"):
            raise _describe(self.settings.name, reply, self.source, lines=self.policy.error_line_numbers)
        if reply.get("model_shapes") != self.spec["model_shapes"]:
            raise WorkerFailure(
                "model_mismatch", f"model() at site {self.settings.name} does not build the shapes the plan declared"
            )
        # The load reply comes after the plan's top level ran: take the device only in its expected form.
        device = str(reply.get("device", "cpu"))
        self.device = device if device == "cpu" or re.fullmatch(r"cuda:\d{1,3}", device) else "unknown"
        log.info("job %s runs its plan on %s", self.run_id, self.device)
        self.audit.append(
            "job_started",
            run_id=self.run_id,
            plan=self.digest,
            confinement=reply.get("confinement", {}),
            device=self.device,
        )

    def _prepare_data(self) -> dict[str, Any]:
        """Run :mod:`site_kernel._prepare_job` for this job's contract; its answer, or a safe WorkerFailure."""
        contract = {**self.spec["contract"], "dataset": self.spec["contract"].get("dataset", self.settings.dataset)}
        request = json.dumps(
            {"site_dir": str(self.site_dir), "contract": contract, "site_steps": self.settings.site_steps}
        )
        self._preparing = subprocess.Popen(
            [sys.executable, "-m", "site_kernel._prepare_job"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_trusted_env(),
            start_new_session=True,
        )
        try:
            out, err = self._preparing.communicate(request.encode(), timeout=1800.0)
        except subprocess.TimeoutExpired:
            self._preparing.kill()
            self._preparing.communicate()
            raise WorkerFailure(
                "resource_limit", f"data preparation exceeded site {self.settings.name}'s time limit of 1800 s"
            ) from None
        if self._preparing.returncode != 0:
            log.error(
                "preparing the data of job %s failed (exit status %s):\n%s",
                self.run_id,
                self._preparing.returncode,
                err.decode(errors="replace")[-8000:],
            )
            raise _preparation_failure(self.settings.name, out)
        return dict(json.loads(out))

    def _grant(self, scratch: Path) -> None:
        """The worker drops to an unprivileged user of this site's own: give it its scratch folder, nothing else."""
        if os.geteuid() != 0:
            return
        for path in (self.job_dir.parent, self.job_dir):
            os.chmod(path, 0o755)
        os.chown(scratch, self.uid, self.uid)
        os.chmod(scratch, 0o700)

    def _exchange(
        self, header: Mapping[str, Any], payload: bytes, *, timeout: float, what: str
    ) -> tuple[dict[str, Any], bytes]:
        assert self.proc is not None
        _pipe.send(self._to_worker, header, payload)
        return self._receive_frame(timeout=timeout, what=what)

    def _receive(self, *, timeout: float, what: str) -> dict[str, Any]:
        return self._receive_frame(timeout=timeout, what=what)[0]

    def _receive_frame(self, *, timeout: float, what: str) -> tuple[dict[str, Any], bytes]:
        assert self.proc is not None
        try:
            ready, _, _ = select.select([self._from_worker], [], [], timeout)
        except (OSError, ValueError):  # stop() closed the pipe from another thread: run stopped
            ready = [self._from_worker]
        if not ready:
            self.stop()
            raise WorkerFailure(
                "resource_limit", f"{what} exceeded site {self.settings.name}'s time limit of {timeout:g} s"
            )
        try:
            header, payload = _pipe.recv(self._from_worker)
            return dict(read_worker_reply(header)), payload
        except (_pipe.PipeClosed, _pipe.FrameTooLarge, ValueError, OSError):  # ProtocolError is a ValueError
            if self._stopping:  # the site stopped it (its run was cancelled): no limit, no violation
                raise WorkerFailure("stopped", f"{what} was stopped at site {self.settings.name}") from None
            code = self.proc.wait(timeout=5)
            self.audit.append("sandbox_violation", run_id=self.run_id, plan=self.digest, exit_code=code)
            raise WorkerFailure(
                "resource_limit",
                f"{what} was stopped at site {self.settings.name} (exceeded a limit or broke the sandbox)",
            ) from None

    def step(self, op: str, arrays: dict[str, np.ndarray], config: dict[str, Any]) -> StepResult:
        from safetensors.numpy import load, save

        self._ready.wait()
        if self._failure is not None:
            raise self._failure
        if self.proc is None or self.proc.poll() is not None:
            raise WorkerFailure("resource_limit", f"the plan's process at site {self.settings.name} has ended")
        with self._lock:
            header = {"op": op, "config": {k: v for k, v in config.items() if _jsonable(v)}}  # a StepRequest
            # Timed here, not by the worker: a plan can patch the clocks of its own process, and a timing it
            # reported would leave the site beside the egress checks (an accession number fits in a float).
            started_at, started = time.time(), time.monotonic()
            reply, payload = self._exchange(
                header, save(arrays), what=f"{op}()", timeout=float(self.policy.limits.phase_seconds(op))
            )
            compute_s = time.monotonic() - started
        if not reply.get("ok"):
            failure = _describe(self.settings.name, reply, self.source, lines=self.policy.error_line_numbers)
            self.stop()  # whatever the plan left behind (threads, forks, half-trained state) goes with the process
            self._failure = failure
            raise failure
        out = dict(load(payload)) if payload else {}
        self.last_used = time.monotonic()
        return StepResult(out, dict(reply.get("metrics", {})), coarse(compute_s), coarse(started_at))

    def stop(self) -> None:
        self._stopping = True
        if self._preparing is not None and self._preparing.poll() is None:
            self._preparing.kill()
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the worker and anything it forked
            except (ProcessLookupError, PermissionError):
                pass
            if self.uid and os.geteuid() == 0:
                _kill_uid(self.uid)  # a fork bomb's children may have left the group: they keep the job's uid
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.error("worker %s did not exit after SIGKILL", self.proc.pid)
        for fd in (self._to_worker, self._from_worker):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._to_worker = self._from_worker = -1
        if self._failure is None:
            self._failure = WorkerFailure(
                "resource_limit", f"the plan's process at site {self.settings.name} was stopped"
            )
        shutil.rmtree(self.job_dir / "scratch", ignore_errors=True)


def worker_uid(site_dir: Path, run_id: int) -> int:
    """The unprivileged uid of one job's worker at one site.

    Stopping a worker kills every process of its uid (a fork bomb's children leave the process group), and the
    process limit counts every process of a uid: so no two workers share one, neither the jobs of one site (a study
    whose idle worker was stopped used to take down another study's worker at the same site) nor the sites on one
    host. Derived from the site's folder and the run, 50,000 uids from 100,000: two concurrent jobs collide with a
    chance of 1 in 50,000."""
    return 100_000 + zlib.crc32(f"{site_dir.resolve()}#{run_id}".encode()) % 50_000


def _kill_uid(uid: int) -> None:
    """SIGKILL every process running as ``uid`` (a uid only one job's worker uses)."""
    import psutil

    for _ in range(5):  # forks can race the first sweep
        found = False
        for proc in psutil.process_iter(["uids"]):
            try:
                if proc.info["uids"] and proc.info["uids"].real == uid:
                    proc.kill()
                    found = True
            except psutil.Error:
                pass
        if not found:
            return


def coarse(seconds: float) -> float:
    """A timing as it may leave the site: to 0.1 s. How long a step takes is still the plan's to choose (it can
    sleep), so a duration stays a slow channel; the rounding keeps it to a few bits per reply."""
    return round(seconds, 1)


def _jsonable(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or (
        isinstance(value, list) and all(isinstance(v, (int, float, str, bool)) for v in value)
    )


def _trusted_env() -> dict[str, str]:
    """The site's own environment for its preparation process, with the site kernel importable and one thread
    per library (preparation runs beside the site's other work)."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    site_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = site_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _worker_env(scratch: Path) -> dict[str, str]:
    """A minimal environment: nothing of the site's own (keys, tokens, paths) is inherited by researcher code."""
    keep = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(
        {
            "HOME": str(scratch),
            "TMPDIR": str(scratch),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env["PYTHONSAFEPATH"] = "1"
    # The worker's uid has no passwd entry; getpass.getuser() (called by MONAI at import) reads these first.
    env["USER"] = env["LOGNAME"] = "flip-plan"
    site_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = site_root + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    return env

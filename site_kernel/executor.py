"""The site's trusted executor: every message from the hub is handled here, by the site's own code.

For each task the SuperNode queues, the executor reads the plan out of the bundle's run config as data, recomputes
its hash, consults the site's policy and approvals, prepares the harmonised dataset, runs the plan in a sandboxed
worker, checks the reply against the egress policy and writes the audit log. Whatever the researcher's code does,
the executor answers with a well-formed reply or an error of a known kind with a safe message, and keeps serving.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from flip_common import secagg as shared_secagg
from flip_common.bundle import BundleRefused, DirectoryRequest, PlanBundle, read_bundle
from flip_common.errors import FlipError
from flip_common.flower import fast_object_pulls
from flip_common.identity import SubmissionRefused
from flip_common.packing import pack, unpack_arrays
from flip_common.planhash import plan_hash
from flip_common.protocol import ERROR_CODE, SiteErrorReason, read_plan_spec

from . import _flower_runtime as rt
from . import run_settings
from ._pace import IdlePacer
from .approvals import ApprovalStore
from .audit import AuditLog
from .egress import check_reply
from .errors import PolicyError
from .jobs import JobWorker, StepResult, WorkerFailure
from .policy import SitePolicy, load_policy
from .privacy import weights_digest
from .privacy_gate import PrivacyGate
from .request import Refusal, Request, query_op
from .secagg_gate import SecAggGate
from .settings import SiteSettings, load_settings
from .submitters import SubmitterCheck, submitter_meta

log = logging.getLogger("flip.site")


def _study(run_config: dict[str, Any], run_id: int) -> int:
    """The study a job belongs to: its own id, or the first job's when it resumes an interrupted study."""
    try:
        return int(str(run_config.get("flip-study", "0")) or 0) or run_id
    except ValueError:
        return run_id


class Executor:
    """Serves one site: see the module docstring. ``handle`` is the unit under test; ``serve`` the loop."""

    def __init__(self, site_dir: Path, settings: SiteSettings, runtime_address: str) -> None:
        self.site_dir = site_dir
        self.settings = settings
        self.runtime_address = runtime_address
        self.audit = AuditLog(site_dir / "audit.jsonl")
        self.approvals = ApprovalStore(site_dir, audit=self.audit)
        self.submitters = SubmitterCheck(site_dir, self.audit)
        self.workers: dict[int, JobWorker] = {}
        self._lock = threading.Lock()
        self._settings_mtime = 0.0
        self._last_refresh = 0.0
        self.privacy = PrivacyGate(site_dir, self.audit)  # the policy's [dp]
        self.secagg = SecAggGate(self.audit)  # each job's secure-aggregation state
        self._run_queues: dict[int, _InOrder] = {}  # kept for the site's life: one per run
        self._busy: dict[int, int] = {}  # run -> its phases in progress: that worker is not evicted
        # every message of a study carries the same bundle: read it once, not once per round
        self._bundle: tuple[bytes, PlanBundle] | None = None
        self._settings_cache: dict[int, dict[str, Any]] = {}

    # -- the loop ----------------------------------------------------------------------------------
    def serve(self, stop: threading.Event, poll_s: float = 0.02, idle_cap_s: float = 0.5) -> None:
        """Serve the SuperNode's tasks until ``stop``: polls every ``poll_s`` during a study, backing off to
        ``idle_cap_s`` once idle (:mod:`site_kernel._pace`).

        Each task is served on a thread of its own, so that an approval query or another study's round
        never waits behind a plan that trains for an hour; one run's tasks still run in order
        (:meth:`_in_order`), and how many jobs hold a worker at once is the policy's ``[jobs] concurrent``.
        """
        fast_object_pulls()
        conn = rt.RuntimeConnection(self.runtime_address)
        pacer = IdlePacer(poll_s, idle_cap_s)
        try:
            while not stop.is_set():
                try:
                    token = conn.acquire_token()
                except Exception as err:  # SuperNode restarting: keep trying, quietly
                    log.debug("runtime API not ready: %s", err)
                    stop.wait(0.5)
                    continue
                if token is None:
                    self._stop_idle_workers()
                    stop.wait(pacer.next_wait())
                    continue
                pacer.active()
                threading.Thread(target=self._serve_task, args=(conn, token), name="task", daemon=True).start()
        finally:
            conn.close()
            self.close()

    def _serve_task(self, conn: rt.RuntimeConnection, token: str) -> None:
        try:
            t0 = time.perf_counter()
            with conn.task(token, on_lost=self._run_stopped) as task:
                run_id = task.run.run_id
                with self._in_order(run_id):
                    t1 = time.perf_counter()
                    reply = self.handle(task.message, task.context.run_config, task.fab.content, run_id)
                    t2 = time.perf_counter()
                    self._capture(reply)
                    task.reply(reply)
            log.debug(
                "task %s: pull %.3f s, handle %.3f s, reply %.3f s",
                task.message.metadata.message_type,
                t1 - t0,
                t2 - t1,
                time.perf_counter() - t2,
            )
        except rt.TaskLost:  # e.g. its run stopped while the SuperNode was receiving it
            log.warning(
                "a task ended before the site could finish it (its run stopped or its "
                "token expired); the site keeps serving"
            )
        except Exception:  # never let one task take the site down
            log.exception("task failed outside the plan; the site keeps serving")

    @contextmanager
    def _in_order(self, run_id: int) -> Iterator[None]:
        """One run's messages are answered one at a time, in the order they came: a round's phases
        build on each other."""
        with self._lock:
            queue = self._run_queues.setdefault(run_id, _InOrder())
        with queue.turn():
            yield

    def _run_stopped(self, run_id: int) -> None:
        """The hub stopped this run (a cancelled study) while the site worked on it: its worker goes
        now."""
        with self._lock:
            worker = self.workers.pop(run_id, None)
            self.secagg.forget(run_id)
        if worker is not None:
            worker.stop()
            self.audit.append("job_stopped", run_id=run_id, reason="the run was stopped at the hub")
            log.info("run %s was stopped at the hub; its worker was stopped", run_id)

    def _capture(self, reply: Message) -> None:
        """Append what leaves the site, byte for byte, to the site's egress capture file (when one is set)."""
        if not self.settings.egress_capture:
            return
        record: dict[str, Any] = {"ts": time.time()}
        if reply.has_error():
            record["error"] = reply.error.reason
        else:
            record["configs"] = {k: dict(v) for k, v in reply.content.config_records.items()}
            record["metrics"] = {k: dict(v) for k, v in reply.content.metric_records.items()}
            record["arrays"] = {
                k: {n: a.numpy().tobytes().hex() for n, a in rec.items()}
                for k, rec in reply.content.array_records.items()
            }
        with open(self.settings.egress_capture, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=str) + "\n")

    def _stop_idle_workers(self) -> None:
        """A finished study sends no goodbye: free a worker's memory once it has been idle for a while."""
        now = time.monotonic()
        if now - self._last_refresh > 1.0:
            self._last_refresh = now
            self._refresh_settings()
        with self._lock:
            idle = [
                run_id
                for run_id, worker in self.workers.items()
                if now - worker.last_used > self.settings.worker_idle_s and not self._busy.get(run_id)
            ]
            stopping = [self.workers.pop(run_id) for run_id in idle]
            for run_id in idle:
                self.secagg.forget(run_id)
        for worker in stopping:
            worker.stop()

    def close(self) -> None:
        with self._lock:
            for worker in self.workers.values():
                worker.stop()
            self.workers.clear()

    # -- one message -------------------------------------------------------------------------------
    def _refresh_settings(self) -> None:
        """Pick up the data owner's edits to ``site.toml`` without a restart."""
        try:
            mtime = (self.site_dir / "site.toml").stat().st_mtime
        except OSError:  # being rewritten, or removed by hand: keep serving with what was loaded
            return
        if mtime != self._settings_mtime:
            self.settings = load_settings(self.site_dir)
            self._settings_mtime = mtime

    def handle(self, message: Message, run_config: dict[str, Any], fab_content: bytes, run_id: int) -> Message:
        op = message.metadata.message_type
        self._refresh_settings()
        try:
            if isinstance(self._read_bundle(fab_content), DirectoryRequest):
                return self._directory(message, op, run_id)
            policy = self._policy()
            source, spec, digest = self._read_plan(run_config, fab_content, run_id)
            who = self._submitter(fab_content, run_id)
            state = self._approval_state(digest, source, spec, policy, run_id, who)
            settings = self._run_settings(run_id, spec, run_config)
            self.approvals.record_run(digest, run_id, settings, submitter=who)
            hold = self._settings_hold(digest, settings, policy) if state == "approved" else None
            request = Request(
                message=message,
                op=op,
                run_id=run_id,
                study=_study(run_config, run_id),
                site=self.settings.name,
                policy=policy,
                source=source,
                spec=spec,
                digest=digest,
                config=dict(message.content.config_records.get("config", {})),
            )
            if op == "query":
                if hold is not None:
                    return self._reply(message, config={"approval": "pending", "detail": hold, "policy": policy.label})
                if state == "approved" and request.query_op.startswith("secagg_"):
                    answer = self.secagg.answer(request)
                    return self._reply(message, config={"approval": "approved"}, secagg=ConfigRecord(answer))
                if state == "approved":
                    refused = (
                        self._settings_refusal(settings, policy, run_id)
                        or self.privacy.refusal_at_hello(request)
                        or self.secagg.refusal_at_hello(request)
                    )
                    if refused is not None:
                        return self._reply(
                            message, config={"approval": "refused", "detail": refused, "policy": policy.label}
                        )
                    self._worker(request, prewarm=True)
                return self._reply(message, config={"approval": state, "policy": policy.label})
            if state != "approved":
                raise Refusal("not_approved", f"plan {digest[:12]} is {state} at site {self.settings.name}")
            if hold is not None:
                raise Refusal("not_approved", f"plan {digest[:12]} at site {self.settings.name}: {hold}")
            problem = run_settings.policy_problem(settings, policy)
            if problem is not None:
                raise Refusal("policy", f"site {self.settings.name}: {problem}", audit="settings_refused")
            strategy = str(spec["config"].get("strategy", ""))
            if not policy.allows_strategy(strategy):
                raise Refusal(
                    "policy",
                    f"strategy {strategy!r} is not allowed by site {self.settings.name}",
                    audit="strategy_refused",
                )
            # A resumed study starts from released weights, not from its initial ones.
            fresh = str(run_config.get("flip-resume-from", "0") or "0") == "0"
            init = str(run_config.get("flip-init-weights", "")) if fresh else None
            return self._run_phase(request, init_b64=init)
        except Refusal as refusal:
            self.audit.append(
                refusal.audit or "refused", run_id=run_id, kind=refusal.kind, op=op, reason=refusal.message
            )
            return self._error(message, refusal.kind, refusal.message)
        except FlipError as err:  # the site's own trouble: said in the site's words, kept short
            self.audit.append("site_error", run_id=run_id, op=op, error=type(err).__name__)
            log.error("site error: %s", err)
            return self._error(
                message,
                "site_error",
                f"site {self.settings.name} could not serve this request: "
                f"{type(err).__name__}; its data owner has the details",
            )

    def _policy(self) -> SitePolicy:
        try:
            return load_policy(self.site_dir)
        except PolicyError as err:
            log.error("%s", err)
            raise Refusal(
                "no_policy",
                f"site {self.settings.name} has no valid policy; nothing runs until its data owner writes one",
            ) from err

    def _read_bundle(self, fab_content: bytes) -> PlanBundle | DirectoryRequest:
        # Tasks of different studies run on threads side by side: read the cache once into a local, so that
        # another study's bundle replacing it meanwhile cannot lend this run its plan.
        cached = self._bundle
        if cached is not None and cached[0] == fab_content:
            return cached[1]
        try:
            bundle = read_bundle(fab_content)
        except BundleRefused as err:
            raise Refusal(
                "bundle_refused", f"site {self.settings.name} refused the bundle: {err.reason}", audit="bundle_refused"
            ) from err
        if isinstance(bundle, PlanBundle):  # a directory request, tiny, must not evict a study's plan
            self._bundle = (fab_content, bundle)
        return bundle

    def _directory(self, message: Message, op: str, run_id: int) -> Message:
        """Answer a directory request with the site's name and public catalogue, and nothing else: no approval
        is needed, since it is what the data owner publishes (``flip-site data catalogue``) and no plan runs."""
        from .data import public_catalogue

        if op != "query" or query_op(message) != "directory":
            raise Refusal(
                "bundle_refused",
                f"site {self.settings.name} answers a directory request's directory query only",
                audit="bundle_refused",
            )
        catalogue = public_catalogue(self.site_dir)
        self.audit.append("directory_answered", run_id=run_id, datasets=sorted(catalogue["datasets"]))
        info = {"site": self.settings.name, "catalogue": json.dumps(catalogue, sort_keys=True, default=str)}
        return Message(RecordDict({"flip": ConfigRecord(info)}), reply_to=message)

    def _read_plan(self, run_config: dict[str, Any], fab_content: bytes, run_id: int) -> tuple[str, dict, str]:
        bundle = self._read_bundle(fab_content)
        if not isinstance(bundle, PlanBundle):
            raise Refusal("bundle_refused", "the bundle carries no FLIP plan", audit="bundle_refused")
        # the plan is read from the bundle itself, as data, not from settings a submitter may override
        run_config = bundle.run_config
        try:
            source = str(run_config["flip-plan-source"])
            spec = read_plan_spec(str(run_config["flip-plan-spec"]))
            contract, shapes = spec["contract"], spec["model_shapes"]
        except (KeyError, ValueError, TypeError) as err:
            raise Refusal("bundle_refused", "the bundle carries no readable FLIP plan", audit="bundle_refused") from err
        digest = plan_hash(source, contract, shapes)
        if digest != spec.get("plan_hash"):
            raise Refusal(
                "bundle_refused", "the plan's declared hash does not match its content", audit="bundle_refused"
            )
        return source, spec, digest

    def _submitter(self, fab_content: bytes, run_id: int) -> dict[str, str]:
        """Who signed this study, verified with the site's own CA (:mod:`site_kernel.submitters`), or a refusal
        that names why (unsigned, unknown_ca, expired, revoked, forged, altered, replayed, no_ca)."""
        try:
            verified = self.submitters.check(self._read_bundle(fab_content).run_config, run_id, self.settings)
        except SubmissionRefused as err:
            raise Refusal(
                err.reason, f"site {self.settings.name} refused the study: {err.message}", audit="submission_refused"
            ) from err
        return submitter_meta(verified)

    def _approval_state(
        self, digest: str, source: str, spec: dict, policy: SitePolicy, run_id: int, who: dict[str, str]
    ) -> str:
        state = self.approvals.state(digest)
        if state == "unknown":
            store = ApprovalStore(self.site_dir, policy=policy, audit=self.audit)
            state = store.submit(
                digest,
                source,
                spec["contract"],
                spec["model_shapes"],
                {"name": str(spec.get("name", ""))[:100], "run_id": run_id, **who},
            )
        return state

    # -- run settings (site_kernel.run_settings: what an approved plan is run with) --------------
    def _run_settings(self, run_id: int, spec: dict, run_config: dict[str, Any]) -> dict[str, Any]:
        """This run's settings, computed once per run (hashing the initial weights is not free)."""
        settings = self._settings_cache.get(run_id)
        if settings is None:
            settings = run_settings.run_settings(spec, str(run_config.get("flip-init-weights", "")))
            recent = dict(list(self._settings_cache.items())[-7:])  # a few runs, not all ever
            self._settings_cache = {**recent, run_id: settings}
        return settings

    def _settings_hold(self, digest: str, settings: dict[str, Any], policy: SitePolicy) -> str | None:
        """Why an approved plan must wait for approval again with these settings, else ``None``."""
        if policy.approval == "automatic":
            return None
        approved = self.approvals.approved_settings(digest)
        if policy.reapprove_on_settings_change:
            if run_settings.settings_hash(settings) in approved:
                return None
        elif policy.initial_weights != "approved" or settings["init_weights"] in {
            s["init_weights"] for s in approved.values()
        }:
            return None
        what = "initial weights" if not policy.reapprove_on_settings_change else "settings"
        if not approved:
            return f"{what} not approved yet (the plan was approved before they were recorded)"
        last = list(approved.values())[-1]
        if what == "initial weights":  # the other settings may differ under this policy
            last = {"init_weights": last["init_weights"]}
            settings = {"init_weights": settings["init_weights"]}
        changed = run_settings.changes(last, settings)
        return f"{what} changed since approval ({'; '.join(changed)})"

    def _check_first_weights(self, arrays: dict, init_b64: str, run_id: int) -> None:
        """Round 1 of a new study must train the initial weights whose hash was recorded (and maybe
        approved) at hello, not other arrays the hub sends in their place."""
        from safetensors.numpy import load

        try:
            announced = weights_digest(dict(load(base64.b64decode(init_b64))))
        except Exception:  # e.g. a dtype numpy lacks: the recorded hash stands, unchecked here
            self.audit.append("first_weights_unchecked", run_id=run_id)
            return
        if weights_digest(arrays) != announced:
            raise Refusal(
                "not_approved",
                f"site {self.settings.name}: the weights of round 1 are "
                "not the initial weights this study announced (and the site recorded)",
                audit="first_weights_refused",
            )

    def _settings_refusal(self, settings: dict[str, Any], policy: SitePolicy, run_id: int) -> str | None:
        problem = run_settings.policy_problem(settings, policy)
        if problem is None:
            return None
        reason = f"site {self.settings.name}: {problem}"
        self.audit.append("settings_refused", run_id=run_id, op="query", reason=reason)
        return reason

    def _worker(self, request: Request, prewarm: bool = False) -> JobWorker | None:
        """This run's worker, started when needed. At most ``[jobs] concurrent`` runs hold one: an
        idle worker of another run makes room, one in the middle of a phase never does. Without room, a
        prewarm is skipped (``None``) and a phase refused."""
        run_id, policy = request.run_id, request.policy
        evicted: list[JobWorker] = []
        try:
            with self._lock:
                worker = self.workers.get(run_id)
                if worker is not None and worker.alive:
                    return worker
                others = [r for r in self.workers if r != run_id]
                idle = sorted((r for r in others if not self._busy.get(r)), key=lambda r: self.workers[r].last_used)
                while len(others) >= policy.concurrent_jobs and idle:
                    old_run = idle.pop(0)
                    others.remove(old_run)
                    evicted.append(self.workers.pop(old_run))
                    self.secagg.forget(old_run)
                if len(others) >= policy.concurrent_jobs:
                    if prewarm:
                        return None
                    raise Refusal(
                        "site_busy",
                        f"site {self.settings.name} is running as many jobs as "
                        f"its policy allows ({policy.concurrent_jobs}); try again "
                        "when one finishes",
                        audit="site_busy",
                    )
                worker = JobWorker(
                    self.site_dir,
                    self.settings,
                    run_id,
                    request.source,
                    request.spec,
                    request.digest,
                    policy,
                    self.audit,
                )
                self.workers[run_id] = worker
                worker.start()
                return worker
        finally:
            for old in evicted:
                old.stop()

    def _run_phase(self, request: Request, *, init_b64: str | None = None) -> Message:
        """Train or evaluate: the privacy gate before and after the plan's step, the secure-aggregation gate after,
        the egress check on what would leave, and the reply."""
        op, run_id, round_ = request.op, request.run_id, request.round
        declared = request.spec["model_shapes"]
        arrays = {}
        for key, array in unpack_arrays(next(iter(request.message.content.array_records.values()))).items():
            if key in declared and list(array.shape) == [1] and declared[key] == []:
                array = array.reshape(())  # Flower's wire format carries 0-d arrays as shape (1,)
            arrays[key] = array
        request = replace(request, arrays=arrays)
        if op == "train" and round_ == 1 and init_b64 is not None:
            self._check_first_weights(arrays, init_b64, run_id)
        worker = self._worker(request)
        assert worker is not None  # only a prewarm goes without one
        charge = self.privacy.before_train(request) if op == "train" else None
        if charge is not None and charge.again is not None:  # released before the study was resumed: at no cost
            again = charge.again
            result, num_examples = StepResult(again.arrays, again.metrics, 0.0, time.time()), again.num_examples
        else:
            try:
                with self._phase(run_id):
                    result = worker.step(op, arrays, {**request.spec.get("train_config", {}), **request.config})
            except WorkerFailure as failure:
                self.audit.append(
                    "plan_failed", run_id=run_id, round=round_, op=op, kind=failure.kind, plan=request.digest
                )
                raise Refusal(failure.kind, failure.message) from None
            num_examples = worker.num_train if op == "train" else worker.num_test
        site_metrics: dict[str, float] = {}
        if charge is not None:  # the site's [dp], never the plan's: clip, noise, and say what was spent
            result.arrays = self.privacy.privatize(charge, request, result.arrays)
            site_metrics = charge.site_metrics()
        secure = op == "train" and request.secure
        if secure:  # the hub cannot screen a masked update: bound it here, before the egress check sees it
            result.arrays, update = self.secagg.bound(request, result.arrays)
        decision = check_reply(
            sent_shapes={k: tuple(v.shape) for k, v in arrays.items()},
            sent_dtypes={k: str(v.dtype) for k, v in arrays.items()},
            reply_arrays=result.arrays if op == "train" else None,
            metrics=result.metrics,
            num_examples=num_examples,
            policy=request.policy,
            site_metrics=site_metrics,
        )
        self.audit.append(
            "egress",
            run_id=run_id,
            round=round_,
            op=op,
            plan=request.digest,
            allowed=decision.allowed,
            reason=decision.reason or "",
        )
        if not decision.allowed:
            raise Refusal("withheld", f"site {self.settings.name} withheld its {op} reply: {decision.reason}")
        if charge is not None:
            self.privacy.record(charge, request, result.arrays, result.metrics, num_examples)
        metrics = dict(decision.metrics)
        metrics["num-examples"] = num_examples
        content = {"metrics": MetricRecord(metrics)}
        if secure:  # only the masked vector leaves; the egress check above saw the bounded update in the clear
            masked = self.secagg.mask(request, update, num_examples)
            content["arrays"] = pack(ArrayRecord({shared_secagg.MASKED: Array(masked)}))
        elif op == "train":
            content["arrays"] = pack(ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in result.arrays.items()}))
        return self._reply(
            request.message,
            config={"approval": "approved", "compute_s": result.compute_s, "started_at": result.started_at},
            **content,
        )

    @contextmanager
    def _phase(self, run_id: int) -> Iterator[None]:
        with self._lock:
            self._busy[run_id] = self._busy.get(run_id, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._busy[run_id] -= 1
                if not self._busy[run_id]:
                    del self._busy[run_id]

    # -- replies -----------------------------------------------------------------------------------
    def _reply(self, message: Message, *, config: dict[str, Any], **records: Any) -> Message:
        info = {"site": self.settings.name, "audit_head": self.audit.head(), **config}
        return Message(RecordDict({**records, "flip": ConfigRecord(info)}), reply_to=message)

    def _error(self, message: Message, kind: str, text: str) -> Message:
        return Message(Error(code=ERROR_CODE, reason=SiteErrorReason(kind, text).reason()), reply_to=message)


class _InOrder:
    """A lock that is taken in the order it was asked for (``threading.Lock`` promises no order).

    The standard library has no first-come lock; a ticket and a condition make one."""

    def __init__(self) -> None:
        self._turn = threading.Condition()
        self._next = self._serving = 0

    @contextmanager
    def turn(self) -> Iterator[None]:
        with self._turn:
            ticket, self._next = self._next, self._next + 1
            self._turn.wait_for(lambda: self._serving == ticket)
        try:
            yield
        finally:
            with self._turn:
                self._serving += 1
                self._turn.notify_all()

"""Federations: where plans are sent. ``connect`` reaches any hub; ``local_federation`` starts one on this machine.

>>> fed = connect("hub.example.org:9093", root_certificates="ca.pem", identity="researchers/alice")  # doctest: +SKIP
>>> job = fed.submit(plan, rounds=5, strategy="fedprox", proximal_mu=0.01)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flip_common.identity import Identity

from ._bundle import bundle
from ._directory import DIRECTORY_FAB_ID, NAMES_TTL_S, Answers, Directory
from ._flower import ControlClient, NodeInfo, RunInfo
from ._offer import check_offered
from .errors import FederationError, JobNotFound
from .job import PLAN_LINES, Job
from .plan import BuiltPlan, Plan

_OPEN_JOBS: dict[Path, Job] = {}  # job folder -> its one follower in this process


def _default_home() -> Path:
    return Path(os.environ.get("FLIP_LAB_HOME", Path.home() / ".flip-lab"))


class Federation:
    """A hub to submit plans to. The same API serves a local federation, papermill runs and remote hubs."""

    def __init__(
        self,
        address: str,
        *,
        root_certificates: str | bytes | None = None,
        workdir: str | Path | None = None,
        identity: str | Path | Identity | None = None,
        project: str = "",
    ) -> None:
        self.address = address
        identity = identity or os.environ.get("FLIP_LAB_IDENTITY") or None
        self.identity = identity if isinstance(identity, Identity) or identity is None else Identity.load(identity)
        self.project = project
        if isinstance(root_certificates, str) and Path(root_certificates).exists():
            root_certificates = Path(root_certificates).read_bytes()
        self._client = ControlClient(address, root_certificates=root_certificates)
        safe = address.replace(":", "_").replace("/", "_")
        self.workdir = Path(workdir) if workdir else _default_home() / "hubs" / safe
        self._jobs: dict[int, Job] = {}
        self._directory = Directory(self._client)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address}>"

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    # -- studies -----------------------------------------------------------------------------------
    def submit(
        self, plan: Plan | BuiltPlan, config: dict[str, Any] | None = None, *, check: bool = True, **settings: Any
    ) -> Job:
        """Send ``plan`` with the study's settings (see ``flip_lab.config.SCHEMA``); returns a ``Job`` at once.

        Everything that can be checked here is checked before anything leaves the notebook: settings, the plan's
        source, its imports and names, that ``model()`` builds and, where every online site's catalogue can be
        read (its own folder on a local federation, else a directory request through the hub), that some site
        offers the contract's dataset, modality, task and labels. Then, unless ``check=False``, the plan runs here
        for one short step on synthetic data shaped as its contract says (``BuiltPlan.check``): a plan that would
        fail at every site fails in this cell, with its traceback.
        """
        built = plan if isinstance(plan, BuiltPlan) else plan.build({**(config or {}), **settings})
        catalogues = self._catalogues()
        if catalogues:
            check_offered(built.spec["contract"], catalogues)
        self._signer()
        if check:
            built.check()
        job = self._start(built)
        if isinstance(plan, Plan):
            plan.submitted_settings = {**(config or {}), **settings}
        return job

    def _catalogues(self) -> dict[str, dict[str, Any]] | None:
        """Every online site's public catalogue, or None where some site's cannot be read (it did not answer the
        directory request, e.g. a site of an older release): then a contract is checked only at the sites."""
        catalogues, complete = self._foreign_catalogues(self.nodes())
        return catalogues if complete and catalogues else None

    def _start(
        self, built: BuiltPlan, *, resume_from: int = 0, study: int = 0, history: list[dict[str, Any]] | None = None
    ) -> Job:
        """Start a run of ``built`` at the hub and follow it from a job folder holding its plan (and ``history``,
        the events it carries over from an interrupted job of ``study``)."""
        import json

        fab = bundle(built, resume_from=resume_from, study=study, identity=self._signer(), project=self.project)
        run_id = self._client.start_run(fab)
        store = self._job_dir(run_id)
        store.mkdir(parents=True, exist_ok=True)
        if study:
            (store / "study.json").write_text(json.dumps({"study": study, "resumed_from": resume_from}))
        if history:
            (store / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in history))
        (store / "plan.py").write_text(built.source)
        if built.origins.spans:  # the researcher's cells as they are now, for the sites' "plan.py line N"
            (store / PLAN_LINES).write_text(json.dumps(built.origins.lines()))
        (store / "spec.json").write_text(json.dumps(built.spec, indent=1))
        job = Job(self._client, run_id, store, rounds=int(built.spec["config"]["rounds"]), plan_hash=built.hash)
        self._jobs[run_id] = job
        _OPEN_JOBS[store.resolve()] = job
        return job

    def _signer(self) -> Identity:
        """The researcher identity studies are signed with; hubs and sites refuse unsigned studies."""
        if self.identity is None:
            raise FederationError(
                f"studies sent to {self.address} must be signed: connect with your researcher identity, "
                f"flip_lab.connect('{self.address}', identity='DIR/researchers/ID') (made by `flip-lab provision "
                f"DIR ... --researcher ID:Person:Organisation:kind`), or set FLIP_LAB_IDENTITY to that folder"
            )
        return self.identity

    def _job_dir(self, job_id: int) -> Path:
        return self.workdir / "jobs" / str(job_id)

    def job(self, job_id: int) -> Job:
        """Re-attach to a job by id: its history so far comes back and, if it still runs, keeps filling."""
        if job_id in self._jobs:
            return self._jobs[job_id]
        info = self._client.run(job_id)
        store = self._job_dir(job_id)
        if info is None and not (store / "events.jsonl").exists():
            raise JobNotFound(job_id, self.address)
        existing = _OPEN_JOBS.get(store.resolve())
        if existing is not None:  # one follower per job folder in a process: events are written once
            self._jobs[job_id] = existing
            return existing
        # A run that finished while nobody watched still has its log at the hub: read the rest of it, then settle.
        job = Job(self._client, job_id, store, follow=info is not None)
        if info is None and not job.done:
            job._settle("failed", "the hub no longer knows this job; its history is what was recorded here")
        self._jobs[job_id] = job
        _OPEN_JOBS[store.resolve()] = job
        return job

    def resume(self, job_id: int) -> Job:
        """Continue a job that stopped with its hub (a crash, a restart) from its last released round.

        The hub keeps the model it released after every round; the new job starts from it with the same plan and
        settings (so the same approvals hold at the sites) and runs the remaining rounds, numbered as in the
        original study, so the sites' per-round seeds are the same. Released rounds are not trained again. A site
        under differential privacy counts the study's spend once: for the round that was in flight when the hub
        stopped, it sends the update it already released again, at no cost. Its history starts with the original
        job's released rounds. FedAdam jobs cannot resume (their optimiser state lived in the hub).
        """
        import json

        from .errors import FlipError

        old = self.job(job_id)
        store = self._job_dir(job_id)
        try:
            source, spec = (store / "plan.py").read_text(), json.loads((store / "spec.json").read_text())
        except FileNotFoundError as err:
            raise FlipError(
                f"job {job_id} was not submitted from here ({store} has no plan): resume it where it was submitted"
            ) from err
        built = Plan.from_source(source, name=spec["name"], contract=spec["contract"]).build(spec["config"])
        if built.hash != spec["plan_hash"]:
            raise FlipError(f"job {job_id}'s plan no longer builds to its hash here; submit the study again")
        released = max(
            (int(e["round"]) for e in old.events if e["type"] == "aggregate" and e["phase"] == "train"), default=0
        )
        if not old.done:
            import httpx

            try:  # the restarted hub may still list the interrupted run as running
                self._client.stop_run(job_id)
            except httpx.HTTPError:
                pass
            old._settle("failed", "interrupted: the hub stopped; resumed as a new job")
        kept = [
            e
            for e in old.events
            if e["type"] not in ("job_started", "job_finished", "site_state") and int(e.get("round", 0)) <= released
        ]
        try:  # the study's first job: a resumed job may be resumed again
            study = int(json.loads((store / "study.json").read_text())["study"])
        except FileNotFoundError:
            study = job_id
        job = self._start(built, resume_from=job_id, study=study, history=kept)
        if (store / PLAN_LINES).exists():  # the same plan: its lines came from the same cells
            (job.store / PLAN_LINES).write_text((store / PLAN_LINES).read_text())
        return job

    def jobs(self) -> list[RunInfo]:
        """The hub's studies, oldest first (directory requests, which ``sites()`` starts, are not studies)."""
        return [run for run in self._client.list_runs() if run.fab_id != DIRECTORY_FAB_ID]

    def nodes(self) -> list[NodeInfo]:
        return self._client.list_nodes()

    def sites(self) -> list[dict[str, Any]]:
        """The hub's sites by their own names: node id, online, last seen. The names come from the sites
        (a directory request, asked again when a node is new or after ``flip_lab._directory.NAMES_TTL_S``); a site
        that did not answer is listed as ``node-ID``."""
        nodes = self.nodes()
        answers, own = self._answers(nodes, NAMES_TTL_S), self._own_nodes()
        return [
            {
                "site": self._name(n.node_id, answers),
                "node_id": n.node_id,
                "online": n.status == "online",
                "last_seen": n.last_seen,
            }
            for n in nodes
            if n.node_id not in own
        ]

    def catalogue(self) -> dict[str, Any]:
        """Each online site's public catalogue, by site name: counts (small ones suppressed), modality, shapes,
        label classes; no identifiers. Read through the hub (a directory request), as the sites publish it."""
        return self._foreign_catalogues(self.nodes())[0]

    # -- sites this object did not start: asked through the hub ---------------------------------------
    def _own_nodes(self) -> set[int]:
        """Node ids of sites whose folders this object reads directly (a local federation's own sites)."""
        return set()

    def _answers(self, nodes: list[NodeInfo], max_age: float | None = None) -> Answers:
        online = {n.node_id for n in nodes if n.status == "online"} - self._own_nodes()
        return self._directory.answers(online, max_age) if online else Answers()

    def _name(self, node_id: int, answers: Answers) -> str:
        entry = answers.sites.get(node_id)
        if entry is None:
            return f"node-{node_id}"
        clash = [n for n, e in answers.sites.items() if e["site"] == entry["site"]]
        return entry["site"] if len(clash) == 1 else f"{entry['site']} (node {node_id})"

    def _foreign_catalogues(self, nodes: list[NodeInfo]) -> tuple[dict[str, Any], bool]:
        """The catalogues of the online sites asked through the hub, and whether every one of them answered."""
        online = [n.node_id for n in nodes if n.status == "online" and n.node_id not in self._own_nodes()]
        answers = self._answers(nodes)
        found = {self._name(n, answers): answers.sites[n]["catalogue"] for n in online if n in answers.sites}
        return found, len(found) == len(online)


def connect(
    address: str,
    *,
    root_certificates: str | bytes | None = None,
    workdir: str | Path | None = None,
    identity: str | Path | None = None,
    project: str = "",
) -> Federation:
    """Connect to a running hub (a FLIP hub is a Flower SuperLink) at ``host:port``.

    Beyond loopback, pass the federation's CA certificate (``root_certificates``) so traffic is encrypted.
    ``identity`` is your researcher folder from ``flip-lab provision`` (``DIR/researchers/ID``, or the
    ``FLIP_LAB_IDENTITY`` environment variable): every study is signed with it, and the hub and each site verify
    who sent it. ``project`` names the project the studies are signed for.
    """
    return Federation(address, root_certificates=root_certificates, workdir=workdir, identity=identity, project=project)

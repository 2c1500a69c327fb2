"""A real hub shows its hospitals: sites that joined it on their own are named, and their catalogues read, through it.

The hub is started alone (`flip-lab up --sites 0`); two sites are started separately with `flip-site run`, under the
secure default (manual approval), so nothing they answer needs a plan approved. The researcher asks the hub with a
directory request, a bundle that carries no plan and that the hub and the sites accept as FLIP's own kind.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import flip_lab
from flip_common.bundle import (
    BundleRefused,
    DirectoryRequest,
    PlanBundle,
    read_bundle,
)
from flip_lab import Plan, PlanError
from flip_lab._bundle import directory_bundle

PLANS = Path(__file__).parent / "plans"


def _with(fab: bytes, *, add: dict[str, bytes] | None = None, edit=None) -> bytes:
    """``fab`` rewritten: entries added, or ``edit(name, data)`` applied to each entry."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, edit(info.filename, data) if edit else data)
        for name, data in (add or {}).items():
            dst.writestr(name, data)
    return out.getvalue()


def _pyproject_edit(old: bytes, new: bytes):
    return lambda name, data: data.replace(old, new) if name == "pyproject.toml" else data


# -- the bundle: exactly FLIP's files and keys for its kind ----------------------------------------------------
def test_a_directory_request_is_read_as_flips_own_kind() -> None:
    assert read_bundle(directory_bundle()) == DirectoryRequest(run_config={"flip-request": "directory"})


@pytest.mark.parametrize(
    "fab",
    [
        pytest.param(_with(directory_bundle(), add={"plan.py": b"import os\n"}), id="an extra file"),
        pytest.param(_with(directory_bundle(), add={"evil.py": b"import os\n"}), id="a foreign file"),
        pytest.param(
            _with(
                directory_bundle(),
                edit=_pyproject_edit(b'flip-request = "directory"', b'flip-request = "directory"\nx = "1"'),
            ),
            id="an extra config key",
        ),
        pytest.param(
            _with(directory_bundle(), edit=_pyproject_edit(b'flip-request = "directory"', b'flip-request = "train"')),
            id="another request",
        ),
        pytest.param(
            _with(directory_bundle(), edit=_pyproject_edit(b'name = "flip-directory"', b'name = "other"')),
            id="another project name",
        ),
        pytest.param(
            _with(directory_bundle(), edit=_pyproject_edit(b"flip_lab.hub.server_app:app", b"evil:app")),
            id="foreign components",
        ),
    ],
)
def test_anything_but_exactly_a_directory_request_is_refused(fab: bytes) -> None:
    with pytest.raises(BundleRefused):
        read_bundle(fab)


def test_a_plan_cannot_pass_for_a_directory_request() -> None:
    from flip_lab._bundle import bundle

    built = Plan.from_file(PLANS / "tiny_plan.py").build({"rounds": 1})
    fab = bundle(built)
    assert isinstance(read_bundle(fab), PlanBundle)
    renamed = _with(fab, edit=_pyproject_edit(b'name = "flip-plan-', b'name = "flip-directory"\n#'))
    with pytest.raises(BundleRefused, match="flip-directory"):
        read_bundle(renamed)


# -- the site: answers with its name and public catalogue, nothing else, and records it -----------------------
def _site_executor(tmp_path: Path, monkeypatch, name: str = "north"):
    from flwr.supercore.task_identity import TaskIdentity

    from site_kernel.executor import Executor
    from site_kernel.settings import load_settings
    from site_kernel.site_folders import init_site

    for key, value in {"_run_id": 5, "_task_id": "t", "_node_id": 0}.items():  # as a task's process sets them
        monkeypatch.setattr(TaskIdentity, key, value)
    site = init_site(tmp_path / "site", name=name, hub="127.0.0.1:9093")  # the secure default: no plan may run
    return site, Executor(site, load_settings(site), "127.0.0.1:1")


def _query(op: str, message_type: str = "query"):
    from flwr.app import ConfigRecord, Message, RecordDict

    return Message(RecordDict({"config": ConfigRecord({"op": op})}), dst_node_id=3, message_type=message_type)


def test_a_site_answers_a_directory_request_with_its_public_catalogue_only(tmp_path, monkeypatch) -> None:
    from site_kernel.data import public_catalogue

    site, executor = _site_executor(tmp_path, monkeypatch)
    reply = executor.handle(_query("directory"), {}, directory_bundle(), 5)
    assert not reply.has_error()
    assert list(reply.content.keys()) == ["flip"]
    assert dict(reply.content.config_records["flip"]) == {
        "site": "north",
        "catalogue": json.dumps(public_catalogue(site), sort_keys=True),
    }
    audit = [json.loads(line) for line in (site / "audit.jsonl").read_text().splitlines()]
    assert [(e["event"], e["run_id"]) for e in audit] == [("directory_answered", 5)]


@pytest.mark.parametrize(("op", "message_type"), [("hello", "query"), ("directory", "train")])
def test_a_directory_bundle_carries_no_other_request(tmp_path, monkeypatch, op: str, message_type: str) -> None:
    _, executor = _site_executor(tmp_path, monkeypatch)
    reply = executor.handle(_query(op, message_type), {}, directory_bundle(), 5)
    assert reply.has_error() and reply.error.reason.startswith("bundle_refused: ")


def test_names_and_catalogues_from_sites_are_made_safe_to_show() -> None:
    from flip_lab._directory import clean_catalogue, clean_name

    assert clean_name("north\x1b[2Kgate") == "north\\x1b[2Kgate"
    cleaned = clean_catalogue({"datasets": {"d\u202e": {"modality": ["CT\x1b[1G"], "cases": 9, "x": object()}}})
    assert cleaned == {"datasets": {"d<U+202E>": {"modality": ["CT\\x1b[1G"], "cases": 9, "x": None}}}
    with pytest.raises(TypeError):
        clean_catalogue({"sites": []})


class _Hub:
    """A Control API stand-in whose every run answers like a hub with sites ``names`` (node id -> name)."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names, self.started = names, 0

    def start_run(self, fab: bytes) -> int:
        assert isinstance(read_bundle(fab), DirectoryRequest)
        self.started += 1
        return self.started

    def stream_logs(self, run_id: int, after: float = 0.0):
        lines = [
            {"type": "directory_site", "node_id": n, "site": name, "catalogue": {"datasets": {}}}
            for n, name in self.names.items()
        ] + [{"type": "directory_finished"}]
        yield "".join(f"FLIP-EVENT {json.dumps(e)}\n" for e in lines), 1.0


def test_the_directory_asks_again_only_for_a_new_node_or_when_too_old() -> None:
    from flip_lab._directory import Directory

    hub = _Hub({1: "north", 2: "south"})
    directory = Directory(hub, ttl=30)
    assert {n: e["site"] for n, e in directory.answers({1, 2}).sites.items()} == {1: "north", 2: "south"}
    directory.answers({1, 2})
    directory.answers({1})
    assert hub.started == 1
    hub.names[3] = "east"
    assert directory.answers({1, 2, 3}).sites[3]["site"] == "east" and hub.started == 2
    directory.answers({1, 2, 3}, max_age=0)
    assert hub.started == 3
    directory.answers({1, 2, 3, 4})  # node 4 does not answer: it is not asked about again on every call
    directory.answers({1, 2, 3, 4})
    assert hub.started == 4


# -- a real hub with two sites started on their own --------------------------------------------------------------
@pytest.fixture(scope="module")
def hub_and_sites(tmp_path_factory):
    from flip_lab.local import LocalFederation, _flower_env, stop_pids
    from site_kernel.site_folders import create_demo_sites

    root = tmp_path_factory.mktemp("directory")
    root.chmod(0o755)  # sandboxed site workers run as unprivileged users
    fed = LocalFederation.start(0, workdir=root / "hub")
    pids: list[int] = []
    try:
        site_dirs = create_demo_sites(root / "sites", n_sites=2, seed=0, hub=fed.address, approval="manual", scale=0.1)
        for site_dir in site_dirs:
            with open(site_dir / "daemon.log", "ab") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "site_kernel.cli", "run", str(site_dir)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    env=_flower_env(),
                )
            pids.append(proc.pid)
        deadline = time.monotonic() + 120
        while sum(n.status == "online" for n in fed.nodes()) < 2:
            assert time.monotonic() < deadline, f"the two sites did not come online: see {root / 'sites'}"
            time.sleep(0.5)
        yield fed, site_dirs
    finally:
        stop_pids(pids)
        fed.shutdown()


def _published(site_dir: Path) -> dict:
    from site_kernel.data import public_catalogue

    return json.loads(json.dumps(public_catalogue(site_dir), default=str))


@pytest.mark.e2e
def test_connect_names_the_sites_and_reads_their_catalogues(hub_and_sites, tmp_path) -> None:
    hub, site_dirs = hub_and_sites
    with flip_lab.connect(hub.address, workdir=tmp_path) as fed:
        started = time.monotonic()
        sites = fed.sites()
        print(f"directory request answered in {time.monotonic() - started:.2f} s")
        assert sorted(s["site"] for s in sites) == sorted(d.name for d in site_dirs)
        assert {s["node_id"] for s in sites} == {n.node_id for n in fed.nodes()}
        assert all(s["online"] for s in sites)
        assert fed.catalogue() == {d.name: _published(d) for d in site_dirs}
        assert not fed.jobs(), "a directory request is not a study"


@pytest.mark.e2e
def test_attach_shows_sites_it_did_not_start(hub_and_sites) -> None:
    hub, site_dirs = hub_and_sites
    fed = flip_lab.attach(hub.workdir)
    try:
        assert sorted(s["site"] for s in fed.sites()) == sorted(d.name for d in site_dirs)
        assert fed.catalogue() == {d.name: _published(d) for d in site_dirs}
    finally:
        fed.close()


@pytest.mark.e2e
def test_a_modality_no_site_offers_is_refused_at_submit_to_a_real_hub(hub_and_sites, tmp_path) -> None:
    hub, _ = hub_and_sites
    plan = Plan.from_file(PLANS / "tiny_plan.py")
    plan.contract = {**plan.contract, "modality": "PET"}
    with flip_lab.connect(hub.address, workdir=tmp_path) as fed:
        before = len(hub._client.list_runs())
        with pytest.raises(PlanError) as caught:
            fed.submit(plan, rounds=1)
        assert caught.value.name == "modality" and "the sites offer CT (" in str(caught.value)
        runs = hub._client.list_runs()
        assert len(runs) == before + 1 and runs[-1].fab_id == "flip-lab/flip-directory", (
            "the only run is the directory request: the study was never sent"
        )


@pytest.mark.e2e
def test_each_site_records_that_it_answered_and_sent_only_its_catalogue(hub_and_sites, tmp_path) -> None:
    from flip_lab._directory import ask

    hub, site_dirs = hub_and_sites
    answers = ask(hub._client)
    assert answers.wall_s < 15, f"a directory request took {answers.wall_s} s"
    assert sorted(entry["site"] for entry in answers.sites.values()) == sorted(d.name for d in site_dirs)
    for site_dir in site_dirs:
        audit = [json.loads(line) for line in (site_dir / "audit.jsonl").read_text().splitlines()]
        answered = [e for e in audit if e.get("event") == "directory_answered"]
        assert any(e.get("run_id") == answers.run_id for e in answered), audit[-3:]
        assert not [e for e in audit if e.get("event") in ("plan_submitted", "plan_pending")]


@pytest.mark.e2e
def test_the_side_panel_shows_a_real_hubs_sites_by_name_with_their_data(hub_and_sites, tmp_path) -> None:
    from flip_lab.server.manager import FederationManager
    from flip_lab.server.views import dataset_summary

    hub, site_dirs = hub_and_sites
    manager = FederationManager(tmp_path / "lab")
    try:
        manager.connect(hub.address)
        rows = {row["site"]: row for row in manager.sites()}
        assert set(rows) == {d.name for d in site_dirs}
        assert all(row["state"] == "online" for row in rows.values())
        assert {name: row["datasets"] for name, row in rows.items()} == {
            d.name: dataset_summary(_published(d)) for d in site_dirs
        }
        assert set(manager.catalogue()) == {d.name for d in site_dirs}
        assert not manager.jobs(), "a directory request is not a job"
    finally:
        manager.close()

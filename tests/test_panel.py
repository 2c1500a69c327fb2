"""``flip_lab.panel``: what the dispatch command runs in a notebook's kernel, tested on plain namespaces."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import flip_lab
from flip_lab.errors import FederationError, PlanError
from flip_lab.local import LocalFederation
from flip_lab.panel import dispatch, find_config, find_plan

PLANS = Path(__file__).parent / "plans"


@pytest.fixture(scope="module")
def plan():
    return flip_lab.Plan.from_file(PLANS / "tiny_plan.py")


def test_the_plan_named_plan_wins_over_other_plans(plan):
    other = flip_lab.Plan("other")
    assert find_plan({"other": other, "plan": plan}) is plan


def test_the_only_plan_is_found_whatever_its_name(plan):
    assert find_plan({"lesions": plan, "also_lesions": plan, "x": 1}) is plan


@pytest.mark.parametrize(
    "namespace, words",
    [
        ({}, "defines no flip_lab.Plan yet"),
        ({"plan": "not a plan", "_hidden": flip_lab.Plan("h")}, "defines no flip_lab.Plan yet"),
        (
            {"a": flip_lab.Plan("a"), "b": flip_lab.Plan("b")},
            r"several plans \(a, b\); name the one to dispatch `plan`",
        ),
    ],
)
def test_no_plan_or_an_ambiguous_one_says_what_to_do(namespace, words):
    with pytest.raises(PlanError, match=words):
        find_plan(namespace)


def test_study_settings_come_from_study_config_or_the_defaults():
    config, source = find_config({})
    assert config == {} and source.startswith("the defaults")
    assert find_config({"study_config": {"rounds": 4}})[0] == {"rounds": 4}
    with pytest.raises(PlanError, match="must be a dict of study settings"):
        find_config({"study_config": [("rounds", 4)]})


def test_without_study_config_dispatch_takes_the_settings_of_the_plans_last_submit(plan, monkeypatch):
    """A notebook that submits with keywords (fed.submit(plan, lr=3e-3, ...)) dispatches with those keywords,
    not with the defaults; a notebook's study_config still wins."""
    sent = []
    monkeypatch.setattr(flip_lab.Federation, "_start", lambda self, built: sent.append(built) or "job")
    monkeypatch.setattr(flip_lab.Federation, "_catalogues", lambda self: None)
    monkeypatch.setattr(flip_lab.Federation, "_signer", lambda self: None)  # nothing is sent, so nothing is signed
    fed = flip_lab.Federation("127.0.0.1:9", workdir="unused")
    try:
        fed.submit(plan, {"rounds": 2}, lr=3e-3, local_epochs=3)
    finally:
        fed.close()
    assert find_config({"plan": plan}, plan) == (
        {"rounds": 2, "lr": 3e-3, "local_epochs": 3},
        "the plan's last fed.submit in this notebook",
    )
    assert find_config({"plan": plan, "study_config": {"rounds": 5}}, plan)[0] == {"rounds": 5}


def test_dispatch_without_a_federation_says_to_connect_first(plan):
    with pytest.raises(PlanError, match="not connected to a federation"):
        dispatch(namespace={"plan": plan})


def test_dispatch_to_a_folder_without_a_federation_names_the_folder(plan, tmp_path):
    with pytest.raises(FederationError, match=f"no running federation in {tmp_path}"):
        dispatch(workdir=str(tmp_path), namespace={"plan": plan})


def test_dispatch_submits_the_plan_with_study_config_and_prints_the_job_id(plan, tmp_path, monkeypatch, capsys):
    """The real submission is exercised end to end by tests/test_lab_ui.py; here, only what dispatch hands over."""
    submitted = []

    class Recording:
        address = "127.0.0.1:9"

        def submit(self, plan, config):
            submitted.append((plan, config))
            return SimpleNamespace(id=42, rounds=4)

    monkeypatch.setattr(LocalFederation, "attach", classmethod(lambda cls, workdir: Recording()))
    job = dispatch(workdir=str(tmp_path), namespace={"plan": plan, "study_config": {"rounds": 4}})
    assert submitted == [(plan, {"rounds": 4})] and job.id == 42
    out = capsys.readouterr().out
    assert "as job 42 (4 rounds) to the hub at 127.0.0.1:9" in out
    assert "Settings from the notebook's `study_config`: rounds=4" in out


@pytest.fixture
def panel_store(tmp_path, monkeypatch):
    """A Jupyter server's state folder as its kernels see it, its panel running a local federation in WORKDIR."""
    from flip_lab.local import PANEL_CONNECTION, PANEL_ENV

    store = tmp_path / "lab"
    store.mkdir()
    (store / PANEL_CONNECTION).write_text('{"kind": "local", "workdir": "/panel/fed", "stopped": false}')
    monkeypatch.setenv(PANEL_ENV, str(store))
    started, attached = [], []

    def attach(cls, workdir):
        attached.append(str(workdir))
        state = {"hub_port": 9, "pids": [], "sites": {"a": "/a", "b": "/b"}, "site_pids": {}}
        return LocalFederation(Path(workdir), state, owner=False)

    monkeypatch.setattr(LocalFederation, "attach", classmethod(attach))
    monkeypatch.setattr(LocalFederation, "start", classmethod(lambda cls, n, **kw: started.append((n, kw)) or "own"))
    return SimpleNamespace(path=store, started=started, attached=attached)


def test_a_notebook_in_lab_joins_the_federation_its_panel_runs(panel_store, capsys):
    fed = flip_lab.local_federation(3, scale=0.5)
    assert panel_store.attached == ["/panel/fed"] and not panel_store.started
    assert fed.joined and fed.address == "127.0.0.1:9"
    assert "Using the local federation of the FLIP Lab panel" in capsys.readouterr().out
    fed.close()


@pytest.mark.parametrize(
    "saved, kwargs",
    [
        (None, {}),  # papermill, plain Python, a Lab whose panel started nothing
        ('{"kind": "remote", "address": "hub:9093", "workdir": ""}', {}),
        ('{"kind": "local", "workdir": "/panel/fed", "stopped": true}', {}),
        ('{"kind": "local", "workdir": "/panel/fed", "stopped": false}', {"workdir": "/mine"}),
    ],
)
def test_a_notebook_starts_its_own_federation_when_the_panel_runs_none_or_a_folder_is_given(panel_store, saved, kwargs):
    from flip_lab.local import PANEL_CONNECTION

    if saved is None:
        (panel_store.path / PANEL_CONNECTION).unlink()
    else:
        (panel_store.path / PANEL_CONNECTION).write_text(saved)
    assert flip_lab.local_federation(2, **kwargs) == "own"
    assert panel_store.started == [(2, kwargs)] and not panel_store.attached


def test_shutdown_of_a_joined_federation_leaves_the_panels_running(monkeypatch, tmp_path):
    from flip_lab import local

    stopped = []
    monkeypatch.setattr(local.supervisor, "stop_pids", lambda pids, timeout=8.0: stopped.append(pids))
    (tmp_path / local.STATE).write_text("{}")
    fed = LocalFederation(tmp_path, {"hub_port": 9, "pids": [1], "sites": {}, "site_pids": {}}, owner=False)
    fed.joined = True
    fed.shutdown()
    assert not stopped and (tmp_path / local.STATE).exists()

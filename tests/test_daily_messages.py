"""Messages that tell the truth: each says what happened and what to do, and a mismatch is caught at submit."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_dryrun import CELLS as DRYRUN_CELLS
from test_dryrun import MISMATCH, line_of
from test_plan import notebook

import flip_lab
from flip_common.contract import validate_contract
from flip_lab import Job, Plan, PlanError
from flip_lab._offer import check_offered
from flip_lab.cli import main as flip_lab_main
from flip_lab.config import BUILTIN_STRATEGIES, validate
from flip_lab.errors import ConfigError, FederationError, JobFailed, NoModelReleased, PlanCheckFailed
from flip_lab.local import STATE, free_port

NOTEBOOKS = Path(__file__).parent / "notebooks"
RECORDED = NOTEBOOKS / "recorded_job"
CONTRACT = {
    "modality": ["CT", "MR"],
    "dims": 2,
    "size": [32, 32],
    "spacing": [6.0, 6.0],
    "intensity": {"kind": "zscore"},
    "labels": {"background": 0, "lesion": 1},
}
CATALOGUES = {  # what three demo sites publish, trimmed to the keys the check reads
    "st-aldhelm": {
        "datasets": {
            "default": {"modality": ["CT"], "task": "segmentation", "label_classes": [0, 1], "label_names": {}}
        }
    },
    "northgate": {
        "datasets": {
            "default": {
                "modality": ["MR"],
                "task": "segmentation",
                "label_classes": [0, 1],
                "label_names": {"1": ["Liver lesion"]},
            }
        }
    },
    "riverside": {
        "datasets": {
            "default": {"modality": ["CT"], "task": "segmentation", "label_classes": [0, 1], "label_names": {}}
        }
    },
}


def _job(tmp_path: Path, events: list[dict]) -> Job:
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return Job(None, 7, tmp_path, follow=False)  # type: ignore[arg-type]


# -- final_weights() says why there is no model --------------------------------------------------------
@pytest.mark.parametrize(
    ("events", "expected"),
    [
        ([], "job 7 has not started yet"),
        (
            [
                {"type": "job_started", "rounds": 3},
                {"type": "site_state", "site": "a", "round": 2, "state": "training"},
            ],
            "job 7 is still running (round 2 of 3): wait for it with job.wait()",
        ),
        (
            [{"type": "job_started", "rounds": 3}, {"type": "job_finished", "status": "cancelled", "message": "x"}],
            "job 7 was cancelled before any round was released",
        ),
        (
            [
                {"type": "job_started", "rounds": 3},
                {"type": "aggregate", "round": 1, "phase": "train", "metrics": {}},
                {"type": "job_finished", "status": "cancelled", "message": "x"},
            ],
            "job 7 was cancelled after round 1 of 3 was released",
        ),
    ],
)
def test_final_weights_of_a_job_without_a_model_says_why(tmp_path: Path, events: list[dict], expected: str) -> None:
    job = _job(tmp_path, events)
    with pytest.raises(NoModelReleased) as caught:
        job.final_weights()
    assert str(caught.value).startswith(expected) and "failed" not in str(caught.value)


# -- a failed job leads with the cause ----------------------------------------------------------------
def test_a_failed_job_leads_with_the_sites_errors(tmp_path: Path) -> None:
    error = "train() raised RuntimeError at plan.py line 9"
    job = _job(
        tmp_path,
        [
            {"type": "job_started", "rounds": 1},
            *(
                {
                    "type": "site_error",
                    "round": 1,
                    "phase": "train",
                    "site": site,
                    "kind": "plan_error",
                    "message": error,
                }
                for site in ("northgate", "riverside")
            ),
            {"type": "round_discarded", "round": 1},
            {
                "type": "job_finished",
                "status": "failed",
                "message": "0 accepted contributor(s), fewer than the minimum of 2: the round is discarded",
            },
        ],
    )
    with pytest.raises(JobFailed) as caught:
        job.wait(timeout=1)
    assert str(caught.value) == (
        f"job 7 failed: {error}, at site northgate (and 1 other site); as a result 0 accepted contributor(s), "
        "fewer than the minimum of 2: the round is discarded"
    )


def test_an_undefined_name_is_reported_at_its_own_line() -> None:
    ns = notebook(
        "import torch\nfrom flip_lab import Plan\nplan = Plan()\n"
        "@plan.model\ndef model():\n    layer = torch.nn.Linear(1, 1)\n    return layr\n"
    )
    plan = ns["plan"]
    for role in ("train", "evaluate"):
        plan.functions[role] = plan.functions["model"]
    with pytest.raises(PlanError) as caught:
        plan.source()
    assert caught.value.line == 7 and "'layr'" in str(caught.value)


# -- mismatches caught at submit ------------------------------------------------------------------------
def test_an_unknown_strategy_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        validate({"strategy": "fedavgg"})
    assert caught.value.key == "strategy" and "fedavg, fedprox" in str(caught.value)


def test_the_known_strategy_names_are_the_hubs() -> None:
    from flip_lab.hub.strategies import BUILTIN

    assert set(BUILTIN_STRATEGIES) == set(BUILTIN)


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        (
            {"modality": "PET"},
            "modality",
            ["modality 'PET'", "CT (riverside, st-aldhelm), MR (northgate)", "--modality PET"],
        ),
        ({"dataset": "liver_pet"}, "dataset", ["dataset 'liver_pet'", "default (northgate, riverside, st-aldhelm)"]),
        ({"labels": {"background": 0, "lesion": 1, "vessel": 2}}, "labels", ["'vessel' (2)", "change `labels`"]),
        ({"modality": "MR", "labels": {"background": 0, "cyst": 1, "liver lesion": 2}}, None, []),
        (
            {"task": "classification", "labels": {"normal": 0, "abnormal": 1}},
            "task",
            ["a classification dataset", "segmentation (northgate, riverside, st-aldhelm)"],
        ),
    ],
)
def test_a_contract_no_site_offers_is_named_by_key(change: dict, key: str | None, words: list[str]) -> None:
    contract = validate_contract({**CONTRACT, **change})
    if key is None:  # offered: a SEG segment named as the contract's label counts, whatever its value
        check_offered(contract, CATALOGUES)
        return
    with pytest.raises(PlanError) as caught:
        check_offered(contract, CATALOGUES)
    assert caught.value.name == key
    for word in words:
        assert word in str(caught.value)


# -- the command line and attach() ----------------------------------------------------------------------
def test_verify_of_a_failed_study_fails_and_names_the_cell(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from flip_lab.errors import FlipError
    from flip_lab.study import run_study

    root = tmp_path / "record"
    with pytest.raises(FlipError):
        run_study(NOTEBOOKS / "replay_study.ipynb", {"fail": True}, root)
    assert flip_lab_main(["study", "verify", str(root)]) == 1
    err = capsys.readouterr().err
    assert "every checksum matches, but the study failed at cell 4 (RuntimeError: stopped on purpose)" in err


def test_attach_to_a_federation_whose_hub_is_gone_says_so(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    site = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state = {
            "workdir": str(tmp_path),
            "pids": [gone.pid, site.pid],
            "hub_pid": gone.pid,
            "hub_port": free_port(),
            "hub_host": "127.0.0.1",
            "sites": {},
            "site_pids": {"a": site.pid},
        }
        (tmp_path / STATE).write_text(json.dumps(state))
        with pytest.raises(FederationError) as caught:
            flip_lab.attach(tmp_path)
        assert "has no running hub" in str(caught.value) and "flip-lab down --workdir" in str(caught.value)
    finally:
        site.kill()
        site.wait()


# -- on a real federation -------------------------------------------------------------------------------
PLANS = Path(__file__).parent / "plans"


@pytest.mark.e2e
def test_an_unknown_job_id_is_named_with_the_hub(federation) -> None:
    from flip_lab.errors import JobNotFound

    with pytest.raises(JobNotFound) as caught:
        federation.job(987654)
    assert str(caught.value) == (f"no job 987654 on the hub at {federation.address}; fed.jobs() lists the jobs there")


@pytest.mark.e2e
def test_a_modality_no_site_offers_is_refused_at_submit(federation) -> None:
    plan = Plan.from_file(PLANS / "tiny_plan.py")
    plan.contract = {**plan.contract, "modality": "PET"}
    before = len(federation.jobs())
    with pytest.raises(PlanError) as caught:
        federation.submit(plan, rounds=1)
    assert caught.value.name == "modality" and "the sites offer CT (" in str(caught.value)
    assert len(federation.jobs()) == before  # nothing was sent


@pytest.mark.e2e
def test_a_failed_job_is_listed_as_failed_and_says_why_first(federation) -> None:
    # check=False: the dry run would stop it here, and this is about how a failure at the sites reads
    job = federation.submit(Plan.from_file(PLANS / "raising_plan.py"), rounds=1, round_timeout=240, check=False)
    with pytest.raises(JobFailed) as caught:
        job.wait(timeout=600)
    # The plan's line stays at the site by default (error_line_numbers = false): the cause leads all the same.
    assert str(caught.value).startswith(f"job {job.id} failed: train() raised ValueError")
    assert "other site" in str(caught.value), "the three sites' one cause is named once"
    assert "; as a result " in str(caught.value)
    deadline = time.monotonic() + 60  # Flower records the run's end a moment after its last event
    while (status := {r.run_id: r.job_status for r in federation.jobs()}[job.id]) != "failed":
        assert status in ("running", "completed") and time.monotonic() < deadline, status
        time.sleep(0.5)


def _notebook_plan_that_flattens_images() -> tuple[Plan, str]:
    cells = DRYRUN_CELLS.replace('"modality": "MR"', '"modality": ["CT", "MR"]').replace(
        'logits = model(data.train_x[i:i + config["batch_size"]])', MISMATCH
    )
    return notebook(cells)["plan"], cells


@pytest.mark.e2e
def test_a_plan_that_would_fail_at_the_sites_fails_at_submit_and_nothing_is_sent(federation) -> None:
    plan, cells = _notebook_plan_that_flattens_images()
    before = len(federation.jobs())
    with pytest.raises(PlanCheckFailed) as caught:
        federation.submit(plan, rounds=1)
    assert caught.value.line == line_of(MISMATCH, cells) and MISMATCH in str(caught.value)
    assert len(federation.jobs()) == before


@pytest.mark.e2e
def test_a_plan_failing_at_the_sites_is_told_at_the_notebook_line_with_its_text(federation) -> None:
    plan, cells = _notebook_plan_that_flattens_images()
    policies = {
        site_dir / "policy.toml": (site_dir / "policy.toml").read_text() for site_dir in federation.site_dirs.values()
    }
    try:  # the sites name the plan's line only where their policy allows it
        for path, policy in policies.items():
            path.write_text(policy.replace("\nerror_line_numbers = false", "\nerror_line_numbers = true"))
        job = federation.submit(plan, rounds=1, round_timeout=240, check=False)  # past the dry run, to the sites
        with pytest.raises(JobFailed) as caught:
            job.wait(timeout=600)
    finally:
        for path, policy in policies.items():
            path.write_text(policy)
    assert all("at plan.py line " in e["message"] for e in job.errors if e["type"] == "site_error"), job.errors
    line = line_of(MISMATCH, cells)
    assert str(caught.value).startswith(
        f"job {job.id} failed: train() raised RuntimeError at a notebook cell, "
        f"line {line} (`{MISMATCH}`) in train(), at site "
    ), str(caught.value)


@pytest.mark.e2e
def test_sites_start_without_connection_warnings(federation) -> None:
    for site_dir in federation.site_dirs.values():
        log = (site_dir / "logs" / "site.log").read_text()
        assert "serving hub" in log and "Connection attempt failed" not in log
        assert "Connection attempt failed" not in (site_dir / "logs" / "supernode.log").read_text()


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.mark.e2e
def test_a_site_whose_hub_is_down_says_so_once_and_serves_when_it_comes(tmp_path: Path) -> None:
    from site_kernel.cli import main as flip_site_main

    port = free_port()
    hub = f"127.0.0.1:{port}"
    assert flip_site_main(["init", str(tmp_path / "site"), "--name", "s1", "--hub", hub]) == 0
    logs = tmp_path / "site" / "logs"

    def text(name: str) -> str:
        return (logs / name).read_text() if (logs / name).exists() else ""

    site = subprocess.Popen(
        [sys.executable, "-m", "site_kernel.cli", "run", str(tmp_path / "site")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(lambda: "waiting for the hub at" in text("supernode.log"), 60, text("supernode.log"))
        time.sleep(5)  # Flower retries after about 0.2, 0.9, 0.4 and 3 s: several retries, one line each log
        site_log, supernode_log = text("site.log"), text("supernode.log")
        assert site_log.count(f"waiting for the hub at {hub}: nothing answers there yet") == 1, site_log
        assert "serving hub" not in site_log, "a site whose hub is down does not claim to serve it"
        assert supernode_log.count(f"waiting for the hub at {hub}: it does not answer") == 1, supernode_log
        assert "Connection attempt failed" not in site_log + supernode_log

        assert flip_lab_main(["up", "--sites", "0", "--listen", hub, "--workdir", str(tmp_path / "hub")]) == 0
        try:
            _wait_for(lambda: f"site s1 serving hub {hub}" in text("site.log"), 60, text("site.log"))
            _wait_for(lambda: f"reached the hub at {hub} after" in text("supernode.log"), 60, text("supernode.log"))
        finally:
            flip_lab_main(["down", "--workdir", str(tmp_path / "hub")])
    finally:
        site.terminate()
        site.wait(timeout=30)


@pytest.mark.e2e
def test_a_hub_alone_listens_where_sites_look_by_default(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from flip_lab.local import _listening, read_state
    from site_kernel.settings import DEFAULT_HUB, SiteSettings

    assert SiteSettings(name="x").hub == DEFAULT_HUB == "127.0.0.1:9093"
    taken = _listening(9093)  # another hub on this machine: then the hub says where it went instead
    try:
        assert flip_lab_main(["up", "--sites", "0", "--workdir", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        address = read_state(tmp_path)["hub_address"]
        if taken:
            assert (
                address != DEFAULT_HUB
                and f"{DEFAULT_HUB}, where sites look for their hub by default, was taken" in out
                and f"flip-site init SITE --hub {address}`" in out
            )
        else:
            assert address == DEFAULT_HUB and "a site joins with `flip-site init SITE`, then" in out
    finally:
        flip_lab_main(["down", "--workdir", str(tmp_path)])

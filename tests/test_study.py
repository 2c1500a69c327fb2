"""Studies: papermill runs with checked parameters, run records that verify, and partial records on failure."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flip_lab import Job
from flip_lab.cli import main
from flip_lab.study import (
    RECORD_ENV,
    StudyCellError,
    StudyParameterError,
    check_parameters,
    parse_cli_value,
    record,
    run_study,
    seal,
    verify_record,
)

NOTEBOOKS = Path(__file__).parent / "notebooks"
STUDY = NOTEBOOKS / "replay_study.ipynb"  # replays RECORDED as job `job_id`; `fail=True` stops it in cell 4
RECORDED = NOTEBOOKS / "recorded_job"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def study_record(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One record made through the command line, as a reviewer would; tests work on copies of it."""
    root = tmp_path_factory.mktemp("study") / "record"
    assert main(["study", "run", str(STUDY), "-p", "job_id", "21", "-p", "scale", "2", "--record", str(root)]) == 0
    return root


@pytest.fixture
def copy(study_record: Path, tmp_path: Path) -> Path:
    target = tmp_path / "record"
    shutil.copytree(study_record, target)
    return target


def test_the_record_holds_what_a_reviewer_needs(study_record: Path) -> None:
    job = study_record / "jobs" / "21"
    for name in ("MANIFEST.json", "status.json", "parameters.json", "notebook.ipynb", "environment.json"):
        assert (study_record / name).is_file(), name
    for name in (
        "plan.py",
        "spec.json",
        "governance.json",
        "events.jsonl",
        "history.csv",
        "history.json",
        "summary.json",
        "final_weights.safetensors",
        "plots/learning_curves.png",
        "plots/site_comparison.png",
        "plots/train_loss.png",
    ):
        assert (job / name).is_file(), name
    params = json.loads((study_record / "parameters.json").read_text())
    assert params == {"recorded": "recorded_job", "job_id": 21, "fail": False, "label": "replay", "scale": 2.0}
    assert json.loads((study_record / "status.json").read_text())["status"] == "completed"
    summary = json.loads((job / "summary.json").read_text())
    assert summary["model"]["sha256"] == sha256(job / "final_weights.safetensors")
    assert summary["final_metrics"]["aggregate"]["dice"] == pytest.approx(0.92892, abs=1e-5)
    governance = json.loads((job / "governance.json").read_text())
    spec = json.loads((RECORDED / "spec.json").read_text())
    assert governance["plan_hash"] == summary["plan_hash"] == spec["plan_hash"]
    assert {s["approval"] for s in governance["sites"].values()} == {"approved"}
    assert all(len(s["audit_head"]) == 64 for s in governance["sites"].values())
    packages = json.loads((study_record / "environment.json").read_text())["packages"]
    assert {"flip-lab", "flwr", "torch", "monai", "numpy"} <= set(packages)
    assert "site2,evaluate,dice" in (job / "history.csv").read_text()


def test_an_intact_record_verifies(study_record: Path, capsys: pytest.CaptureFixture) -> None:
    assert verify_record(study_record) == []
    assert main(["study", "verify", str(study_record)]) == 0
    assert "every checksum matches" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name", ["jobs/21/final_weights.safetensors", "jobs/21/history.csv", "notebook.ipynb", "parameters.json"]
)
def test_one_flipped_byte_is_found(copy: Path, name: str, capsys: pytest.CaptureFixture) -> None:
    path = copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    problems = verify_record(copy)
    assert problems == [f"{name}: sha256 differs from MANIFEST.json (changed after the record was written)"]
    assert main(["study", "verify", str(copy)]) == 1
    assert name in capsys.readouterr().err


def test_missing_and_added_files_are_found(copy: Path) -> None:
    (copy / "jobs" / "21" / "plots" / "train_loss.png").unlink()
    (copy / "extra.txt").write_text("added later")
    problems = verify_record(copy)
    assert "jobs/21/plots/train_loss.png: listed in MANIFEST.json but missing" in problems
    assert "extra.txt: not covered by MANIFEST.json (added after the record was sealed)" in problems


def test_a_plan_that_no_longer_gives_its_hash_is_found_even_when_resealed(copy: Path) -> None:
    plan = copy / "jobs" / "21" / "plan.py"
    plan.write_text(plan.read_text() + "\n# edited\n")
    seal(copy)
    assert verify_record(copy) == [
        (
            "jobs/21: plan.py and spec.json do not give the recorded plan hash "
            f"{json.loads((RECORDED / 'spec.json').read_text())['plan_hash'][:16]}…"
        )
    ]


def test_a_folder_without_manifest_is_not_a_record(tmp_path: Path) -> None:
    assert "has no MANIFEST.json" in verify_record(tmp_path)[0]


def test_a_failing_cell_leaves_a_partial_record_naming_it(tmp_path: Path) -> None:
    root = tmp_path / "record"
    with pytest.raises(StudyCellError) as caught:
        run_study(STUDY, {"fail": True}, root)
    err = caught.value
    assert (err.cell_index, err.ename, err.evalue, err.record) == (3, "RuntimeError", "stopped on purpose", root)
    assert "cell 4 (index 3" in str(err) and "`if fail:`" in str(err)
    status = json.loads((root / "status.json").read_text())
    assert status["status"] == "failed" and status["cell_index"] == 3 and status["ename"] == "RuntimeError"
    assert (root / "notebook.ipynb").is_file() and not (root / "jobs").exists()  # it stopped before record(job)
    assert (root / "environment.json").is_file()
    assert verify_record(root) == []


@pytest.mark.parametrize(
    ("parameters", "name", "expected"),
    [
        ({"job_id": "seven"}, "job_id", "expected int"),
        ({"fail": 1}, "fail", "expected bool"),
        ({"job_id": True}, "job_id", "expected int"),
        ({"label": 3}, "label", "expected str"),
        ({"rounds": 3}, "rounds", "no such parameter; it has fail, job_id, label, recorded, scale"),
    ],
)
def test_wrong_parameters_are_named(parameters: dict, name: str, expected: str) -> None:
    with pytest.raises(StudyParameterError) as caught:
        check_parameters(STUDY, parameters)
    assert caught.value.name == name and expected in str(caught.value)


def test_an_int_may_fill_a_float_parameter() -> None:
    assert check_parameters(STUDY, {"scale": 3}) == {"scale": 3.0}


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("job_id", "12", 12),
        ("scale", "0.5", 0.5),
        ("fail", "true", True),
        ("fail", "False", False),
        ("label", "12", "12"),
    ],
)
def test_command_line_values_take_the_defaults_type(name: str, text: str, value: object) -> None:
    assert parse_cli_value(STUDY, name, text) == value and type(parse_cli_value(STUDY, name, text)) is type(value)


def test_the_command_line_names_a_wrong_parameter(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["study", "run", str(STUDY), "-p", "job_id", "seven", "--record", str(tmp_path / "r")]) == 2
    assert "parameter 'job_id': expected int" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing ran


def test_record_outside_a_study_does_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RECORD_ENV, raising=False)
    shutil.copytree(RECORDED, tmp_path / "job")
    assert record(Job(None, 4, tmp_path / "job", follow=False)) is None  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job"]


def test_plain_papermill_gives_a_verifiable_record(tmp_path: Path) -> None:
    root = tmp_path / "record"
    env = {**os.environ, RECORD_ENV: str(root)}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "papermill",
            str(STUDY),
            str(tmp_path / "out.ipynb"),
            "-p",
            "job_id",
            "5",
            "--cwd",
            str(NOTEBOOKS),
            "--no-progress-bar",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    assert (root / "jobs" / "5" / "final_weights.safetensors").is_file()
    assert verify_record(root) == []

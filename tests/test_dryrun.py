"""The dry run before submit: a plan that would fail at every site fails in the notebook, at the researcher's own
cell and line, on synthetic data shaped as its contract says; and a site's "plan.py line N" is told back as the
cell and line the researcher wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_plan import notebook

from flip_common.contract import validate_contract
from flip_lab import Job, Plan
from flip_lab._dryrun import SAMPLES, synthetic_data
from flip_lab.errors import PlanCheckFailed, PlanCheckWarning
from flip_lab.federation import Federation
from flip_lab.job import PLAN_LINES

PLANS = Path(__file__).parent / "plans"
CELLS = """
import torch
import torch.nn.functional as F
from flip_lab import Plan

plan = Plan("cells", contract={"modality": "MR", "dims": 2, "size": [32, 32], "spacing": [2.0, 2.0],
                               "intensity": {"kind": "zscore"}, "labels": {"background": 0, "lesion": 1}})

@plan.model
def model():
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))

@plan.train
def train(model, data, config):
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"])
    for i in range(0, data.num_train, config["batch_size"]):
        logits = model(data.train_x[i:i + config["batch_size"]])
        loss = F.cross_entropy(logits, data.train_y[i:i + config["batch_size"]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"loss": loss.item()}

@plan.evaluate
def evaluate(model, data, config):
    with torch.no_grad():
        return {"loss": F.cross_entropy(model(data.test_x), data.test_y).item()}
"""
# Flattening the images for a conv net: the kind of shape mismatch that used to surface only at the sites.
MISMATCH = 'logits = model(data.train_x[i:i + config["batch_size"]].flatten(1))'


def line_of(text: str, source: str) -> int:
    return next(n for n, line in enumerate(source.splitlines(), 1) if text in line)


def mismatched() -> tuple[Plan, str]:
    cells = CELLS.replace('logits = model(data.train_x[i:i + config["batch_size"]])', MISMATCH)
    return notebook(cells)["plan"], cells


def test_a_good_plan_passes_and_leaves_the_notebooks_random_state() -> None:
    built = notebook(CELLS)["plan"].build({"rounds": 2})
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    built.check()
    assert torch.equal(torch.rand(3), expected)


def test_a_plan_file_passes() -> None:
    assert Plan.from_file(PLANS / "tiny_plan.py").check(rounds=2).spec["config"]["rounds"] == 2


def test_a_shape_mismatch_fails_here_at_the_cell_line_that_has_it() -> None:
    plan, cells = mismatched()
    with pytest.raises(PlanCheckFailed) as caught:
        plan.check()
    line = line_of(MISMATCH, cells)
    assert caught.value.role == "train" and caught.value.line == line
    assert str(caught.value).startswith(
        f"train() raised RuntimeError at {caught.value.cell}, line {line} (`{MISMATCH}`)"
    )
    assert "synthetic data" in str(caught.value) and "check=False" in str(caught.value)
    # The full traceback is the plan's own, and its frame is the researcher's cell, not the assembled plan.py.
    cause = caught.value.__cause__
    assert isinstance(cause, RuntimeError)
    frames = []
    tb = cause.__traceback__
    while tb is not None:
        frames.append((tb.tb_frame.f_code.co_filename, tb.tb_lineno))
        tb = tb.tb_next
    assert (plan.functions["train"].__code__.co_filename, line) in frames


def test_a_failing_plan_is_not_sent_and_check_false_sends_it(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = []
    monkeypatch.setattr(Federation, "_start", lambda self, built, **kw: sent.append(built) or "job")
    monkeypatch.setattr(Federation, "_catalogues", lambda self: None)  # no hub here to ask for its sites' catalogues
    fed = Federation("127.0.0.1:1", workdir="unused")
    plan, _ = mismatched()
    with pytest.raises(PlanCheckFailed):
        fed.submit(plan, rounds=1)
    assert sent == []
    assert fed.submit(plan, rounds=1, check=False) == "job" and len(sent) == 1


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ("return [loss.item()]", "train() returned a list, not a dict of metrics"),
        ('return {"loss": logits}', "train() returned metric 'loss' as a Tensor"),
    ],
)
def test_what_train_returns_is_checked_as_a_site_would(body: str, words: str) -> None:
    plan = notebook(CELLS.replace('return {"loss": loss.item()}', body))["plan"]
    with pytest.raises(PlanCheckFailed) as caught:
        plan.check()
    assert str(caught.value).startswith(words), str(caught.value)


def test_weights_train_changes_in_shape_are_refused() -> None:
    plan = notebook(CELLS.replace("opt.step()", "opt.step()\n        model[0].bias.data = torch.zeros(5)"))["plan"]
    with pytest.raises(PlanCheckFailed) as caught:
        plan.check()
    assert str(caught.value).startswith("after train() the model's '0.bias' has shape [5], not [4]")


def test_numbers_that_are_not_finite_on_made_up_data_are_said_not_refused() -> None:
    # Synthetic data can make a sound plan's numbers odd, and a plan can act on the data (the workshop's
    # poisoning plan): warn, and let the researcher decide.
    broken = 'model[0].weight.data.fill_(float("inf"))\n    return {"loss": float("nan")}'
    plan = notebook(CELLS.replace('return {"loss": loss.item()}', broken))["plan"]
    with pytest.warns(PlanCheckWarning) as caught:
        plan.check()
    assert str(caught[0].message).startswith(
        "on synthetic data train() returned 'loss' = nan; after train() the model's '0.weight' holds values that are "
        "not finite"
    )


@pytest.mark.parametrize(
    ("change", "label_shape", "values"),
    [
        ({}, [SAMPLES, 24, 16], {0, 1, 4}),
        ({"task": "classification", "labels": {"normal": 0, "a": 1, "b": 2}}, [SAMPLES], {0, 1, 2}),
    ],
)
def test_synthetic_data_is_shaped_as_a_site_hands_it(change: dict, label_shape: list, values: set) -> None:
    contract = validate_contract(
        {
            "modality": "CT",
            "dims": 2,
            "size": [24, 16],
            "spacing": [1.0, 1.0],
            "intensity": {"kind": "window", "center": 40, "width": 400},
            "labels": {"background": 0, "lesion": 1, "cyst": 4},
            **change,
        }
    )
    data = synthetic_data(contract)
    assert list(data.train_x.shape) == list(data.test_x.shape) == [SAMPLES, 1, 24, 16]
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert list(data.train_y.shape) == list(data.test_y.shape) == label_shape
    assert set(torch.cat([data.train_y.flatten(), data.test_y.flatten()]).tolist()) <= values
    assert float(data.train_x.min()) >= 0.0 and float(data.train_x.max()) <= 1.0  # a window maps to [0, 1]
    assert data.num_train == data.num_test == SAMPLES


# -- a site's "plan.py line N", told as the researcher wrote it --------------------------------------------
def test_each_plan_line_maps_back_to_the_cell_line_it_was_written_on() -> None:
    plan, cells = mismatched()
    built = plan.build({})
    lines = built.origins.lines()
    plan_line = line_of(MISMATCH, built.source)
    assert lines[str(plan_line)]["line"] == line_of(MISMATCH, cells)
    assert lines[str(plan_line)]["text"] == MISMATCH


def _failed_job(tmp_path: Path, message: str, plan_lines: dict) -> Job:
    (tmp_path / PLAN_LINES).write_text(json.dumps(plan_lines))
    events = [
        {"type": "job_started", "rounds": 1},
        *(
            {
                "type": "site_error",
                "round": 1,
                "phase": "train",
                "site": site,
                "kind": "plan_error",
                "message": f"{message} at site {site}",
            }
            for site in ("northgate", "riverside")
        ),
        {"type": "job_finished", "status": "failed", "message": "the round is discarded"},
    ]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return Job(None, 7, tmp_path, follow=False)  # type: ignore[arg-type]


def test_a_sites_plan_line_is_told_as_the_cell_line_with_its_text(tmp_path: Path) -> None:
    job = _failed_job(
        tmp_path,
        "train() raised RuntimeError at plan.py line 12 in train()",
        {"12": {"cell": "cell In[5]", "line": 7, "text": "logits = model(x.flatten(1))"}},
    )
    assert job.describe_failure() == (
        "train() raised RuntimeError at cell In[5], line 7 (`logits = model(x.flatten(1))`) in train(), at site "
        "northgate (and 1 other site); as a result the round is discarded"
    )


def test_the_shown_line_escapes_what_could_hide_or_move_text(tmp_path: Path) -> None:
    job = _failed_job(
        tmp_path,
        "train() raised ValueError at plan.py line 3 in train()",
        {"3": {"cell": "cell In[2]", "line": 3, "text": "x = 1  # \u202eevil\x1b[2K"}},
    )
    assert "(`x = 1  # <U+202E>evil\\x1b[2K`)" in job.describe_failure()


def test_a_line_the_lab_did_not_write_down_is_left_as_the_site_said(tmp_path: Path) -> None:
    job = _failed_job(
        tmp_path,
        "train() raised ValueError at plan.py line 99 in train()",
        {"3": {"cell": "cell In[2]", "line": 3, "text": "x = 1"}},
    )
    assert job.describe_failure().startswith("train() raised ValueError at plan.py line 99 in train(), at site")

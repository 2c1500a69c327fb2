"""``%%flip_plan`` in a real in-process IPython shell: capture across cells, and refusals in one clear line."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from IPython.core.interactiveshell import InteractiveShell

from flip_lab import Plan, PlanError
from flip_lab.magic import PlanRefused

EARLIER_CELL = """
import torch
import torch.nn.functional as F

HIDDEN = 4

def double(x):
    return x * 2

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, HIDDEN, 3, padding=1)

    def forward(self, x):
        return self.conv(x)
"""

PLAN_CELL = """%%flip_plan plan --name lesions
CONTRACT = {"modality": "MR", "dims": 2, "size": [16, 16]}

def model():
    return Net()

def train(model, data, config):
    return {"loss": float(double(config["lr"]))}
"""

EVALUATE_CELL = """%%flip_plan plan
def evaluate(model, data, config):
    return {"dice": 1.0}
"""


@pytest.fixture
def shell() -> Iterator[InteractiveShell]:
    ip = InteractiveShell.instance()
    ip.run_cell("%load_ext flip_lab.magic")
    yield ip
    ip.reset()


def run(shell: InteractiveShell, cell: str) -> object:
    return shell.run_cell(cell, store_history=True)


def test_functions_from_earlier_cells_are_captured(shell: InteractiveShell, capsys: pytest.CaptureFixture) -> None:
    assert run(shell, EARLIER_CELL).success
    assert run(shell, PLAN_CELL).success
    assert "still to define: evaluate" in capsys.readouterr().out
    assert run(shell, EVALUATE_CELL).success
    assert "ready to submit" in capsys.readouterr().out
    plan = shell.user_ns["plan"]
    assert isinstance(plan, Plan) and plan.name == "lesions"
    assert plan.contract == {"modality": "MR", "dims": 2, "size": [16, 16]}
    source = plan.source()
    for expected in (
        "class Net(torch.nn.Module):",
        "def double(x):",
        "HIDDEN = 4",
        "import torch",
        'return {"loss": float(double(config["lr"]))}',
    ):
        assert expected in source
    rebuilt = Plan.from_source(source, name="rebuilt")  # the assembled source runs on its own
    assert rebuilt.functions == {} and rebuilt.source() == source


def test_the_cell_runs_in_the_notebook_namespace(shell: InteractiveShell) -> None:
    run(shell, EARLIER_CELL)
    run(shell, PLAN_CELL)
    assert callable(shell.user_ns["model"]) and shell.user_ns["CONTRACT"]["dims"] == 2


@pytest.mark.parametrize(
    ("cell", "name", "advice"),
    [
        ("square = lambda x: x * x\n", "square", "def square"),
        (
            "def outer():\n    k = 3\n    def scaled(x):\n        return k * x\n    return scaled\nscaled = outer()\n",
            "scaled",
            "closure",
        ),
        ("import pandas\n", "pandas", "do not install"),
        ("", "undefined_helper", "is not defined"),
    ],
)
def test_what_cannot_travel_is_refused_by_name(
    shell: InteractiveShell, capsys: pytest.CaptureFixture, cell: str, name: str, advice: str
) -> None:
    run(shell, EARLIER_CELL)
    run(shell, cell)
    capsys.readouterr()
    result = run(shell, f"%%flip_plan plan\ndef model():\n    return {name}(Net())\n")
    assert isinstance(result.error_in_exec, PlanRefused) and isinstance(result.error_in_exec, PlanError)
    assert result.error_in_exec.name == name
    shown = capsys.readouterr()
    text = shown.out + shown.err
    assert f"'{name}'" in text and advice in text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1
    assert "plan" not in shell.user_ns  # nothing registered


def test_an_error_in_the_cell_itself_registers_nothing(shell: InteractiveShell, capsys: pytest.CaptureFixture) -> None:
    result = run(shell, "%%flip_plan plan\ndef model():\n    return None\nraise ValueError('bad setting')\n")
    assert isinstance(result.error_in_exec, PlanRefused)
    out = capsys.readouterr()
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.out + out.err)  # IPython colours its tracebacks
    assert "ValueError: bad setting" in text  # the researcher's own error, shown in full
    assert "the cell raised ValueError; nothing was registered on plan" in text
    assert "plan" not in shell.user_ns


def test_a_refused_function_leaves_the_plan_as_it_was(shell: InteractiveShell) -> None:
    run(shell, EARLIER_CELL)
    run(shell, PLAN_CELL)
    before = dict(shell.user_ns["plan"].functions)
    result = run(shell, "%%flip_plan plan\nimport pandas\ndef train(model, data, config):\n    return pandas.x\n")
    assert isinstance(result.error_in_exec, PlanRefused)
    assert shell.user_ns["plan"].functions == before


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ("%%flip_plan plan\nx = 1\n", "defines none of model(), train(), evaluate()"),
        ("%%flip_plan 2plan\ndef model():\n    return 1\n", "not a variable name"),
        ("%%flip_plan CONFIG\ndef model():\n    return 1\n", "already holds a dict"),
    ],
)
def test_misuse_is_explained(shell: InteractiveShell, cell: str, message: str) -> None:
    shell.user_ns["CONFIG"] = {"lr": 0.1}
    result = run(shell, cell)
    assert isinstance(result.error_in_exec, PlanRefused)
    assert message in str(result.error_in_exec)


def test_a_dry_run_failure_names_the_magic_cell_and_the_line_as_the_notebook_shows_them(
    shell: InteractiveShell,
) -> None:
    from flip_lab.errors import PlanCheckFailed

    run(shell, EARLIER_CELL)
    cell = PLAN_CELL.replace(
        '"size": [16, 16]}',
        '"size": [16, 16], "spacing": [1.0, 1.0], '
        '"intensity": {"kind": "zscore"}, "labels": {"background": 0, "lesion": 1}}',
    ).replace('return {"loss"', 'torch.ones(2, 3) @ data.train_x.flatten(1)\n    return {"loss"')
    number = shell.execution_count
    assert run(shell, cell).success
    assert run(shell, EVALUATE_CELL).success
    with pytest.raises(PlanCheckFailed) as caught:
        shell.user_ns["plan"].check()
    line = next(n for n, text in enumerate(cell.splitlines(), 1) if "flatten(1)" in text)
    assert (caught.value.cell, caught.value.line) == (f"cell In[{number}]", line)

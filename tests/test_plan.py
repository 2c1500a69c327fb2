"""Plan capture: what travels is source text that runs on its own, and what cannot travel is refused by name."""

from __future__ import annotations

import json
import textwrap
import types
from pathlib import Path

import pytest

from flip_lab import Plan, PlanError
from flip_lab.config import validate
from flip_lab.errors import ConfigError

PLANS = Path(__file__).parent / "plans"


def notebook(source: str) -> dict:
    """Execute ``source`` as if typed into notebook cells: functions land in a ``__main__``-like namespace.

    ``inspect.getsource`` needs a real file, as IPython provides through its cell cache.
    """
    import linecache

    filename = f"<ipython-input-{abs(hash(source))}>"
    text = textwrap.dedent(source)
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(text, filename, "exec"), namespace)
    return namespace


CELLS = """
import torch
import torch.nn.functional as F
from flip_lab import Plan

HIDDEN = 4
CONTRACT = {"modality": "MR", "dims": 2, "size": [32, 32], "spacing": [2.0, 2.0],
            "intensity": {"kind": "zscore"}, "labels": {"background": 0, "lesion": 1}}
plan = Plan("cells", contract=CONTRACT)

def helper(x):
    return x * 2

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, HIDDEN, 3)

    def forward(self, x):
        return self.conv(x)

@plan.model
def build():
    return Net()

@plan.train
def train(model, data, config):
    return {"loss": float(helper(1))}

@plan.evaluate
def evaluate(model, data, config):
    return {"loss": float(F.relu(torch.tensor(1.0)))}
"""


def test_capture_collects_helpers_classes_imports_and_constants():
    ns = notebook(CELLS)
    source = ns["plan"].source()
    assert "import torch\n" in source
    assert "import torch.nn.functional as F" in source
    assert "HIDDEN = 4" in source
    assert "def helper(x)" in source and "class Net(torch.nn.Module)" in source
    assert "@plan" not in source
    assert "model = build" in source
    module = types.ModuleType("site_side")
    exec(compile(source, "plan.py", "exec"), module.__dict__)  # runs on its own, as at a site
    assert module.train(None, None, {}) == {"loss": 2.0}


def test_build_declares_shapes_and_a_hash_that_changes_with_one_character():
    ns = notebook(CELLS)
    built = ns["plan"].build({"rounds": 1})
    assert built.spec["model_shapes"] == {"conv.weight": [4, 1, 3, 3], "conv.bias": [4]}
    other = Plan.from_source(built.source.replace("x * 2", "x * 3"), contract=ns["CONTRACT"]).build({"rounds": 1})
    assert other.hash != built.hash
    assert json.loads(json.dumps(built.spec)) == built.spec


@pytest.mark.parametrize(
    "cells, message",
    [
        (
            (
                "import torch\nfrom flip_lab import Plan\nplan = Plan()\nsquash = lambda x: x\n"
                "@plan.model\ndef model():\n    return squash(torch.nn.Linear(1, 1))\n"
            ),
            "'squash' (used by model) is a lambda",
        ),
        (
            (
                "import torch\nfrom flip_lab import Plan\nplan = Plan()\ndef make():\n    k = 3\n"
                "    def inner():\n        return torch.nn.Linear(k, 1)\n    return inner\nbuilt = make()\n"
                "@plan.model\ndef model():\n    return built()\n"
            ),
            "closure over local variable(s) k",
        ),
        (
            (
                "import torch\nfrom flip_lab import Plan\nplan = Plan()\n"
                "@plan.model\ndef model():\n    return undefined_thing(1)\n"
            ),
            "name 'undefined_thing' used in model() is not defined",
        ),
        (
            (
                "import torch\nimport pandas\nfrom flip_lab import Plan\nplan = Plan()\n"
                "@plan.model\ndef model():\n    return pandas.DataFrame()\n"
            ),
            "comes from 'pandas', which FLIP sites do not install",
        ),
        (
            (
                "import torch, threading\nfrom flip_lab import Plan\nplan = Plan()\nLOCK = threading.Lock()\n"
                "@plan.model\ndef model():\n    LOCK\n    return torch.nn.Linear(1, 1)\n"
            ),
            "cannot travel as source",
        ),
    ],
)
def test_what_cannot_travel_is_refused_by_name(cells, message):
    ns = notebook(cells)
    plan = ns["plan"]
    for role in ("train", "evaluate"):
        plan.functions.setdefault(role, plan.functions["model"])
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan.source()


def test_syntax_error_in_plan_source_reports_its_line():
    with pytest.raises(PlanError, match=r"line 3"):
        Plan.from_source("import torch\n\ndef model(:\n    pass\n")


def test_missing_role_names_the_decorator_to_use():
    plan = Plan()
    with pytest.raises(PlanError, match=r"@plan.train"):
        plan.source()


def test_plan_from_file_builds():
    built = Plan.from_file(PLANS / "tiny_plan.py").build({"rounds": 2, "seed": 3})
    assert built.spec["contract"]["size"] == [32, 32]
    assert built.spec["config"]["rounds"] == 2
    assert len(built.weights) > 0


@pytest.mark.parametrize(
    "settings, key",
    [
        ({"rounds": "3"}, "rounds"),
        ({"rounds": 0}, "rounds"),
        ({"lr": "fast"}, "lr"),
        ({"round_timeout": True}, "round_timeout"),
        ({"nonsense": 1}, "nonsense"),
    ],
)
def test_config_refuses_wrong_types_by_key(settings, key):
    with pytest.raises(ConfigError) as err:
        validate(settings)
    assert err.value.key == key


def test_config_fills_defaults_and_passes_fedprox_mu():
    cfg = validate({"strategy": "fedprox", "proximal_mu": 0.1, "lr": 1})
    assert cfg["lr"] == 1.0 and cfg["rounds"] == 3
    assert cfg["strategy_options"]["proximal_mu"] == 0.1

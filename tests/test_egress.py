"""Egress: exactly the model sent, finite allowlisted metrics, minimum cohort, safe errors."""

from __future__ import annotations

import numpy as np
import pytest

from site_kernel.egress import check_reply, describe_failure, failure_fields, safe_error
from site_kernel.policy import Limits, MetricRules, SitePolicy

CANARY = "SMITH^JOHN"
POLICY = SitePolicy(
    demo=False,
    approval="manual",
    allowed_strategies=("fedavg",),
    min_cohort=10,
    metrics=MetricRules(allow=("loss", "accuracy", "dice"), max_count=2),
    limits=Limits(),
    accept_weaker_isolation=False,
)
SHAPES = {"w": (2, 3), "b": (2,), "steps": ()}
DTYPES = {"w": "float32", "b": "float32", "steps": "int64"}


def arrays(**override):
    out = {
        "w": np.ones((2, 3), np.float32),
        "b": np.zeros(2, np.float32),
        "steps": np.array(3, np.int64),
    }
    out.update(override)
    return {k: v for k, v in out.items() if v is not None}


def check(reply_arrays="default", metrics=None, num_examples=50, policy=POLICY):
    return check_reply(
        sent_shapes=SHAPES,
        sent_dtypes=DTYPES,
        reply_arrays=arrays() if reply_arrays == "default" else reply_arrays,
        metrics={"loss": 0.5} if metrics is None else metrics,
        num_examples=num_examples,
        policy=policy,
    )


def test_a_proper_reply_is_released_with_clean_metrics():
    decision = check(metrics={"loss": np.float32(0.25), "accuracy": np.int64(1)})
    assert decision.allowed and decision.outcome == "released"
    assert decision.metrics == {"loss": 0.25, "accuracy": 1}
    assert type(decision.metrics["loss"]) is float and type(decision.metrics["accuracy"]) is int


def test_reply_without_arrays_is_checked_for_metrics_only():
    assert check(reply_arrays=None, metrics={"dice": 0.8}).allowed


@pytest.mark.parametrize(
    ("reply", "needle"),
    [
        (arrays(**{CANARY: np.zeros(1, np.float32)}), "not in the model sent"),
        (arrays(b=None), "lacks array(s) of the model sent: b"),
        (arrays(w=np.ones((3, 2), np.float32)), "`w` does not have the shape that was sent (2, 3)"),
        (arrays(w=np.ones((2, 3), np.float64)), "`w` is not of the dtype that was sent (float32)"),
        (arrays(w=np.full((2, 3), np.nan, np.float32)), "`w` contains NaN"),
        (arrays(b=np.array([1.0, np.inf], np.float32)), "`b` contains NaN or infinite"),
        (arrays(w=np.array([[CANARY] * 3] * 2, dtype=object)), "`w` is not a numeric array"),
        (arrays(w=[[1.0] * 3] * 2), "`w` is not a numeric array"),
        (arrays(w=np.zeros((2, 3), dtype=[(CANARY, "f4")])), "`w` is not a numeric array"),
    ],
)
def test_arrays_must_be_exactly_the_model_sent(reply, needle):
    decision = check(reply_arrays=reply)
    assert not decision.allowed and decision.outcome == "refused"
    assert needle in decision.reason and CANARY not in decision.reason


@pytest.mark.parametrize(
    ("metrics", "needle"),
    [
        ({CANARY: 1.0}, "not in this site's allowlist (allowed: loss, accuracy, dice)"),
        ({"loss": CANARY}, "`loss` is not a number"),
        ({"loss": True}, "`loss` is not a number"),
        ({"loss": np.bool_(True)}, "`loss` is not a number"),
        ({"loss": [1.0, 2.0]}, "`loss` is not a number"),
        ({"loss": float("nan")}, "`loss` is not finite"),
        ({"loss": float("inf")}, "`loss` is not finite"),
        (
            {"loss": 1.0, "accuracy": 1.0, "dice": 1.0},
            "carries 3 metrics; this site allows at most 2",
        ),
    ],
)
def test_metrics_must_be_finite_allowlisted_numbers(metrics, needle):
    decision = check(metrics=metrics)
    assert not decision.allowed and decision.outcome == "refused"
    assert needle in decision.reason and CANARY not in decision.reason


@pytest.mark.parametrize(("n", "allowed"), [(9, False), (10, True), (500, True)])
def test_replies_below_the_minimum_cohort_are_withheld(n, allowed):
    decision = check(num_examples=n)
    assert decision.allowed is allowed
    if not allowed:
        assert decision.outcome == "withheld" and "minimum cohort (10)" in decision.reason
        assert decision.metrics == {}


@pytest.mark.parametrize("n", [-1, 12.5, True, "50"])
def test_example_count_must_be_a_count(n):
    assert check(num_examples=n).outcome == "refused"


PLAN = """\
import torch

class DataLeak(Exception):
    pass

def helper(x):
    raise ValueError(f"patient {x}")

def train(model, data, config):
    return helper(data)

def evaluate(model, data, config):
    raise DataLeak(data)

def dynamic(model, data, config):
    raise type(data, (Exception,), {"__module__": "builtins"})()

def from_torch(model, data, config):
    return torch.zeros(2) @ torch.zeros(3)
"""


def run_plan(function, data=CANARY):
    namespace: dict = {}
    exec(compile(PLAN, "plan.py", "exec"), namespace)
    try:
        namespace[function](None, data, {})
    except Exception as exc:
        return exc
    raise AssertionError("the plan did not raise")


def test_safe_error_names_type_function_and_line_but_never_the_text():
    kind, message = safe_error("plan_error", run_plan("train"), plan_source=PLAN)
    assert (kind, message) == ("plan_error", "train() raised ValueError at plan.py line 7")


def test_plan_defined_exception_is_named_since_it_is_in_the_approved_source():
    _, message = safe_error("plan_error", run_plan("evaluate"), plan_source=PLAN)
    assert message == "evaluate() raised DataLeak at plan.py line 13" and CANARY not in message


def test_exception_type_made_up_at_run_time_is_not_named():
    _, message = safe_error("plan_error", run_plan("dynamic", data="SMITH_JOHN"), plan_source=PLAN)
    assert "SMITH_JOHN" not in message and message.startswith("dynamic() raised an Exception subclass")


def test_library_exception_is_described_by_its_builtin_base():
    exc = run_plan("from_torch")
    _, message = safe_error("plan_error", exc, plan_source=PLAN)
    assert message.startswith("from_torch() raised RuntimeError") and "plan.py line 19" in message
    assert str(exc) not in message


def test_without_source_only_builtin_names_are_shown():
    _, message = safe_error("plan_error", run_plan("evaluate"))
    assert message == "the plan raised an Exception subclass at plan.py line 13"


def test_error_outside_plan_code():
    _, message = safe_error("plan_error", KeyError(CANARY), plan_source=PLAN)
    assert message == "KeyError raised while running the plan"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"function": "train", "exc_type": "ValueError", "line": 7},
            "train() raised ValueError at plan.py line 7",
        ),
        (
            {"function": CANARY, "exc_type": "ValueError", "line": 7},
            "the plan raised ValueError at plan.py line 7",
        ),
        (
            {"function": "train", "exc_type": "SMITH_JOHN", "exc_base": "ValueError", "line": 7},
            "train() raised a ValueError subclass at plan.py line 7",
        ),
        (
            {
                "function": "train",
                "exc_type": "X",
                "exc_base": CANARY,
                "library": CANARY,
                "line": 7,
            },
            "train() raised a BaseException subclass at plan.py line 7",
        ),
        ({"function": "train", "exc_type": "OSError", "line": 4711}, "train() raised OSError"),
        ({"function": "train", "exc_type": "OSError", "line": "7"}, "train() raised OSError"),
    ],
)
def test_describe_failure_trusts_no_field_the_worker_sent(fields, expected):
    assert describe_failure("plan_error", plan_source=PLAN, **fields) == ("plan_error", expected)


def test_failure_fields_round_trip_through_describe_failure():
    fields = failure_fields(run_plan("train"))
    assert fields == {
        "function": "train",
        "exc_type": "ValueError",
        "exc_base": "ValueError",
        "library": None,
        "line": 7,
    }


def test_odd_kinds_become_plan_error():
    assert safe_error(CANARY, ValueError())[0] == "plan_error"

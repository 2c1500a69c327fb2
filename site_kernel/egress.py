"""The site's egress policy: the last check on everything that leaves the site after a plan ran.

:func:`check_reply` lets a reply out only when its arrays are exactly the model that was sent (same
keys, shapes and dtypes, finite values), its metrics are finite numbers named in the site's
allowlist, and it was computed on at least the policy's minimum cohort. Metrics the site composes
itself (:data:`SITE_METRICS`, such as the epsilon its differential privacy has spent) travel beside
the plan's: the plan's allowlist and count limit do not apply to them, and a plan may not use their
names. :func:`safe_error` turns an
exception from plan code into a kind and a message that carry no exception text. What the plan prints
never leaves: it stays in the site's log.

Reasons and messages name only what the site or the hub already knows (the keys of the model the hub
sent, allowlisted metric names, identifiers present in the approved plan source). Anything the plan
computed at run time, such as an extra key, an unknown metric name, a received shape or dtype, or an
exception message, could spell out patient data and is never echoed.

Example::

    decision = check_reply(sent_shapes=shapes, sent_dtypes=dtypes, reply_arrays=arrays,
                           metrics={"loss": 0.3}, num_examples=120, policy=policy)
    if not decision.allowed:
        send_error("egress_refused", decision.reason)
"""

from __future__ import annotations

import builtins
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any, Literal

import numpy as np

from flip_common.protocol import SITE_METRICS

from .policy import SitePolicy

Outcome = Literal["released", "withheld", "refused"]
# Libraries a failure message may name as an exception's origin: a fixed list, hence safe to print.
_LIBRARIES = ("torch", "numpy", "monai", "safetensors", "scipy", "sklearn", "pandas", "PIL")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class EgressDecision:
    """``allowed`` replies may leave with ``metrics`` (cleaned to plain ints and floats).

    ``outcome`` is ``"released"``, ``"withheld"`` (a valid reply over too few examples) or
    ``"refused"`` (the reply breaks the policy). ``reason`` is safe to send to the researcher and to
    write to the audit log.
    """

    allowed: bool
    outcome: Outcome
    reason: str
    metrics: dict[str, int | float] = field(default_factory=dict)


def check_reply(
    *,
    sent_shapes: Mapping[str, tuple[int, ...]],
    sent_dtypes: Mapping[str, str],
    reply_arrays: Mapping[str, Any] | None,
    metrics: Mapping[str, Any],
    num_examples: Any,
    policy: SitePolicy,
    site_metrics: Mapping[str, float] | None = None,
) -> EgressDecision:
    """Decide whether one reply may leave the site; ``reply_arrays=None``: no weights in it.

    ``metrics`` are the plan's; ``site_metrics`` (names from :data:`SITE_METRICS`) are the site's
    own and are added to the released metrics without counting against the plan's allowlist.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, Integral) or num_examples < 0:
        return _refused("the example count is not a non-negative integer")
    if reply_arrays is not None:
        problem = _check_arrays(sent_shapes, sent_dtypes, reply_arrays)
        if problem:
            return _refused(problem)
    cleaned, problem = _check_metrics(metrics, policy)
    if problem:
        return _refused(problem)
    for name, value in (site_metrics or {}).items():
        if name not in SITE_METRICS or not math.isfinite(float(value)):
            # The site's own code is at fault: refuse rather than send something unvetted.
            return _refused(f"the site's own metric `{name}` is unknown or not finite")
        cleaned[name] = float(value)
    if int(num_examples) < policy.min_cohort:
        return EgressDecision(
            False,
            "withheld",
            f"computed on fewer examples than this site's minimum cohort ({policy.min_cohort})",
        )
    return EgressDecision(True, "released", "", cleaned)


def _check_arrays(
    sent_shapes: Mapping[str, tuple[int, ...]],
    sent_dtypes: Mapping[str, str],
    arrays: Mapping[str, Any],
) -> str | None:
    extra = [k for k in arrays if k not in sent_shapes]
    if extra:
        return f"the reply carries {len(extra)} array(s) that were not in the model sent to this site"
    missing = sorted(k for k in sent_shapes if k not in arrays)
    if missing:
        return f"the reply lacks array(s) of the model sent: {', '.join(missing[:5])}"
    for key in sorted(sent_shapes):
        arr = arrays[key]
        want_shape, want_dtype = tuple(sent_shapes[key]), str(sent_dtypes.get(key, ""))
        if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "biufc":
            return f"array `{key}` is not a numeric array"
        if arr.shape != want_shape:
            return f"array `{key}` does not have the shape that was sent {want_shape}"
        if str(arr.dtype) != want_dtype:
            return f"array `{key}` is not of the dtype that was sent ({want_dtype})"
        if arr.dtype.kind in "fc" and not bool(np.isfinite(arr).all()):
            return f"array `{key}` contains NaN or infinite values"
    return None


def _check_metrics(metrics: Mapping[str, Any], policy: SitePolicy) -> tuple[dict[str, int | float], str | None]:
    rules = policy.metrics
    if not isinstance(metrics, Mapping):
        return {}, "metrics are not a name-to-number mapping"
    posing = sorted(SITE_METRICS & set(metrics))
    if posing:  # fixed names, hence safe to echo
        return {}, f"metric `{posing[0]}` is reserved for the site's own reporting"
    if len(metrics) > rules.max_count:
        return (
            {},
            f"the reply carries {len(metrics)} metrics; this site allows at most {rules.max_count}",
        )
    unknown = [k for k in metrics if k not in rules.allow]
    if unknown:
        allowed = ", ".join(rules.allow) or "none"
        return (
            {},
            f"{len(unknown)} metric name(s) are not in this site's allowlist (allowed: {allowed})",
        )
    cleaned: dict[str, int | float] = {}
    for name, value in metrics.items():
        if isinstance(value, bool | np.bool_) or not isinstance(value, Real):
            return {}, f"metric `{name}` is not a number"
        number = int(value) if isinstance(value, Integral) else float(value)
        if not math.isfinite(number):
            return {}, f"metric `{name}` is not finite"
        cleaned[name] = number
    return cleaned, None


def _refused(reason: str) -> EgressDecision:
    return EgressDecision(False, "refused", reason)


def safe_error(
    kind: str, exc: BaseException, *, plan_filename: str = "plan.py", plan_source: str | None = None
) -> tuple[str, str]:
    """Map an exception raised by plan code to ``(kind, message)`` that may leave the site.

    The message holds the exception's type, the plan function it came through and the line in the
    plan's source, never the exception's text (which may quote patient data). Names are shown only
    when they provably are builtins or appear in ``plan_source`` (the approved source), and line
    numbers only when they lie in it, so a plan cannot smuggle data out through a type or function
    name made up at run time. Without ``plan_source`` only builtin exception names are shown.

    >>> safe_error("plan_error", err, plan_source=src)
    ('plan_error', 'train() raised ValueError at plan.py line 12')
    """
    return describe_failure(
        kind,
        **failure_fields(exc, plan_filename=plan_filename),
        plan_source=plan_source,
        plan_filename=plan_filename,
    )


def failure_fields(exc: BaseException, *, plan_filename: str = "plan.py") -> dict[str, Any]:
    """The parts of an exception a site may describe.

    ``function`` is the plan function it came through, ``exc_type`` its class name, ``exc_base``
    the nearest builtin exception class, ``library`` its origin if a known library, ``line`` the
    innermost line in the plan.

    For the sandboxed worker to send to the executor. The worker ran plan code, so the executor must
    treat these fields as untrusted and pass them through :func:`describe_failure`, which checks
    each one again.
    """
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_filename == plan_filename or os.path.basename(code.co_filename) == plan_filename:
            frames.append((code.co_name, tb.tb_lineno))
        tb = tb.tb_next
    cls = type(exc)
    base = next((c.__name__ for c in cls.__mro__ if _is_builtin_exception(c.__name__, c)), "BaseException")
    top = str(cls.__module__).split(".")[0]
    return {
        "function": frames[0][0] if frames else None,
        "exc_type": cls.__qualname__,
        "exc_base": base,
        "library": top if top in _LIBRARIES else None,
        "line": frames[-1][1] if frames else None,
    }


def describe_failure(
    kind: str,
    *,
    function: Any = None,
    exc_type: Any = None,
    exc_base: Any = None,
    library: Any = None,
    line: Any = None,
    plan_source: str | None,
    plan_filename: str = "plan.py",
) -> tuple[str, str]:
    """Compose ``(kind, message)`` from :func:`failure_fields`, trusting none of them."""
    if not (isinstance(kind, str) and re.fullmatch(r"[a-z][a-z0-9_]{0,39}", kind)):
        kind = "plan_error"
    idents = set(_IDENT.findall(plan_source)) if plan_source is not None else set()
    if isinstance(exc_type, str) and (_is_builtin_exception(exc_type) or exc_type in idents):
        type_name = exc_type
    else:
        base = exc_base if isinstance(exc_base, str) and _is_builtin_exception(exc_base) else "BaseException"
        origin = f" from {library}" if library in _LIBRARIES else ""
        article = "an" if base[0] in "AEIOU" else "a"
        type_name = f"{article} {base} subclass{origin}"
    if function is None:
        return kind, f"{type_name} raised while running the plan"
    if function == "<module>":
        who = "the plan's top level"
    elif isinstance(function, str) and function in idents:
        who = f"{function}()"
    else:
        who = "the plan"
    n_lines = plan_source.count("\n") + 1 if plan_source is not None else 1_000_000
    valid_line = isinstance(line, int) and not isinstance(line, bool) and 1 <= line <= n_lines
    where = f" at {plan_filename} line {line}" if valid_line else ""
    return kind, f"{who} raised {type_name}{where}"


def _is_builtin_exception(name: str, cls: object = None) -> bool:
    # A class's __name__ and __module__ can be set to anything at run time: a name counts as builtin
    # only when the builtins module holds an exception class of that name (and, given a class, that
    # very class).
    found = getattr(builtins, name, None)
    is_exc = isinstance(found, type) and issubclass(found, BaseException)
    return is_exc and (cls is None or found is cls)

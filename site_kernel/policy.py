"""The site's governance policy: one TOML file per site, every key documented.

``SITE/policy.toml`` says who approves plans, which strategies the site joins, how many examples
must stand behind a reply, which metrics may leave, the sandbox's resource limits, that researcher
output stays at the site and, optionally, the differential privacy the site applies to its updates
(``[dp]``, see :mod:`site_kernel.privacy`) and the norm bound it enforces under secure aggregation
(``[secure_aggregation]``, see :mod:`site_kernel.secagg`). The shipped ``policy_default.toml`` documents every
key and supplies the value of any key a site leaves out (``[dp]`` and ``[secure_aggregation]`` excepted: they have no
defaults).
A site without a policy runs nothing (:class:`~site_kernel.errors.PolicyMissing`).

Example::

    policy = load_policy(site_dir)
    if not policy.allows_strategy("fedavg"): ...
    print(policy.label)     # "manual approval" or "automatic approval (demo only)"
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from .errors import PolicyError, PolicyMissing

POLICY_FILE = "policy.toml"
Approval = Literal["manual", "automatic"]
InitialWeights = Literal["any", "approved"]


@dataclass(frozen=True)
class Limits:
    """Resource limits for one sandboxed plan process (``[limits]`` in ``policy_default.toml``)."""

    memory_mb: int = 8192
    cpu_seconds: int = 3600
    processes: int = 64
    open_files: int = 256
    file_size_mb: int = 1024
    train_seconds: int = 3600
    evaluate_seconds: int = 900
    wall_seconds: int = 3600

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def phase_seconds(self, op: str) -> int:
        """The wall-clock limit of one phase: ``train``, ``evaluate``, or another (``wall_seconds``)."""
        own = {"train": self.train_seconds, "evaluate": self.evaluate_seconds}.get(op, self.wall_seconds)
        return min(own, self.wall_seconds)


@dataclass(frozen=True)
class MetricRules:
    """Which metric names may leave the site, and how many per reply."""

    allow: tuple[str, ...]
    max_count: int


@dataclass(frozen=True)
class DpRules:
    """Differential privacy the site applies to every update it sends (``[dp]``).

    ``clip_norm`` bounds the L2 norm of the update (trained minus received weights, over every
    floating tensor); Gaussian noise of standard deviation ``noise_multiplier * clip_norm`` is added
    to each coordinate; ``epsilon_budget`` caps the site's cumulative epsilon over all jobs at
    ``delta``. See :mod:`site_kernel.privacy` for what the epsilon means.
    """

    clip_norm: float
    noise_multiplier: float
    epsilon_budget: float
    delta: float

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip_norm


DP_KEYS = ("clip_norm", "noise_multiplier", "epsilon_budget", "delta")


@dataclass(frozen=True)
class SitePolicy:
    """A validated site policy. Build it with :func:`load_policy`, not by hand."""

    demo: bool
    approval: Approval
    allowed_strategies: tuple[str, ...]
    min_cohort: int
    metrics: MetricRules
    limits: Limits
    accept_weaker_isolation: bool
    source: Path | None = None
    dp: DpRules | None = None
    # [secure_aggregation] max_update_norm: the bound this site enforces on its own update under secure
    # aggregation (where the hub cannot screen updates); None: [dp]'s clip sets it, or the site refuses such jobs.
    secagg_max_update_norm: float | None = None
    # Run settings (see site_kernel.run_settings): bounds on what an approved plan may be run with.
    max_rounds: int = 100
    initial_weights: InitialWeights = "any"
    reapprove_on_settings_change: bool = False
    # [allowed_config]: train-config key -> {"min", "max"} or {"values"}; empty: no bound.
    allowed_config: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # error_line_numbers: whether a plan's error that leaves the site names the plan's line.
    error_line_numbers: bool = False
    # [jobs] concurrent: how many studies may hold a plan process at this site at once.
    concurrent_jobs: int = 2
    # [resources] devices: accelerators studies may use, e.g. ("cuda:0",); empty: the CPU only.
    devices: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """How the site's approval mode is shown in every status line."""
        return "automatic approval (demo only)" if self.approval == "automatic" else "manual approval"

    def allows_strategy(self, name: str) -> bool:
        return name.strip().lower() in {s.lower() for s in self.allowed_strategies}


def default_policy_text() -> str:
    """The documented default policy, exactly as shipped."""
    return resources.files(__package__).joinpath("policy_default.toml").read_text(encoding="utf-8")


def write_default_policy(site_dir: Path, *, demo: bool, overwrite: bool = False, min_cohort: int | None = None) -> Path:
    """Write the documented default policy to ``SITE/policy.toml`` and return its path.

    ``demo=True`` writes ``demo = true`` and ``approval = "automatic"``; everything else keeps its
    secure default. ``min_cohort`` replaces the default minimum cohort (the 3D demo's sites, whose examples are
    whole patients, hold fewer than 10 test patients). An existing policy is never replaced unless ``overwrite``
    is true.
    """
    path = Path(site_dir) / POLICY_FILE
    if path.exists() and not overwrite:
        raise PolicyError(f"{path} already exists; edit it, or remove it first to start from the defaults")
    text = default_policy_text()
    if min_cohort is not None:
        text = _replace_line(text, "min_cohort = 10", f"min_cohort = {int(min_cohort)}")
    if demo:
        text = _replace_line(text, "demo = false", "demo = true")
        text = _replace_line(text, 'approval = "manual"', 'approval = "automatic"')
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def load_policy(site_dir: Path) -> SitePolicy:
    """Read and validate ``SITE/policy.toml``.

    Raises :class:`PolicyMissing` when the file is absent and :class:`PolicyError` (with ``key``
    set) when a key is unknown or has the wrong type or value.
    """
    path = Path(site_dir) / POLICY_FILE
    if not path.is_file():
        raise PolicyMissing(
            f"this site has no {POLICY_FILE} ({path}): nothing runs until the data owner writes "
            "one; `flip-site policy init` writes a documented default"
        )
    try:
        given = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise PolicyError(f"{path} is not valid TOML ({err}); fix the file and try again") from err
    # [dp] has no defaults to merge with (there is no safe default for a privacy budget): it is
    # validated on its own, and the rest of the file as before.
    given = dict(given)
    dp = _dp_rules(given.pop("dp")) if "dp" in given else None
    # [secure_aggregation] likewise: its one key has no safe default (a bound suits one model, not all).
    secagg = _secagg_bound(given.pop("secure_aggregation")) if "secure_aggregation" in given else None
    # [allowed_config] likewise: its keys are the study's config keys, which no default can list.
    allowed = _allowed_config(given.pop("allowed_config")) if "allowed_config" in given else {}
    defaults = tomllib.loads(default_policy_text())
    policy = _build(_merge(defaults, given, prefix=""), source=path, dp=dp)
    policy = replace(policy, allowed_config=allowed)
    return replace(policy, secagg_max_update_norm=secagg) if secagg is not None else policy


def _merge(defaults: Mapping[str, Any], given: Mapping[str, Any], *, prefix: str) -> dict[str, Any]:
    """Overlay ``given`` on ``defaults``, refusing keys the defaults do not document."""
    merged = dict(defaults)
    for key, value in given.items():
        dotted = f"{prefix}{key}"
        if key not in defaults:
            known = ", ".join(sorted(defaults))
            raise PolicyError(f"policy.toml: unknown key `{dotted}` (known here: {known})", key=dotted)
        if isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                raise PolicyError(f"policy.toml: `{dotted}` must be a table ([{dotted}])", key=dotted)
            merged[key] = _merge(defaults[key], value, prefix=f"{dotted}.")
        else:
            merged[key] = value
    return merged


def _build(t: dict[str, Any], *, source: Path | None, dp: DpRules | None = None) -> SitePolicy:
    demo = _bool(t, "demo")
    approval = _choice(t, "approval", ("manual", "automatic"))
    if approval == "automatic" and not demo:
        raise PolicyError(
            'policy.toml: approval = "automatic" is allowed only with demo = true; a real site '
            'approves each plan by hand (approval = "manual")',
            key="approval",
        )
    if t["researcher_output"] != "keep":
        # "release" was documented once but never sent anything: refuse it rather than let a site believe it.
        raise PolicyError(
            f'policy.toml: `researcher_output` must be "keep" (got {t["researcher_output"]!r}); what a plan '
            "prints stays in the site's log (SITE/logs/) and is never sent to the researcher",
            key="researcher_output",
        )
    metrics, limits, sandbox = t["metrics"], t["limits"], t["sandbox"]
    return SitePolicy(
        demo=demo,
        approval=approval,  # type: ignore[arg-type]  # checked by _choice
        allowed_strategies=_names(t, "allowed_strategies"),
        min_cohort=_int(t, "min_cohort", minimum=1),
        metrics=MetricRules(
            allow=_names(metrics, "allow", prefix="metrics."),
            max_count=_int(metrics, "max_count", minimum=0, prefix="metrics."),
        ),
        limits=Limits(**{k: _int(limits, k, minimum=1, prefix="limits.") for k in Limits.__dataclass_fields__}),
        accept_weaker_isolation=_bool(sandbox, "accept_weaker_isolation", prefix="sandbox."),
        error_line_numbers=_bool(t, "error_line_numbers"),
        source=source,
        dp=dp,
        max_rounds=_int(t, "max_rounds", minimum=1),
        initial_weights=_choice(  # type: ignore[arg-type]  # checked by _choice
            t, "initial_weights", ("any", "approved")
        ),
        reapprove_on_settings_change=_bool(t, "reapprove_on_settings_change"),
        concurrent_jobs=_int(t["jobs"], "concurrent", minimum=1, prefix="jobs."),
        devices=_devices(t["resources"]),
    )


def _devices(section: Mapping[str, Any]) -> tuple[str, ...]:
    """``[resources] devices``: a list of distinct ``"cuda:N"`` names."""
    value = section["devices"]
    ok = isinstance(value, list) and all(
        isinstance(v, str) and v.startswith("cuda:") and v[5:].isdigit() and len(v[5:]) < 4 for v in value
    )
    if not ok or len(set(value)) != len(value):
        raise _wrong("resources.devices", 'a list of distinct GPU names such as ["cuda:0"]', value)
    return tuple(value)


def _allowed_config(section: Any) -> dict[str, dict[str, Any]]:
    """Validate ``[allowed_config]``: each key maps to ``{min, max}`` (numbers) or ``{values}``."""
    if not isinstance(section, dict):
        raise PolicyError("policy.toml: `allowed_config` must be a table ([allowed_config])", key="allowed_config")
    out: dict[str, dict[str, Any]] = {}
    for key, bound in section.items():
        dotted = f"allowed_config.{key}"
        values = bound.get("values") if isinstance(bound, dict) else None
        if isinstance(bound, dict) and set(bound) == {"values"} and isinstance(values, list):
            out[key] = {"values": list(bound["values"])}
            continue
        if isinstance(bound, dict) and bound and set(bound) <= {"min", "max"}:
            for end in bound:
                _number(bound, end, prefix=f"{dotted}.")
            out[key] = dict(bound)
            continue
        raise PolicyError(
            f"policy.toml: `{dotted}` must be {{min = A, max = B}} (either end may be left out) or "
            f"{{values = [...]}}, e.g. {key} = {{min = 0.0, max = 0.1}}",
            key=dotted,
        )
    return out


def _dp_rules(section: Any) -> DpRules:
    """Validate ``[dp]``: every key required, each a positive finite number (``delta`` below 1)."""
    if not isinstance(section, dict):
        raise PolicyError("policy.toml: `dp` must be a table ([dp])", key="dp")
    unknown = sorted(set(section) - set(DP_KEYS))
    if unknown:
        raise PolicyError(
            f"policy.toml: unknown key `dp.{unknown[0]}` (known here: {', '.join(DP_KEYS)})",
            key=f"dp.{unknown[0]}",
        )
    missing = [k for k in DP_KEYS if k not in section]
    if missing:
        raise PolicyError(
            f"policy.toml: [dp] needs `dp.{missing[0]}` too; a [dp] section sets all of "
            f"{', '.join(DP_KEYS)} (each is described in policy_default.toml)",
            key=f"dp.{missing[0]}",
        )
    values = {k: _positive(section, k, prefix="dp.") for k in DP_KEYS}
    if values["delta"] >= 1.0:
        raise _wrong("dp.delta", "a number strictly between 0 and 1", section["delta"])
    return DpRules(**values)


def _secagg_bound(section: Any) -> float | None:
    """Validate ``[secure_aggregation]``: only ``max_update_norm``, a positive finite number, optional."""
    if not isinstance(section, dict):
        raise PolicyError(
            "policy.toml: `secure_aggregation` must be a table ([secure_aggregation])", key="secure_aggregation"
        )
    unknown = sorted(set(section) - {"max_update_norm"})
    if unknown:
        raise PolicyError(
            f"policy.toml: unknown key `secure_aggregation.{unknown[0]}` (known here: max_update_norm)",
            key=f"secure_aggregation.{unknown[0]}",
        )
    if "max_update_norm" not in section:
        return None
    return _positive(section, "max_update_norm", prefix="secure_aggregation.")


# Hand-written checks rather than a schema library: TOML already yields native types, and these few
# isinstance tests (minding that bool is an int in Python) give messages that name the key and the
# expected type.
def _bool(t: Mapping[str, Any], key: str, *, prefix: str = "") -> bool:
    value = t[key]
    if not isinstance(value, bool):
        raise _wrong(prefix + key, "true or false", value)
    return value


def _int(t: Mapping[str, Any], key: str, *, minimum: int, prefix: str = "") -> int:
    value = t[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _wrong(prefix + key, f"an integer >= {minimum}", value)
    return value


def _positive(t: Mapping[str, Any], key: str, *, prefix: str = "") -> float:
    value = t[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _wrong(prefix + key, "a positive finite number", value)
    return float(value)


def _number(t: Mapping[str, Any], key: str, *, prefix: str = "") -> float:
    value = t[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _wrong(prefix + key, "a finite number", value)
    return float(value)


def _choice(t: Mapping[str, Any], key: str, options: tuple[str, ...], *, prefix: str = "") -> str:
    value = t[key]
    if value not in options:
        raise _wrong(prefix + key, " or ".join(f'"{o}"' for o in options), value)
    return str(value)


def _names(t: Mapping[str, Any], key: str, *, prefix: str = "") -> tuple[str, ...]:
    value = t[key]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _wrong(prefix + key, "a list of non-empty strings", value)
    return tuple(v.strip() for v in value)


def _wrong(key: str, expected: str, value: object) -> PolicyError:
    shown = repr(value) if isinstance(value, (bool, int, float, str)) else type(value).__name__
    return PolicyError(f"policy.toml: `{key}` must be {expected}, got {shown}", key=key)


def _replace_line(text: str, old: str, new: str) -> str:
    lines = text.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if line.strip() == old]
    if len(hits) != 1:  # the shipped file is ours: this guards edits to it, not user input
        raise AssertionError(f"policy_default.toml must contain the line {old!r} exactly once")
    lines[hits[0]] = lines[hits[0]].replace(old, new)
    return "".join(lines)

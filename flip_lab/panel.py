"""The kernel side of the side panel's "Dispatch plan" command.

The panel runs ``flip_lab.panel.dispatch(...)`` in the notebook's own kernel, so the plan is built from the
functions the researcher defined there, exactly as ``fed.submit(plan)`` in a cell would. Nothing here needs a
Jupyter server: it is plain notebook API.

The plan is the ``flip_lab.Plan`` named ``plan`` in the notebook, else the only ``Plan`` there. The study settings
are the notebook's own, as its submit cell would send them: the dict named ``study_config`` if the notebook has one
(keys: ``flip_lab.config.SCHEMA``), else those of the plan's last ``fed.submit`` in this kernel, else the defaults.
The message after a dispatch names the settings it used and where they came from.
"""

from __future__ import annotations

from typing import Any

from .errors import PlanError
from .plan import BuiltPlan, Plan

PLAN_NAME = "plan"
CONFIG_NAME = "study_config"


def find_plan(namespace: dict[str, Any]) -> Plan | BuiltPlan:
    """The plan to dispatch from a notebook's variables; ``PlanError`` says what to define when there is none."""
    named = namespace.get(PLAN_NAME)
    if isinstance(named, Plan | BuiltPlan):
        return named
    found = {
        name: value
        for name, value in namespace.items()
        if isinstance(value, Plan | BuiltPlan) and not name.startswith("_")
    }
    distinct = {id(value): name for name, value in found.items()}
    if len(distinct) == 1:
        return found[next(iter(distinct.values()))]
    if not distinct:
        raise PlanError(
            "this notebook defines no flip_lab.Plan yet: run the cells that create it "
            "(e.g. plan = flip_lab.Plan.from_file('my_plan.py')) and dispatch again"
        )
    names = ", ".join(sorted(distinct.values()))
    raise PlanError(f"this notebook defines several plans ({names}); name the one to dispatch `plan`")


def find_config(namespace: dict[str, Any], plan: Plan | BuiltPlan | None = None) -> tuple[dict[str, Any], str]:
    """The study settings to dispatch ``plan`` with and, in words, where they came from."""
    if CONFIG_NAME in namespace:
        config = namespace[CONFIG_NAME]
        if not isinstance(config, dict):
            raise PlanError(
                f"`{CONFIG_NAME}` must be a dict of study settings such as {{'rounds': 3}}, got {type(config).__name__}"
            )
        return dict(config), f"the notebook's `{CONFIG_NAME}`"
    submitted = getattr(plan, "submitted_settings", None)
    if submitted is not None:
        return dict(submitted), "the plan's last fed.submit in this notebook"
    return {}, (
        f"the defaults: define `{CONFIG_NAME} = {{'rounds': 3, 'lr': 1e-3, ...}}` in the notebook to choose them"
    )


def _settings_words(config: dict[str, Any]) -> str:
    shown = {
        key: config[key] for key in ("rounds", "strategy", "local_epochs", "lr", "batch_size", "seed") if key in config
    }
    return ", ".join(f"{key}={value!r}" for key, value in shown.items())


def dispatch(
    address: str = "", workdir: str = "", *, ca_file: str = "", namespace: dict[str, Any] | None = None
) -> Any:
    """Submit the notebook's plan to the federation the panel shows and print the job's id.

    ``workdir`` names a local federation's folder (``flip_lab.attach``); otherwise ``address`` is a hub
    (``flip_lab.connect``, with ``ca_file`` for TLS). ``namespace`` defaults to the notebook's variables.
    Returns the ``flip_lab.Job``.
    """
    from .federation import connect
    from .local import LocalFederation

    if namespace is None:
        namespace = _user_namespace()
    plan = find_plan(namespace)
    config, source = find_config(namespace, plan)
    if workdir:
        federation: Any = LocalFederation.attach(workdir)
    elif address:
        federation = connect(address, root_certificates=ca_file or None)
    else:
        raise PlanError("the panel is not connected to a federation: start the local one or connect to a hub")
    job = federation.submit(plan, config)
    rounds = f"{job.rounds} round{'s' if job.rounds != 1 else ''}" if job.rounds else "its rounds"
    settings = _settings_words(config)
    print(
        f"Dispatched plan '{plan.name}' as job {job.id} ({rounds}) to the hub at {federation.address}. "
        f"Settings from {source}{': ' + settings if settings else ''}. Follow it in the FLIP Lab panel."
    )
    return job


def _user_namespace() -> dict[str, Any]:
    try:
        from IPython import get_ipython
    except ImportError as err:
        raise PlanError("dispatch() without a namespace runs inside a notebook kernel") from err
    shell = get_ipython()
    if shell is None:
        raise PlanError("dispatch() without a namespace runs inside a notebook kernel; pass namespace=globals()")
    return shell.user_ns  # type: ignore[no-any-return]

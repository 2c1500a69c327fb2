"""Package a built plan as a Flower bundle (FAB).

A FAB carries text files only. The plan rides in the app's run config (``[tool.flwr.app.config]``), which Flower
hands to the hub's ServerApp and to every site's context as-is: ``flip-plan-source`` (the module text),
``flip-plan-spec`` (JSON: hash, contract, declared shapes, config) and ``flip-init-weights`` (base64 safetensors).
A study is signed by its researcher: three more keys (``flip-submission``, ``flip-signature``,
``flip-certificate``, see :mod:`flip_common.identity`). ``plan.py`` is included as a file too, for whoever reviews the
bundle by hand. A directory request
(``directory_bundle``) carries no plan at all, only its kind.
"""

from __future__ import annotations

import base64
import json
import re

import tomli_w

from flip_common.bundle import COMPONENTS, DIRECTORY_CONFIG, DIRECTORY_PROJECT, PUBLISHER
from flip_common.identity import Identity, sign

from ._flower import build_fab
from .plan import BuiltPlan


def bundle(
    plan: BuiltPlan,
    *,
    resume_from: int = 0,
    study: int = 0,
    identity: Identity | None = None,
    project: str = "",
) -> bytes:
    """The Flower bundle (FAB) of a plan; ``resume_from`` names a job whose last released round it continues, and
    ``study`` the first job of the study (sites count a study's privacy spend once, over all the jobs carrying it).
    With ``identity`` the study is signed (:func:`flip_common.identity.sign`): hub and sites refuse unsigned ones."""
    config = plan_config(plan, resume_from=resume_from, study=study)
    if identity is not None:
        config.update(sign(identity, config, project=project))
    return plan_fab(plan, config)


def plan_config(plan: BuiltPlan, *, resume_from: int = 0, study: int = 0) -> dict[str, str]:
    """A plan's run config, unsigned (``flip_common.bundle.CONFIG_KEYS``)."""
    return {
        "flip-plan-source": plan.source,
        "flip-plan-spec": json.dumps(plan.spec, sort_keys=True),
        "flip-init-weights": base64.b64encode(plan.weights).decode(),
        "flip-resume-from": str(resume_from),
        "flip-study": str(study),
    }


def plan_fab(plan: BuiltPlan, config: dict[str, str]) -> bytes:
    """The FAB that carries ``config`` (a plan's run config, signed or not) for ``plan``."""
    slug = re.sub(r"[^a-z0-9-]+", "-", plan.name.lower()).strip("-") or "plan"
    pyproject = _pyproject(f"flip-plan-{slug}", f"FLIP Lab plan {plan.name} ({plan.hash[:12]})", config)
    files = {
        "pyproject.toml": pyproject,
        "plan.py": plan.source.encode(),
        "README.md": f"# FLIP plan {plan.name}\n\nPlan hash: `{plan.hash}`\n".encode(),
    }
    return build_fab(files)


def directory_bundle() -> bytes:
    """The bundle of a directory request: each site answers it with its name and public catalogue, unapproved
    (no plan travels, so there is nothing to approve)."""
    files = {
        "pyproject.toml": _pyproject(DIRECTORY_PROJECT, "FLIP Lab directory request", dict(DIRECTORY_CONFIG)),
        "README.md": b"# FLIP directory request\n\nEach site answers with its name and public catalogue.\n",
    }
    return build_fab(files)


def _pyproject(name: str, description: str, config: dict[str, str]) -> bytes:
    return tomli_w.dumps(
        {
            "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
            "project": {
                "name": name,
                "version": "1.0.0",
                "description": description,
                "license": "Apache-2.0",
                "dependencies": [],
            },
            "tool": {"flwr": {"app": {"publisher": PUBLISHER, "components": dict(COMPONENTS), "config": config}}},
        }
    ).encode()

"""Package a built plan as a Flower bundle (FAB).

A FAB carries text files only. The plan rides in the app's run config (``[tool.flwr.app.config]``), which Flower
hands to the hub's ServerApp and to every site's context as-is: ``flip-plan-source`` (the module text),
``flip-plan-spec`` (JSON: hash, contract, declared shapes, config) and ``flip-init-weights`` (base64 safetensors).
``plan.py`` is included as a file too, for whoever reviews the bundle by hand.
"""

from __future__ import annotations

import base64
import json
import re

import tomli_w

from ._bundle_read import COMPONENTS, PUBLISHER
from ._flower import build_fab
from .plan import BuiltPlan


def bundle(plan: BuiltPlan, *, resume_from: int = 0, study: int = 0) -> bytes:
    """The Flower bundle (FAB) of a plan; ``resume_from`` names a job whose last released round it continues, and
    ``study`` the first job of the study (sites count a study's privacy spend once, over all the jobs carrying it)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", plan.name.lower()).strip("-") or "plan"
    pyproject = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": f"flip-plan-{slug}",
            "version": "1.0.0",
            "description": f"FLIP Lab plan {plan.name} ({plan.hash[:12]})",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": PUBLISHER,
                    "components": dict(COMPONENTS),
                    "config": {
                        "flip-plan-source": plan.source,
                        "flip-plan-spec": json.dumps(plan.spec, sort_keys=True),
                        "flip-init-weights": base64.b64encode(plan.weights).decode(),
                        "flip-resume-from": str(resume_from),
                        "flip-study": str(study),
                    },
                }
            }
        },
    }
    files = {
        "pyproject.toml": tomli_w.dumps(pyproject).encode(),
        "plan.py": plan.source.encode(),
        "README.md": f"# FLIP plan {plan.name}\n\nPlan hash: `{plan.hash}`\n".encode(),
    }
    return build_fab(files)

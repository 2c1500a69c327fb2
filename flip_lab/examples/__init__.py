"""Example plans. Each is a plain module defining ``CONTRACT``, ``model``, ``train`` and ``evaluate``, written as a
researcher would write them in a notebook; load one with ``flip_lab.Plan.from_file(path)``.
"""

from pathlib import Path

SEGMENTATION_PLAN = Path(__file__).with_name("segmentation_plan.py")

__all__ = ["SEGMENTATION_PLAN"]

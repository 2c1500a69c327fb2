"""The root of every error FLIP raises on purpose, on either side of the boundary.

The lab's errors (:mod:`flip_lab.errors`) and the site's (:mod:`site_kernel.errors`) derive from :class:`FlipError`, so
code that must not fail on a bad request (a site answering a hub, a panel rendering a job) catches one class.
"""

from __future__ import annotations

from typing import Literal

#: Whose action fixes an error: the researcher (the plan, its contract or settings) or the site's data owner.
FixedBy = Literal["researcher", "data_owner"]


class FlipError(Exception):
    """Root of every error FLIP raises on purpose."""

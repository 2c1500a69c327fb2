"""FLIP Lab's Jupyter server extension: the side panel's REST API and event stream over a ``FederationManager``.

The notebook API (``flip_lab``) never imports this package: papermill runs and plain Python have no server.
"""

from __future__ import annotations

from typing import Any

from .. import __version__


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .app import FlipLabApp

    return [{"module": "flip_lab.server", "app": FlipLabApp}]


__all__ = ["__version__", "_jupyter_server_extension_points"]

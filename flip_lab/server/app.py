"""The Jupyter server extension: one ``FederationManager`` and its event stream, configured from Jupyter's config.

Enabled by ``etc/jupyter/jupyter_server_config.d/flip_lab.json``; settings go in ``jupyter_server_config.py`` or on
the command line, e.g. ``jupyter lab --FlipLabApp.local_scale=0.3``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Float, Int, Unicode

from ..local import PANEL_ENV
from .handlers import routes
from .manager import FederationManager
from .stream import EventStream

log = logging.getLogger("flip_lab.server")


class FlipLabApp(ExtensionApp):
    """Serves the FLIP Lab side panel: REST and one event stream under ``/flip-lab/api``."""

    name = "flip_lab"
    load_other_extensions = True

    state_dir = Unicode(
        "",
        help="Folder for the panel's saved connection, its local federation and its job records "
        "(default: $FLIP_LAB_HOME/lab, i.e. ~/.flip-lab/lab).",
    ).tag(config=True)
    poll_interval = Float(
        2.0,
        help="Seconds between checks of the sites and the hub's job list while a panel is open "
        "(a panel may ask for its own interval between 1 and 60 s).",
    ).tag(config=True)
    local_scale = Float(
        1.0,
        help="Size of each simulated hospital in a local federation started from the panel "
        "(1.0 is the full demo; smaller starts faster).",
    ).tag(config=True)
    max_jobs = Int(20, help="How many of the hub's most recent jobs the panel lists.").tag(config=True)
    stop_local_on_exit = Bool(
        True,
        help="Stop the local federation started from the panel when the Jupyter server stops. If False it "
        "keeps running and the next server picks it up again.",
    ).tag(config=True)

    def initialize_settings(self) -> None:
        from ..federation import _default_home

        store = Path(self.state_dir).expanduser() if self.state_dir else _default_home() / "lab"
        # Kernels started by this server inherit the variable: `flip_lab.local_federation()` in a notebook joins
        # the panel's federation instead of starting a second one beside it.
        os.environ[PANEL_ENV] = str(store.absolute())
        self.manager = FederationManager(
            store,
            local_options={"scale": self.local_scale},
            max_jobs=self.max_jobs,
            stop_local_on_exit=self.stop_local_on_exit,
        )
        self.stream = EventStream(self.manager, poll_interval=self.poll_interval)
        self.settings.update({"flip_lab_manager": self.manager, "flip_lab_stream": self.stream})

    def initialize_handlers(self) -> None:
        self.handlers.extend(routes())

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        # A connection saved by an earlier server (a restart while a job runs) is picked up again in the
        # background, so the server starts at once even if the hub is slow to answer.
        self._restoring = asyncio.get_running_loop().create_task(self._restore())

    async def _restore(self) -> None:
        try:
            await asyncio.to_thread(self.manager.restore)
        except Exception as err:  # the panel shows "not connected"; the reason belongs in the log
            log.warning("FLIP Lab could not pick up its saved federation connection: %s", err)

    async def stop_extension(self) -> None:
        self.stream.close()
        await asyncio.to_thread(self.manager.close)

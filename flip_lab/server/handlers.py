"""Thin HTTP and WebSocket handlers over ``FederationManager``: parse the request, call the manager off the event
loop, translate its errors into JSON with a status code. Every handler requires an authenticated Jupyter user
(403 otherwise) and is authorised on the ``flip_lab`` resource.

    GET    /flip-lab/api/status              snapshot: connection, sites, jobs
    POST   /flip-lab/api/connect             {"address": "host:port", "ca_file"?} or {"workdir": DIR}
    POST   /flip-lab/api/disconnect
    POST   /flip-lab/api/local               {"sites": N}: starts in the background (202); progress on the stream
    DELETE /flip-lab/api/local               stop the local federation
    POST   /flip-lab/api/refresh             poll the hub now; returns the snapshot
    GET    /flip-lab/api/sites | catalogue | jobs
    POST   /flip-lab/api/jobs/ID/cancel
    WS     /flip-lab/api/events[?interval=S]  messages.StreamMessage, a snapshot first

A refused request answers with jupyter_server's JSON error body, ``{"message": ..., "reason": ...}``: ``message``
is for a person (never a traceback), ``reason`` a short word such as ``bad_request`` or ``unreachable``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar

from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import authorized, ws_authenticated
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from tornado import web, websocket

from ..errors import ConfigError, FederationError, FlipError, HubUnreachable
from .manager import FederationManager, PanelError
from .stream import EventStream, clamp_interval

AUTH_RESOURCE = "flip_lab"
T = TypeVar("T")
STATUS = {"bad_request": 400, "not_connected": 409, "busy": 409, "unknown_job": 404}


class ManagerHandler(APIHandler):
    auth_resource = AUTH_RESOURCE

    @property
    def manager(self) -> FederationManager:
        return self.settings["flip_lab_manager"]  # type: ignore[no-any-return]

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a manager method in a worker thread; its errors become JSON answers a person can read."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except PanelError as err:
            raise web.HTTPError(STATUS.get(err.reason, 400), str(err), reason=err.reason) from err
        except HubUnreachable as err:
            raise web.HTTPError(502, str(err), reason="unreachable") from err
        except FederationError as err:
            raise web.HTTPError(409, str(err), reason="federation") from err
        except (ConfigError, FlipError) as err:
            raise web.HTTPError(400, str(err), reason="bad_request") from err

    def body(self) -> dict[str, Any]:
        try:
            body = self.get_json_body() or {}
        except web.HTTPError:
            raise web.HTTPError(400, "the request body is not JSON", reason="bad_request") from None
        if not isinstance(body, dict):
            raise web.HTTPError(400, "the request body must be a JSON object", reason="bad_request")
        return body

    def reply(self, payload: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(payload))


class StatusHandler(ManagerHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply(self.manager.snapshot())


class RefreshHandler(ManagerHandler):
    @web.authenticated
    @authorized
    async def post(self) -> None:
        await self.call(self.manager.poll)
        self.reply(self.manager.snapshot())


class ConnectHandler(ManagerHandler):
    @web.authenticated
    @authorized
    async def post(self) -> None:
        body = self.body()
        fields = {key: body.get(key, "") for key in ("address", "workdir", "ca_file")}
        if not all(isinstance(v, str) for v in fields.values()):
            raise web.HTTPError(400, "address, workdir and ca_file must be strings", reason="bad_request")
        address = fields["address"].strip()
        self.reply(
            await self.call(
                self.manager.connect, address, workdir=fields["workdir"].strip(), ca_file=fields["ca_file"].strip()
            )
        )


class DisconnectHandler(ManagerHandler):
    @web.authenticated
    @authorized
    async def post(self) -> None:
        self.reply(await self.call(self.manager.disconnect))


class LocalHandler(ManagerHandler):
    @web.authenticated
    @authorized
    async def post(self) -> None:
        sites = self.body().get("sites", 2)
        self.reply(await self.call(self.manager.start_local, sites, wait=False), status=202)

    @web.authenticated
    @authorized
    async def delete(self) -> None:
        self.reply(await self.call(self.manager.stop_local))


class SitesHandler(ManagerHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply(self.manager.sites())


class CatalogueHandler(ManagerHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply(await self.call(self.manager.catalogue))


class JobsHandler(ManagerHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply(self.manager.jobs())


class CancelHandler(ManagerHandler):
    @web.authenticated
    @authorized
    async def post(self, job_id: str) -> None:
        self.reply(await self.call(self.manager.cancel, job_id))


class EventsHandler(WebSocketMixin, websocket.WebSocketHandler, JupyterHandler):  # type: ignore[misc]
    """The panel's event stream: a snapshot, then every change (``messages.StreamMessage``) as JSON text.

    ``WebSocketMixin`` brings Jupyter's origin check (no cross-site sockets) and keep-alive pings.
    """

    auth_resource = AUTH_RESOURCE

    @property
    def event_stream(self) -> EventStream:
        return self.settings["flip_lab_stream"]  # type: ignore[no-any-return]

    @ws_authenticated
    async def get(self, *args: Any, **kwargs: Any) -> None:
        allowed = await ensure_async(self.authorizer.is_authorized(self, self.current_user, "read", AUTH_RESOURCE))
        if not allowed:
            raise web.HTTPError(403)
        await super().get(*args, **kwargs)

    def open(self, *args: Any, **kwargs: Any) -> None:
        interval = clamp_interval(self.get_query_argument("interval", ""), self.event_stream.poll_interval)
        self.event_stream.add(self, interval)

    def on_message(self, message: str | bytes) -> None:
        # The only thing a panel says on this socket is "refresh"; anything else is ignored.
        if message == "refresh":
            self.event_stream.refresh_soon()

    def on_close(self) -> None:
        self.event_stream.remove(self)

    def send(self, text: str) -> None:
        try:
            self.write_message(text)
        except websocket.WebSocketClosedError:
            self.event_stream.remove(self)


def routes() -> list[tuple[str, type]]:
    api = "flip-lab/api"
    return [
        (f"{api}/status", StatusHandler),
        (f"{api}/refresh", RefreshHandler),
        (f"{api}/connect", ConnectHandler),
        (f"{api}/disconnect", DisconnectHandler),
        (f"{api}/local", LocalHandler),
        (f"{api}/sites", SitesHandler),
        (f"{api}/catalogue", CatalogueHandler),
        (f"{api}/jobs", JobsHandler),
        (rf"{api}/jobs/(\d+)/cancel", CancelHandler),
        (f"{api}/events", EventsHandler),
    ]

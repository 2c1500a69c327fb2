"""The server extension over HTTP and WebSocket, in a real ``jupyter server`` process on 127.0.0.1: every handler
refuses requests without a token, refusals come back as words, and the event stream carries a real job's rounds."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import websocket  # websocket-client, a dependency of jupyter_server
from _jupyter import Jupyter, start_jupyter

import flip_lab
from flip_common.net import free_port

PLANS = Path(__file__).parent / "plans"
API = "/flip-lab/api"
torch.set_num_threads(1)

ENDPOINTS = [
    ("GET", "status"),
    ("POST", "refresh"),
    ("POST", "connect"),
    ("POST", "disconnect"),
    ("POST", "local"),
    ("DELETE", "local"),
    ("GET", "sites"),
    ("GET", "catalogue"),
    ("GET", "jobs"),
    ("POST", "jobs/12/cancel"),
    ("GET", "events"),
]


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory):
    server = start_jupyter(tmp_path_factory.mktemp("jupyter"))
    yield server
    server.stop()


def call(jupyter: Jupyter, method: str, path: str, body: Any = None, *, token: bool = True) -> httpx.Response:
    return httpx.request(
        method,
        f"{jupyter.url}{API}/{path}",
        headers=jupyter.headers() if token else {},
        content=json.dumps(body) if body is not None else None,
        timeout=60,
    )


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class Stream:
    """The panel's side of the event stream, read on a thread of its own."""

    def __init__(self, jupyter: Jupyter, interval: float = 1) -> None:
        self.socket = websocket.create_connection(
            f"{jupyter.ws_url}{API}/events?interval={interval}",
            header=[f"Authorization: token {jupyter.token}"],
            timeout=5,
        )
        self.messages: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                text = self.socket.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketException, OSError):  # closed by either side: the test is done reading
                return
            if not text:
                return
            self.messages.append(json.loads(text))

    def connection_states(self) -> list[str]:
        return [m["connection"]["state"] for m in list(self.messages) if m["type"] in ("snapshot", "connection")]

    def close(self) -> None:
        self.socket.close()


@pytest.mark.parametrize("method, path", ENDPOINTS)
@pytest.mark.parametrize("token", ["", "wrong-token"])
def test_every_endpoint_refuses_requests_without_a_valid_token(jupyter, method, path, token):
    headers = {"Authorization": f"token {token}"} if token else {}
    if path == "events":
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(
                f"{jupyter.ws_url}{API}/events", header=[f"{k}: {v}" for k, v in headers.items()], timeout=5
            )
        assert refused.value.status_code == 403
        return
    response = httpx.request(method, f"{jupyter.url}{API}/{path}", headers=headers, timeout=10)
    assert response.status_code == 403


def test_a_cross_site_socket_riding_on_the_login_cookie_is_refused(jupyter):
    """A page on another site cannot open the stream with the researcher's browser cookie (token in a header is
    not at risk: another site cannot know it, which is why Jupyter checks the origin only for cookies)."""
    with httpx.Client(base_url=jupyter.url) as browser:
        browser.get("/login", params={"token": jupyter.token}, follow_redirects=True)
        cookie = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
    assert cookie, "logging in with the token sets a cookie"
    same = websocket.create_connection(
        f"{jupyter.ws_url}{API}/events", header=[f"Cookie: {cookie}"], origin=jupyter.url, timeout=5
    )
    assert json.loads(same.recv())["type"] == "snapshot"
    same.close()
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(
            f"{jupyter.ws_url}{API}/events", header=[f"Cookie: {cookie}"], origin="http://evil.example", timeout=5
        )
    assert refused.value.status_code == 403


@pytest.mark.parametrize(
    "method, path, body, status, reason, words",
    [
        ("POST", "connect", {"address": "127.0.0.1:PORT"}, 502, "unreachable", "cannot reach the FLIP hub"),
        ("POST", "connect", {}, 400, "bad_request", "either a hub address"),
        ("POST", "connect", {"address": 5}, 400, "bad_request", "must be strings"),
        ("POST", "connect", [1, 2], 400, "bad_request", "must be a JSON object"),
        ("POST", "local", {"sites": 99}, 400, "bad_request", "between 1 and 16 sites"),
        ("POST", "local", {"sites": "two"}, 400, "bad_request", "between 1 and 16 sites"),
        ("DELETE", "local", None, 409, "not_connected", "nothing to stop"),
        ("POST", "jobs/12/cancel", None, 409, "not_connected", "not connected to a federation"),
        ("GET", "catalogue", None, 409, "not_connected", "not connected to a federation"),
    ],
)
def test_refusals_are_json_with_a_sentence_and_no_traceback(jupyter, method, path, body, status, reason, words):
    if isinstance(body, dict) and body.get("address") == "127.0.0.1:PORT":
        body = {"address": f"127.0.0.1:{free_port()}"}
    response = call(jupyter, method, path, body)
    assert response.status_code == status
    answer = response.json()
    assert answer["reason"] == reason and words in answer["message"]
    assert "Traceback" not in response.text and not answer.get("traceback")


def test_status_starts_disconnected_and_the_stream_opens_with_a_snapshot(jupyter):
    assert call(jupyter, "GET", "status").json()["connection"]["state"] == "disconnected"
    stream = Stream(jupyter)
    try:
        first = wait_for(lambda: stream.messages[:1], 10, "the snapshot")[0]
        assert first["type"] == "snapshot" and first["connection"]["state"] == "disconnected"
    finally:
        stream.close()


def finished(stream: Stream, job_id: str) -> dict[str, Any] | None:
    return next(
        (
            m["event"]
            for m in list(stream.messages)
            if m["type"] == "job_event" and m["job_id"] == job_id and m["event"]["type"] == "job_finished"
        ),
        None,
    )


@pytest.mark.e2e
def test_a_local_federation_and_its_jobs_through_rest_the_stream_and_a_server_restart(tmp_path):
    """Start a federation over REST, follow a notebook's job on the stream, restart the server mid-job (the
    federation keeps running when so configured) and see the job through to its end from the new server."""
    keep = ["--FlipLabApp.stop_local_on_exit=False"]
    jupyter = start_jupyter(tmp_path / "jupyter", extra=keep)
    stream = Stream(jupyter)
    try:
        started = call(jupyter, "POST", "local", {"sites": 2})
        assert started.status_code == 202 and started.json()["state"] == "starting"
        assert call(jupyter, "POST", "local", {"sites": 2}).status_code == 409, "a second start is refused"
        wait_for(
            lambda: {"connected", "failed"} & set(stream.connection_states()), 180, "the local federation to start"
        )
        assert stream.connection_states()[-1] == "connected", call(jupyter, "GET", "status").text
        info = call(jupyter, "GET", "status").json()["connection"]
        assert info["kind"] == "local" and info["workdir"] == str(jupyter.local_workdir())
        sites = wait_for(
            lambda: [s for s in call(jupyter, "GET", "sites").json() if s["state"] == "online"], 30, "two sites online"
        )
        assert len(sites) == 2
        assert set(call(jupyter, "GET", "catalogue").json()) == {s["site"] for s in sites}

        notebook = flip_lab.attach(info["workdir"])  # as the dispatch command does in the notebook's kernel
        plan = flip_lab.Plan.from_file(PLANS / "tiny_plan.py")
        job_id = str(notebook.submit(plan, rounds=2, round_timeout=240).id)
        assert wait_for(lambda: finished(stream, job_id), 300, f"job {job_id} to finish")["status"] == "completed"
        events = [m["event"] for m in stream.messages if m["type"] == "job_event" and m["job_id"] == job_id]
        assert [e["round"] for e in events if e["type"] == "aggregate" and e["phase"] == "evaluate"] == [1, 2]
        listed = {j["id"]: j for j in call(jupyter, "GET", "jobs").json()}[job_id]
        assert (listed["status"], listed["round"], listed["rounds"]) == ("completed", 2, 2)
        again = call(jupyter, "POST", f"jobs/{job_id}/cancel")
        assert again.status_code == 200 and again.json()["status"] == "completed", "an ended job stays as it was"
        assert call(jupyter, "POST", "jobs/99/cancel").json()["reason"] == "unknown_job"

        # The server restarts while a longer job runs.
        long_id = str(notebook.submit(plan, rounds=25, round_timeout=240).id)
        wait_for(
            lambda: any(
                m["type"] == "job_event" and m["job_id"] == long_id and m["event"]["type"] == "aggregate"
                for m in list(stream.messages)
            ),
            120,
            "the long job's first round",
        )
        stream.close()
        jupyter.proc.terminate()
        jupyter.proc.wait(30)
        jupyter = start_jupyter(jupyter.root, extra=keep, port=jupyter.port)
        stream = Stream(jupyter)
        snapshot = wait_for(
            lambda: [m for m in stream.messages if m["type"] == "snapshot" and m["connection"]["state"] == "connected"],
            60,
            "the restored connection",
        )[-1]
        assert snapshot["connection"]["workdir"] == info["workdir"]
        wait_for(
            lambda: any(m.get("job", {}).get("id") == long_id for m in list(stream.messages)),
            30,
            "the running job to be listed again",
        )
        end = wait_for(lambda: finished(stream, long_id), 300, "the long job to finish after the restart")
        assert end["status"] == "completed"
        listed = {j["id"]: j for j in call(jupyter, "GET", "jobs").json()}[long_id]
        assert (listed["round"], len(listed["metrics"]["dice"])) == (25, 25), "no round lost across the restart"

        stopped = call(jupyter, "DELETE", "local")
        assert stopped.status_code == 200 and stopped.json()["state"] == "disconnected"
        wait_for(lambda: stream.connection_states()[-1] == "disconnected", 10, "the stream to say so")
    finally:
        stream.close()
        jupyter.stop()

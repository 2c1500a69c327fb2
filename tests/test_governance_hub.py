"""The hub runs only FLIP's own code: bundles are data; foreign or oversized ones are refused.

Each attack submits a bundle to a real hub (SuperLink + FLIP's runner) over the Control API, as
``flwr run`` would, and checks what a submitter could otherwise have done: run code at the hub, fake
a job's events, read the hub's TLS key.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from flip_common.bundle import MAX_PLAN_BYTES, BundleRefused, read_plan_bundle
from flip_lab._flower import ControlClient, build_fab
from flip_lab.cli import main as flip_lab_main
from flip_lab.local import LocalFederation, free_port, read_state
from flip_lab.provision import provision

SERVER_APP_WRITES = """
from pathlib import Path
from types import SimpleNamespace
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    {payload}
    forged = '{{"type":"job_finished","status":"completed","message":"forged"}}'
    print("FLIP-EVENT " + forged, flush=True)
    Path({marker!r}).write_text(text)
"""


def _pyproject(components: dict[str, str], publisher: str = "attacker", config: str = "") -> bytes:
    return (
        f'[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        f'[project]\nname = "evil"\nversion = "1.0.0"\ndependencies = []\n'
        f'[tool.flwr.app]\npublisher = "{publisher}"\n[tool.flwr.app.components]\n'
        + "".join(f'{k} = "{v}"\n' for k, v in components.items())
        + f"[tool.flwr.app.config]\n{config}"
    ).encode()


def _plain_flower_app(marker: Path, payload: str = "text = 'ran at the hub'") -> bytes:
    code = SERVER_APP_WRITES.format(payload=payload, marker=str(marker))
    return build_fab(
        {
            "pyproject.toml": _pyproject({"serverapp": "evil_app:app", "clientapp": "evil_app:app"}),
            "evil_app.py": code.encode(),
        }
    )


def _flip_lookalike(marker: Path, payload: str = "text = 'replaced FLIP'") -> bytes:
    """FLIP's component names, with the bundle's own flip_lab/hub/server_app.py to shadow FLIP's."""
    code = SERVER_APP_WRITES.format(payload=payload, marker=str(marker)).encode()
    return build_fab(
        {
            "pyproject.toml": _pyproject(
                {
                    "serverapp": "flip_lab.hub.server_app:app",
                    "clientapp": "flip_lab.hub.client_app:app",
                },
                publisher="flip-lab",
            ),
            "flip_lab/__init__.py": b"",
            "flip_lab/hub/__init__.py": b"",
            "flip_lab/hub/server_app.py": code,
        }
    )


def _deflated(files: dict[str, bytes]) -> bytes:
    """A bundle zipped by hand, as an attacker would (Flower's builder caps the zip at 10 MB)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return out.getvalue()


def _oversized_flip_plan(size: int) -> bytes:
    """A bundle shaped exactly like FLIP's whose plan unpacks to ``size`` bytes (kB compressed)."""
    source = "#" * size
    config = (
        f'flip-plan-source = "{source}"\nflip-plan-spec = "{{}}"\nflip-init-weights = ""\n'
        f'flip-resume-from = "0"\nflip-study = "0"\n'
    )
    return _deflated(
        {
            "pyproject.toml": _pyproject(
                {
                    "serverapp": "flip_lab.hub.server_app:app",
                    "clientapp": "flip_lab.hub.client_app:app",
                },
                "flip-lab",
                config,
            ),
            "plan.py": source.encode(),
            "README.md": b"# plan\n",
        }
    )


def _finished(client: ControlClient, run_id: int, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.run(run_id)
        if run is not None and run.status == "finished":
            return run
        time.sleep(0.25)
    raise AssertionError(f"run {run_id} did not finish within {timeout} s")


def _events(client: ControlClient, run_id: int) -> str:
    return "".join(text for text, _ in client.stream_logs(run_id))


def _refusals(hub_dir: Path) -> dict[int, str]:
    path = hub_dir / "refusals.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return {int(r["run_id"]): r["reason"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    fed = LocalFederation.start(0, workdir=tmp_path_factory.mktemp("hubfed"))
    client = ControlClient(fed.address)
    yield fed, client
    client.close()
    fed.shutdown()


@pytest.mark.e2e
def test_a_plain_flower_app_is_refused_and_never_runs_at_the_hub(hub, tmp_path):
    fed, client = hub
    marker = tmp_path / "ran"
    run = _finished(client, client.start_run(_plain_flower_app(marker)))
    assert run.job_status == "failed" and "refused by the hub" in run.details
    assert "components other than FLIP's" in run.details or "files are not exactly FLIP's" in run.details
    assert not marker.exists()
    assert run.run_id in _refusals(fed.workdir / "hub")
    assert "refused by the hub" in (fed.workdir / "hub" / "superlink.log").read_text(errors="replace")


@pytest.mark.e2e
def test_a_bundle_shadowing_flips_server_app_is_refused_and_forges_no_events(hub, tmp_path):
    fed, client = hub
    marker = tmp_path / "shadowed"
    run_id = client.start_run(_flip_lookalike(marker))
    run = _finished(client, run_id)
    assert run.job_status == "failed" and "files are not exactly FLIP's" in run.details
    assert not marker.exists()
    assert "FLIP-EVENT" not in _events(client, run_id)
    assert run_id in _refusals(fed.workdir / "hub")


@pytest.mark.e2e
def test_an_oversized_plan_is_refused_at_the_hub_naming_the_limit(hub):
    fed, client = hub
    fab = _oversized_flip_plan(50 << 20)
    assert len(fab) < 1 << 20, "the attack relies on the bundle being small on the wire"
    run = _finished(client, client.start_run(fab))
    assert run.job_status == "failed" and f"limit of {MAX_PLAN_BYTES} bytes" in run.details
    assert run.run_id in _refusals(fed.workdir / "hub")


@pytest.mark.e2e
def test_run_config_overrides_are_refused(hub):
    _, client = hub
    # a valid-looking plan shape is not needed: the override alone is reason enough, checked after
    # the files
    fab = _oversized_flip_plan(10)
    run = _finished(client, client.start_run(fab, override_config={"flip-study": "7"}))
    assert run.job_status == "failed" and "run-config overrides" in run.details


@pytest.mark.e2e
def test_the_side_panel_shows_a_refused_run_as_failed_with_the_reason_and_no_events(hub, tmp_path):
    from flip_lab.server.manager import FederationManager

    fed, client = hub
    run_id = str(client.start_run(_flip_lookalike(tmp_path / "shadowed")))
    manager = FederationManager(tmp_path / "lab")
    manager.connect(fed.address)
    try:
        deadline = time.monotonic() + 120
        job = None
        while time.monotonic() < deadline:
            manager.poll()
            job = next((j for j in manager.jobs() if j["id"] == run_id), None)
            if job is not None and job["status"] == "failed":
                break
            time.sleep(0.3)
        assert job is not None and job["status"] == "failed", job
        assert job["message"].startswith("refused by the hub:")
        assert job["round"] == 0 and job["rounds"] is None and not job["strategy"]
        assert not job["metrics"] and not job["site_states"]
    finally:
        manager.close()


def _tiny_built(**settings):
    from flip_lab import Plan

    return Plan.from_file(Path(__file__).parent / "plans" / "tiny_plan.py").build({"rounds": 1, **settings})


@pytest.mark.e2e
def test_an_unsigned_flip_plan_is_refused_at_the_hub(hub):
    from flip_lab._bundle import plan_config, plan_fab

    fed, client = hub
    built = _tiny_built()
    run = _finished(client, client.start_run(plan_fab(built, plan_config(built))))
    assert run.job_status == "failed" and run.details.startswith("refused by the hub: unsigned:"), run.details
    assert run.run_id in _refusals(fed.workdir / "hub")


@pytest.mark.e2e
def test_a_study_signed_outside_the_federation_or_altered_after_signing_is_refused_at_the_hub(hub, tmp_path):
    from flip_common.identity import SIGNATURE_KEYS, Identity, sign
    from flip_lab._bundle import bundle, plan_config, plan_fab
    from flip_lab.provision import Researcher, ensure_trust

    fed, client = hub
    stranger = Identity.load(ensure_trust(tmp_path / "elsewhere", Researcher("eve", "Eve", "Elsewhere", "company")))
    run = _finished(client, client.start_run(bundle(_tiny_built(), identity=stranger)))
    assert run.job_status == "failed" and run.details.startswith("refused by the hub: unknown_ca:"), run.details
    signed = plan_config(_tiny_built())
    signed.update(sign(fed.identity, signed))
    more = _tiny_built(rounds=5)
    replay = {**plan_config(more), **{k: signed[k] for k in SIGNATURE_KEYS}}
    run = _finished(client, client.start_run(plan_fab(more, replay)))
    assert run.job_status == "failed" and "altered" in run.details and "rounds 1 -> 5" in run.details
    assert run.run_id in _refusals(fed.workdir / "hub")


@pytest.mark.e2e
def test_a_study_signed_by_the_federations_researcher_is_admitted_by_the_hub(hub):
    from flip_lab._bundle import bundle

    fed, client = hub
    run_id = client.start_run(bundle(_tiny_built(connect_timeout=5), identity=fed.identity))
    log = fed.workdir / "hub" / "superlink.log"
    deadline = time.monotonic() + 120
    while f"run {run_id} signed by Local researcher" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the hub did not admit a signed study"
        time.sleep(0.25)
    client.stop_run(run_id)
    assert run_id not in _refusals(fed.workdir / "hub")


@pytest.fixture(scope="module")
def tls_hub(tmp_path_factory):
    """A hub with certificates, started as `flip-lab up --certs ... --workdir RELATIVE`."""
    root = tmp_path_factory.mktemp("tlsfed")
    port = free_port()
    prov = provision(root / "prov", hub_address=f"127.0.0.1:{port}", sites=["alpha"])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        code = flip_lab_main(
            [
                "up",
                "--sites",
                "0",
                "--listen",
                f"127.0.0.1:{port}",
                "--certs",
                "prov/hub",
                "--workdir",
                "fed",
            ]
        )
    try:
        assert code == 0
        state = read_state(root / "fed")
        assert state is not None
        client = ControlClient(state["hub_address"], root_certificates=prov.researcher_ca.read_bytes())
        yield root / "fed", prov, client
        client.close()
    finally:
        flip_lab_main(["down", "--workdir", str(root / "fed")])


@pytest.mark.e2e
def test_flip_lab_up_with_certs_starts_from_a_relative_workdir(tls_hub):
    workdir, _, client = tls_hub
    state = read_state(workdir)
    assert state is not None and state["workdir"] == str(workdir) and state["ca"]
    assert (workdir / "hub" / "superlink.db").exists()  # durable, as every hub with certificates
    client.list_runs()  # the hub answers over TLS


@pytest.mark.e2e
def test_a_bundle_cannot_read_the_tls_hubs_private_key(tls_hub, tmp_path):
    workdir, prov, client = tls_hub
    marker = tmp_path / "key"
    steal = (
        "import psutil\n    cmd = [a for p in psutil.process_iter(['cmdline']) for a in "
        "(p.info['cmdline'] or [])]\n"
        "    text = Path(cmd[cmd.index('--ssl-keyfile') + 1]).read_text()"
    )
    for fab in (_flip_lookalike(marker, steal), _plain_flower_app(marker, steal)):
        run = _finished(client, client.start_run(fab))
        assert run.job_status == "failed" and "refused by the hub" in run.details
        assert not marker.exists()
    key = (prov.hub / "hub.key").read_text()
    assert key not in (workdir / "hub" / "superlink.log").read_text(errors="replace")


@pytest.mark.e2e
@pytest.mark.skipif(os.geteuid() != 0, reason="a study drops its uid only on a hub run as root")
def test_a_study_process_cannot_read_the_hubs_key_or_secret(tls_hub):
    workdir, prov, _ = tls_hub
    hub_dir = workdir / "hub"
    probe = (
        "import sys\nfrom flip_lab.hub.study import _drop_privileges\n_drop_privileges()\n"
        "for path in sys.argv[1:]:\n    try:\n        open(path).read()\n"
        "    except PermissionError:\n        print('denied', path)\n"
    )
    paths = [str(prov.hub / "hub.key"), str(hub_dir / "runtime.secret")]
    out = subprocess.run(
        [sys.executable, "-I", "-c", probe, *paths],
        env={**os.environ, "FLIP_HUB_DIR": str(hub_dir)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == [f"denied {p}" for p in paths]


@pytest.mark.parametrize("size", [MAX_PLAN_BYTES + 1, 50 << 20])
def test_a_site_refuses_a_bundle_whose_plan_unpacks_beyond_the_limit(size):
    from site_kernel.executor import Executor, Refusal

    executor = Executor.__new__(Executor)  # only the bundle check, without a site's data and SuperNode
    executor.settings, executor._bundle = SimpleNamespace(name="alpha"), None
    with pytest.raises(Refusal, match=f"limit of {MAX_PLAN_BYTES} bytes") as refused:
        executor._read_plan({}, _oversized_flip_plan(size), run_id=1)
    assert refused.value.kind == "bundle_refused"


def test_an_oversized_bundle_is_refused_before_anything_is_unpacked():
    import tracemalloc

    fab = _oversized_flip_plan(50 << 20)  # 50 MB twice over: in plan.py and in the pyproject
    tracemalloc.start()
    try:
        with pytest.raises(BundleRefused, match="limit"):
            read_plan_bundle(fab)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"refusing a 50 MB plan took {peak >> 20} MiB"


@pytest.mark.parametrize("entry", ["pyproject.toml", "plan.py", "README.md"])
def test_every_entry_is_refused_beyond_its_own_cap(entry, monkeypatch):
    import flip_common.bundle as reader

    fab = _oversized_flip_plan(100)
    monkeypatch.setitem(reader.MAX_ENTRY_BYTES, entry, 3)
    with pytest.raises(BundleRefused, match=f"{entry}.*limit of 3 bytes"):
        read_plan_bundle(fab)


MARKUP = "<img src=x onerror=alert(1)> [click](http://evil.example) **loud** `x` | cell\n# heading"


def test_the_markdown_summary_shows_markup_from_events_as_text():
    from markdown_it import MarkdownIt

    from flip_lab.display import JobView, summary_markdown

    view = JobView.from_events(
        [
            {
                "type": "job_started",
                "rounds": 1,
                "strategy": "fedavg",
                "min_sites": 1,
                "sites": [],
                "plan_hash": "ab`<i>x</i>",
                "t": 0.5,
            },
            {
                "type": "site_error",
                "round": 1,
                "phase": "train",
                "site": "alpha<b>",
                "kind": "plan_error",
                "message": MARKUP,
                "t": 1.0,
            },
            {
                "type": "job_finished",
                "status": "failed",
                "message": MARKUP,
                "rounds_completed": 0,
                "t": 2.0,
            },
        ],
        job_id=12,
    )
    rendered = MarkdownIt("commonmark", {"html": True}).enable("table").render(summary_markdown(view))
    assert "<img" not in rendered and "<a " not in rendered and "<strong>loud" not in rendered
    assert "<h1>" not in rendered and "<b>" not in rendered and "<i>" not in rendered
    assert "&lt;img src=x onerror=alert(1)&gt;" in rendered and "[click](http://evil.example)" in rendered

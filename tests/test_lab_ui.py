"""The FLIP Lab panel in a real JupyterLab, driven in headless Chromium (Debian's, never a downloaded build).

One researcher's path: open Lab, open the panel, start a local federation of two sites from it, see them come
online and the line that attaches a notebook to them, run a notebook that defines a plan, dispatch it with the
notebook toolbar's command, open the job's live dashboard from the panel while it runs and watch its per-site curves
grow round by round in the notebook while the panel follows the job to its last round (both saying the same round),
see a notebook's local_federation() join the panel's federation, reload Lab (the panel comes back where it was,
with the job), and stop the federation. Screenshots go to test-artifacts/lab-ui/; the pictures of the panel and of
the dashboard become docs/images/panel.png and docs/images/dashboard.png (the README's) when there are none yet or
FLIP_LAB_UPDATE_SCREENSHOTS=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from _jupyter import Jupyter, start_jupyter

if TYPE_CHECKING:
    from playwright.sync_api import Locator

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts" / "lab-ui"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--disable-gpu",
]
PANEL = "#flip-lab-panel"

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


def start_lab(tmp_path: Path, port: int | None = None) -> Jupyter:
    """JupyterLab serving a folder with the dispatch notebook (which defines its plan); quiet about news and
    updates, and with the panel's sparkline set to the loss (the setting overrides the Dice it picks by default)."""
    root = tmp_path / "lab"
    root.mkdir(exist_ok=True)
    shutil.copy(REPO / "tests" / "notebooks" / "dispatch_demo.ipynb", root)
    settings = tmp_path / "lab-settings"
    for plugin, values in [
        ("@jupyterlab/apputils-extension/notification", {"fetchNews": "false", "checkForUpdates": False}),
        ("flip-lab/plugin", {"metric": "loss"}),
    ]:
        path = settings / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    return start_jupyter(
        root,
        app="lab",
        extra=["--LabApp.news_url=None"],
        port=port,
        env={"JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces")},
    )


@pytest.fixture
def lab(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed; run scripts/setup-browser")
    servers = [start_lab(tmp_path)]
    known = httpx.get(f"{servers[0].url}/lab/api/settings/flip-lab:plugin", headers=servers[0].headers(), timeout=30)
    if known.status_code != 200:
        servers[0].stop()
        pytest.fail(
            "JupyterLab does not know the flip-lab extension: install the package (pip install .) or link "
            "flip_lab/labextension into share/jupyter/labextensions/flip-lab, as ./run setup does"
        )
    yield servers
    for server in servers:
        server.stop()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(servers[-1].log, ARTIFACTS / "jupyter-lab.log")


def launch(pw, console_errors: list[str], page_errors: list[str]):
    browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1360, "height": 860}, device_scale_factor=2)
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page_errors.append(f"{e}\n{e.stack or ''}"))
    return browser, page


def test_researcher_starts_a_federation_dispatches_a_plan_and_watches_it_finish(lab: list[Jupyter]):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    console_errors: list[str] = []
    page_errors: list[str] = []
    t0 = time.monotonic()
    server = lab[0]
    with sync_playwright() as pw:
        browser, page = launch(pw, console_errors, page_errors)
        try:
            page.goto(f"{server.url}/lab/tree/dispatch_demo.ipynb?token={server.token}")
            expect(page.locator(".jp-NotebookPanel")).to_be_visible(timeout=90_000)
            expect(page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")).to_have_count(1, timeout=60_000)

            # The panel: open it from its tab in the left sidebar, start two simulated hospitals.
            page.locator("li[data-id='flip-lab-panel']").click()
            panel = page.locator(PANEL)
            expect(panel.get_by_text("Not connected")).to_be_visible()
            expect(panel.get_by_label("Number of simulated sites")).to_have_value("2")
            panel.get_by_role("button", name="Start local federation").click()
            started = time.monotonic()
            expect(panel.get_by_text("Starting the local federation")).to_be_visible(timeout=15_000)
            # No promised duration: the panel counts the seconds while the hospitals generate their data.
            expect(panel.get_by_text(re.compile(r"Starting the local federation · [0-9]+ s so far"))).to_be_visible()
            expect(panel).not_to_contain_text("about a minute")
            expect(panel.get_by_text("Local federation running")).to_be_visible(timeout=180_000)
            print(f"the panel's local federation of 2 sites started in {time.monotonic() - started:.0f} s")
            # The one line that attaches a notebook to this federation, and its copy button.
            attach = f'fed = flip_lab.attach("{server.local_workdir()}")'
            expect(panel.locator(".jp-FlipLab-attachLine")).to_have_text(attach)
            panel.get_by_role("button", name="Copy").click()
            expect(panel.get_by_role("button", name="Copied")).to_be_visible()
            expect(panel.get_by_text("Sites · 2 of 2 online")).to_be_visible(timeout=30_000)
            expect(panel.locator(".jp-FlipLab-site-online")).to_have_count(2)
            expect(panel.locator(".jp-FlipLab-siteData").first).to_contain_text("cases (")
            page.screenshot(path=str(ARTIFACTS / "1-sites-online.png"))

            # The dispatch command is offered in the palette and the notebook's context menu too.
            page.locator(".jp-Notebook .jp-CodeCell").first.click(button="right")
            expect(page.locator(".lm-Menu-itemLabel", has_text="Dispatch Plan to Federation")).to_be_visible()
            page.keyboard.press("Escape")
            page.keyboard.press("Control+Shift+C")
            page.keyboard.type("Dispatch Plan")
            expect(page.locator(".lm-CommandPalette-itemLabel", has_text="Dispatch Plan to Federation")).to_be_visible()
            page.keyboard.press("Escape")

            # The notebook: run the cell that defines the plan, then dispatch from the notebook toolbar.
            page.locator(".jp-Notebook .jp-CodeCell").first.click()
            page.keyboard.press("Control+Enter")
            expect(page.locator(".jp-OutputArea-output").first).to_contain_text(
                "plan lesions is ready to dispatch", timeout=60_000
            )
            page.locator(".jp-NotebookPanel-toolbar [data-command='flip-lab:dispatch']").click()
            expect(panel.get_by_text("Dispatched plan 'lesions' as job")).to_be_visible(timeout=90_000)
            job = panel.locator(".jp-FlipLab-job").first
            expect(job).to_be_visible(timeout=30_000)
            expect(job.get_by_text("Running · ")).to_be_visible(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "2-job-running.png"))

            # "Open dashboard" while the job runs: the cell it inserts (and runs) ends with the job, which shows
            # itself as the live dashboard widget; its per-site curves redraw as each round's replies land.
            sites = panel.locator(".jp-FlipLab-siteName").all_inner_texts()
            assert len(sites) == 2, sites
            job.get_by_role("button", name="Open dashboard").click()
            cells = page.locator(".jp-Notebook .jp-CodeCell")
            expect(cells).to_have_count(2, timeout=15_000)
            expect(cells.nth(1)).to_contain_text("flip_lab.attach(")
            watch_dashboard(cells.nth(1), job, sites)

            expect(job.get_by_text("Completed · 3 of 3 rounds")).to_be_visible(timeout=300_000)
            expect(job.locator("svg.jp-FlipLab-sparkline path")).to_have_count(1)
            expect(job.locator(".jp-FlipLab-metricValue")).to_contain_text("loss")
            expect(job.locator(".jp-FlipLab-metricValue")).to_contain_text("round 3")
            expect(job.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
            page.screenshot(path=str(ARTIFACTS / "3-job-completed.png"))
            panel.get_by_role("button", name="Dismiss").click()
            expect(panel.get_by_text("Dispatched plan")).to_have_count(0)
            panel.locator(".jp-FlipLab-body").screenshot(path=str(ARTIFACTS / "panel.png"))

            # A notebook of this Lab asking for a local federation gets the panel's: no second one starts.
            cells.last.click()
            page.keyboard.press("Escape")
            page.keyboard.press("b")
            expect(cells).to_have_count(3)
            page.keyboard.press("Enter")  # edit the new cell
            page.keyboard.type("import flip_lab; fed = flip_lab.local_federation(2); print(fed.joined, fed.workdir)")
            page.keyboard.press("Shift+Enter")
            joined = cells.nth(2).locator(".jp-OutputArea-output")
            expect(joined).to_contain_text("Using the local federation of the FLIP Lab panel", timeout=60_000)
            expect(joined).to_contain_text(f"True {server.local_workdir()}")

            # A reload restores the layout: the panel is open again and shows the finished job.
            page.reload()
            panel = page.locator(PANEL)
            expect(panel).to_be_visible(timeout=90_000)
            expect(panel.get_by_text("Completed · 3 of 3 rounds")).to_be_visible(timeout=30_000)

            panel.get_by_role("button", name="Stop local federation").click()
            expect(panel.get_by_text("The local federation was stopped.")).to_be_visible(timeout=60_000)
            expect(panel.get_by_text("Not connected")).to_be_visible()
            page.screenshot(path=str(ARTIFACTS / "4-stopped.png"))
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "failure.png"))
            raise
        finally:
            (ARTIFACTS / "console-errors.txt").write_text("\n".join(console_errors + page_errors))
            browser.close()
    ours = [e for e in console_errors if "flip" in e.lower()]
    assert not page_errors, f"unhandled errors in the page: {page_errors}"
    assert not ours, f"the panel logged errors: {ours}"
    for picture in ("panel.png", "dashboard.png"):
        readme_image = REPO / "docs" / "images" / picture
        if not readme_image.exists() or os.environ.get("FLIP_LAB_UPDATE_SCREENSHOTS") == "1":
            readme_image.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ARTIFACTS / picture, readme_image)
    print(f"UI path took {time.monotonic() - t0:.0f} s")


# Both the panel's job and the notebook's dashboard, read in the same instant: "round k of n" while it runs.
SAME_ROUND = """([job, headline]) => {
    const panel = job.querySelector('.jp-FlipLab-headlineTitle')?.textContent ?? '';
    const ours = panel.match(/Running · round (\\d+) of 3/);
    const theirs = headline.textContent.match(/running, round (\\d+) of 3/);
    return ours !== null && theirs !== null && ours[1] === theirs[1] && ours[1] !== '1' ? ours[1] : false;
}"""


def watch_dashboard(cell: Locator, job: Locator, sites: list[str]) -> None:
    """The live dashboard in ``cell``'s output, followed to the job's end: its site rows name every site, it says
    the same round as the panel, and its curve image is redrawn between round 2 and round 3. Once the job has
    ended its curves and table show once, in the static output a saved notebook keeps; that output is saved as
    dashboard.png."""
    from playwright.sync_api import expect

    dashboard = cell.locator(".jp-OutputArea-output .flip-lab-dashboard")
    expect(dashboard).to_be_visible(timeout=60_000)
    headline = dashboard.locator(".flip-lab-dashboard-headline")
    states = dashboard.locator(".flip-lab-dashboard-states tbody tr")
    curves = dashboard.locator("img.flip-lab-dashboard-curves")
    expect(headline).to_contain_text("running, round 2 of 3", timeout=240_000)  # round 1 released, round 2 under way
    # The panel and the dashboard say the same round while it runs (round 2 or 3: the round in progress).
    same = cell.page.wait_for_function(
        SAME_ROUND, arg=[job.element_handle(), headline.element_handle()], timeout=120_000
    ).json_value()
    assert same in ("2", "3"), same
    expect(states).to_have_count(len(sites))
    for name in sites:
        expect(states.filter(has_text=name)).to_have_count(1)
    expect(curves).to_be_visible()
    # The image's src is a blob URL made from the PNG the kernel sent: a new src is a redrawn figure.
    drawn_before = curves.get_attribute("src")
    assert drawn_before
    # When the job ends the kernel draws the curves once more, then writes the static picture and summary under
    # the widget (what a saved notebook keeps) and hides the widget, so the curves show once.
    summary = cell.locator(".jp-OutputArea-output").filter(has_text="aggregate at round 3")
    expect(summary).to_have_count(1, timeout=300_000)
    expect(summary).to_contain_text("completed, 3 of 3 rounds")
    expect(dashboard).to_be_hidden(timeout=30_000)
    expect(curves).not_to_have_attribute("src", drawn_before)
    expect(headline).to_contain_text("completed, 3 of 3 rounds")
    expect(dashboard.locator(".flip-lab-dashboard-progress")).to_contain_text("3/3")
    expect(states.filter(has_text="done")).to_have_count(len(sites))
    pictures = cell.locator(".jp-OutputArea-output img:visible")
    expect(pictures).to_have_count(1)
    cell.page.wait_for_function("img => img.complete", arg=pictures.element_handle(), timeout=10_000)
    size = pictures.evaluate("img => [img.naturalWidth, img.naturalHeight, img.clientWidth, img.clientHeight]")
    assert min(size) > 100, f"the curve image did not render: natural and shown size {size}"
    output = cell.locator(".jp-Cell-outputArea")
    output.scroll_into_view_if_needed()
    output.screenshot(path=str(ARTIFACTS / "dashboard.png"))


def test_panel_says_when_the_server_is_gone_and_recovers_by_itself(lab: list[Jupyter], tmp_path):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    console_errors: list[str] = []
    page_errors: list[str] = []
    with sync_playwright() as pw:
        browser, page = launch(pw, console_errors, page_errors)
        try:
            page.goto(f"{lab[0].url}/lab?token={lab[0].token}")
            page.locator("li[data-id='flip-lab-panel']").click(timeout=90_000)
            panel = page.locator(PANEL)
            expect(panel.get_by_text("Not connected")).to_be_visible(timeout=30_000)
            lab[0].stop()
            expect(panel.get_by_text("Lost contact with the Jupyter server")).to_be_visible(timeout=30_000)
            expect(panel).to_contain_text("the panel recovers on its own")
            page.screenshot(path=str(ARTIFACTS / "5-server-gone.png"))
            lab.append(start_lab(tmp_path, port=lab[0].port))
            expect(panel.get_by_text("Lost contact with the Jupyter server")).to_have_count(0, timeout=60_000)
            expect(panel.get_by_text("Not connected")).to_be_visible()
            expect(panel.get_by_role("button", name="Start local federation")).to_be_enabled()
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "failure-restart.png"))
            raise
        finally:
            (ARTIFACTS / "console-errors-restart.txt").write_text("\n".join(console_errors + page_errors))
            browser.close()
    # While the server is away, the browser logs each refused connection and JupyterLab's own status poll
    # rejects unhandled (its stack lies wholly in jlab_core); neither comes from the panel, whose code is served
    # from /lab/extensions/flip-lab/.
    assert not [e for e in page_errors if "flip" in e.lower()], f"the panel raised unhandled: {page_errors}"
    network = ("WebSocket connection to", "Failed to load resource")
    ours = [e for e in console_errors if "flip" in e.lower() and not e.startswith(network)]
    assert not ours, f"the panel logged errors: {ours}"

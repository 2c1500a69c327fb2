"""Every notebook under notebooks/ runs headless (papermill) on a real local federation, with small parameters."""

from __future__ import annotations

import json
import re
from pathlib import Path

import papermill
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def outputs(nb_path: Path) -> tuple[str, set[str]]:
    """All text a reader of the saved notebook sees, and the output mime types."""
    nb = json.loads(nb_path.read_text())
    text, kinds = [], set()
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                raise AssertionError(f"{nb_path.name}: {out['ename']}: {out['evalue']}")
            text.append("".join(out.get("text", "")))
            for kind, value in out.get("data", {}).items():
                kinds.add(kind)
                if kind.startswith("text/"):
                    text.append("".join(value))
    return "\n".join(text), kinds


def execute(name: str, tmp_path: Path, **parameters) -> tuple[str, set[str]]:
    out = tmp_path / Path(name).name
    papermill.execute_notebook(
        str(NOTEBOOKS / name),
        str(out),
        parameters=parameters,
        cwd=str(tmp_path),
        progress_bar=False,
        kernel_name="python3",
    )
    return outputs(out)


def test_every_notebook_is_covered():
    found = {str(p.relative_to(NOTEBOOKS)) for p in NOTEBOOKS.rglob("*.ipynb") if ".ipynb_checkpoints" not in str(p)}
    assert found == set(CASES), "add the new notebook to CASES"


CASES = {
    "quickstart.ipynb": ("completed", "parameters; final aggregated Dice"),
    "workshop/01_federated_basics.ipynb": ("FedProx",),
    "workshop/02_heterogeneity_and_harmonisation.ipynb": ("vendors", "FlipFigure"),
    "workshop/03_governance_site_side.ipynb": ("plan_error", "audit log intact", "pending"),
    "workshop/04_privacy.ipynb": ("withheld", "update norm"),
    "workshop/05_reproducible_study.ipynb": ("[[], []]", "largest difference between the two runs: 0.0"),
    "workshop/06_volumes.ipynb": ("completed", "on 3D volumes"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_runs_headless(name, federation, tmp_path):
    params = {"scale": 0.3}
    if name == "workshop/06_volumes.ipynb":  # its own 3D hospitals: two, each with 3 test patients or more
        params = {"n_sites": 2, "scale": 0.7, "rounds": 1}
    elif name != "workshop/03_governance_site_side.ipynb":
        params["federation_workdir"] = str(federation.workdir)
        params["rounds"] = 1  # every cell still runs; a second round adds time, not coverage
    text, kinds = execute(name, tmp_path, **params)
    for needle in CASES[name]:
        assert needle in text, f"{name}: expected {needle!r} in its outputs"
    # A study run from a notebook (workshop 5) must not spill its kernel's start-up warnings into the cell.
    assert "without encryption" not in text, f"{name}: a nested kernel's warning landed in the notebook"
    if name == "quickstart.ipynb":  # a newcomer's first study, even at the suite's small settings, visibly learns
        dice = float(re.search(r"final aggregated Dice ([0-9.]+)", text).group(1))
        assert dice >= 0.1, f"the quickstart ended at Dice {dice}: it should visibly learn in one round"
    if name in (
        "quickstart.ipynb",
        "workshop/01_federated_basics.ipynb",
        "workshop/02_heterogeneity_and_harmonisation.ipynb",
    ):
        assert "image/png" in kinds, "the dashboard's static image must be saved in the notebook"


def test_dispatch_from_the_panel_sends_the_quickstarts_own_settings(federation, tmp_path):
    """The panel's "Dispatch Plan to Federation" runs flip_lab.panel.dispatch in the notebook's kernel: after the
    quickstart, it trains with the notebook's settings (study_config), so with the same seed it reaches the same
    Dice as the notebook's own submit cell, not the one the default settings give."""
    nb = json.loads((NOTEBOOKS / "quickstart.ipynb").read_text())
    nb["cells"].insert(
        -1,
        {
            "cell_type": "code",
            "execution_count": None,
            "id": "dispatch",
            "metadata": {},
            "outputs": [],
            "source": [
                "import flip_lab.panel\n",
                "dispatched = flip_lab.panel.dispatch(workdir=federation_workdir)\n",
                "dispatched.wait()\n",
                "print('DICE', job.metric('dice').iloc[-1], dispatched.metric('dice').iloc[-1])",
            ],
        },
    )
    source = tmp_path / "quickstart_dispatch.ipynb"
    source.write_text(json.dumps(nb))
    out = tmp_path / "out.ipynb"
    papermill.execute_notebook(
        str(source),
        str(out),
        cwd=str(tmp_path),
        progress_bar=False,
        kernel_name="python3",
        parameters={"scale": 0.3, "rounds": 1, "federation_workdir": str(federation.workdir)},
    )
    text, _ = outputs(out)
    assert "Settings from the notebook's `study_config`: rounds=1, strategy='fedavg', local_epochs=3, lr=0.003" in text
    submitted, dispatched = map(float, re.search(r"DICE ([0-9.]+) ([0-9.]+)", text).groups())
    assert dispatched == pytest.approx(submitted, abs=1e-6)

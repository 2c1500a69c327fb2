"""A data owner's everyday commands start in well under a second: they never import torch or MONAI, which only
harmonisation and training need (importing them costs several CPU-seconds)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel
import pytest

from site_kernel.cli import main as flip_site

HEAVY = ("torch", "monai")
# Runs flip-site in a fresh interpreter, then prints which heavy packages that command path imported.
RUN_AND_REPORT = (
    "import contextlib, io, sys\n"
    "from site_kernel.cli import main\n"
    "with contextlib.redirect_stdout(io.StringIO()):\n"
    "    code = main(sys.argv[1:])\n"
    f"print(code, sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii", images / "a.nii")
    assert flip_site(["init", str(tmp_path / "site"), "--name", "s1"]) == 0
    return tmp_path


@pytest.mark.parametrize(
    "command",
    [
        ["data", "add", "default", "{images}", "--site", "{site}", "--modality", "MR"],
        ["data", "catalogue", "--site", "{site}"],
    ],
)
def test_data_commands_do_not_import_torch_or_monai(site: Path, command: list[str]) -> None:
    if command[1] == "catalogue":
        assert (
            flip_site(
                ["data", "add", "default", str(site / "images"), "--site", str(site / "site"), "--modality", "MR"]
            )
            == 0
        )
    argv = [part.format(images=site / "images", site=site / "site") for part in command]
    done = subprocess.run(
        [sys.executable, "-c", RUN_AND_REPORT, *argv], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.stdout.strip() == "0 []", done.stdout + done.stderr

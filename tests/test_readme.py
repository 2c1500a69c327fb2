"""Every command the README shows is run by a test.

The commands are read from the README itself: its shell blocks, the command table, shell commands in inline code,
and the calls of the Python API in its Python blocks and inline code. Each must be listed in ``RUN_BY`` with the
test that runs it, and that test's source must name it; a command added to the README without a test fails here.
Every ``flip-lab``/``flip-site`` line of the shell blocks and the table is also parsed by the real command's
parser, so an option the README shows must exist.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from flip_lab.cli import build_parser as flip_lab_parser
from site_kernel.cli import build_parser as flip_site_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
PARSERS = {"flip-lab": flip_lab_parser, "flip-site": flip_site_parser}
PROGRAMS = ("flip-lab", "flip-site", "./run", "python", "pip")
PYTHON_NAMES = ("flip_lab", "fed", "job", "plan")  # the README's names for FLIP's API and the objects it returns

# A command's key (program and subcommands, or an API name) -> "module::test" (or fixture) that runs it, a test
# module whose own code does, or a notebook, which test_notebooks executes (as it does every notebook). Where the
# README's own line would take minutes or a network, the test runs the same command on less, as its docstring says.
RUN_BY = {
    "flip-site demo": "test_supervisor::test_flip_site_demo_lays_out_ready_site_folders_as_the_readme_shows",
    "./run demo": "test_readme::test_the_run_script_offers_what_the_readme_says",
    "./run test": "test_readme::test_the_run_script_offers_what_the_readme_says",
    "./run lab": "test_readme::test_the_run_script_offers_what_the_readme_says",
    "./run bench": "test_readme::test_the_run_script_offers_what_the_readme_says",
    "flip-lab demo": "test_e2e_spine::test_the_demo_runs_a_study_and_prints_its_metrics",
    "flip-lab up": "test_local_lifecycle::test_up_status_down_leaves_no_process_or_port",
    "flip-lab status": "test_local_lifecycle::test_up_status_down_leaves_no_process_or_port",
    "flip-lab down": "test_local_lifecycle::test_up_status_down_leaves_no_process_or_port",
    "flip-lab jobs": "test_e2e_spine::test_jobs_lists_and_cancel_stops_a_study",
    "flip-lab cancel": "test_e2e_spine::test_jobs_lists_and_cancel_stops_a_study",
    "flip-lab provision": "test_readme::test_provision_and_a_hospitals_init_run_as_the_readme_shows",
    "flip-lab revoke": "test_readme::test_provision_and_a_hospitals_init_run_as_the_readme_shows",
    "flip-site trust": "test_readme::test_provision_and_a_hospitals_init_run_as_the_readme_shows",
    "flip-lab study run": "test_study::study_record",  # a fixture: its record is what the module's tests read
    "flip-lab study verify": "test_study::test_an_intact_record_verifies",
    "flip-lab study heads": "test_governance_review::test_audit_heads_are_exported_from_a_run_record",
    "flip-site init": "test_daily_messages::test_a_site_whose_hub_is_down_says_so_once_and_serves_when_it_comes",
    "flip-site data add": "test_site_imports::test_data_commands_do_not_import_torch_or_monai",
    "flip-site run": "test_daily_messages::test_a_site_whose_hub_is_down_says_so_once_and_serves_when_it_comes",
    "flip-site plans list": "test_e2e_approval::test_plan_waits_for_approval_then_runs_and_a_changed_plan_waits_again",
    "flip-site plans show": "test_e2e_approval::test_plan_waits_for_approval_then_runs_and_a_changed_plan_waits_again",
    "flip-site plans approve": "test_e2e_approval::test_plan_waits_for_approval_then_runs_and_a_changed_plan_waits_again",  # noqa: E501 - a test's name
    "flip-site plans reject": "test_approvals::test_plans_commands",
    "flip-site audit show": "test_audit::test_audit_commands",
    "flip-site audit verify": "test_audit::test_audit_commands",
    "flip-site privacy": "test_privacy::test_flip_site_privacy_shows_budget_spent_remaining_and_jobs",
    "python bench/heterogeneity.py": "test_data_benchmark::test_quick_benchmark_shows_what_harmonisation_buys",
    "python scripts/build-wheels": "test_readme::test_the_parts_build_as_wheels_and_install_offline",
    "pip wheel": "test_readme::test_the_parts_build_as_wheels_and_install_offline",
    "pip install": "test_readme::test_the_parts_build_as_wheels_and_install_offline",
    "flip_lab.local_federation": "conftest::federation",
    "flip_lab.connect": "test_e2e_spine::test_reattach_by_id_from_a_new_connection",
    "flip_lab.Plan": "test_plan",  # the module builds its plan as the README does, and its tests use it
    "plan.model": "test_plan",
    "plan.train": "test_plan",
    "plan.evaluate": "test_plan",
    "fed.submit": "test_e2e_spine::test_fedavg_study_improves_and_streams_per_site_rows_while_running",
    "job.history": "test_e2e_spine::test_fedavg_study_improves_and_streams_per_site_rows_while_running",
    "job.wait": "test_e2e_spine::test_fedavg_study_improves_and_streams_per_site_rows_while_running",
    "job.final_weights": "test_e2e_spine::test_fedavg_study_improves_and_streams_per_site_rows_while_running",
    "job.cancel": "test_e2e_spine::test_cancel_stops_the_job",
    "job.audit_heads": "test_governance_review::test_audit_heads_are_exported_from_a_run_record",
    "job.id": "test_e2e_spine::test_reattach_by_id_from_a_new_connection",
    "fed.job": "test_e2e_spine::test_reattach_by_id_from_a_new_connection",
    "fed.resume": "test_e2e_hub_restart::test_a_study_interrupted_by_a_hub_crash_resumes_with_identical_weights",
    "fed.catalogue": "notebooks/quickstart.ipynb",
    "fed.sites": "test_directory::test_connect_names_the_sites_and_reads_their_catalogues",
    "plan.check": "test_dryrun::test_a_shape_mismatch_fails_here_at_the_cell_line_that_has_it",
    "fed.harmonisation_report": "notebooks/workshop/02_heterogeneity_and_harmonisation.ipynb",
    "flip_lab.plots.harmonisation_distributions": "notebooks/workshop/02_heterogeneity_and_harmonisation.ipynb",
}


# -- reading the README -----------------------------------------------------------------------------------------
def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)


def _command_cells() -> list[str]:
    """The first cell of each row of the command table."""
    return [line.split("|")[1] for line in README.splitlines() if line.startswith("| `") and len(line.split("|")) > 2]


def _cell_commands(cell: str) -> list[str]:
    """``flip-lab up [--sites 3]` / `status`` -> both commands; ``plans list / show`` -> ``plans list``,
    ``plans show``."""
    out: list[str] = []
    program = ""
    for span in re.findall(r"`([^`]+)`", cell):
        parts = [p.strip() for p in span.split(" / ")]
        first = parts[0] if parts[0].startswith(PROGRAMS) else f"{program} {parts[0]}"
        program = first.split()[0]
        out.append(first)
        out += [" ".join([*first.split()[:-1], part]) for part in parts[1:]]
    return out


def block_commands() -> list[str]:
    """The shell commands of the README's shell blocks, comments dropped."""
    lines = [line.split("  #")[0].strip() for block in _blocks("bash") + _blocks("sh") for line in block.splitlines()]
    return [c for c in lines if c]


def full_commands() -> list[str]:
    """The shell commands the README shows as commands: its shell blocks and the command table, whose lines are
    shorthand (``flip-site plans list / show / approve / reject``)."""
    return block_commands() + [c for cell in _command_cells() for c in _cell_commands(cell)]


def inline_commands() -> list[str]:
    """Shell commands in the README's inline code (``flip-site run SITE --hub HOST:PORT``), often partial."""
    return [span for span in re.findall(r"`([^`\n]+)`", README) if span.startswith(tuple(p + " " for p in PROGRAMS))]


def key_of(command: str) -> str:
    """``flip-site plans show 3f9c2a1b --site SITE`` -> ``flip-site plans show``."""
    words = command.split()
    if words[0] not in PARSERS:
        return " ".join(words[:2])
    parser, key = PARSERS[words[0]](), [words[0]]
    for word in words[1:]:
        choices = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if not choices or word not in choices:
            break
        parser = choices[word]
        key.append(word)
    return " ".join(key)


def python_names() -> set[str]:
    """FLIP's API as the README's Python shows it: calls, decorators and attributes of ``flip_lab``, ``fed``,
    ``job`` and ``plan``, in its Python blocks (comments included) and inline code."""
    names: set[str] = set()
    spans = re.findall(r"`([^`\n]+)`", README)
    texts = _blocks("python") + [s for s in spans if re.match(rf"({'|'.join(PYTHON_NAMES)})\.", s)]
    heads = "|".join(PYTHON_NAMES)
    for text in texts:
        names |= set(re.findall(rf"(?<![\w.])((?:{heads})(?:\.\w+)+)\s*\(", text))  # calls, also in comments
        names |= set(re.findall(rf"^@((?:{heads})\.\w+)", text, flags=re.MULTILINE))
        names |= set(re.findall(r"(?<![\w.])((?:job|fed)\.\w+)\b(?!\s*\()", text))  # attributes: job.history
    return names


def readme_keys() -> set[str]:
    return {key_of(c) for c in full_commands() + inline_commands()} | python_names()


# -- the checks -------------------------------------------------------------------------------------------------
def test_the_readme_shows_commands_and_calls() -> None:
    keys = readme_keys()
    assert {
        "flip-lab demo",
        "flip-site plans show",
        "./run demo",
        "pip wheel",
        "fed.submit",
        "plan.model",
        "job.history",
        "fed.resume",
    } <= keys, sorted(keys)


def test_every_command_in_the_readme_names_the_test_that_runs_it() -> None:
    missing = sorted(readme_keys() - set(RUN_BY))
    assert not missing, f"README commands no test runs (add a test and list it in RUN_BY): {missing}"


def _source_of(runner: str) -> str:
    if runner.endswith(".ipynb"):
        cells = json.loads((REPO / runner).read_text())["cells"]
        return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    if "::" not in runner:
        return inspect.getsource(importlib.import_module(runner))
    module, name = runner.split("::")
    test = getattr(importlib.import_module(module), name, None)
    assert callable(test), f"{runner} does not exist"
    return inspect.getsource(inspect.unwrap(test))  # a fixture's own function


@pytest.mark.parametrize("key", sorted(RUN_BY))
def test_the_named_test_exists_and_runs_the_command(key: str) -> None:
    source = _source_of(RUN_BY[key])
    if key.startswith("./run "):
        words = [key.split()[1]]
    elif key.startswith("python "):
        words = [Path(key.split()[1]).stem]
    elif key.split()[0] in PROGRAMS:
        words = key.split()[1:]
    else:
        words = [key.rsplit(".", 1)[1]]
    absent = [w for w in words if not re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", source)]
    assert not absent, f"{RUN_BY[key]} never names {absent}: it cannot be the test that runs `{key}`"


def _placeholders_filled(command: str) -> list[str]:
    """A README line as arguments: optional brackets dropped, ``...`` removed, ``JOB`` a job id."""
    words = shlex.split(command.replace("[", "").replace("]", "").replace(" ...", ""))
    return ["7" if w == "JOB" else w for w in words]


@pytest.mark.parametrize("command", [c for c in block_commands() if c.split()[0] in PARSERS])
def test_each_flip_command_line_in_the_readme_parses(command: str) -> None:
    words = _placeholders_filled(command)
    try:
        PARSERS[words[0]]().parse_args(words[1:])
    except SystemExit as exit_:
        pytest.fail(f"`{command}` does not parse (exit {exit_.code})")


def _subparser(key: str) -> argparse.ArgumentParser:
    words = key.split()
    parser = PARSERS[words[0]]()
    for word in words[1:]:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
    return parser


@pytest.mark.parametrize("command", sorted({c for c in full_commands() + inline_commands() if c.split()[0] in PARSERS}))
def test_each_option_the_readme_shows_exists(command: str) -> None:
    known = {o for a in _subparser(key_of(command))._actions for o in a.option_strings}
    shown = {w.strip("[],").split("=")[0] for w in command.split() if w.strip("[").startswith("-")}
    assert shown <= known, f"`{command}`: {sorted(shown - known)} unknown to `{key_of(command)}`"


# -- commands no other test runs --------------------------------------------------------------------------------
def test_the_run_script_offers_what_the_readme_says() -> None:
    """``./run demo|test|lab|bench`` each set up .venv (which this suite runs in) and then start one command that a
    test runs: ``flip-lab demo`` (test_the_demo_runs_a_study_and_prints_its_metrics), pytest (this suite),
    ``jupyter lab`` on the notebooks (test_lab_ui) and the scripts under bench/ (test_data_benchmark). Without a
    command the script lists them."""
    listed = subprocess.run([str(REPO / "run")], capture_output=True, text=True, timeout=30, check=False)
    assert listed.returncode == 2
    script = (REPO / "run").read_text()
    for command, starts in [
        ("demo", "exec flip-lab demo"),
        ("test", "exec python -m pytest"),
        ("lab", "exec jupyter lab"),
        ("bench", 'python "$b"'),
    ]:
        assert f"./run {command}" in listed.stdout
        arm = re.search(rf"^  {command}\)(.*?);;", script, flags=re.MULTILINE | re.DOTALL)
        assert arm and starts in arm.group(1), f"./run {command} no longer starts `{starts}`"


def test_the_parts_build_as_wheels_and_install_offline(tmp_path: Path) -> None:
    """The README's offline installation: ``python scripts/build-wheels wheelhouse``, ``pip wheel`` for the
    dependencies, then ``pip install --no-index --find-links wheelhouse flip-site`` at a hospital and ``flip-lab``
    for a researcher. Here with ``--no-deps``: the dependencies are published wheels that would need the network
    (tests/test_packaging.py installs the site part with its whole closure). The build is quiet about the packages'
    metadata (setuptools warned about ``project.license`` once)."""
    wheelhouse = tmp_path / "wheelhouse"
    built = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build-wheels"), str(wheelhouse)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    assert "Deprecat" not in built.stdout + built.stderr, built.stdout + built.stderr
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    offline = ["--no-index", "--find-links", str(wheelhouse), "--no-deps"]
    again = subprocess.run(
        [*pip, "wheel", *offline, "--wheel-dir", str(wheelhouse), "flip-site", "flip-lab"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    for part, holds, lacks in [
        ("flip-site", "site_kernel/cli.py", "flip_lab"),
        ("flip-lab", "flip_lab/labextension/package.json", "site_kernel"),
    ]:
        target = tmp_path / part
        installed = subprocess.run(
            [*pip, "install", *offline, "--target", str(target), part, "flip-common"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert (target / holds).is_file() and (target / "flip_common" / "py.typed").is_file()
        assert not (target / lacks).exists()
    shared = tmp_path / "flip-lab" / "share" / "jupyter" / "labextensions" / "flip-lab"
    assert (shared / "install.json").is_file() and (shared / "package.json").is_file()


def test_provision_and_a_hospitals_init_run_as_the_readme_shows(tmp_path: Path) -> None:
    """Deploying across hospitals, steps 1 and 3: the README's own lines, in a scratch folder."""
    from flip_lab.cli import main as flip_lab_main
    from site_kernel.cli import main as flip_site_main

    fed = tmp_path / "fed"
    assert (
        flip_lab_main(
            [
                "provision",
                str(fed),
                "--hub-address",
                "hub.example.org:9093",
                "--site",
                "st-marys",
                "--site",
                "royal-infirmary",
                "--researcher",
                "alice:Alice Smith:King's College London:university",
            ]
        )
        == 0
    )
    for written in ("ca/ca.key", "hub/sites.toml", "sites/st-marys/bundle.toml", "researcher/ca.pem", "ca/crl.pem"):
        assert (fed / written).is_file(), written
    assert (fed / "ca" / "ca.key").stat().st_mode & 0o077 == 0
    site = tmp_path / "srv" / "flip-site"
    assert flip_site_main(["init", str(site), "--certs", str(fed / "sites" / "st-marys")]) == 0
    assert 'name = "st-marys"' in (site / "site.toml").read_text()
    assert 'federation_ca = "certs/ca.pem"' in (site / "site.toml").read_text()
    assert (fed / "researchers" / "alice" / "alice.cert.pem").is_file()
    # revoking a researcher, and the hospital taking the new list
    before = (fed / "ca" / "crl.pem").read_bytes()
    assert flip_lab_main(["revoke", str(fed), "alice"]) == 0
    assert (fed / "ca" / "crl.pem").read_bytes() != before and not (fed / "researchers" / "alice").exists()
    assert flip_site_main(["trust", str(site), "--crl", str(fed / "ca" / "crl.pem")]) == 0
    assert (site / "certs" / "crl.pem").read_bytes() == (fed / "ca" / "crl.pem").read_bytes()

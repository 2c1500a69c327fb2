"""Reproducible studies: run a parameterised notebook with papermill and keep a verifiable run record.

    flip-lab study run study.ipynb -p rounds 5 -p seed 1 --record runs/seed1
    flip-lab study verify runs/seed1

How jobs reach the record: ``run_study`` sets ``FLIP_STUDY_RECORD=<record folder>`` for the notebook's kernel, and
the notebook calls ``flip_lab.study.record(job)`` once a job has ended (``job.wait(); study.record(job)``). Outside a
study (no ``FLIP_STUDY_RECORD``), ``record`` does nothing, so the same notebook runs interactively unchanged.
Plain papermill gives a verifiable record the same way::

    FLIP_STUDY_RECORD=runs/seed1 papermill study.ipynb out.ipynb -p seed 1
    flip-lab study verify runs/seed1

(put papermill's output notebook outside the record folder, or run ``flip-lab study seal runs/seed1`` after it, so
the manifest covers it). ``record`` seals the folder after every job; ``run_study`` adds the executed notebook,
``parameters.json`` and ``status.json`` and seals it again.

Record layout::

    MANIFEST.json        sha256 of every other file
    status.json          completed / failed, and for a failure the cell that stopped the study   (run_study)
    parameters.json      the parameters the notebook ran with, defaults included                 (run_study)
    notebook.ipynb       the executed notebook                                                   (run_study)
    environment.json     python and package versions (flip-lab, flwr, torch, monai, numpy, ...)
    jobs/<id>/           plan.py, spec.json (plan hash, contract, config), governance.json (per site: approval,
                         policy, audit head), events.jsonl, history.csv, history.json, summary.json (final metrics,
                         model sha256), final_weights.safetensors, plots/*.png

What repeats and what does not: with the same seed, plan and site data, the local federation reproduces the
metrics, the plan hash and the final weights; event times, compute durations, audit heads (each site's log grows
with every job) and PNG bytes differ between runs, and are recorded as what happened, not as what must repeat.
The manifest detects accidental change; it is not a signature against someone who rewrites it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flip_common.textsafe import shown

from .errors import FlipError

if TYPE_CHECKING:
    from .display import JobLike

log = logging.getLogger("flip_lab")
RECORD_ENV = "FLIP_STUDY_RECORD"
MANIFEST = "MANIFEST.json"
PACKAGES = ("flip-lab", "flwr", "torch", "monai", "numpy", "pandas", "safetensors", "matplotlib", "papermill")


class StudyError(FlipError):
    """A study could not run or its record could not be written."""


class StudyParameterError(StudyError):
    def __init__(self, name: str, message: str):
        self.name = name
        super().__init__(f"parameter {name!r}: {message}")


class StudyCellError(StudyError):
    """The notebook stopped in a cell; ``record`` holds the partial run record, ``status.json`` says where."""

    def __init__(
        self,
        notebook: str,
        cell_index: int,
        execution_count: int | None,
        ename: str,
        evalue: str,
        record: Path,
        first_line: str = "",
    ):
        self.cell_index, self.execution_count, self.ename, self.evalue, self.record = (
            cell_index,
            execution_count,
            ename,
            evalue,
            record,
        )
        where = (
            f"cell {cell_index + 1} (index {cell_index}"
            + (f", In [{execution_count}]" if execution_count else "")
            + ")"
        )
        code = f" `{first_line}`" if first_line else ""
        super().__init__(
            f"{notebook} stopped at {where}{code}: {ename}: {evalue}. The partial run record is in "
            f"{record} (status.json says where it stopped)"
        )


# -- parameters ----------------------------------------------------------------------------------------
def notebook_parameters(notebook: str | Path) -> dict[str, Any]:
    """The notebook's ``parameters`` cell as {name: default}; a default that is not a literal maps to ``...``."""
    import papermill

    found = papermill.inspect_notebook(str(notebook))
    defaults: dict[str, Any] = {}
    for name, info in found.items():
        try:
            defaults[name] = ast.literal_eval(str(info.get("default")))
        except (ValueError, SyntaxError):
            defaults[name] = ...  # an expression: any type is accepted
    return defaults


def _type_name(value: Any) -> str:
    return "float" if isinstance(value, float) else type(value).__name__


def check_parameters(notebook: str | Path, parameters: dict[str, Any]) -> dict[str, Any]:
    """Check ``parameters`` against the notebook's defaults: known names, same types (an int may fill a float)."""
    defaults = notebook_parameters(notebook)
    if parameters and not defaults:
        raise StudyParameterError(
            next(iter(parameters)),
            f"{Path(notebook).name} has no cell tagged 'parameters'; "
            "tag the cell holding the defaults with 'parameters'",
        )
    checked: dict[str, Any] = {}
    for name, value in parameters.items():
        if name not in defaults:
            raise StudyParameterError(
                name, f"{Path(notebook).name} has no such parameter; it has {', '.join(sorted(defaults))}"
            )
        default = defaults[name]
        if default is ... or default is None:
            checked[name] = value
        elif isinstance(default, bool) or isinstance(value, bool):
            if not (isinstance(default, bool) and isinstance(value, bool)):
                raise StudyParameterError(name, f"expected {_type_name(default)}, got {_type_name(value)} {value!r}")
            checked[name] = value
        elif isinstance(default, float) and isinstance(value, int):
            checked[name] = float(value)
        elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
            checked[name] = list(value)
        elif not isinstance(value, type(default)):
            raise StudyParameterError(
                name, f"expected {_type_name(default)} (the default is {default!r}), got {_type_name(value)} {value!r}"
            )
        else:
            checked[name] = value
    return checked


def parse_cli_value(notebook: str | Path, name: str, text: str) -> Any:
    """A ``-p NAME VALUE`` string converted to the type of the notebook's default for ``NAME``."""
    default = notebook_parameters(notebook).get(name, ...)
    try:
        if isinstance(default, bool):
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes")
        if isinstance(default, float):
            return float(text)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, str):
            return text
        if isinstance(default, (list, dict, tuple)):
            return json.loads(text)
    except ValueError as err:
        raise StudyParameterError(
            name, f"expected {_type_name(default)} (the default is {default!r}), got {text!r}"
        ) from err
    with contextlib.suppress(ValueError, SyntaxError):  # no typed default: a literal if it reads as one
        return ast.literal_eval(text)
    return text


# -- the record -----------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")


def environment() -> dict[str, Any]:
    """Python, platform and the versions of the packages a study's numbers depend on."""
    versions: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "packages": versions,
    }


def record(job: JobLike, record_dir: str | Path | None = None) -> Path | None:
    """Write ``job``'s part of the run record into ``record_dir`` (default: ``$FLIP_STUDY_RECORD``) and seal it.

    Returns the job's folder in the record, or ``None`` outside a study. Call it once the job has ended; calling it
    again rewrites the job's folder with what the job holds then.
    """
    from .display import JobView, final_metrics  # pandas and matplotlib load only when a record is written

    target = record_dir if record_dir is not None else os.environ.get(RECORD_ENV)
    if not target:
        log.info("no run record: %s is not set (this is not a study run)", RECORD_ENV)
        return None
    if not getattr(job, "done", True):
        log.warning(
            "job %s is still %s: recording what it holds now; call job.wait() before record(job)",
            job.id,
            getattr(job, "status", "running"),
        )
    root = Path(target)
    folder = root / "jobs" / str(job.id)
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "plots").mkdir(parents=True)
    events = list(job.events)
    view = JobView.from_events(
        events,
        job_id=job.id,
        rounds=int(getattr(job, "rounds", 0) or 0),
        plan_hash=str(getattr(job, "plan_hash", "") or ""),
    )
    store = Path(getattr(job, "store", folder))
    for name in ("plan.py", "spec.json", "final_weights.safetensors"):
        if (store / name).is_file():
            shutil.copyfile(store / name, folder / name)
    with open(folder / "events.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(event, sort_keys=True) + "\n" for event in events)
    frame = view.frame()
    frame.to_csv(folder / "history.csv", index=False)
    _write_json(folder / "history.json", frame.to_dict(orient="records"))
    _write_json(folder / "governance.json", view.governance())
    weights = folder / "final_weights.safetensors"
    _write_json(
        folder / "summary.json",
        {
            "job": job.id,
            "status": view.status,
            "message": view.message,
            "rounds": view.rounds,
            "rounds_released": view.released,
            "plan_hash": view.plan_hash,
            "final_metrics": final_metrics(view),
            "errors": view.errors,
            "model": {"file": weights.name, "sha256": _sha256(weights)} if weights.exists() else None,
        },
    )
    _write_plots(frame, folder / "plots")
    _write_json(root / "environment.json", environment())
    seal(root)
    return folder


def _write_plots(frame: Any, folder: Path) -> None:
    from . import plots
    from .display import primary_metric

    metric = primary_metric(frame)
    figures = {
        "learning_curves.png": lambda: plots.learning_curves(frame, metric or "loss", "evaluate"),
        "train_loss.png": lambda: plots.learning_curves(frame, "loss", "train"),
    }
    if metric:
        figures["site_comparison.png"] = lambda: plots.site_comparison(frame, metric)
    for name, make in figures.items():
        make().savefig(folder / name, format="png", dpi=100)


def seal(record_dir: str | Path) -> dict[str, str]:
    """Write ``MANIFEST.json``: the sha256 of every file in the record. Returns {relative path: sha256}."""
    root = Path(record_dir)
    files = {
        p.relative_to(root).as_posix(): _sha256(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).as_posix() != MANIFEST
    }
    _write_json(root / MANIFEST, {"format": "flip-lab-record/1", "algorithm": "sha256", "files": files})
    return files


def verify_record(path: str | Path) -> list[str]:
    """Re-check a run record: every checksum in its manifest, no unlisted files, and each job's plan hash
    recomputed from its plan source. Returns the problems found; an empty list means the record is intact."""
    root = Path(path)
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        listed: dict[str, str] = dict(manifest["files"])
    except FileNotFoundError:
        return [f"{root} has no {MANIFEST}: it is not a run record, or it was never sealed"]
    except (ValueError, KeyError, TypeError) as err:
        return [f"{MANIFEST} is unreadable ({type(err).__name__}); the record cannot be checked"]
    problems = []
    for name, digest in sorted(listed.items()):
        file = root / name
        if not file.is_file():
            problems.append(f"{name}: listed in {MANIFEST} but missing")
        elif _sha256(file) != digest:
            problems.append(f"{name}: sha256 differs from {MANIFEST} (changed after the record was written)")
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST}
    problems += [
        f"{name}: not covered by {MANIFEST} (added after the record was sealed)"
        for name in sorted(present - set(listed))
    ]
    for job in sorted((root / "jobs").glob("*")) if (root / "jobs").is_dir() else []:
        problems += _check_plan_hash(job, root)
    return problems


def _check_plan_hash(folder: Path, root: Path) -> list[str]:
    from .plan import plan_hash

    where = folder.relative_to(root).as_posix()
    try:
        spec = json.loads((folder / "spec.json").read_text(encoding="utf-8"))
        source = (folder / "plan.py").read_text(encoding="utf-8")
    except (OSError, ValueError):
        return []  # a replayed job may have no plan; the manifest already covers what is there
    expected = spec.get("plan_hash", "")
    if plan_hash(source, spec.get("contract", {}), spec.get("model_shapes", {})) != expected:
        return [f"{where}: plan.py and spec.json do not give the recorded plan hash {expected[:16]}…"]
    return []


# -- running a study ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _record_env(record_dir: Path) -> Iterator[None]:
    """Point the notebook's kernel (a child process, which inherits the environment) at the record."""
    previous = os.environ.get(RECORD_ENV)
    os.environ[RECORD_ENV] = str(record_dir.resolve())
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(RECORD_ENV, None)
        else:
            os.environ[RECORD_ENV] = previous


def run_study(
    notebook: str | Path,
    parameters: dict[str, Any] | None = None,
    record_dir: str | Path | None = None,
    *,
    kernel_name: str | None = None,
    timeout: float | None = None,
) -> Path:
    """Execute ``notebook`` with papermill and ``parameters``; return the sealed run record folder.

    Parameters are checked against the notebook's ``parameters`` cell first (``StudyParameterError`` names the
    one that is wrong). The kernel runs in the notebook's folder with ``FLIP_STUDY_RECORD`` set. If a cell fails,
    the partial record is still sealed and ``StudyCellError`` names the cell.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    notebook = Path(notebook)
    if not notebook.is_file():
        raise StudyError(f"no notebook at {notebook}")
    checked = check_parameters(notebook, dict(parameters or {}))
    root = (
        Path(record_dir)
        if record_dir
        else notebook.parent / "records" / (f"{notebook.stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    )
    if root.exists() and any(root.iterdir()):
        raise StudyError(f"the record folder {root} is not empty; pick a new one (--record DIR)")
    root.mkdir(parents=True, exist_ok=True)
    defaults = {k: v for k, v in notebook_parameters(notebook).items() if v is not ...}
    _write_json(root / "parameters.json", {**defaults, **checked})
    status: dict[str, Any] = {"status": "running", "notebook": notebook.name, "started": time.time()}
    _write_json(root / "status.json", status)
    output = root / "notebook.ipynb"
    failure: StudyCellError | None = None
    with _record_env(root):
        try:
            # The study's kernel shares this process's stderr; inside a notebook that is the calling cell's output,
            # where the kernel's start-up warnings (e.g. "running over TCP without encryption", about a kernel
            # that listens on loopback only) would land. Errors still show.
            papermill.execute_notebook(
                str(notebook),
                str(output),
                parameters=checked,
                kernel_name=kernel_name,
                cwd=str(notebook.parent),
                progress_bar=False,
                execution_timeout=timeout,
                extra_arguments=["--IPKernelApp.log_level=ERROR"],
            )
            status["status"] = "completed"
        except PapermillExecutionError as err:
            failure = _cell_failure(notebook, output, err, root)
            status.update(
                status="failed",
                cell_index=failure.cell_index,
                cell_number=failure.cell_index + 1,
                execution_count=failure.execution_count,
                ename=err.ename,
                evalue=err.evalue,
            )
        except Exception as err:  # the kernel died or could not start: still leave a record of that
            status.update(status="failed", ename=type(err).__name__, evalue=str(err))
            raise StudyError(
                f"{notebook.name} could not run: {type(err).__name__}: {err}. The partial run record is in {root}"
            ) from err
        finally:
            status["finished"] = time.time()
            _write_json(root / "status.json", status)
            if not (root / "environment.json").exists():  # the notebook recorded no job (or stopped first)
                _write_json(root / "environment.json", environment())
            seal(root)
    if failure is not None:
        raise failure
    return root


def _cell_failure(notebook: Path, output: Path, err: Any, root: Path) -> StudyCellError:
    """Translate papermill's index (which counts the injected parameters cell) to the notebook's own cells."""
    import nbformat

    index = int(err.cell_index)  # counts the injected cell, not the error banners papermill adds afterwards
    with contextlib.suppress(Exception):
        executed = nbformat.read(str(output), as_version=4)
        tags = [c.metadata.get("tags", []) for c in executed.cells]
        tags = [t for t in tags if "papermill-error-cell-tag" not in t]
        injected = [i for i, t in enumerate(tags) if "injected-parameters" in t]
        if injected and injected[0] < index:
            index -= 1
    source = str(err.source or "").strip().splitlines()
    return StudyCellError(
        notebook.name, index, err.exec_count, err.ename, err.evalue, root, source[0][:80] if source else ""
    )


# -- command line ---------------------------------------------------------------------------------------
def _cmd_run(args: argparse.Namespace) -> int:
    params = {name: parse_cli_value(args.notebook, name, value) for name, value in args.parameter}
    root = run_study(args.notebook, params, args.record, kernel_name=args.kernel, timeout=args.timeout)
    print(f"study completed; run record: {root}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    problems = verify_record(args.record)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    if problems:
        print(f"{args.record}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    files = json.loads((Path(args.record) / MANIFEST).read_text())["files"]
    unfinished = study_failure(args.record)
    if unfinished:
        print(f"{args.record}: {len(files)} files, every checksum matches, but {unfinished}", file=sys.stderr)
        return 1
    print(f"{args.record}: {len(files)} files, every checksum matches")
    return 0


def audit_heads(record_dir: str | Path) -> dict[str, str]:
    """Per site, the last audit head a run record holds (the newest job that heard from it wins)."""
    heads: dict[str, str] = {}
    jobs = sorted(
        (Path(record_dir) / "jobs").glob("*/governance.json"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1,
    )
    for path in jobs:
        sites = json.loads(path.read_text(encoding="utf-8")).get("sites", {})
        heads.update({str(k): str(v["audit_head"]) for k, v in sites.items() if v.get("audit_head")})
    return heads


def _cmd_heads(args: argparse.Namespace) -> int:
    heads = audit_heads(args.record)
    if not heads:
        print(f"{args.record}: no site sent an audit head", file=sys.stderr)
        return 1
    for site, head in sorted(heads.items()):
        # The site's name and head came from the site: shown with visible escapes.
        head = shown(head)
        print(f"{shown(site)}\t{head}\tflip-site audit verify --expected-head {head} --site DIR")
    return 0


def study_failure(path: str | Path) -> str | None:
    """What ``status.json`` says went wrong in the study the record holds, or None if it completed.

    An intact record of a failed study is still a failed study: its results are partial.
    """
    try:
        status = json.loads((Path(path) / "status.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None  # a record written by plain papermill has no status; its notebook says how it ended
    except ValueError:
        return "status.json is unreadable, so whether the study completed is unknown"
    if status.get("status") == "completed":
        return None
    if status.get("status") == "running":
        return "the study never finished (status.json still says running): its results are partial; run the study again"
    where = f" at cell {status['cell_number']}" if "cell_number" in status else ""
    error = f" ({status['ename']}: {status.get('evalue', '')})" if status.get("ename") else ""
    return (
        f"the study failed{where}{error}: its results are partial; see notebook.ipynb, fix the cell and run "
        "the study again"
    )


def _cmd_seal(args: argparse.Namespace) -> int:
    print(f"{args.record}: sealed {len(seal(args.record))} files")
    return 0


def add_study_commands(subparsers: Any) -> None:
    """Mount ``study run``, ``study verify`` and ``study seal`` on the ``flip-lab`` command."""
    study = subparsers.add_parser("study", help="run parameterised study notebooks and check their run records")
    sub = study.add_subparsers(dest="study_command", required=True)
    run = sub.add_parser("run", help="run a notebook with papermill and keep a run record")
    run.add_argument("notebook")
    run.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="a parameter, converted to the type of its default in the notebook",
    )
    run.add_argument("--record", help="the run record folder (default: records/NOTEBOOK-TIME beside it)")
    run.add_argument("--kernel", help="the Jupyter kernel (default: the notebook's own)")
    run.add_argument("--timeout", type=float, help="seconds any one cell may run")
    run.set_defaults(func=_cmd_run)
    verify = sub.add_parser("verify", help="re-check every checksum of a run record")
    verify.add_argument("record")
    verify.set_defaults(func=_cmd_verify)
    heads = sub.add_parser(
        "heads",
        help="the last audit head each site sent, for `flip-site audit verify --expected-head`",
    )
    heads.add_argument("record")
    heads.set_defaults(func=_cmd_heads)
    seal_ = sub.add_parser("seal", help="rewrite a record's manifest (after adding papermill's output notebook)")
    seal_.add_argument("record")
    seal_.set_defaults(func=_cmd_seal)

"""``%%flip_plan``: write a plan's functions in a notebook cell, the way notebooks are written.

    %load_ext flip_lab.magic

    %%flip_plan plan --name lesions
    CONTRACT = {"modality": "MR", "dims": 2, "size": [64, 64]}

    def model():
        return Net()            # Net, helpers and imports from earlier cells are captured too

    def train(model, data, config):
        ...

The cell runs in the notebook's namespace like any other cell. Then the ``model``/``train``/``evaluate`` functions it
defines are registered on the ``flip_lab.Plan`` kept in ``PLAN_VAR`` (created if missing, reused if present, so one
plan can be written over several ``%%flip_plan`` cells), and a ``CONTRACT`` dict assigned in the cell becomes the
plan's data contract. Registration goes through the plan's decorators, so ``flip_lab._capture`` pulls in everything
the functions reach (functions and classes from earlier cells, imports, constants) exactly as written.

Each new function is captured at once, so what cannot travel (a lambda kept in a variable, a closure, a module the
sites do not install, an undefined name) is refused here: the cell fails with one short ``PlanRefused`` line that
names the name and says what to do, instead of a traceback, and nothing is registered. ``--show`` prints the
assembled plan source.
"""

from __future__ import annotations

import ast
import sys
from typing import Any

from IPython.core.magic import Magics, cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ._capture import Capture
from .errors import PlanError
from .plan import ENTRIES, Plan


class PlanRefused(PlanError):
    """A ``%%flip_plan`` cell that cannot become (part of) a plan. IPython shows only the message."""

    def _render_traceback_(self) -> list[str]:
        # IPython and ipykernel use this instead of a full traceback: the message already says what and where.
        return [f"PlanRefused: {self}"]


def _top_level(source: str) -> tuple[list[str], bool]:
    """The entry functions a cell defines at top level, and whether it assigns ``CONTRACT``."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # the cell already ran, so this is IPython-only syntax that survived transformation
        return [], False
    roles = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ENTRIES]
    targets = [
        t
        for n in tree.body
        if isinstance(n, (ast.Assign, ast.AnnAssign))
        for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
    ]
    contract = any(isinstance(t, ast.Name) and t.id == "CONTRACT" for t in targets)
    return roles, contract


def register_cell(namespace: dict[str, Any], plan_var: str, source: str, *, name: str | None = None) -> Plan:
    """Register the entry functions that ``source`` (an already executed cell) defined in ``namespace``.

    Returns the plan stored in ``namespace[plan_var]``. Raises ``PlanRefused`` naming the name that cannot travel;
    on refusal the plan is left as it was.
    """
    roles, has_contract = _top_level(source)
    if not roles:
        raise PlanRefused(
            f"the cell defines none of {', '.join(r + '()' for r in ENTRIES)} at its top level; "
            f"define them with `def` in a %%flip_plan cell"
        )
    existing = namespace.get(plan_var)
    if existing is not None and not isinstance(existing, Plan):
        raise PlanRefused(
            f"{plan_var!r} already holds a {type(existing).__name__}, not a flip_lab.Plan; pick another variable name",
            name=plan_var,
        )
    functions = {role: namespace[role] for role in roles}
    for role, fn in functions.items():
        try:
            Capture().add_entry(role, fn)
        except PlanError as err:
            raise PlanRefused(str(err), name=err.name) from err
    contract = namespace.get("CONTRACT") if has_contract else None
    if contract is not None and not isinstance(contract, dict):
        raise PlanRefused(
            f"CONTRACT must be a dict (the plan's data contract), got {type(contract).__name__}", name="CONTRACT"
        )
    plan = existing if existing is not None else Plan(name or plan_var)
    if name:
        plan.name = name
    if contract is not None:
        plan.contract = dict(contract)
    for role, fn in functions.items():
        getattr(plan, role)(fn)
    namespace[plan_var] = plan
    return plan


def describe(plan: Plan, plan_var: str) -> str:
    have = [r for r in ENTRIES if r in plan.functions]
    missing = [r for r in ENTRIES if r not in plan.functions]
    text = f"{plan_var}: plan {plan.name!r} has {', '.join(have)}"
    if missing:
        return text + f"; still to define: {', '.join(missing)}"
    source = plan.source()  # complete: assemble and compile it now, as submit will
    return text + f"; {len(source.splitlines())} lines of source ready to submit"


@magics_class
class FlipMagics(Magics):
    @magic_arguments()
    @argument("plan_var", help="the variable that holds (or will hold) the flip_lab.Plan")
    @argument("--name", default=None, help="the plan's name (default: the variable's name)")
    @argument("--show", action="store_true", help="print the assembled plan source")
    @cell_magic
    def flip_plan(self, line: str, cell: str) -> None:
        """Run the cell, then register its model/train/evaluate on the Plan in PLAN_VAR (see flip_lab.magic)."""
        args = parse_argstring(self.flip_plan, line)
        if not args.plan_var.isidentifier():
            raise PlanRefused(f"{args.plan_var!r} is not a variable name; use e.g. `%%flip_plan plan`")
        shell = self.shell
        if shell is None:  # pragma: no cover - a cell magic always runs inside a shell
            raise PlanRefused("%%flip_plan runs only inside IPython")
        # Tracebacks and the lab's messages about plan lines should name the cell and line the researcher sees: the
        # body runs below the magic's line (kept as a comment: IPython drops a cell's leading blank lines), and its
        # code is filed under this cell's In[n] (IPython's compiler maps file -> n), not the next one.
        numbers = getattr(shell.compile, "_filename_map", None)
        this_cell = _calling_cell(numbers) if numbers else None
        result = shell.run_cell(f"# %%flip_plan {line}\n{cell}", store_history=False)
        if numbers is not None and this_cell is not None:
            for role in _top_level(cell)[0]:
                code = getattr(shell.user_ns.get(role), "__code__", None)
                if code is not None:
                    numbers[code.co_filename] = this_cell
        if not result.success:  # IPython has already shown the cell's own error in full
            error = result.error_in_exec or result.error_before_exec
            raise PlanRefused(f"the cell raised {type(error).__name__}; nothing was registered on {args.plan_var}")
        try:
            plan = register_cell(shell.user_ns, args.plan_var, shell.transform_cell(cell), name=args.name)
            print(describe(plan, args.plan_var))
            if args.show and all(r in plan.functions for r in ENTRIES):
                print(plan.source())
        except PlanRefused:
            raise
        except PlanError as err:  # the complete plan failed to assemble
            raise PlanRefused(str(err), name=err.name) from err


def _calling_cell(numbers: dict[str, int]) -> int | None:
    """The ``In[n]`` of the cell whose code is running this magic: the nearest caller compiled from a cell."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename in numbers:
            return numbers[frame.f_code.co_filename]
        frame = frame.f_back
    return None


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext flip_lab.magic`` (and ``%load_ext flip_lab`` once the package forwards to this)."""
    ipython.register_magics(FlipMagics)

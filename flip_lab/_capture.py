"""Turn functions written in notebook cells into one self-contained module of source text.

A plan travels as source, never as a pickle, so everything ``model``/``train``/``evaluate`` use must be expressible
as source: imports of packages the site has, functions and classes defined in the notebook (captured recursively),
and plain constants. Anything else (a lambda kept in a variable, a closure over a local, an object from a module the
site does not have) is refused here, before anything is sent, with the name and what to do about it.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import linecache
import sys
import textwrap
import types
from collections.abc import Callable
from typing import Any

from ._sourcemap import SourceMap, Span, cell_label
from .errors import PlanError

# Top-level packages every FLIP site kernel installs. A plan may import these and the standard library only.
SITE_PACKAGES = frozenset(
    {
        "torch",
        "numpy",
        "monai",
        "scipy",
        "math",
        "random",
        "collections",
        "functools",
        "itertools",
        "dataclasses",
        "typing",
        "statistics",
        "time",
        "copy",
        "json",
        "re",
        "enum",
        "abc",
        "operator",
        "warnings",
    }
)
_CONSTANT_TYPES = (int, float, str, bool, type(None), bytes)


def _is_constant(value: Any, depth: int = 0) -> bool:
    if isinstance(value, _CONSTANT_TYPES):
        return True
    if depth < 3 and isinstance(value, (tuple, list, frozenset, set)):
        return all(_is_constant(v, depth + 1) for v in value)
    if depth < 3 and isinstance(value, dict):
        return all(_is_constant(k, depth + 1) and _is_constant(v, depth + 1) for k, v in value.items())
    return False


def _where(obj: Any) -> tuple[str, int | None]:
    code = getattr(obj, "__code__", None)
    filename = code.co_filename if code else getattr(inspect.getmodule(obj), "__file__", "") or ""
    line = code.co_firstlineno if code else None
    return (cell_label(filename) if filename else "<unknown>"), line


def _line_of_use(obj: Any, name: str, first_line: int | None) -> int | None:
    """The line where ``obj`` first reads ``name`` (a typo, say), counted as ``first_line`` is: the code object
    knows only where the definition starts, which is its first decorator's line."""
    if first_line is None:
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    except (OSError, TypeError, SyntaxError):
        return first_line
    uses = [
        n.lineno for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Load)
    ]
    return first_line + min(uses) - 1 if uses else first_line


def _class_source_from_methods(cls: type) -> tuple[str, str, int] | None:
    """Find a class's source (and its file and first line) through its methods' code: ``inspect.getsource``
    cannot for classes in notebooks."""
    for member in vars(cls).values():
        code = getattr(getattr(member, "__func__", member), "__code__", None)
        if code is None:
            continue
        text = "".join(linecache.getlines(code.co_filename))
        if not text:
            continue
        for node in ast.walk(ast.parse(text)):
            if (
                isinstance(node, ast.ClassDef)
                and node.name == cls.__name__
                and node.lineno <= code.co_firstlineno <= (node.end_lineno or 0)
            ):
                segment = ast.get_source_segment(text, node, padded=True)
                return (segment, code.co_filename, node.lineno) if segment else None
    return None


def _origin(obj: Any) -> tuple[str, int] | None:
    """The file and line where the text :func:`_source_of` returns for ``obj`` starts."""
    code = getattr(obj, "__code__", None)
    if code is not None:
        return code.co_filename, code.co_firstlineno
    if not inspect.isclass(obj):
        return None
    try:
        return inspect.getsourcefile(obj) or inspect.getfile(obj), inspect.getsourcelines(obj)[1]
    except (OSError, TypeError):
        found = _class_source_from_methods(obj)
        return (found[1], found[2]) if found else None


def _source_of(obj: Any) -> str:
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError) as err:
        found = _class_source_from_methods(obj) if inspect.isclass(obj) else None
        if found:
            return textwrap.dedent(found[0])
        cell, line = _where(obj)
        raise PlanError(
            f"cannot read the source of {getattr(obj, '__qualname__', obj)!r}; define it in a notebook cell "
            f"or a .py file (not with exec or in an interactive console)",
            name=getattr(obj, "__name__", None),
            line=line,
            cell=cell,
        ) from err
    return textwrap.dedent(source)


def _strip_plan_decorators(source: str, name: str) -> tuple[str, int]:
    """Remove ``@plan.train``-style decorators: the site has no ``plan`` object, the functions stand alone.

    Returns the source and how many lines went before its ``def``, so its lines can be traced back."""
    tree = ast.parse(source)
    node = tree.body[0]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.decorator_list:
        first_body_line = node.lineno  # ``def``/``class`` line, 1-based, after decorators
        lines = source.splitlines()
        kept = [ast.get_source_segment(source, d) or "" for d in node.decorator_list]
        keep = [f"@{d}" for d in kept if not _is_plan_decorator(d)]
        return "\n".join(keep + lines[first_body_line - 1 :]) + "\n", first_body_line - 1 - len(keep)
    return source, 0


def _is_plan_decorator(text: str) -> bool:
    head = text.split("(")[0]
    return head.split(".")[-1] in {"model", "train", "evaluate"} and "." in head


class Capture:
    """Collects the source of a set of entry functions and everything they reach."""

    def __init__(self) -> None:
        self.imports: dict[str, str] = {}  # bound name -> import statement
        self.constants: dict[str, str] = {}
        self.definitions: dict[str, str] = {}  # name -> source, in dependency order
        self.origins: dict[str, tuple[str, int, int]] = {}  # name -> (file, line of its first line, lines)
        self._visiting: set[str] = set()

    def add_entry(self, name: str, fn: Callable[..., Any]) -> None:
        if not inspect.isfunction(fn):
            raise PlanError(f"{name} must be a plain function defined with `def`, got {type(fn).__name__}", name=name)
        self._add_object(fn.__name__, fn, fn.__globals__, used_by=name)

    def _add_object(self, name: str, obj: Any, namespace: dict[str, Any], used_by: str) -> None:
        if name in self.definitions or name in self._visiting:
            return
        if inspect.isfunction(obj) and obj.__name__ == "<lambda>":
            cell, line = _where(obj)
            raise PlanError(
                f"{name!r} (used by {used_by}) is a lambda kept in a variable; its source cannot travel. "
                f"Write it as `def {name}(...):` in a cell",
                name=name,
                line=line,
                cell=cell,
            )
        if inspect.isfunction(obj) and obj.__closure__:
            cell, line = _where(obj)
            free = ", ".join(obj.__code__.co_freevars)
            raise PlanError(
                f"{name!r} (used by {used_by}) is a closure over local variable(s) {free} that cannot travel; "
                f"define it at the top level of a cell and pass those values through the config",
                name=name,
                line=line,
                cell=cell,
            )
        self._visiting.add(name)
        source, removed = _strip_plan_decorators(_source_of(obj), name)
        origin = _origin(obj)
        if origin is not None:
            self.origins[name] = (origin[0], origin[1] + removed, source.rstrip().count("\n") + 1)
        try:
            tree = ast.parse(source)
        except SyntaxError as err:  # e.g. source that only compiles inside a class body
            cell, line = _where(obj)
            raise PlanError(
                f"the source of {name!r} does not parse on its own: {err.msg}", name=name, line=line, cell=cell
            ) from err
        defined_name = getattr(tree.body[0], "name", name)
        if defined_name != name:  # ``alias = func``: keep the definition, bind the alias too
            source += f"{name} = {defined_name}\n"
        needed = _free_names(tree)
        for dep in sorted(needed):
            self._resolve(dep, namespace, used_by=name, obj=obj)
        self._visiting.discard(name)
        self.definitions[name] = source

    def _resolve(self, name: str, namespace: dict[str, Any], used_by: str, obj: Any) -> None:
        if name in self.imports or name in self.constants or name in self.definitions:
            return
        if name not in namespace:
            if hasattr(builtins, name) or name == "__class__":
                return
            cell, line = _where(obj)
            line = _line_of_use(obj, name, line)
            raise PlanError(
                f"name {name!r} used in {used_by}() is not defined; define or import it in a cell before "
                f"building the plan",
                name=name,
                line=line,
                cell=cell,
            )
        value = namespace[name]
        if isinstance(value, types.ModuleType):
            self._add_import(name, value, used_by)
        elif inspect.isfunction(value) or inspect.isclass(value):
            module = getattr(value, "__module__", "__main__")
            if module in ("__main__", getattr(obj, "__module__", "__main__")) and _defined_in_notebook(value):
                self._add_object(name, value, getattr(value, "__globals__", namespace), used_by)
            else:
                self._add_from_import(name, value, module, used_by)
        elif _is_constant(value):
            self.constants[name] = f"{name} = {value!r}\n"
        elif callable(value) and getattr(value, "__module__", None):
            self._add_from_import(name, value, value.__module__, used_by)
        else:
            raise PlanError(
                f"{name!r} (used by {used_by}) is a {type(value).__name__} object, which cannot travel as "
                f"source; build it inside model()/train() or pass plain values through the config",
                name=name,
            )

    def _add_import(self, name: str, module: types.ModuleType, used_by: str) -> None:
        top = module.__name__.split(".")[0]
        self._check_available(top, name, used_by)
        if module.__name__ == name:
            self.imports[name] = f"import {name}\n"
        elif "." in module.__name__ and module.__name__.rsplit(".", 1)[1] == name:
            parent, leaf = module.__name__.rsplit(".", 1)
            self.imports[name] = f"from {parent} import {leaf}\n"
        else:
            self.imports[name] = f"import {module.__name__} as {name}\n"

    def _add_from_import(self, name: str, value: Any, module: str, used_by: str) -> None:
        top = module.split(".")[0]
        self._check_available(top, name, used_by)
        real = getattr(value, "__name__", name)
        target = module
        # Prefer the public path the researcher imported from when it re-exports the object.
        self.imports[name] = f"from {target} import {real}" + (f" as {name}" if real != name else "") + "\n"

    def _check_available(self, top: str, name: str, used_by: str) -> None:
        if top in SITE_PACKAGES or top in sys.stdlib_module_names:
            return
        installed = ", ".join(sorted(p for p in SITE_PACKAGES if p not in sys.stdlib_module_names))
        raise PlanError(
            f"{name!r} (used by {used_by}) comes from {top!r}, which FLIP sites do not install; plans may use "
            f"the standard library and {installed}",
            name=name,
        )

    def module_source(self) -> tuple[str, SourceMap]:
        """The plan's text, and where each definition's lines came from."""
        parts = ["# FLIP plan: assembled from the researcher's notebook\n"]
        parts += sorted(set(self.imports.values()))
        parts.append("\n")
        parts += [self.constants[k] for k in sorted(self.constants)]
        spans = []
        line = "".join(parts).count("\n") + 1
        for name, source in self.definitions.items():
            text = source.rstrip() + "\n"
            if name in self.origins:
                filename, first, length = self.origins[name]
                spans.append(Span(line + 2, length, filename, first))
            parts.append("\n\n" + text)
            line += 2 + text.count("\n")
        return "".join(parts), SourceMap(spans)


def _defined_in_notebook(obj: Any) -> bool:
    module = getattr(obj, "__module__", "")
    return (
        module == "__main__"
        or module not in sys.modules
        or not hasattr(sys.modules[module], "__file__")
        or (module.startswith("flip_plan_"))
    )


def _free_names(tree: ast.AST) -> set[str]:
    """Names a definition loads but never binds itself: the globals it needs."""
    bound = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))}
    for n in ast.walk(tree):
        if isinstance(n, ast.arguments):
            bound |= {a.arg for a in n.posonlyargs + n.args + n.kwonlyargs}
            bound |= {a.arg for a in (n.vararg, n.kwarg) if a is not None}
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n is not tree:
            bound.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in n.names}
        elif isinstance(n, ast.ExceptHandler) and n.name:
            bound.add(n.name)
    top = tree.body[0] if isinstance(tree, ast.Module) and tree.body else None
    loads = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    if isinstance(top, (ast.FunctionDef, ast.ClassDef)):
        loads.discard(top.name)  # recursion or self-reference
    return loads - bound


def check_compiles(source: str) -> None:
    """Compile the assembled module; a syntax error is reported with its line in the plan source."""
    try:
        compile(source, "plan.py", "exec")
    except SyntaxError as err:
        raise PlanError(f"the plan does not compile: {err.msg}", line=err.lineno, cell="plan.py") from err

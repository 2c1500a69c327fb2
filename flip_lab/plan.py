"""Plans: the researcher's ``model``, ``train`` and ``evaluate`` as plain functions, sent as source text.

>>> plan = Plan("lesions", contract={"modality": "MR", "dims": 2, "size": [64, 64]})
>>> @plan.model
... def model():
...     return torch.nn.Conv2d(1, 2, 3, padding=1)

``plan.build(config)`` captures every function, class, import and constant the three reach, checks that the
assembled module runs on its own (here, before anything is sent), initialises the model with the study's seed and
returns what travels: source text, a JSON spec with the plan's hash, and the initial weights as safetensors.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flip_common.planhash import plan_hash

from . import config as _config
from ._capture import Capture, check_compiles
from ._sourcemap import SourceMap
from .errors import PlanError

ENTRIES = ("model", "train", "evaluate")


@dataclass(frozen=True)
class BuiltPlan:
    name: str
    source: str
    spec: dict[str, Any]
    weights: bytes  # safetensors
    # Where each line of ``source`` was written (a notebook cell, a file): stays in the notebook, never sent.
    origins: SourceMap = field(default_factory=SourceMap, compare=False)

    @property
    def hash(self) -> str:
        return str(self.spec["plan_hash"])

    def check(self) -> None:
        """Run ``model``, one short ``train`` and ``evaluate`` here, on synthetic data shaped as the contract says.

        What a site's worker would hand the plan, generated from the contract alone (no site's data is read): a
        ``PlanCheckFailed`` with the plan's own traceback, pointing at the cells, when the plan would fail at every
        site. ``Federation.submit`` runs it before sending anything, unless ``check=False``.
        """
        from ._dryrun import dry_run

        dry_run(self)


class Plan:
    """A study's code and data contract. Register functions with ``@plan.model``, ``@plan.train`` and
    ``@plan.evaluate``."""

    def __init__(self, name: str = "plan", *, contract: dict[str, Any] | None = None) -> None:
        self.name = name
        self.contract: dict[str, Any] = dict(contract or {})
        self.functions: dict[str, Callable[..., Any]] = {}
        self._source: str | None = None
        # the study settings of this plan's last ``fed.submit`` in this process: the panel's dispatch reuses them
        self.submitted_settings: dict[str, Any] | None = None
        self._origins = SourceMap()  # of ``_source``

    def _register(self, role: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.functions[role] = fn
            self._source = None
            self._origins = SourceMap()
            return fn

        return decorator

    @property
    def model(self) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """``@plan.model``: a function with no arguments returning a ``torch.nn.Module``."""
        return self._register("model")

    @property
    def train(self) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """``@plan.train``: ``train(model, data, config) -> dict[str, float]`` trains ``model`` in place."""
        return self._register("train")

    @property
    def evaluate(self) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """``@plan.evaluate``: ``evaluate(model, data, config) -> dict[str, float]``."""
        return self._register("evaluate")

    @classmethod
    def from_source(cls, source: str, *, name: str = "plan", contract: dict[str, Any] | None = None) -> Plan:
        """A plan from module source text defining ``model``, ``train``, ``evaluate`` (and ``CONTRACT``)."""
        check_compiles(source)
        namespace = _exec_module(source, name)
        plan = cls(name, contract=contract if contract is not None else namespace.get("CONTRACT", {}))
        for role in ENTRIES:
            if not callable(namespace.get(role)):
                raise PlanError(f"the plan source defines no function {role}()", name=role)
        plan._source = source
        return plan

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> Plan:
        path = Path(path)
        source = path.read_text()
        plan = cls.from_source(source, name=kwargs.pop("name", path.stem), **kwargs)
        plan._origins = SourceMap.identity(str(path), source)
        return plan

    def source(self) -> str:
        """The module text that travels to the sites."""
        return self._assemble()[0]

    def _assemble(self) -> tuple[str, SourceMap]:
        """The module text, and where each of its lines was written."""
        if self._source is not None:
            return self._source, self._origins
        missing = [r for r in ENTRIES if r not in self.functions]
        if missing:
            raise PlanError(
                f"the plan has no {', '.join(missing)} function yet; decorate one with "
                + ", ".join(f"@plan.{m}" for m in missing)
            )
        capture = Capture()
        for role in ENTRIES:
            capture.add_entry(role, self.functions[role])
        source, origins = capture.module_source()
        for role in ENTRIES:  # the site calls model/train/evaluate by role, whatever the functions were called
            fn_name = self.functions[role].__name__
            if fn_name != role:
                source += f"\n{role} = {fn_name}\n"
        check_compiles(source)
        return source, origins

    def build(self, config: dict[str, Any] | None = None) -> BuiltPlan:
        """Validate the config, capture the source, initialise the model and compute the plan's hash."""
        import torch
        from safetensors.torch import save

        cfg = _config.validate(dict(config or {}))
        contract = _validated_contract(self.contract)
        source, origins = self._assemble()
        namespace = _exec_module(source, self.name)
        torch.manual_seed(cfg["seed"])
        try:
            module = namespace["model"]()
        except Exception as err:
            raise PlanError(f"model() raised {type(err).__name__}: {err}", name="model") from err
        if not isinstance(module, torch.nn.Module):
            raise PlanError(f"model() must return a torch.nn.Module, got {type(module).__name__}", name="model")
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        shapes = {k: list(v.shape) for k, v in state.items()}
        dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in state.items()}
        spec = {
            "name": self.name,
            "plan_hash": plan_hash(source, contract, shapes),
            "contract": contract,
            "model_shapes": shapes,
            "model_dtypes": dtypes,
            "config": cfg,
            "train_config": _config.train_config(cfg),
        }
        return BuiltPlan(self.name, source, spec, save(state), origins)

    def check(self, config: dict[str, Any] | None = None, **settings: Any) -> BuiltPlan:
        """Build the plan with the study's settings and dry-run it here (:meth:`BuiltPlan.check`); returns it."""
        built = self.build({**(config or {}), **settings})
        built.check()
        return built


def _validated_contract(contract: dict[str, Any]) -> dict[str, Any]:
    """The contract as every site will read it (defaults filled in), or a PlanError naming the bad key."""
    from flip_common.contract import ContractError, validate_contract

    try:
        return validate_contract(contract)
    except ContractError as err:
        raise PlanError(f"the plan's data contract is not valid: {err}", name="contract") from err


def _exec_module(source: str, name: str) -> dict[str, Any]:
    """Run the assembled source in a fresh module, as a site will; report failures as plan errors."""
    module = types.ModuleType(f"flip_plan_{name.replace('-', '_')}")
    module.__file__ = "plan.py"
    try:
        exec(compile(source, "plan.py", "exec"), module.__dict__)
    except Exception as err:
        line = getattr(err, "lineno", None)
        raise PlanError(
            f"the plan fails when run on its own: {type(err).__name__}: {err}", line=line, cell="plan.py"
        ) from err
    return module.__dict__

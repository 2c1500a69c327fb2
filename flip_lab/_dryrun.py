"""A plan's dry run in the notebook, before anything is sent (``BuiltPlan.check``, run by ``Federation.submit``).

A shape mismatch found at the sites costs a study, and the site may only say "train() raised RuntimeError at
plan.py line 12". Here the plan runs as a site's worker would run it (``model()``, the initial weights loaded,
``train`` then ``evaluate`` with the study's config, the site's seeds), but on a few synthetic images and labels
generated from the data contract alone: nothing reads a site's data, so the full traceback is safe to show. The
plan's statements are compiled at the cells they were written in, so the traceback and the message name the
researcher's cell and line.

The run is kept short: two training and two test images, one local epoch.
"""

from __future__ import annotations

import ast
import linecache
import math
import types
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ._sourcemap import describe, located
from .errors import PlanCheckFailed, PlanCheckWarning

if TYPE_CHECKING:
    from .plan import BuiltPlan

SAMPLES = 2  # synthetic training and test images: two, so a batch norm still has a batch
NATIVE_SIZE = 32  # voxels a side of a synthetic volume when a dims=3 contract keeps each case's own extent
_NEXT = "nothing was sent: fix the plan, or submit it with check=False to send it as it is"


def synthetic_data(contract: dict[str, Any], seed: int = 0) -> Any:
    """What a site's worker hands ``train``/``evaluate`` as ``data``, shaped by ``contract`` (validated), made up.

    Images float32 ``[N, 1, H, W]`` in the contract's intensity range; labels int64, label maps ``[N, H, W]`` of
    the contract's label values, or class indices ``[N]`` for a classification contract. For ``dims=3``, cases
    ``{"image": [1, X, Y, Z], "label": [1, X, Y, Z], "meta"}`` of the contract's ``size`` (or
    :data:`NATIVE_SIZE` voxels a side when it has none), in ``data.train`` / ``data.test``.
    """
    import torch

    from flip_common.sitedata import SiteData

    rng = np.random.default_rng(seed)
    values = sorted(contract["labels"].values())
    if contract["dims"] == 3:
        return _synthetic_volumes(contract, rng, values)
    height, width = contract["size"]
    label_shape = (SAMPLES,) if contract.get("task") == "classification" else (SAMPLES, height, width)

    def images() -> Any:
        shape = (SAMPLES, 1, height, width)
        array = rng.standard_normal(shape) if contract["intensity"]["kind"] == "zscore" else rng.random(shape)
        return torch.from_numpy(array.astype(np.float32))

    def labels() -> Any:
        return torch.from_numpy(rng.choice(values, size=label_shape).astype(np.int64))

    return SiteData(images(), labels(), images(), labels())


def _synthetic_volumes(contract: dict[str, Any], rng: np.random.Generator, values: list[int]) -> Any:
    from flip_common.sitedata import MemoryCases, VolumeData

    size = tuple(contract["size"] or (NATIVE_SIZE,) * 3)
    affine = np.diag([*contract["spacing"], 1.0])

    def case(index: int) -> dict[str, Any]:
        shape = (1, *size)
        image = rng.standard_normal(shape) if contract["intensity"]["kind"] == "zscore" else rng.random(shape)
        if contract.get("task") == "classification":
            label: Any = np.int64(rng.choice(values))
        else:
            label = rng.choice(values, size=shape).astype(np.int64)
        meta = {"index": index, "spacing": np.asarray(contract["spacing"], np.float64), "affine": affine}
        return {"image": image.astype(np.float32), "label": label, "meta": meta}

    return VolumeData(MemoryCases([case(i) for i in range(SAMPLES)]), MemoryCases([case(i) for i in range(SAMPLES)]))


def dry_run(built: BuiltPlan) -> None:
    """Run ``built`` once on synthetic data; ``PlanCheckFailed`` names the cell, line and what to do."""
    import torch
    from safetensors.torch import load

    spec = built.spec
    seed = int(spec["config"]["seed"])
    data = synthetic_data(spec["contract"], seed)
    doubts: list[str] = []
    # The notebook's own random state is left as it was. What the plan warns about goes to the sites' logs there;
    # here it would repeat at every submit.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        namespace = _load(built)
        torch.manual_seed(seed)
        model = _call(built, "model", namespace["model"])
        try:
            model.load_state_dict(load(built.weights), strict=True)
        except Exception as err:
            raise PlanCheckFailed(
                f"model() built a different model the second time ({type(err).__name__}); "
                f"a site would refuse the study's weights. {_NEXT}",
                role="model",
            ) from err
        for role in ("train", "evaluate"):
            config = {**spec["train_config"], "local_epochs": 1, "op": role, "server-round": 1, "device": "cpu"}
            if role == "train" and float(config.get("proximal_mu", 0.0)) > 0:  # as the site's worker adds it
                config["global_params"] = [p.detach().clone() for p in model.parameters()]
            torch.manual_seed(seed * 100_003 + 1)
            _check_metrics(role, _call(built, role, namespace[role], model, data, config), doubts)
            if role == "train":
                _check_weights(model, spec, doubts)
    if doubts:  # made-up data can make a sound plan's numbers odd: said, not refused
        warnings.warn(
            PlanCheckWarning(
                f"on synthetic data {'; '.join(doubts)}. Sites withhold non-finite replies: if real data could do this "
                "too, fix the plan before the study runs"
            ),
            stacklevel=3,
        )


def _load(built: BuiltPlan) -> dict[str, Any]:
    """Execute the plan's source, each top-level statement compiled at the cell line it was written on."""
    own = f"<flip plan {built.name}>"  # imports, constants: lines the lab wrote
    linecache.cache[own] = (len(built.source), None, built.source.splitlines(True), own)
    module = types.ModuleType(f"flip_plan_{built.name.replace('-', '_')}")
    module.__file__ = "plan.py"
    for node in ast.parse(built.source).body:
        decorators = getattr(node, "decorator_list", None)
        first = decorators[0].lineno if decorators else node.lineno
        last = node.end_lineno or node.lineno
        start, end = built.origins.origin(first), built.origins.origin(last)
        piece = ast.Module(body=[node], type_ignores=[])
        filename = own
        if start is not None and end == (start[0], start[1] + last - first):
            ast.increment_lineno(piece, start[1] - first)
            filename = start[0]
        try:
            exec(compile(piece, filename, "exec"), module.__dict__)
        except Exception as err:
            raise _failure(built, "the plan's top level", err) from err
    return module.__dict__


def _call(built: BuiltPlan, role: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception as err:  # the researcher's own code, on made-up data: the whole traceback is theirs to see
        raise _failure(built, f"{role}()", err, role=role) from err


def _failure(built: BuiltPlan, who: str, err: Exception, *, role: str = "plan") -> PlanCheckFailed:
    plan_files = built.origins.filenames() | {f"<flip plan {built.name}>"}
    frame = None
    tb = err.__traceback__
    while tb is not None:  # the innermost line the researcher wrote
        if tb.tb_frame.f_code.co_filename in plan_files:
            frame = (tb.tb_frame.f_code.co_filename, tb.tb_lineno)
        tb = tb.tb_next
    where = located(*frame) if frame is not None else None
    at = f" at {describe(where)}" if where is not None else ""
    shape = built.spec["contract"]
    if shape["dims"] == 3:
        size = ", ".join(str(n) for n in shape["size"] or (NATIVE_SIZE,) * 3)
        what = f"{SAMPLES} cases in data.train/data.test, images [1, {size}]"
    else:
        what = f"{SAMPLES} images [1, {', '.join(str(n) for n in shape['size'])}]"
    kind = "classes" if shape.get("task") == "classification" else "label values"
    return PlanCheckFailed(
        f"{who} raised {type(err).__name__}{at}: {err}. This was a dry run on synthetic data shaped as the "
        f"contract says ({what}, {kind} {sorted(shape['labels'].values())}); "
        f"{_NEXT}",
        role=role,
        line=where["line"] if where else None,
        cell=where["cell"] if where else None,
    )


def _check_metrics(role: str, metrics: Any, doubts: list[str]) -> None:
    if not isinstance(metrics, dict):
        raise PlanCheckFailed(
            f"{role}() returned a {type(metrics).__name__}, not a dict of metrics such as "
            f"{{'loss': 0.31}}; every site would refuse it. {_NEXT}",
            role=role,
        )
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError):
            raise PlanCheckFailed(
                f"{role}() returned metric {key!r} as a {type(value).__name__}; a metric is one "
                f"number (float(...) or .item()), else the sites refuse it. {_NEXT}",
                role=role,
            ) from None
        if not math.isfinite(number):
            doubts.append(f"{role}() returned {key!r} = {number}")


def _check_weights(model: Any, spec: dict[str, Any], doubts: list[str]) -> None:
    import torch

    state = model.state_dict()
    shapes, dtypes = spec["model_shapes"], spec["model_dtypes"]
    if set(state) != set(shapes):
        changed = sorted(set(state) ^ set(shapes))
        raise PlanCheckFailed(
            f"train() changed the model's parameters ({', '.join(changed[:5])}); a site sends "
            f"back exactly the model it received, or nothing. {_NEXT}",
            role="train",
        )
    for key, tensor in state.items():
        problem = ""
        if list(tensor.shape) != shapes[key]:
            problem = f"has shape {list(tensor.shape)}, not {shapes[key]}"
        elif str(tensor.dtype).removeprefix("torch.") != dtypes[key]:
            problem = f"has dtype {str(tensor.dtype).removeprefix('torch.')}, not {dtypes[key]}"
        elif tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            doubts.append(f"after train() the model's {key!r} holds values that are not finite")
        if problem:
            raise PlanCheckFailed(
                f"after train() the model's {key!r} {problem}; the sites would withhold the update. {_NEXT}",
                role="train",
            )

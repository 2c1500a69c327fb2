"""How ``flip-site plans show`` presents a plan's data contract to the data owner.

The contract that applies is the one the study sent with the plan (and the plan's hash covers): the site harmonises
its data to it. A plan's source often defines its own ``CONTRACT`` constant as well, which the researcher may have
changed before submitting (``plan.contract = {...}``); the site never runs the source to read it, and it does not
apply. So the listing labels the contract that applies, with the defaults the site fills in, and marks the source's
constant where it stands, saying whether it matches.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping
from typing import Any

from flip_common.contract import ContractError, validate_contract
from flip_common.textsafe import shown

HEADING = "contract that applies (the site harmonises its data to this; the source's own CONTRACT does not count):"


def _normalised(contract: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The contract with the site's defaults filled in, or as sent with why it is refused."""
    try:
        return validate_contract(contract), ""
    except ContractError as error:
        return dict(contract), f"refused by this site: {error}"


def applied_lines(contract: Mapping[str, Any]) -> list[str]:
    """The contract that applies, one key a line, every value shown with visible escapes."""
    values, problem = _normalised(contract)
    lines = [HEADING]
    lines += [
        f"  {shown(key):<12}{shown(json.dumps(values[key], sort_keys=True, ensure_ascii=False))}"
        for key in sorted(values)
    ]
    if problem:
        lines.append(f"  ({shown(problem)})")
    return lines


def source_constant(source: str, contract: Mapping[str, Any]) -> tuple[int, str] | None:
    """Where the source's top-level ``CONTRACT`` assignment ends (a 1-based line number) and a note to show under
    it, or None when the source assigns none. The source is parsed, never run."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    found = [
        node
        for node in tree.body
        if isinstance(node, ast.Assign | ast.AnnAssign)
        and any(
            isinstance(t, ast.Name) and t.id == "CONTRACT"
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        )
    ]
    if not found or found[-1].value is None:
        return None
    node = found[-1]
    end = node.end_lineno or node.lineno
    try:
        own = ast.literal_eval(node.value)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return end, "^ the source's own CONTRACT, not a plain value: it does not apply, the contract above does"
    if not isinstance(own, Mapping):
        return end, "^ the source's own CONTRACT is not a dict: it does not apply, the contract above does"
    (theirs, refused), (applied, refused_too) = _normalised(own), _normalised(contract)
    if refused or refused_too:  # defaults are filled in only where valid: compare as written
        theirs, applied = dict(own), dict(contract)
    differ = sorted(k for k in set(theirs) | set(applied) if theirs.get(k) != applied.get(k))
    if not differ:
        return end, "^ the source's own CONTRACT: the same as the contract that applies"
    return end, (
        f"^ the source's own CONTRACT does NOT apply: the contract above does "
        f"(they differ in {shown(', '.join(differ))})"
    )

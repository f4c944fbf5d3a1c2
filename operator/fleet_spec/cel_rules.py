"""The CRD's CEL rules (x-kubernetes-validations), evaluated as the apiserver does, by a library.

Every rule is read from the schema and run by `cel` (PyPI common-expression-language) with
`self` bound to the value at its place, so `inferencefleet run` and the apiserver judge a
fleet by the same text. The apiserver's CEL has Kubernetes' own libraries on top of the
standard; KUBERNETES_FUNCTIONS holds those our rules may use, and `unsupported` names any
function a rule calls that neither provides (a unit test keeps that empty).
"""

from __future__ import annotations

import functools
import importlib
import itertools
import re
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import cel

# Kubernetes' resource.Quantity grammar: a signed decimal and a binary, decimal or exponent suffix.
_QUANTITY = re.compile(
    r"^[+-]?(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?$"
)


def _is_quantity(value: Any) -> bool:
    return isinstance(value, str) and bool(_QUANTITY.match(value))


def _find(value: str, pattern: str) -> str:
    found = re.search(pattern, value)
    return found.group(0) if found else ""


def _find_all(value: str, pattern: str, limit: int = -1) -> list[str]:
    matches = [m.group(0) for m in re.finditer(pattern, value)]
    return matches if limit < 0 else matches[:limit]


def _index_of(value: str, substring: str, offset: int = 0) -> int:
    """Kubernetes' strings extension: the first index of substring at or after offset, or -1."""
    return value.find(substring, offset)


def _is_sorted(values: list[Any]) -> bool:
    return all(a <= b for a, b in itertools.pairwise(values))


# Functions of Kubernetes' CEL libraries (k8s.io/apiserver/pkg/cel/library) we provide.
KUBERNETES_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "isQuantity": _is_quantity,
    "find": _find,
    "findAll": _find_all,
    "isSorted": _is_sorted,
    "indexOf": _index_of,
}

# Functions and macros of the CEL standard definitions that the library evaluates itself.
STANDARD_FUNCTIONS = frozenset(
    {
        "size", "matches", "startsWith", "endsWith", "contains", "has",
        "all", "exists", "exists_one", "map", "filter",
        "int", "uint", "double", "string", "bytes", "bool", "dyn", "type",
        "timestamp", "duration",
    }
)  # fmt: skip


@functools.cache
def _cel() -> ModuleType:
    """The CEL library, imported on first use (it is slow to import, and most commands that
    load fleet_spec never validate a fleet)."""
    return importlib.import_module("cel")


@functools.cache
def _program(rule: str) -> cel.Program:
    program: cel.Program = _cel().compile(rule)
    return program


def _context(value: Any) -> cel.Context:
    library = _cel()
    context: cel.Context = library.Context({"self": value}, dict(KUBERNETES_FUNCTIONS))
    library.stdlib.add_stdlib_to_context(context)
    return context


def unsupported(rule: str) -> set[str]:
    """Functions the rule calls that this module cannot evaluate (operators aside)."""
    known = STANDARD_FUNCTIONS | set(KUBERNETES_FUNCTIONS) | set(_context(None).functions)
    return {
        name
        for name in _program(rule).functions()
        if name not in known and not name.startswith(("_", "@", "!"))
    }


def _message(rule: Mapping[str, Any], context: cel.Context | None) -> str:
    if "messageExpression" in rule:
        try:
            return str(_program(rule["messageExpression"]).execute(context))
        except (RuntimeError, ValueError):
            pass  # the apiserver falls back to message, as here
    return str(rule.get("message") or f"failed rule: {rule['rule']}")


def rule_errors(value: Any, schema: Mapping[str, Any], where: str) -> list[tuple[str, str]]:
    """(field, message) for every rule under `schema` that `value` breaks, depth first."""
    errors: list[tuple[str, str]] = []
    declared = schema.get("x-kubernetes-validations", [])
    context = _context(value) if declared else None
    for rule in declared:
        program = _program(rule["rule"])
        if "oldSelf" in program.variables():
            continue  # a transition rule: a new object has no old self to compare with
        try:
            ok = program.execute(context) is True
            message = "" if ok else _message(rule, context)
        except (RuntimeError, ValueError) as error:
            ok, message = False, f"rule {rule['rule']!r} could not be evaluated: {error}"
        if ok:
            continue
        path = where + rule.get("fieldPath", "")
        if not path and ": " in message:  # root rules name their field in the message
            path, message = message.split(": ", 1)
        errors.append((path or "<root>", message))
    if isinstance(value, dict):
        properties: Mapping[str, Any] = schema.get("properties", {})
        for key, sub in properties.items():
            if key in value:
                errors += rule_errors(value[key], sub, f"{where}.{key}" if where else key)
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            for key, item in value.items():
                if key not in properties:
                    errors += rule_errors(item, extra, f"{where}[{key}]")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += rule_errors(item, schema["items"], f"{where}[{index}]")
    return errors


def rules(schema: Any) -> list[str]:
    """Every rule text in a schema (nested), in document order."""
    found: list[str] = []
    if isinstance(schema, dict):
        found += [rule["rule"] for rule in schema.get("x-kubernetes-validations", [])]
        for value in schema.values():
            found += rules(value)
    elif isinstance(schema, list):
        for value in schema:
            found += rules(value)
    return found

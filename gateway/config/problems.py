"""pydantic's validation errors as a config's reader needs them: each error's location followed
through the schema's types (union-member tags dropped, the member the value looks like chosen), and
its message reworded in the schema's terms ("unknown field (allowed: ...)", "must be one of: ...")."""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from gateway.config.schema import GatewayConfig

Loc = tuple[str | int, ...]

_LISTS = (list, tuple, set, frozenset)
_UNIONS = (Union, types.UnionType)
# pydantic's `<kind>_type` / `<kind>_parsing` errors, by kind
_EXPECTED = {"string": "a string", "int": "an integer", "bool": "a boolean", "float": "a number",
             "list": "a list", "tuple": "a list", "set": "a list", "dict": "a mapping", "model": "a mapping"}
_BOUNDS = {"greater_than_equal": ("at least", "ge"), "less_than_equal": ("at most", "le")}


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional: neither shows up in an error's loc."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif get_origin(tp) in _UNIONS and len(members := _members(tp)) == 1:
            tp = members[0]
        else:
            return tp


def _members(tp: Any) -> list[Any]:
    return [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) in _UNIONS else [tp]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _tag_name(tp: Any) -> str:
    """The name pydantic gives a union member in an error's loc."""
    tp = _unwrap(tp)
    return tp.__name__ if isinstance(tp, type) else str(tp).replace(" ", "").replace("typing.", "")


def _kind(tp: Any) -> tuple[str, type]:
    """How a union member is described, and the YAML value type it takes."""
    tp = _unwrap(tp)
    if get_origin(tp) in _LISTS:
        return ("a list of strings" if _unwrap(get_args(tp)[0]) is str else "a list"), list
    if get_origin(tp) is dict or _is_model(tp):
        return "a mapping", dict
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number"}
    return names.get(tp, _tag_name(tp)), tp if isinstance(tp, type) else object


class _Walk:
    """Follows an error's loc through the schema's types, dropping union-member tags."""

    def __init__(self, loc: Loc) -> None:
        tp: Any = GatewayConfig
        self.parent: Any = None
        self.union: tuple[Loc, list[Any], str] | None = None  # (path of the union, members, tag)
        path: list[str | int] = []
        for part in loc:
            tp = _unwrap(tp)
            if len(members := _members(tp)) > 1 and isinstance(part, str):
                self.union = self.union or (tuple(path), members, part)
                tp = next((m for m in members if _tag_name(m) == part), Any)
                continue
            self.parent, origin, args = tp, get_origin(tp), get_args(tp)
            path.append(part)
            if _is_model(tp) and part in tp.model_fields:
                tp = tp.model_fields[part].annotation
            elif origin in _LISTS and args:
                tp = args[0]
            else:
                tp = args[1] if origin is dict and args else Any
        self.path: Loc = tuple(path)
        self.type = _unwrap(tp)


def _problem(err: Any, walk: _Walk) -> str:
    kind: str = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        allowed = ", ".join(walk.parent.model_fields) if _is_model(walk.parent) else ""
        return f"unknown field (allowed: {allowed})"
    if kind == "literal_error":
        values = get_args(walk.type) if get_origin(walk.type) is Literal else ()
        return "must be one of: " + (", ".join(map(str, values)) or str(ctx.get("expected")).replace("'", ""))
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind in _BOUNDS:
        return f"must be {_BOUNDS[kind][0]} {ctx.get(_BOUNDS[kind][1])}"
    if kind == "missing":
        return "required field is missing"
    if kind.endswith(("_type", "_parsing")) and kind.rsplit("_", 1)[0] in _EXPECTED:
        return "expected " + _EXPECTED[kind.rsplit("_", 1)[0]]
    msg = str(err["msg"]).removeprefix("Value error, ")
    return msg[:1].lower() + msg[1:]


def validation_problems(exc: ValidationError, bad: set[Loc], incomplete: set[Loc]) -> list[tuple[Loc, str]]:
    """Reworded problems; a union field gets the problems of the member its value looks like, or one line.
    Problems at or under `bad` (values the loader reported already) are left out, and so are missing
    fields of `incomplete` mappings (where the loader refused a merge key)."""
    out: list[tuple[Loc, str]] = []
    unions: dict[Loc, tuple[list[Any], list[tuple[str, Any, _Walk]]]] = {}
    for err in exc.errors(include_url=False):
        walk = _Walk(tuple(err["loc"]))
        if any(walk.path[:i] in bad for i in range(len(walk.path) + 1)):
            continue
        if err["type"] == "missing" and walk.path[:-1] in incomplete:
            continue
        if walk.union is None:
            out.append((walk.path, _problem(err, walk)))
        else:
            where, members, tag = walk.union
            unions.setdefault(where, (members, []))[1].append((tag, err, walk))
    for where, (members, errs) in unions.items():
        # a member refusing the value as a whole saw all of it (with distinct kinds, one always does)
        value = next((e["input"] for _, e, w in errs if w.path == where), None)
        chosen = next((_tag_name(m) for m in members if isinstance(value, _kind(m)[1])), None)
        picked = [(w.path, _problem(e, w)) for tag, e, w in errs if tag == chosen]
        out.extend(picked or [(where, "expected " + " or ".join(_kind(m)[0] for m in members))])
    return out

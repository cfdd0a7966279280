"""Typed backend options: what each backend takes, with types, defaults and help.

A backend declares ``class Options(BackendOptions)`` with one pydantic field per
option (as llm's ``Options`` classes do). capbench validates what a user gives
(``--backend-option``, a sweep file, a stored run) against it before any engine
starts, so ``max_batch: 8`` stays an integer and ``max_batch=eight`` is one
error that names the option; ``capbench plugins --json`` lists every option
with its type, default and help.

Engine flags ride along as field metadata: ``flag("--max-model-len", "help")``
declares an option that a server backend passes to its engine as that flag.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from capbench_core.errors import CapbenchError

FLAG_KEY = "flag"


class BackendOptions(BaseModel):
    """Base of every backend's options: unknown names are errors, numbers given as text are coerced."""

    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    @field_validator("*", mode="after")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @classmethod
    def describe(cls) -> dict[str, dict[str, Any]]:
        """name -> {type, default, help[, flag]}: what `capbench plugins --json` lists."""
        out: dict[str, dict[str, Any]] = {}
        for name, info in cls.model_fields.items():
            entry: dict[str, Any] = {"type": type_name(info.annotation), "default": info.default,
                                     "help": info.description or ""}
            extra = info.json_schema_extra
            if isinstance(extra, dict) and extra.get(FLAG_KEY):
                entry["flag"] = extra[FLAG_KEY]
            out[name] = entry
        return out

    @classmethod
    def flags(cls) -> dict[str, str]:
        """option -> the engine flag it becomes (options without one are capbench's own)."""
        out = {}
        for name, info in cls.model_fields.items():
            extra = info.json_schema_extra
            if isinstance(extra, dict) and extra.get(FLAG_KEY):
                out[name] = str(extra[FLAG_KEY])
        return out


def flag(engine_flag: str, help_: str, default: Any = None, **constraints: Any) -> Any:
    """A field that a server backend passes to its engine as ``engine_flag`` (booleans: the bare flag)."""
    return Field(default, description=help_, json_schema_extra={FLAG_KEY: engine_flag}, **constraints)


def option(help_: str, default: Any = None, **constraints: Any) -> Any:
    """A field capbench uses itself (no engine flag)."""
    return Field(default, description=help_, **constraints)


def type_name(annotation: Any) -> str:
    """`int`, `str`, `float | None`, `'a' | 'b'`: the annotation as a user reads it."""
    origin = get_origin(annotation)
    if origin is None:
        return getattr(annotation, "__name__", str(annotation))
    args = get_args(annotation)
    if str(origin) == "typing.Literal":
        return " | ".join(repr(a) for a in args)
    return " | ".join("None" if a is type(None) else type_name(a) for a in args)


def options_from_help(helps: Mapping[str, str]) -> type[BackendOptions]:
    """An Options class for a backend that only lists names and help (the older ``Backend.options`` dict):
    every option optional text or number, so nothing it accepted before is refused now."""
    from pydantic import create_model

    fields: dict[str, Any] = {name: (str | int | float | bool | None, Field(None, description=text))
                              for name, text in helps.items()}
    model: type[BackendOptions] = create_model("Options", __base__=BackendOptions, **fields)
    return model


def validate(backend: str, model: type[BackendOptions], raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` checked and converted by ``model``; every field present (defaults filled in).
    One CapbenchError names each bad option and what it needs."""
    try:
        return model.model_validate(dict(raw)).model_dump()
    except ValidationError as exc:
        raise CapbenchError(_message(backend, model, exc)) from None


def _message(backend: str, model: type[BackendOptions], exc: ValidationError) -> str:
    known = ", ".join(model.model_fields) or "(none)"
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            parts.append(f"{backend} does not know option {name}")
        elif err["type"] == "value_error":
            parts.append(f"{backend} option {name}={err.get('input')!r}: {message}")
        else:
            parts.append(f"{backend} option {name}={err.get('input')!r} is not valid: {message[0].lower()}"
                         f"{message[1:]}")
    return "; ".join(parts) + f"; known: {known}"

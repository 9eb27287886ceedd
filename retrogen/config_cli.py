"""CLI options derived from a :class:`~retrogen.config.LibraryConfig`, so no command re-lists its settings.

``@config_options(RetrievalConfig)`` on a typer command replaces its ``config`` parameter by one option per
field (``--dedup-threshold``, help = the field's description, default = the field's default) and calls the
command with the built config. Types map to the command line as follows: numbers, strings and booleans as
themselves (booleans as ``--flag/--no-flag``); ``tuple[str, ...]`` as a repeatable option; mappings (per-class prompts,
names, descriptions) as the path of a JSON file. A field may add short historical flags through
``json_schema_extra={"cli": ["--steps"]}``.
"""

from __future__ import annotations

import functools
import inspect
import json
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

import typer
from pydantic.fields import FieldInfo

from .config import LibraryConfig


def config_options(config_cls: type[LibraryConfig], *, param: str = "config",
                   exclude: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a typer command whose ``param`` parameter receives a ``config_cls`` built from options."""
    fields = {n: f for n, f in config_cls.model_fields.items() if n not in exclude}

    def deco(command: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(command)
        hints = typing.get_type_hints(command)  # the command's own annotations, resolved in its own module
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
               for p in sig.parameters.values() if p.name != param]
        derived = [_option(name, f) for name, f in fields.items()]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = {n: _from_cli(config_cls, n, kwargs.pop(n)) for n in list(kwargs) if n in fields}
            return command(**kwargs, **{param: config_cls(**values)})

        wrapper.__signature__ = sig.replace(parameters=own + derived)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in own + derived}
        del wrapper.__wrapped__  # typer must see the derived signature, not the command's own
        return wrapper

    return deco


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _option(name: str, field: FieldInfo) -> inspect.Parameter:
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    annotation, default = _cli_type(field.annotation), field.get_default(call_default_factory=True)
    flag = _flag(name)
    decls = [f"{flag}/--no-{flag[2:]}" if annotation is bool else flag, *extra.get("cli", [])]
    if annotation is list:
        annotation, default = list[str], list(default or [])
    elif annotation is Path:
        default = None
    help_text = field.description or ""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                             default=typer.Option(default, *decls, help=help_text, show_default=default is not None))


def _cli_type(annotation: Any) -> Any:
    """The command-line type of a field: its own for scalars (Optional kept), ``list`` for tuples, a JSON
    file ``Path`` for mappings."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    optional = len(args) < len(get_args(annotation))
    base = args[0] if optional and len(args) == 1 else annotation
    origin = get_origin(base)
    if origin in (tuple, list):
        return list
    if origin in (dict, Mapping) or base in (dict, Mapping) or origin is typing.Mapping:
        return Path
    if origin is typing.Literal:
        base = str
    if isinstance(base, types.UnionType) or origin is typing.Union:
        base = str
    return base | None if optional else base


def _from_cli(config_cls: type[LibraryConfig], name: str, value: Any) -> Any:
    """Back from the command line to the field's JSON shape (a JSON file's content for mappings)."""
    if isinstance(value, list):
        return tuple(value)
    if value is not None and _cli_type(config_cls.model_fields[name].annotation) is Path:
        try:
            data = json.loads(Path(value).read_text())
        except (OSError, ValueError) as e:
            raise config_cls.error(f"{_flag(name)}: cannot read {value} as JSON: {e}") from None
        if not isinstance(data, dict):
            raise config_cls.error(f"{_flag(name)}: {value} must hold a JSON object {{label: ...}}")
        return data
    return value

"""The YAML reference, generated from the config schema so it cannot drift from it.

Every key a pipeline file accepts is a pydantic field with a type, a default, bounds and
a description; :func:`config_reference` walks those models (the core sections, then the
options model of every backend dvla itself ships) and renders Markdown. ``docs/config-
reference.md`` is its output, and a test regenerates it and fails when the two differ, so
a new field without a description or a changed default cannot slip past the docs.
Third-party backends are left out on purpose: which plugins happen to be installed must
not change dvla's own document (``dvla config-reference --all`` includes them).
"""

from __future__ import annotations

import enum
import json
import sys
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from dvla import registry
from dvla.config import BackendOptions, PipelineFile

_HEADER = """# Pipeline file reference

Generated from dvla's config schema by `dvla config-reference`; do not edit by hand
(a test fails when this file and the schema disagree). Every section rejects unknown
keys. Override any key from the command line with `--set dotted.key=value`.
"""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, tuple, set, frozenset):
        inner = [a for a in args if a is not Ellipsis]
        return f"list of {_type_name(inner[0])}" if inner else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type):
        if issubclass(annotation, SecretStr):
            return "secret string"
        if issubclass(annotation, BaseModel):
            return "section"
        if issubclass(annotation, enum.Enum):
            return "one of " + ", ".join(f"`{m.value}`" for m in annotation)
        return {"int": "integer", "float": "number", "str": "string", "bool": "boolean"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation).replace("typing.", "")


def _bounds(field: FieldInfo) -> str:
    parts = []
    for meta in field.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sym} {value}")
    return ", ".join(parts)


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "**required**"
    if field.default_factory is not None:
        return "(section)"
    value = field.default
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str) and "\n" in value:
        return f"`{json.dumps(value)}`"
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _table(
    model: type[BaseModel], prefix: str, out: list[str]
) -> list[tuple[str, type[BaseModel]]]:
    """Append ``model``'s fields as a table; return its nested sections to render next."""
    nested: list[tuple[str, type[BaseModel]]] = []
    out.append("| key | type | default | description |")
    out.append("| --- | --- | --- | --- |")
    for name, field in model.model_fields.items():
        ann = field.annotation
        sub = _section_model(ann)
        key = f"{prefix}{name}"
        if sub is not None and not issubclass(sub, BackendOptions):
            nested.append((key, sub))
        kind = _type_name(ann)
        bounds = _bounds(field)
        if bounds:
            kind = f"{kind} ({bounds})"
        desc = field.description or ""
        if not desc and sub is not None and sub.__doc__:
            desc = sub.__doc__.strip().splitlines()[0]
        out.append(f"| `{key}` | {_cell(kind)} | {_cell(_default(field))} | {_cell(desc)} |")
    out.append("")
    return nested


def _section_model(annotation: Any) -> type[BaseModel] | None:
    for cand in (annotation, *typing.get_args(annotation)):
        if isinstance(cand, type) and issubclass(cand, BaseModel):
            return cand
    return None


def _render_model(title: str, model: type[BaseModel], prefix: str, out: list[str]) -> None:
    out.append(f"## `{title}`" if title else "## Top level")
    out.append("")
    doc = (model.__doc__ or "").strip()
    if doc:
        out.append(" ".join(doc.split("\n\n")[0].split()))
        out.append("")
    nested = _table(model, prefix, out)
    for key, sub in nested:
        if sub.__name__ in ("BackendSection",):
            continue
        _render_model(key, sub, f"{key}.", out)


def config_reference(include_plugins: bool = False) -> str:
    """The Markdown reference of every pipeline-file key dvla (and its backends) accepts.

    Args:
        include_plugins: also document backends from other installed packages.
    """
    out = [_HEADER]
    top: list[str] = []
    _render_top(top)
    out.extend(top)
    out.append("## Backends")
    out.append("")
    out.append(
        "`simulator`, `model`, `algorithm` and `optimizer` each name a backend with `name`; "
        "the section's other keys are that backend's options, below. `dvla plugins` lists "
        "what is installed."
    )
    out.append("")
    for section, group in registry.GROUPS.items():
        for name, entry in sorted(registry.discover(group).items()):
            if entry.package != "dvla" and not include_plugins:
                continue
            cls = entry.load()
            options: type[BaseModel] = getattr(cls, "Options", BackendOptions)
            pkg = "" if entry.package == "dvla" else f" (package `{entry.package}`)"
            out.append(f"### `{section}: {{name: {name}}}`{pkg}")
            out.append("")
            # A backend module's docstring opens with what the backend is ("``toy``: ...").
            module = sys.modules.get(cls.__module__)
            doc = ((module.__doc__ if module else None) or cls.__doc__ or "").strip()
            if doc:
                out.append(" ".join(doc.split("\n\n")[0].split()))
                out.append("")
            if not options.model_fields:
                out.append("No options.")
                out.append("")
                continue
            _table(options, f"{section}.", out)
    return "\n".join(out).rstrip() + "\n"


def _render_top(out: list[str]) -> None:
    out.append("## Top level")
    out.append("")
    nested = _table(PipelineFile, "", out)
    for key, sub in nested:
        _render_model(key, sub, f"{key}.", out)

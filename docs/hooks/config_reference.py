"""The configuration page's field tables, generated from fashionfuse's pydantic models (each
field's path, type, default and description) and committed in docs/configuration.md between
the two markers, so the page reads the same on GitHub and on the site:

    python docs/hooks/config_reference.py     # rewrite the tables after changing a field

`tests/test_docs.py` fails when the committed tables are not what the models generate, and
checks every field has a description of its own. As an MkDocs hook it puts the generated
tables in the page at build time (the same text when the page is current)."""

from __future__ import annotations

import types
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

MARKER = "<!-- config-reference -->"
END = "<!-- /config-reference -->"
PAGE = __import__("pathlib").Path(__file__).resolve().parents[1] / "configuration.md"


def _sections(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in _sections(a)]


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin in (list, tuple, set):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping {_type_name(args[0])} -> {_type_name(args[1])}" if args else "mapping"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.default
    if value is PydanticUndefined and field.default_factory is not None:
        value = field.default_factory()
    if isinstance(value, BaseModel):
        return "(section)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)) and len(str(value)) > 60:
        return f"`{str(value)[:57]}...`"
    return f"`{value}`"


def rows(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(path, type, default, description) for every field under `model`, depth first."""
    out = []
    for name, field in model.model_fields.items():
        path = prefix + name
        subs = _sections(field.annotation)
        is_list = typing.get_origin(field.annotation) is list
        out.append((path, _type_name(field.annotation), _default(field),
                    (field.description or "").replace("|", "\\|").replace("\n", " ")))
        for sub in subs:
            out += rows(sub, f"{path}[]." if is_list else f"{path}.")
    return out


def reference_markdown() -> str:
    """One table per top-level section of the run config."""
    from fashionfuse.config import RunConfig

    groups: dict[str, list] = {}
    for row in rows(RunConfig):
        top = row[0].split(".")[0].split("[")[0]
        key = top if RunConfig.model_fields[top].annotation and _sections(
            RunConfig.model_fields[top].annotation) else "(top level)"
        groups.setdefault(key, []).append(row)
    parts = []
    for key, items in groups.items():
        parts.append(f"## `{key}`\n" if key != "(top level)" else "## Top level\n")
        parts.append("| field | type | default | meaning |\n|---|---|---|---|")
        parts += [f"| `{p}` | {t} | {d} | {m} |" for p, t, d, m in items]
        parts.append("")
    return "\n".join(parts)


def with_reference(markdown: str) -> str:
    """The page with the generated tables between its markers."""
    head, rest = markdown.split(MARKER, 1)
    tail = rest.split(END, 1)[1] if END in rest else "\n"
    return f"{head}{MARKER}\n\n{reference_markdown()}\n{END}{tail}"


def on_page_markdown(markdown: str, page, config, files) -> str:
    return with_reference(markdown) if MARKER in markdown else markdown


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(PAGE.parents[1] / "src"))
    PAGE.write_text(with_reference(PAGE.read_text()))
    print(f"wrote {PAGE}")

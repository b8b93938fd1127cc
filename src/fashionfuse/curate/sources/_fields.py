"""Field access shared by the readers: typed lookups that raise MalformedRow."""

from __future__ import annotations

from ..records import MalformedRow


def text_field(row: dict, *names: str, required: bool = True) -> str:
    """The first present string field among `names` ("" when optional and absent)."""
    for name in names:
        if name in row and row[name] is not None:
            value = row[name]
            if not isinstance(value, str):
                raise MalformedRow(f"field {name!r} is {type(value).__name__}, expected string")
            return value
    if required:
        raise MalformedRow(f"missing field {' / '.join(repr(n) for n in names)}")
    return ""

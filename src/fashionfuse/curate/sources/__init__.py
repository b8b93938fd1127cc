"""Source readers: one module per raw format, looked up by name in `READERS`.

A reader takes a path and yields `(where, row_or_exception)` pairs via `iter_rows`, then turns
each row into a `Record` or raises `MalformedRow`. To add a format, write a module with a
`to_record(row, index, source_name)` function and register it in `READERS`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

from ..records import MalformedRow, Record
from . import alpaca, oasst1, openorca, sharegpt

RowToRecord = Callable[[dict, str, str], Record]

READERS: dict[str, RowToRecord] = {
    "sharegpt": sharegpt.to_record,
    "puffin": sharegpt.to_record,      # LDJnr/Puffin: ShareGPT-style conversations
    "samantha": sharegpt.to_record,    # samantha-data: ShareGPT-style conversations
    "openorca": openorca.to_record,
    "alpaca": alpaca.to_record,
    "open_platypus": alpaca.to_record,  # instruction / input / output
    "airoboros": alpaca.to_record,      # instruction / response
    "oasst1": oasst1.to_record,         # tree export: best-ranked thread per tree
}


def iter_rows(path: Path) -> Iterator[tuple[str, dict | MalformedRow]]:
    """Yield (file:line, row) for JSONL files or (file:#index, row) for JSON arrays."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: source file not found")
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield where, MalformedRow(f"invalid JSON: {exc.msg}")
                    continue
                yield where, row if isinstance(row, dict) else MalformedRow("row is not an object")
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise MalformedRow(f"{path}: expected a JSON array of records")
        for i, row in enumerate(data):
            where = f"{path}:#{i}"
            yield where, row if isinstance(row, dict) else MalformedRow("row is not an object")
    else:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl or .json)")


def read_source(fmt: str, path: Path, source_name: str) -> Iterator[tuple[str, Record | MalformedRow]]:
    """Yield (where, Record) for good rows and (where, MalformedRow) for bad ones."""
    to_record = READERS[fmt]
    for index, (where, row) in enumerate(iter_rows(path)):
        if isinstance(row, MalformedRow):
            yield where, row
            continue
        try:
            rec = to_record(row, f"{source_name}-{index:07d}", source_name)
        except MalformedRow as exc:
            yield where, exc
            continue
        rec.meta["where"] = where
        yield where, rec

"""Source readers: one module per raw format, looked up by name in `READERS`.

A reader takes a path and yields `(where, row_or_exception)` pairs via `iter_rows`, then turns
each row into a `Record` or raises `MalformedRow`. To add a format, write a module with a
`to_record(row, index, source_name)` function and register it in `READERS`.
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from typing import Callable, Iterator

from ...errors import MissingFileError, UserError
from ..records import MalformedRow, Record
from . import alpaca, messages, oasst1, openorca, sharegpt

RowToRecord = Callable[[dict, str, str], Record]

READERS: dict[str, RowToRecord] = {
    "messages": messages.to_record,    # HF conversational: [{"role", "content"}, ...]
    "sharegpt": sharegpt.to_record,
    "puffin": sharegpt.to_record,      # LDJnr/Puffin: ShareGPT-style conversations
    "samantha": sharegpt.to_record,    # samantha-data: ShareGPT-style conversations
    "openorca": openorca.to_record,
    "alpaca": alpaca.to_record,
    "open_platypus": alpaca.to_record,  # instruction / input / output
    "airoboros": alpaca.to_record,      # instruction / response
    "oasst1": oasst1.to_record,         # tree export: best-ranked thread per tree
    "oasst1_messages": oasst1.to_record,  # flat message table, rebuilt into trees first
}
ROW_GROUPERS = {"oasst1_messages": oasst1.trees_from_messages}


# the keys inside each turn of a conversation list, by format: (list field, turn keys)
TURN_FIELDS = {"messages": ("messages", ("role", "content")),
               "sharegpt": ("conversations", ("from", "value")),
               "puffin": ("conversations", ("from", "value")),
               "samantha": ("conversations", ("from", "value"))}

_MISSING = object()


def _lookup(row: dict, dotted: str):
    """`row[a][b]` for "a.b" (a key that itself holds a dot wins); _MISSING when absent."""
    if dotted in row:
        return row[dotted]
    node = row
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _rename(row: dict, fields: dict[str, str] | None, fmt: str = "") -> dict:
    """Apply a field mapping {standard name: name in this source} to one row. A source name
    may reach into nested objects ("data.conversation"); the turn keys of a conversation list
    (`role`/`content` for messages, `from`/`value` for ShareGPT) are renamed in every turn."""
    if not fields:
        return row
    list_field, turn_keys = TURN_FIELDS.get(fmt, (None, ()))
    out = dict(row)
    for standard, theirs in fields.items():
        if standard in turn_keys:
            continue
        value = _lookup(row, theirs)
        if value is not _MISSING:
            out[standard] = value
    inner = {s: t for s, t in fields.items() if s in turn_keys and s != t}
    turns = out.get(list_field) if list_field else None
    if inner and isinstance(turns, list):
        out[list_field] = [
            {**turn, **{s: turn[t] for s, t in inner.items() if t in turn}}
            if isinstance(turn, dict) else turn for turn in turns]
    return out


def _decode(raw: bytes, first: bool) -> str:
    """One line of a file as text (a UTF-8 byte-order mark on the first line is dropped);
    raises MalformedRow for bytes that are not UTF-8."""
    if first and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedRow(f"invalid UTF-8 at byte {exc.start}") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict | MalformedRow]]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            try:
                line = _decode(raw, lineno == 1)
                if not line.strip():
                    continue
                row = json.loads(line)
            except MalformedRow as exc:
                yield where, exc
                continue
            except json.JSONDecodeError as exc:
                yield where, MalformedRow(f"invalid JSON: {exc.msg}")
                continue
            yield where, row if isinstance(row, dict) else MalformedRow("row is not an object")


def _json_rows(path: Path) -> Iterator[tuple[str, dict | MalformedRow]]:
    """A JSON array file; a file that cannot be parsed is one malformed entry at its error."""
    try:
        data = json.loads(_decode(path.read_bytes(), True))
    except MalformedRow as exc:
        yield f"{path}:1", exc
        return
    except json.JSONDecodeError as exc:
        yield f"{path}:{exc.lineno}", MalformedRow(f"invalid JSON: {exc.msg} (column {exc.colno}); "
                                                   "no row of this file could be read")
        return
    if not isinstance(data, list):
        yield f"{path}:1", MalformedRow("expected a JSON array of records")
        return
    for i, row in enumerate(data):
        yield f"{path}:#{i}", row if isinstance(row, dict) else MalformedRow("row is not an object")


def _csv_rows(path: Path) -> Iterator[tuple[str, dict | MalformedRow]]:
    # undecodable bytes become lone surrogates, so one bad row does not stop the file
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
        for lineno, row in enumerate(csv.DictReader(fh), 2):  # line 1 is the header
            bad = any(isinstance(v, str) and any("\udc80" <= c <= "\udcff" for c in v)
                      for v in row.values())
            yield f"{path}:{lineno}", MalformedRow("invalid UTF-8") if bad else row


def iter_rows(path: Path) -> Iterator[tuple[str, dict | MalformedRow]]:
    """Yield (where, row) from a local file: .jsonl (file:line), .json array, .csv, .parquet.
    Undecodable or unparsable rows come as MalformedRow with their place; nothing raises."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: source file not found")
    if path.suffix == ".jsonl":
        yield from _jsonl_rows(path)
    elif path.suffix == ".json":
        yield from _json_rows(path)
    elif path.suffix == ".csv":
        yield from _csv_rows(path)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:#{i}", row
    else:
        raise UserError(f"{path}: unsupported file type {path.suffix!r} "
                        "(use .jsonl, .json, .csv or .parquet)")


def iter_hub_rows(name: str, config: str | None, split: str, revision: str | None
                  ) -> Iterator[tuple[str, dict]]:
    """Yield (dataset:split:#index, row) from a Hugging Face hub dataset via `datasets`."""
    from datasets import load_dataset

    ds = load_dataset(name, config, split=split, revision=revision)
    for i, row in enumerate(ds):
        yield f"{name}:{split}:#{i}", row


def read_source(fmt: str, path: Path | None, source_name: str, *, fields: dict[str, str] | None = None,
                hub: str | None = None, hub_config: str | None = None, split: str = "train",
                revision: str | None = None) -> Iterator[tuple[str, Record | MalformedRow]]:
    """Yield (where, Record) for good rows and (where, MalformedRow) for bad ones."""
    to_record = READERS[fmt]
    rows = iter_hub_rows(hub, hub_config, split, revision) if hub else iter_rows(Path(path))
    if fmt in ROW_GROUPERS:
        rows = ROW_GROUPERS[fmt](rows)
    for index, (where, row) in enumerate(rows):
        if isinstance(row, MalformedRow):
            yield where, row
            continue
        try:
            rec = to_record(_rename(row, fields, fmt), f"{source_name}-{index:07d}", source_name)
        except MalformedRow as exc:
            yield where, exc
            continue
        rec.meta["where"] = where
        yield where, rec


def first_rows_problems(field: str, fmt: str, path: str, fields: dict[str, str] | None = None,
                        rows: int = 50, strict: bool = False) -> list[str]:
    """Lines for the first `rows` rows of a local source: one when none of them reads as `fmt`
    (naming the first bad row's place and problem), and with `strict` (curate.strict:
    curation stops at the first malformed row) one for every malformed row among them. None for
    a grouped format (oasst1_messages, rebuilt from the whole file)."""
    if fmt in ROW_GROUPERS or not Path(path).is_file():
        return []
    try:
        read = list(itertools.islice(read_source(fmt, Path(path), "check", fields=fields), rows))
    except UserError as exc:
        return [f"{field}: {exc}"]
    if not read:
        return [f"{field}: {path}: no rows"]
    bad = [(where, item) for where, item in read if not isinstance(item, Record)]
    if strict:
        return [f"{field}: {where}: {item} (curate.strict stops at it)" for where, item in bad]
    if len(bad) < len(read):
        return []
    where, item = bad[0]
    return [f"{field}: {where}: {item} (none of the first rows reads as format {fmt}; "
            "check source.format and source.fields)"]


"""Facts from a user's file: JSONL (one object a line) or CSV (a header row), checked whole before use.

Each row needs ``prompt`` and ``target`` (``answer`` is accepted as the same field). In JSONL an
optional ``metadata`` object is kept; any other key or CSV column becomes metadata too.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import EditInputError
from .inputs import check_fact

FACT_SUFFIXES = (".jsonl", ".csv")
_ANSWER_KEYS = ("target", "answer")


def read_facts(path: str | Path) -> list[dict[str, Any]]:
    """Records ``{"prompt", "target", "metadata"}``; EditInputError naming the file and line otherwise."""
    if not isinstance(path, (str, os.PathLike)):
        raise EditInputError(f"read_facts needs the path of a .jsonl or .csv file, got {type(path).__name__}.")
    path = Path(path)
    if path.suffix.lower() not in FACT_SUFFIXES:
        hint = "" if path.suffix else " (to write one fact, call edit(prompt, target))"
        raise EditInputError(f"{path}: facts are read from .jsonl or .csv files, not {path.suffix or 'no suffix'!r}"
                             f"{hint}.")
    try:
        if path.is_dir():
            raise EditInputError(f"{path} is a folder; give the path of a fact file.")
        if not path.is_file():
            raise EditInputError(f"{path} does not exist.")
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise EditInputError(f"{path} is not UTF-8 text: {error}") from None
    except OSError as error:  # a name too long, no permission, ...
        raise EditInputError(f"cannot read facts from {path}: {error}") from None
    rows = _csv_rows(text) if path.suffix.lower() == ".csv" else _jsonl_rows(text, path)
    records = [_record(row, f"{path.name} line {line}: ") for line, row in rows]
    if not records:
        raise EditInputError(f"{path} holds no facts; each row needs a prompt and a target.")
    return records


def fact_records(items: Any, caller: str) -> list[Any]:
    """The records of a fact file (a path), or the items of an iterable; EditInputError for anything else."""
    if isinstance(items, (str, os.PathLike)):
        return read_facts(items)
    if isinstance(items, Mapping):
        raise EditInputError(f"{caller} takes a list of facts, got a single {type(items).__name__}; "
                             f"wrap it in a list: {caller}([fact]).")
    if not isinstance(items, Iterable):
        raise EditInputError(f"{caller} needs a list of facts or the path of a fact file, got {type(items).__name__}.")
    return list(items)


def _jsonl_rows(text: str, path: Path) -> list[tuple[int, Any]]:
    rows = []
    for line, content in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 may sit inside a value
        if not content.strip():
            continue
        try:
            rows.append((line, json.loads(content)))
        except json.JSONDecodeError as error:
            raise EditInputError(f"{path.name} line {line}: not valid JSON ({error}).") from None
    return rows


def _csv_rows(text: str) -> list[tuple[int, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))  # keeps quoted fields that span lines whole
    rows = []
    for row in reader:
        if any(value and value.strip() for key, value in row.items() if key is not None):
            rows.append((_first_line(reader.line_num, row), {key: value for key, value in row.items()
                                                            if value not in (None, "")}))
    return rows


def _first_line(last_line: int, row: dict[str | None, Any]) -> int:
    """The line a CSV row starts on: the reader counts to its last, and a quoted field may span lines."""
    values = [v for value in row.values() for v in (value if isinstance(value, list) else [value])]
    return last_line - sum(value.count("\n") for value in values if isinstance(value, str))


def _record(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise EditInputError(f"{where}expected an object with 'prompt' and 'target', got {type(row).__name__}.")
    if None in row:
        raise EditInputError(f"{where}has more values than the header has columns.")
    answers = [row[key] for key in _ANSWER_KEYS if key in row]
    if len(answers) > 1 and answers[0] != answers[1]:
        raise EditInputError(f"{where}gives both 'target' and 'answer' with different values; keep one.")
    if "prompt" not in row or not answers:
        missing = " and ".join(k for k, present in (("prompt", "prompt" in row), ("target", bool(answers)))
                               if not present)
        raise EditInputError(f"{where}missing {missing}; each row needs 'prompt' and 'target' (or 'answer').")
    metadata = row.get("metadata", {})
    if not isinstance(metadata, dict):
        raise EditInputError(f"{where}metadata must be an object, got {type(metadata).__name__}.")
    extra = {k: v for k, v in row.items() if k not in ("prompt", "metadata", *_ANSWER_KEYS)}
    fact = check_fact(row["prompt"], answers[0], {**extra, **metadata}, where=where)
    return {"prompt": fact.prompt, "target": fact.target, "metadata": fact.metadata}

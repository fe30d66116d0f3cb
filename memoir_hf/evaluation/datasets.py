"""Loaders for the editing benchmarks (ZsRE, CounterFact, hallucination, temporal) and plain JSONL.

Each loader yields :class:`EvalRecord` in file order. A malformed record (a missing or empty field,
a value of the wrong type) is reported with its index (its line, for JSONL) and either skipped with
a warning or, with ``strict=True``, refused with a DataError; it is never silently mis-parsed.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..editing.inputs import valid_unicode
from ..errors import MemoirError


class DataError(MemoirError, ValueError):
    """An evaluation file or record cannot be used."""


@dataclass(frozen=True)
class EvalRecord:
    """One edit with the prompts it is judged on."""

    index: int
    """Position in the source file (0-based record index; for JSONL the line number - 1); ``load_many``
    runs it on across files, each file starting after the last index of the one before."""
    prompt: str
    target: str
    rephrase: str | None = None
    loc: str | None = None
    loc_ans: str | None = None
    subject: str | None = None


# For each format: EvalRecord field -> (source key, required).
_FIELDS: dict[str, dict[str, tuple[str, bool]]] = {
    "zsre": {"prompt": ("src", True), "target": ("alt", True), "rephrase": ("rephrase", True),
             "loc": ("loc", True), "loc_ans": ("loc_ans", True), "subject": ("subject", False)},
    "counterfact": {"prompt": ("prompt", True), "target": ("target_new", True),
                    "rephrase": ("rephrase_prompt", True), "loc": ("locality_prompt", True),
                    "loc_ans": ("locality_ground_truth", True), "subject": ("subject", False)},
    "hallucination": {"prompt": ("prompt", True), "target": ("target_new", True),
                      "loc": ("locality_prompt", True), "loc_ans": ("locality_ground_truth", True),
                      "subject": ("subject", False)},
    "temporal": {"prompt": ("prompt", True), "target": ("target_new", True), "rephrase": ("ood_rephrase", True),
                 "loc": ("locality_prompt", True), "loc_ans": ("locality_ground_truth", True),
                 "subject": ("subject", False)},
    "jsonl": {"prompt": ("prompt", True), "target": ("target", True), "rephrase": ("rephrase", False),
              "loc": ("loc", False), "loc_ans": ("loc_ans", False), "subject": ("subject", False)},
}
FORMATS = tuple(_FIELDS)


def load_records(path: str | Path, format: str, *, limit: int | None = None, strict: bool = False) -> list[EvalRecord]:
    """Records of a benchmark file. ``limit`` keeps the first N good records."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1, got {limit}.")
    if format not in _FIELDS:
        raise DataError(f"unknown data format {format!r}; use one of {', '.join(FORMATS)}.")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist.")
    raw = _jsonl_rows(path) if format == "jsonl" else _json_rows(path)
    records: list[EvalRecord] = []
    problems: list[str] = []
    notes: list[str] = []
    for index, row in raw:
        try:
            record, note = _record(row, index, _FIELDS[format], where=_where(path, format, index), strict=strict)
        except DataError as error:
            if strict:
                raise
            problems.append(str(error))
            continue
        records.append(record)
        if note:
            notes.append(note)
        if limit is not None and len(records) >= limit:
            break
    _warn(problems, f"skipped {len(problems)} malformed record(s) of {path}")
    _warn(notes, f"{len(notes)} record(s) of {path} have no usable locality pair; they are edited and judged "
                 "without a locality check")
    if not records:
        raise DataError(f"{path} holds no usable {format} record.")
    return records


def load_many(paths: str | Path | Sequence[str | Path], format: str, *, limit: int | None = None,
              strict: bool = False) -> list[EvalRecord]:
    """Records of one file, or of several in order; indices run on across files so they stay unique."""
    if isinstance(paths, (str, Path)):
        return load_records(paths, format, limit=limit, strict=strict)
    if not paths:
        raise DataError("no data file given: pass at least one.")
    records: list[EvalRecord] = []
    offset = 0
    for path in paths:
        remaining = None if limit is None else limit - len(records)
        if remaining == 0:
            break
        part = load_records(path, format, limit=remaining, strict=strict)
        records += [dataclasses.replace(r, index=r.index + offset) for r in part]
        offset = records[-1].index + 1
    return records


def _warn(lines: list[str], headline: str) -> None:
    if lines:
        shown = "\n  ".join(lines[:10]) + ("\n  ..." if len(lines) > 10 else "")
        warnings.warn(f"{headline}:\n  {shown}", stacklevel=3)


def _where(path: Path, format: str, index: int) -> str:
    return f"{path.name} line {index + 1}" if format == "jsonl" else f"{path.name} record {index}"


def _json_rows(path: Path) -> list[tuple[int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, list):
        raise DataError(f"{path} must hold a JSON list of records, found {type(data).__name__}.")
    return list(enumerate(data))


def _utf8_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").split("\n")  # not splitlines: U+2028 may sit inside a JSON line
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text: {error}") from None


def _jsonl_rows(path: Path) -> list[tuple[int, Any]]:
    rows: list[tuple[int, Any]] = []
    for number, line in enumerate(_utf8_lines(path)):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            rows.append((number, _Unparsable(str(error))))
    return rows


@dataclass(frozen=True)
class _Unparsable:
    error: str


def _record(row: Any, index: int, fields: dict[str, tuple[str, bool]], *, where: str,
            strict: bool) -> tuple[EvalRecord, str | None]:
    """The record, and a note when its locality pair is unusable (then it is kept without one)."""
    if isinstance(row, _Unparsable):
        raise DataError(f"{where}: not valid JSON ({row.error}).")
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(row).__name__}.")
    values = {name: _field(row, key, required=required and name not in _LOCALITY, blank_ok=name in _LOCALITY,
                           where=where) for name, (key, required) in fields.items()}
    note = None
    if (values["loc"] is None) != (values["loc_ans"] is None) or (
            values["loc"] is None and fields["loc"][1]):
        note = f"{where}: no usable locality pair ({fields['loc'][0]!r}, {fields['loc_ans'][0]!r})"
        if strict:
            raise DataError(f"{note}.")
        values["loc"] = values["loc_ans"] = None
    return EvalRecord(index=index, **values), note


_LOCALITY = ("loc", "loc_ans")


def _field(row: dict[str, Any], key: str, *, required: bool, blank_ok: bool, where: str) -> str | None:
    value = row.get(key)
    if value is None or (blank_ok and isinstance(value, str) and not value.strip()):
        if required:
            raise DataError(f"{where}: field {key!r} is missing.")
        return None
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {key!r} is not a non-empty string ({value!r:.40}).")
    if not valid_unicode(value):
        raise DataError(f"{where}: field {key!r} is not valid Unicode (it holds a lone surrogate).")
    return value


# The text of a calibration record: the first of these keys it has (a blank one refuses the file). An edit
# record (one with a target) gives only its locality prompt: its own prompt is not unrelated text.
_LOCALITY_KEYS = ("loc_prompt", "locality_prompt", "loc")
_TEXT_KEYS = (*_LOCALITY_KEYS, "prompt")
_TARGET_KEYS = ("target", "alt", "target_new")


def load_texts(path: str | Path) -> list[str]:
    """Unrelated texts for threshold calibration: a text file (one a line), a JSON list or a JSONL file
    of strings or of objects with a text field.

    From an object the first of ``loc_prompt``, ``locality_prompt``, ``loc`` and ``prompt`` is taken, so a
    benchmark's *train* split (ZsRE's train loc prompts or train file, CounterFact's or hallucination's
    train file) gives its locality prompts: the queries that must not read an edit, as routing sees them.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"calibration text file {path} does not exist.")
    if path.suffix in (".json", ".jsonl"):
        rows = _json_rows(path) if path.suffix == ".json" else _jsonl_rows(path)
        texts = [_text_of(item, _where(path, path.suffix[1:], i)) for i, item in rows]
        skipped = texts.count(None)
        if skipped:
            warnings.warn(f"{path}: {skipped} edit record(s) without a locality prompt give no calibration text.",
                          stacklevel=2)
        texts = [text for text in texts if text is not None]
    else:
        texts = [line.strip() for line in _utf8_lines(path) if line.strip()]
    if not texts:
        raise DataError(f"{path} holds no text.")
    return texts


def _text_of(item: Any, where: str) -> str | None:
    """The calibration text of one item; None for an edit record without a locality prompt."""
    if isinstance(item, _Unparsable):
        raise DataError(f"{where}: not valid JSON ({item.error}).")
    if isinstance(item, dict):
        edit_record = any(key in item for key in _TARGET_KEYS)
        keys = _LOCALITY_KEYS if edit_record else _TEXT_KEYS
        item = next((item[key] for key in keys if key in item), None)
        if item is None and edit_record:
            return None
    if not isinstance(item, str) or not item.strip():
        raise DataError(f"{where}: expected a string or an object with one of {', '.join(map(repr, _TEXT_KEYS))}.")
    return item

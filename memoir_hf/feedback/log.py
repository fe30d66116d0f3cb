"""FeedbackLog: an append-only JSONL file of corrections users gave to the model's answers.

Each line is one :class:`Feedback` with a fresh ``feedback_id``. Lines are appended under a file
lock, one ``write`` each, flushed and fsynced, so a crash can at worst leave an incomplete last line
(not UTF-8 or not JSON); reading skips such a line with a warning and refuses any other malformed
line, naming it. The next ``add`` cuts the incomplete line off before appending, so the fragment never
becomes a malformed line in the middle of the file; nothing else is ever rewritten.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # not POSIX: appends are not locked
    fcntl = None  # type: ignore[assignment]

from ..editing.inputs import valid_unicode
from ..errors import MemoirError
from ..memory.store import utc_now


@dataclass(frozen=True)
class Feedback:
    """One correction: after ``prompt`` the model said ``answer``; the user says ``correction``."""

    prompt: str
    correction: str
    answer: str | None = None
    confidence: float = 1.0
    """How sure the source is, in [0, 1]; ``learn_from`` applies only confident enough feedback."""
    source: str = "user"
    time: str = field(default_factory=utc_now)
    feedback_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        for name in ("prompt", "correction"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise MemoirError(f"feedback needs a non-empty string {name}, got {value!r}.")
        if self.answer is not None and not isinstance(self.answer, str):
            raise MemoirError(f"feedback answer must be a string or None, got {self.answer!r}.")
        check_confidence(self.confidence, "feedback confidence")
        if not isinstance(self.source, str) or not isinstance(self.feedback_id, str) or not self.feedback_id:
            raise MemoirError("feedback source and feedback_id must be strings (feedback_id non-empty).")
        for name in ("prompt", "correction", "answer", "source"):
            value = getattr(self, name)
            if value is not None and not valid_unicode(value):
                raise MemoirError(f"feedback {name} is not valid Unicode (it holds a lone surrogate): {value!r:.60}")


def check_confidence(value: object, name: str) -> None:
    """A confidence (or a threshold on it) is a number in [0, 1]; MemoirError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value <= 1:
        raise MemoirError(f"{name} must be a number in [0, 1], got {value!r}.")


class FeedbackLog:
    """The feedback in one JSONL file, oldest first. The file is created on the first ``add``."""

    def __init__(self, path: str | os.PathLike):
        if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
            raise MemoirError(f"a FeedbackLog needs the path of its JSONL file, got {path!r}.")
        self.path = Path(path)
        if self.path.is_dir():
            raise MemoirError(f"{self.path} is a folder; a FeedbackLog needs the path of a file in it.")

    def add(self, prompt: str, correction: str, *, answer: str | None = None, confidence: float = 1.0,
            source: str = "user") -> Feedback:
        """Append one correction and return it (with its new ``feedback_id``).

        The file is locked while the line is appended (on POSIX systems), so several processes may add
        to one log. An incomplete last line left by an interrupted write is dropped first, with a
        warning; a complete record that only lacks its newline gets it.
        """
        feedback = Feedback(prompt, correction, answer, confidence, source)
        line = (json.dumps(asdict(feedback), ensure_ascii=False) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as handle:
            _lock(handle)
            start, last = _last_line(handle)
            if last.strip():
                if self._unterminated(last, "its last line") is None:
                    warnings.warn(f"{self.path}: dropping its incomplete last line (an interrupted write?) before "
                                  "appending.", stacklevel=2)
                    handle.truncate(start)
                else:
                    handle.write(b"\n")
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        return feedback

    def __iter__(self) -> Iterator[Feedback]:
        return iter(self.entries())

    def __len__(self) -> int:
        return len(self.entries())

    def entries(self) -> list[Feedback]:
        """Every feedback in the file (none when the file does not exist yet)."""
        if not self.path.exists():
            return []
        *lines, last = self.path.read_bytes().removeprefix(codecs.BOM_UTF8).split(b"\n")
        entries = [self._parse(self._decoded(line, f"line {number}"), f"line {number}")
                   for number, line in enumerate(lines, start=1) if line.strip()]
        if last.strip():
            unterminated = self._unterminated(last, f"line {len(lines) + 1}")
            if unterminated is None:
                warnings.warn(f"{self.path}: the last line is incomplete (an interrupted write?); it is ignored.",
                              stacklevel=2)
            else:
                entries.append(unterminated)
        seen: set[str] = set()
        for number, entry in enumerate(entries, start=1):
            if entry.feedback_id in seen:
                raise MemoirError(f"{self.path}: feedback_id {entry.feedback_id!r} appears twice (entry {number}).")
            seen.add(entry.feedback_id)
        return entries

    def _unterminated(self, raw: bytes, where: str) -> Feedback | None:
        """The record on a last line without its newline; None for a torn write (not UTF-8 or not JSON).
        Complete JSON that is no feedback record is refused like any malformed line."""
        try:
            values = json.loads(raw.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        return self._feedback(values, where)

    def _decoded(self, raw: bytes, where: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise MemoirError(f"{self.path} {where} is not UTF-8 text: {error}") from None

    def _parse(self, line: str, where: str) -> Feedback:
        try:
            values = json.loads(line)
        except json.JSONDecodeError as error:
            raise MemoirError(f"{self.path} {where} is not a feedback record: {error}") from None
        return self._feedback(values, where)

    def _feedback(self, values: object, where: str) -> Feedback:
        try:
            if not isinstance(values, dict):
                raise TypeError("not a JSON object")
            return Feedback(**values)
        except (TypeError, MemoirError) as error:
            raise MemoirError(f"{self.path} {where} is not a feedback record: {error}") from None


_TAIL_CHUNK = 1 << 16


def _last_line(handle: BinaryIO) -> tuple[int, bytes]:
    """The offset and bytes of what follows the file's last newline, read backwards from the end."""
    position = handle.seek(0, os.SEEK_END)
    tail = b""
    while position > 0:
        step = min(_TAIL_CHUNK, position)
        position -= step
        handle.seek(position)
        tail = handle.read(step) + tail
        newline = tail.rfind(b"\n")
        if newline >= 0:
            return position + newline + 1, tail[newline + 1:]
    return 0, tail


def _lock(handle: BinaryIO) -> None:
    """Hold an exclusive advisory lock on the open file until it is closed (no lock without fcntl)."""
    if fcntl is not None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)

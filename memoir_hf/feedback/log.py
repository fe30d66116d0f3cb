"""FeedbackLog: an append-only JSONL file of corrections users gave to the model's answers.

Each line is one :class:`Feedback` with a fresh ``feedback_id``. Lines are only ever appended, one
``write`` each, flushed and fsynced, so a crash can at worst leave an incomplete last line; reading
skips such a line with a warning and refuses any other malformed line, naming it. The next ``add``
drops the incomplete line (or ends a complete record that only lacks its newline) before appending,
so the fragment never becomes a malformed line in the middle of the file.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
        confidence = self.confidence
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 <= confidence <= 1 \
                or math.isnan(confidence):
            raise MemoirError(f"feedback confidence must be a number in [0, 1], got {confidence!r}.")
        if not isinstance(self.source, str) or not isinstance(self.feedback_id, str) or not self.feedback_id:
            raise MemoirError("feedback source and feedback_id must be strings (feedback_id non-empty).")


class FeedbackLog:
    """The feedback in one JSONL file, oldest first. The file is created on the first ``add``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def add(self, prompt: str, correction: str, *, answer: str | None = None, confidence: float = 1.0,
            source: str = "user") -> Feedback:
        """Append one correction and return it (with its new ``feedback_id``)."""
        feedback = Feedback(prompt, correction, answer, confidence, source)
        line = json.dumps(asdict(feedback), ensure_ascii=False) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_last_line()
        with open(self.path, "a", encoding="utf-8") as handle:
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
        lines = self.path.read_text(encoding="utf-8").split("\n")
        if lines[-1].strip() and not self._is_record(lines[-1]):
            warnings.warn(f"{self.path}: the last line is incomplete (an interrupted write?); it is ignored.",
                          stacklevel=2)
            lines.pop()
        entries = [self._parse(line, number) for number, line in enumerate(lines, start=1) if line.strip()]
        seen: set[str] = set()
        for number, entry in enumerate(entries, start=1):
            if entry.feedback_id in seen:
                raise MemoirError(f"{self.path}: feedback_id {entry.feedback_id!r} appears twice (entry {number}).")
            seen.add(entry.feedback_id)
        return entries

    def _repair_last_line(self) -> None:
        """Make the file end with a newline before appending: a complete record that lacks it gets it,
        an incomplete line (an interrupted write) is cut off with a warning."""
        if not self.path.exists():
            return
        with open(self.path, "rb+") as handle:
            data = handle.read()
            start = data.rfind(b"\n") + 1
            last = data[start:]
            if not last:
                return
            if self._is_record(last.decode("utf-8", errors="replace")):
                handle.write(b"\n")
            else:
                warnings.warn(f"{self.path}: dropping its incomplete last line (an interrupted write?) before "
                              "appending.", stacklevel=3)
                handle.truncate(start)
            handle.flush()
            os.fsync(handle.fileno())

    def _is_record(self, line: str) -> bool:
        try:
            self._parse(line, 0)
        except MemoirError:
            return False
        return True

    def _parse(self, line: str, number: int) -> Feedback:
        try:
            values = json.loads(line)
            if not isinstance(values, dict):
                raise TypeError("not a JSON object")
            return Feedback(**values)
        except (json.JSONDecodeError, TypeError, MemoirError) as error:
            raise MemoirError(f"{self.path} line {number} is not a feedback record: {error}") from None

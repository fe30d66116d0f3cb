"""Self-correction: ask the model first, edit only the facts it gets wrong."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from ..editing.fact_files import fact_records
from ..editing.inputs import EncodedFact, Fact, fact_from_record, record_position
from ..editing.result import EditResult
from ..errors import EditInputError, MemoirError
from .answers import answers_match

if TYPE_CHECKING:
    from ..model import MemoirModel

Accept = Callable[[str, str], bool]
"""``accept(model_answer, expected)``: True when the model's answer already says what is expected."""
ALREADY_CORRECT, EDITED, EDIT_FAILED = "already_correct", "edited", "edit_failed"
EXTRA_ANSWER_TOKENS = 3
"""Tokens generated beyond the expected answer's length, so a longer wrong answer is seen as wrong."""


@dataclass(frozen=True)
class Correction:
    """What ``correct`` did with one fact, and why."""

    prompt: str
    answer: str
    model_answer: str
    """The model's greedy answer before any edit (through the memory)."""
    status: str
    """"already_correct", "edited" or "edit_failed"."""
    edit: EditResult | None = None

    @property
    def reason(self) -> str:
        if self.status == ALREADY_CORRECT:
            return f"the model already answers {self.model_answer!r}"
        if self.edit.error is not None:
            return f"the model answered {self.model_answer!r}; the edit was rolled back: {self.edit.error}"
        verdict = "now answers" if self.status == EDITED else "still does not reliably answer"
        return f"the model answered {self.model_answer!r}; edit {self.edit.edit_id} {verdict} {self.answer!r}"


@dataclass
class CorrectionReport:
    corrections: list[Correction] = field(default_factory=list)

    def _count(self, status: str) -> int:
        return sum(c.status == status for c in self.corrections)

    @property
    def checked(self) -> int:
        return len(self.corrections)

    @property
    def already_correct(self) -> int:
        return self._count(ALREADY_CORRECT)

    @property
    def edited(self) -> int:
        return self._count(EDITED)

    @property
    def failed(self) -> int:
        return self._count(EDIT_FAILED)

    def summary(self) -> str:
        return (f"checked {self.checked}: {self.already_correct} already correct, {self.edited} edited, "
                f"{self.failed} failed")


def correct_one(memoir: MemoirModel, fact: Fact, encoded: EncodedFact, accept: Accept | None) -> Correction:
    model_answer = memoir._greedy_answer(encoded.prompt_ids, len(encoded.target_ids) + EXTRA_ANSWER_TOKENS)
    if _accepted(accept, model_answer, fact.target):
        return Correction(fact.prompt, fact.target, model_answer, ALREADY_CORRECT)
    result = memoir._write(fact, encoded)
    return Correction(fact.prompt, fact.target, model_answer, EDITED if result.success else EDIT_FAILED, result)


def correct_many(memoir: MemoirModel, items: Iterable[Any] | str | os.PathLike, accept: Accept | None, *,
                 progress: bool) -> CorrectionReport:
    records = fact_records(items, "correct_many")
    facts = [fact_from_record(_with_target(record, record_position(i)), i) for i, record in enumerate(records)]
    # Every fact is checked (and tokenized) before the first is edited.
    encoded = [memoir._encode(fact, where=record_position(i)) for i, fact in enumerate(facts)]
    report = CorrectionReport()
    bar = tqdm(zip(facts, encoded, strict=True), total=len(facts), desc="memoir corrections", unit="fact",
               disable=not progress)
    for fact, fact_ids in bar:
        report.corrections.append(correct_one(memoir, fact, fact_ids, accept))
        bar.set_postfix(edited=report.edited, correct=report.already_correct)
    return report


def _with_target(record: Any, where: str) -> Any:
    """Corrections name the expected text ``answer``; edits call it ``target``. Both are accepted."""
    if not isinstance(record, Mapping) or "answer" not in record:
        return record
    if "target" in record and record["target"] != record["answer"]:
        raise EditInputError(f"{where}gives both 'answer' and 'target' with different values; keep one.")
    return {("target" if key == "answer" else key): value for key, value in record.items()}


def check_accept(accept: Any) -> None:
    if accept is not None and not callable(accept):
        raise MemoirError(f"accept must be a callable (model_answer, expected) -> bool, got {type(accept).__name__}.")


def _accepted(accept: Accept | None, model_answer: str, expected: str) -> bool:
    if accept is None:
        return answers_match(model_answer, expected)
    verdict = accept(model_answer, expected)
    if isinstance(verdict, np.bool_):
        verdict = bool(verdict)
    if not isinstance(verdict, bool):
        raise MemoirError(f"accept must return True or False, returned {type(verdict).__name__} {verdict!r}.")
    return verdict

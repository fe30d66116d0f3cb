"""Apply the corrections of a FeedbackLog as edits, each at most once."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..editing.inputs import check_fact
from ..errors import MemoirError
from .log import Feedback, FeedbackLog

if TYPE_CHECKING:
    from ..model import MemoirModel

FEEDBACK_KEY = "feedback_id"
"""Edit metadata key naming the feedback an edit came from: what makes learn_from idempotent."""


@dataclass
class LearnReport:
    """What ``learn_from`` did with each feedback entry."""

    applied: dict[str, int] = field(default_factory=dict)
    """feedback_id -> the edit_id it produced."""
    failed: dict[str, int | None] = field(default_factory=dict)
    """feedback_id -> edit_id of edits that did not reach their target (kept, marked unsuccessful), or
    None for an edit rolled back because its optimisation produced NaN/inf (nothing stored)."""
    already_applied: list[str] = field(default_factory=list)
    below_confidence: list[str] = field(default_factory=list)
    invalid: dict[str, str] = field(default_factory=dict)
    """feedback_id -> why it cannot be edited (say, a prompt longer than the model's context); skipped."""


def learn_from(memoir: MemoirModel, log: FeedbackLog, *, min_confidence: float = 0.8,
               progress: bool = True) -> LearnReport:
    """Edit every correction of ``log`` with confidence >= ``min_confidence`` that no edit came from.

    An edit that was removed (or merged away) still counts: removing it does not invite the same
    feedback back in.
    """
    done = {e.metadata.get(FEEDBACK_KEY) for e in memoir.store.records + memoir.store.removed}
    report = LearnReport()
    pending = []
    for entry in log.entries():
        if entry.feedback_id in done:
            report.already_applied.append(entry.feedback_id)
        elif entry.confidence < min_confidence:
            report.below_confidence.append(entry.feedback_id)
        elif (reason := _why_not_editable(memoir, entry)) is not None:
            report.invalid[entry.feedback_id] = reason
        else:
            pending.append(entry)
    if report.invalid:
        warnings.warn(f"{log.path}: {len(report.invalid)} correction(s) cannot be edited and were skipped "
                      f"(LearnReport.invalid says why): {next(iter(report.invalid.values()))}", stacklevel=3)
    records = [{"prompt": e.prompt, "target": e.correction,
                "metadata": {FEEDBACK_KEY: e.feedback_id, "source": e.source, "confidence": e.confidence}}
               for e in pending]
    for entry, result in zip(pending, memoir.edit_many(records, progress=progress), strict=True):
        (report.applied if result.success else report.failed)[entry.feedback_id] = result.edit_id
    return report


def _why_not_editable(memoir: MemoirModel, entry: Feedback) -> str | None:
    """The check every edit makes, on one correction: None when it can be edited."""
    try:
        memoir._encode(check_fact(entry.prompt, entry.correction))
    except MemoirError as error:
        return str(error)
    return None

"""What edit() returns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EditResult:
    edit_id: int | None
    """The stored edit's id; None when nothing was stored (see ``error``)."""
    success: bool
    """Every target token is the argmax after the plain prompt, read through routing."""
    loss: float
    """Final mean target cross-entropy over the prompt and its prefixed variants."""
    steps: int
    """Optimiser steps taken (at most max_steps, plus unprotected_steps for a protected edit that was stuck;
    fewer when the loss fell below stop_loss)."""
    seconds: float
    target_accuracy: float
    """Fraction of target tokens that are the argmax after the plain prompt, through routing."""
    routed_edit_id: int | None
    """The edit the plain prompt routed to in that check (normally this edit)."""
    error: str | None = None
    """Why nothing was stored, when the edit was rolled back (its optimisation produced NaN or inf)."""

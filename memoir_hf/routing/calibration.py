"""Set the routing threshold from data instead of by hand.

Negatives: generic texts unrelated to the edits, scored by their best overlap with any stored edit.
Positives: each edit prompt behind the context prefixes the model generated (the prompt in other
contexts), scored by its overlap with its own edit's mask. τ goes midway between a high quantile of
the negatives and a low quantile of the positives; when those cross, τ stays at the negatives'
quantile, so that locality (unrelated prompts untouched) wins over generalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Calibration:
    threshold: float
    negative_quantile: float
    """The ``negative_q`` quantile of unrelated texts' best overlap with any edit."""
    positive_quantile: float
    """The ``positive_q`` quantile of prefixed edit prompts' overlap with their own edit."""
    negatives: int
    positives: int


def choose_threshold(negative_overlaps: np.ndarray, positive_overlaps: np.ndarray, *, negative_q: float = 0.99,
                     positive_q: float = 0.05) -> Calibration:
    high_negative = float(np.quantile(negative_overlaps, negative_q))
    low_positive = float(np.quantile(positive_overlaps, positive_q))
    threshold = (high_negative + low_positive) / 2 if low_positive > high_negative else high_negative
    # Masks have k bits, so overlaps are multiples of 1/k: step just above a negative's exact value.
    threshold = min(1.0, threshold + 1e-9)
    return Calibration(threshold, high_negative, low_positive, len(negative_overlaps), len(positive_overlaps))

"""The editing metrics, as EasyEdit and the WISE / GRACE / MEMOIR papers compute them.

Rel and Gen: teacher-forced token accuracy of the target after the edit prompt / its rephrase.
Loc: fraction of the loc answer's tokens whose argmax after all edits equals the argmax before any
edit. PPL: perplexity of the target (hallucination). Every function takes plain token lists, so
each is checked on hand-made cases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def token_accuracy(predicted: Sequence[int], target: Sequence[int]) -> float:
    """Fraction of positions where the argmax token is the target token."""
    _same_length(predicted, target)
    return sum(p == t for p, t in zip(predicted, target, strict=True)) / len(target)


def agreement(before: Sequence[int], after: Sequence[int]) -> float:
    """Fraction of positions whose argmax did not change (Loc of one record)."""
    _same_length(before, after)
    return sum(b == a for b, a in zip(before, after, strict=True)) / len(before)


def perplexity(token_nll: Sequence[float]) -> float:
    """exp of the mean negative log-likelihood of the target tokens."""
    if not token_nll:
        raise ValueError("perplexity of an empty target")
    return math.exp(sum(token_nll) / len(token_nll))


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _same_length(a: Sequence[int], b: Sequence[int]) -> None:
    if len(a) != len(b) or not a:
        raise ValueError(f"token lists must be non-empty and of equal length, got {len(a)} and {len(b)}")

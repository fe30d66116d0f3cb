"""Context prefixes for prefix augmentation, generated once by the model itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..generation import greedy_new_tokens
from .inputs import context_length


def generate_prefixes(model: nn.Module, tokenizer: Any, starts: Sequence[str], lengths: Sequence[int]) -> list[str]:
    """One greedy continuation of each start for each length (shorter ones are prefixes of longer)."""
    if not starts or not lengths:
        return []
    device = next(model.parameters()).device
    limit = context_length(getattr(model, "config", None))
    prefixes = []
    for start in starts:
        start_ids = tokenizer(start)["input_ids"]
        # Never past the model's context: such a prefix could not be used, and generating it would crash
        # models with learned positions (or run for ever with a huge prefix length).
        budget = max(lengths) if limit is None else min(max(lengths), limit - len(start_ids))
        new_tokens = greedy_new_tokens(model, tokenizer, start_ids, budget, device) if budget > 0 else []
        for length in lengths:
            continuation = tokenizer.decode(new_tokens[:length], skip_special_tokens=True)
            prefixes.append(" ".join(f"{start}{continuation}".split()))
    return prefixes


def with_prefix(prefix: str, prompt: str) -> str:
    """The prompt behind a context prefix, as a new sentence."""
    separator = " " if prefix.endswith((".", "!", "?", ":")) else ". "
    return f"{prefix}{separator}{prompt}"

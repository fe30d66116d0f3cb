"""Pad token id lists into one batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_batch(rows: Sequence[Sequence[int]], *, pad_id: int, device: torch.device | str | None = None,
              side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for token id lists of different lengths."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[i, span] = torch.tensor(list(row), dtype=torch.long)
        attention_mask[i, span] = 1
    return input_ids.to(device), attention_mask.to(device)

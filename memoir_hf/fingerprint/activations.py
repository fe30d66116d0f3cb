"""Read the down projection inputs of a batch without running the layers above it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..memory.layer import MemoirLayer
from .batching import pad_batch


class _StopForward(Exception):
    """Raised by the observer once the memory layer's input is captured, to skip the layers above."""


@torch.no_grad()
def capture_down_proj_inputs(
    model: nn.Module, layer: MemoirLayer, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Activations [batch, seq, d_ff] entering the memory layer for this batch."""
    captured: list[torch.Tensor] = []

    def observe(inputs: torch.Tensor) -> None:
        captured.append(inputs.detach())
        raise _StopForward

    layer.observer = observe
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
              use_cache=False)
    except _StopForward:
        pass
    finally:
        layer.observer = None
    if not captured:
        raise RuntimeError("the forward pass never reached the memory layer")
    return captured[0].reshape(input_ids.shape[0], input_ids.shape[1], -1)


def down_proj_inputs_in_batches(model: nn.Module, layer: MemoirLayer, rows: Sequence[Sequence[int]], *,
                                pad_id: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(activations [b, seq, d_ff], attention_mask [b, seq]) for token id lists, ``batch_size`` at a time."""
    for start in range(0, len(rows), batch_size):
        input_ids, attention_mask = pad_batch(rows[start:start + batch_size], pad_id=pad_id, device=layer.device)
        yield capture_down_proj_inputs(model, layer, input_ids, attention_mask), attention_mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so left padding does not shift them (as generate does)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

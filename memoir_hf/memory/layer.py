"""MemoirLayer: a frozen down projection plus the zero-initialised sparse residual memory W_m."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..patching.dispatch import execution_device


@dataclass
class RoutedRows:
    """Which sequences of a batch read the memory, and through which stored mask each one does."""

    batch_size: int
    rows: torch.Tensor
    """Indices of the routed sequences, long [r]."""
    masks: torch.Tensor
    """The matched edits' masks as 0/1 in the layer's dtype, [r, d_ff]."""


@dataclass
class ColumnEdit:
    """An edit in progress: the trainable copy of W_m's masked columns."""

    columns: torch.Tensor
    delta: torch.Tensor
    """W_m[:, columns] in float32, [d_model, k]; the only tensor that gets gradient."""


RouteFn = Callable[[torch.Tensor], "RoutedRows | None"]


class MemoirLayer(nn.Module):
    """Computes ``base(a) + W_m (M ⊙ a)``, where M is the routed edit's mask for each sequence.

    The base layer is kept (a reference, never a copy) and never modified; it is only called, as
    accelerate may have offloaded its weight to "meta". W_m starts at zero, on the device the base
    layer computes on; a sequence that routes to no edit gets exactly the base layer's output.
    """

    def __init__(self, base_layer: nn.Module, d_model: int, d_ff: int):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = d_ff
        self.out_features = d_model
        self.memory_weight = nn.Parameter(
            torch.zeros(d_model, d_ff, device=execution_device(base_layer), dtype=base_layer.weight.dtype),
            requires_grad=False,
        )
        self.router: RouteFn | None = None
        self.observer: Callable[[torch.Tensor], None] | None = None
        self.column_edit: ColumnEdit | None = None

    @property
    def device(self) -> torch.device:
        return self.memory_weight.device

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        output = self.base_layer(inputs)
        if self.observer is not None:
            self.observer(inputs)
        if self.column_edit is not None:
            return output + self._edit_residual(inputs, self.column_edit).to(output.dtype)
        routed = self.router(inputs) if self.router is not None else None
        if routed is None:
            return output
        return self._add_routed_residual(inputs, output, routed)

    @staticmethod
    def _edit_residual(inputs: torch.Tensor, edit: ColumnEdit) -> torch.Tensor:
        return inputs.index_select(-1, edit.columns).to(edit.delta.dtype) @ edit.delta.T

    def _add_routed_residual(self, inputs: torch.Tensor, output: torch.Tensor, routed: RoutedRows) -> torch.Tensor:
        # Some families (OPT) flatten [batch, seq] before the MLP: view rows as sequences again.
        shape = output.shape
        inputs = inputs.reshape(routed.batch_size, -1, inputs.shape[-1])
        output = output.reshape(routed.batch_size, -1, output.shape[-1])
        selected = inputs.index_select(0, routed.rows) * routed.masks[:, None, :].to(inputs.dtype)
        residual = selected @ self.memory_weight.T
        return output.index_add(0, routed.rows, residual.to(output.dtype)).reshape(shape)

    @torch.no_grad()
    def write_columns(self, columns: torch.Tensor, values: torch.Tensor) -> None:
        """Store a finished edit: only these columns of W_m change."""
        self.memory_weight[:, columns] = values.to(self.memory_weight.dtype)

    @torch.no_grad()
    def subtract_columns(self, columns: torch.Tensor, values: torch.Tensor) -> None:
        """Take an edit's delta back out of these columns."""
        columns = columns.to(self.device)
        # In float32: taking out the latest edit gives back W_m bit for bit wherever the edit's change
        # fits float32 exactly beside what the entry held (every bf16/fp16 entry not over 2^13 times
        # smaller than the change), and to float32 rounding of the change elsewhere.
        remaining = self.memory_weight[:, columns].float() - values.to(self.device, torch.float32)
        self.memory_weight[:, columns] = remaining.to(self.memory_weight.dtype)

    def extra_repr(self) -> str:
        return f"d_ff={self.in_features}, d_model={self.out_features}"

"""Train one edit: only the k columns of W_m selected by the edit's mask, with everything else frozen."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MemoirConfig
from ..fingerprint.activations import position_ids
from ..fingerprint.batching import pad_batch
from ..memory.layer import ColumnEdit, MemoirLayer


@dataclass
class EditBatch:
    """Prompt variants (left padded) each followed by the same target tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_ids: torch.Tensor

    @classmethod
    def build(cls, prompts: list[list[int]], target_ids: list[int], *, pad_id: int, device: torch.device) -> EditBatch:
        input_ids, attention_mask = pad_batch([p + target_ids for p in prompts], pad_id=pad_id, device=device)
        return cls(input_ids, attention_mask, torch.tensor(target_ids, device=device))


@dataclass
class TrainOutcome:
    columns_value: torch.Tensor
    """The trained W_m[:, columns], float32 [d_model, k]."""
    loss: float
    steps: int
    inputs: torch.Tensor
    """The memory layer's inputs for the batch, [batch, seq, d_ff], as the steps saw them (they are frozen)."""


def train_columns(model: nn.Module, layer: MemoirLayer, batch: EditBatch, columns: torch.Tensor,
                  config: MemoirConfig, *, all_positions: bool = False,
                  earlier_keys: torch.Tensor | None = None) -> TrainOutcome:
    """SGD on W_m[:, columns] so that every prompt variant is followed by the target.

    The other columns of W_m are never read or written. Weight decay pulls this edit's own change toward
    zero, not the columns' values (see :func:`_sgd_step`).
    ``all_positions`` computes logits at every position, as the reference code does (for the naive path).
    ``earlier_keys`` is the second moment C of earlier edits' keys on these columns [k, k] (see
    :mod:`memoir_hf.memory.earlier_keys`): with ``config.protect_earlier_edits`` = μ > 0 each step is
    taken in the metric ``I + μC``, i.e. the gradient is multiplied by ``(I + μC)^-1``, which shrinks
    it along the directions earlier edits' tokens read and leaves the others. Where many ΔW reach the
    target, steps in this metric head for one that is small in ``tr(ΔW (I + μC) ΔW^T)`` (exactly the
    smallest, for a linear read-out trained to its optimum), which is what a penalty ``μ tr(ΔW C ΔW^T)``
    in the loss would ask for; plain SGD on such a penalty diverges once μ times C's largest
    eigenvalue passes 1 / learning_rate, and C grows with every edit. An edit still above
    ``config.stop_loss`` after ``config.max_steps`` protected steps takes up to
    ``config.unprotected_steps`` more in the plain metric.
    """
    start = layer.memory_weight[:, columns].detach().float()
    delta = start.clone().requires_grad_(True)
    metric = _inverse_metric(earlier_keys, config.protect_earlier_edits)
    seen: list[torch.Tensor] = []
    layer.column_edit = ColumnEdit(columns, delta)
    layer.observer = _keep_first(seen)
    try:
        with frozen_parameters(model):
            total_steps = config.max_steps + (config.unprotected_steps if metric is not None else 0)
            for step in range(total_steps + 1):
                last = step == total_steps
                with torch.set_grad_enabled(not last), _autocast(config, delta.device):
                    loss = target_loss(model, batch, all_positions=all_positions)
                if last or loss.item() < config.stop_loss:
                    break
                (grad,) = torch.autograd.grad(loss, [delta])
                protected = metric is not None and step < config.max_steps
                _sgd_step(delta, grad @ metric if protected else grad, config, start)
    finally:
        layer.column_edit = None
        layer.observer = None
    inputs = seen[0].reshape(*batch.input_ids.shape, -1)  # some families (OPT) flatten [batch, seq]
    return TrainOutcome(delta.detach(), float(loss.item()), step, inputs)


def _keep_first(into: list[torch.Tensor]) -> Callable[[torch.Tensor], None]:
    def observe(inputs: torch.Tensor) -> None:
        if not into:
            into.append(inputs.detach())
    return observe


def _inverse_metric(earlier_keys: torch.Tensor | None, strength: float) -> torch.Tensor | None:
    """(I + strength C)^-1, symmetric positive definite with eigenvalues in (0, 1]; None leaves SGD plain.

    Inverted in float64 on the CPU (a k x k Cholesky solve, milliseconds): C grows with every edit,
    and in float32 an inverse of I + μC with μ times C's largest eigenvalue near 1e6 already has
    negative eigenvalues, which would turn some steps uphill.
    """
    if earlier_keys is None or not strength:
        return None
    metric = torch.eye(earlier_keys.shape[0], dtype=torch.float64) + strength * earlier_keys.double().cpu()
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(metric))
    return inverse.to(earlier_keys.device, torch.float32)


def _autocast(config: MemoirConfig, device: torch.device) -> AbstractContextManager[None]:
    if config.edit_autocast is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, config.edit_autocast))


def _sgd_step(delta: torch.Tensor, grad: torch.Tensor, config: MemoirConfig, start: torch.Tensor) -> None:
    """One clipped SGD step on the edit's columns, with weight decay on ``delta - start``, the edit's own
    change. The columns are shared with earlier edits (two masks share about k / d_ff of their columns):
    decay on their values would shrink what every earlier edit wrote there at each step of each later
    edit, which the reference code does (to the whole of W_m) and which loses old edits over time."""
    # As floats: torch refuses Python ints beyond int64 (a valid config may hold learning_rate=2**70).
    max_norm, learning_rate, weight_decay = map(float, (config.max_grad_norm, config.learning_rate,
                                                        config.weight_decay))
    with torch.no_grad():
        norm = grad.norm()
        if norm > max_norm:
            grad = grad * (max_norm / (norm + 1e-6))
        delta -= learning_rate * (grad + weight_decay * (delta - start))


def target_loss(model: nn.Module, batch: EditBatch, *, all_positions: bool = False) -> torch.Tensor:
    """Mean cross-entropy of the target tokens, from logits at the target positions only."""
    logits = target_logits(model, batch.input_ids, batch.attention_mask, len(batch.target_ids),
                           all_positions=all_positions)
    labels = batch.target_ids.expand(logits.shape[0], -1)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def target_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  n_target: int, *, all_positions: bool = False) -> torch.Tensor:
    """Logits predicting the last ``n_target`` tokens of each left-padded row: [batch, n_target, vocab]."""
    length = input_ids.shape[1]
    positions = torch.arange(length - n_target - 1, length - 1, device=input_ids.device)
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False,
              "position_ids": position_ids(attention_mask)}
    if not all_positions and accepts_argument(type(model), "logits_to_keep"):
        # Positions as a tensor, not a count: the head then gets a contiguous gather of the hidden
        # states instead of a strided slice, which PyTorch multiplies as a batched matmul against the
        # vocabulary matrix broadcast once per row, about ten times slower on CPU.
        kwargs["logits_to_keep"] = positions
    logits = model(**kwargs).logits
    return logits[:, positions] if logits.shape[1] == length else logits


@functools.cache
def accepts_argument(model_class: type[nn.Module], argument: str) -> bool:
    """Whether ``model_class.forward`` takes ``argument`` (looked up once per class)."""
    try:
        return argument in inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):
        return False


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """No base parameter records gradient while an edit trains (restored afterwards)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)

"""Train one edit: only the k columns of W_m selected by the edit's mask, with everything else frozen."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
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


def train_columns(model: nn.Module, layer: MemoirLayer, batch: EditBatch, columns: torch.Tensor,
                  config: MemoirConfig) -> TrainOutcome:
    """SGD on W_m[:, columns] so that every prompt variant is followed by the target.

    Weight decay acts on these columns only; the other columns of W_m are never read or written.
    """
    delta = layer.memory_weight[:, columns].detach().float().clone().requires_grad_(True)
    layer.column_edit = ColumnEdit(columns, delta)
    try:
        with frozen_parameters(model):
            for step in range(config.max_steps + 1):
                last = step == config.max_steps
                with torch.set_grad_enabled(not last):
                    loss = target_loss(model, batch)
                if last or loss.item() < config.stop_loss:
                    break
                (grad,) = torch.autograd.grad(loss, [delta])
                _sgd_step(delta, grad, config)
    finally:
        layer.column_edit = None
    return TrainOutcome(delta.detach(), float(loss.item()), step)


def _sgd_step(delta: torch.Tensor, grad: torch.Tensor, config: MemoirConfig) -> None:
    with torch.no_grad():
        norm = grad.norm()
        if norm > config.max_grad_norm:
            grad = grad * (config.max_grad_norm / (norm + 1e-6))
        delta -= config.learning_rate * (grad + config.weight_decay * delta)


def target_loss(model: nn.Module, batch: EditBatch) -> torch.Tensor:
    """Mean cross-entropy of the target tokens, from logits at the target positions only."""
    logits = target_logits(model, batch.input_ids, batch.attention_mask, len(batch.target_ids))
    labels = batch.target_ids.expand(logits.shape[0], -1)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def target_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  n_target: int) -> torch.Tensor:
    """Logits predicting the last ``n_target`` tokens of each left-padded row: [batch, n_target, vocab]."""
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False,
              "position_ids": position_ids(attention_mask)}
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = n_target + 1
    logits = model(**kwargs).logits
    return logits[:, -(n_target + 1):-1]


def _accepts(model: nn.Module, argument: str) -> bool:
    try:
        return argument in inspect.signature(model.forward).parameters
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

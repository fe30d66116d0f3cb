"""Run an edit's batch once below the memory, then let each optimisation step skip that part.

Everything below the edited down projection is frozen, and so is the down projection's input a
(W_m does not feed back into it). So the decoder layers below the edited one are run once and then
replaced by stubs that return their recorded outputs, and the edited layer's MLP returns
``memory(a)`` from the recorded a. Each step still goes through the model's own forward (its masks,
rotary embeddings, final norm, soft-capping and head), but computes only the edited layer's
attention, the memory, and the layers above it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..fingerprint.activations import capture_down_proj_inputs
from ..memory.layer import MemoirLayer


@contextmanager
def reuse_frozen_prefix(model: nn.Module, layers: nn.ModuleList, layer_index: int, mlp: nn.Module | None,
                        memory: MemoirLayer, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Iterator[None]:
    """Within this block, forward calls on exactly this batch reuse the frozen prefix.

    ``mlp`` is the module whose output is the down projection's output (None when the down
    projection sits directly in the decoder layer, as in OPT: then the edited layer's MLP runs).
    """
    outputs: dict[int, Any] = {}
    hooks = [layers[i].register_forward_hook(_recorder(outputs, i)) for i in range(layer_index)]
    try:
        activations = capture_down_proj_inputs(model, memory, input_ids, attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    stubs: dict[nn.Module, Callable[..., Any]] = {layers[i]: _returning(outputs[i]) for i in range(layer_index)}
    if mlp is not None:
        stubs[mlp] = _returning_memory(memory, activations)
    with _replaced_forwards(stubs):
        yield


def _recorder(outputs: dict[int, Any], index: int) -> Callable[..., None]:
    def record(module: nn.Module, args: Any, output: Any) -> None:
        outputs[index] = output
    return record


def _returning(output: Any) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return output
    return forward


def _returning_memory(memory: MemoirLayer, activations: torch.Tensor) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        return memory(activations)
    return forward


@contextmanager
def _replaced_forwards(replacements: dict[nn.Module, Callable[..., Any]]) -> Iterator[None]:
    """Swap modules' forward for the block; an instance-level forward (accelerate's) is restored."""
    saved = {module: module.__dict__.get("forward") for module in replacements}
    for module, forward in replacements.items():
        module.forward = forward
    try:
        yield
    finally:
        for module, previous in saved.items():
            if previous is None:
                del module.forward
            else:
                module.forward = previous

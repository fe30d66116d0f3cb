"""Run an edit's batch once below the memory, then let each optimisation step skip that part.

Everything below the edited down projection is frozen, and so is the down projection's input a
(W_m does not feed back into it). So the decoder layers below the edited one are run once and then
replaced by stubs that return their recorded outputs; so is the edited layer's attention, and the
edited layer's MLP returns ``memory(a)`` from the recorded a. Each step still goes through the
model's own forward (its masks, rotary embeddings, final norm, soft-capping and head), but computes
only the memory, the rest of the edited layer, and the layers above it. In the top decoder layer
the MLP runs at the target positions only: its output elsewhere feeds no logit the loss reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..fingerprint.activations import capture_down_proj_inputs
from ..memory.layer import MemoirLayer


@contextmanager
def reuse_frozen_prefix(model: nn.Module, layers: nn.ModuleList, layer_index: int, mlp_name: str | None,
                        memory: MemoirLayer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        n_target: int) -> Iterator[None]:
    """Within this block, forward calls on exactly this batch reuse the frozen prefix.

    ``mlp_name`` names, within a decoder layer, the module whose output is the down projection's
    output (None when the down projection sits directly in the decoder layer, as in OPT: then the
    edited layer's MLP runs). The batch's last ``n_target`` tokens are the target.
    """
    frozen = [layers[i] for i in range(layer_index)] + _attention_of(layers[layer_index])
    outputs: dict[nn.Module, Any] = {}
    hooks = [module.register_forward_hook(_recorder(outputs, module)) for module in frozen]
    try:
        activations = capture_down_proj_inputs(model, memory, input_ids, attention_mask)
    finally:
        for hook in hooks:
            hook.remove()
    stubs: dict[nn.Module, Callable[..., Any]] = {module: _returning(output) for module, output in outputs.items()}
    if mlp_name is not None:
        stubs[layers[layer_index].get_submodule(mlp_name)] = _returning_memory(memory, activations)
        if layer_index < len(layers) - 1:
            top_mlp = layers[-1].get_submodule(mlp_name)
            length = input_ids.shape[1]
            stubs[top_mlp] = _at_positions_only(top_mlp.forward, length - n_target - 1, length - 1)
    with _replaced_forwards(stubs):
        yield


ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")


def _attention_of(decoder_layer: nn.Module) -> list[nn.Module]:
    """The decoder layer's attention block, if it has one under a usual name.

    Its output depends only on the layer's frozen input, so it too can be recorded once; when it
    runs after the down projection (and so is not recorded), it simply keeps running.
    """
    children = dict(decoder_layer.named_children())
    return [children[name] for name in ATTENTION_NAMES if name in children][:1]


def _recorder(outputs: dict[nn.Module, Any], module: nn.Module) -> Callable[..., None]:
    def record(_module: nn.Module, args: Any, output: Any) -> None:
        outputs[module] = output
    return record


def _returning(output: Any) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return output
    return forward


def _returning_memory(memory: MemoirLayer, activations: torch.Tensor) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        return memory(activations)
    return forward


def _at_positions_only(forward: Callable[..., Any], start: int, stop: int) -> Callable[..., Any]:
    """An MLP forward computed on positions [start, stop) only, with zeros elsewhere (left padding keeps
    the target positions the same in every row). An MLP that returns more than a tensor (a registered
    mixture of experts, say) runs in full, from its first call on."""
    in_full = False

    def at_positions(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        nonlocal in_full
        if not in_full:
            output = forward(hidden_states[:, start:stop].contiguous(), *args, **kwargs)
            if isinstance(output, torch.Tensor):
                return F.pad(output, (0, 0, start, hidden_states.shape[1] - stop))
            in_full = True
        return forward(hidden_states, *args, **kwargs)
    return at_positions


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

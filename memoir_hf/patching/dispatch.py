"""The patched layer of a model dispatched by accelerate (``device_map``, cpu or disk offload).

Such a model may keep a layer's weight on the "meta" device, with its values in cpu memory or on
disk, and load it only for the duration of each call, onto the execution device of the
``AlignDevicesHook`` accelerate attached to the layer (``module._hf_hook``). So the weight's device
is not where the layer computes, and the weight has no values outside a call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's execution device, else its weight's."""
    hook = _align_hook(module)
    if hook is None or hook.execution_device is None:
        return module.weight.device
    return torch.device(hook.execution_device)


@contextmanager
def loaded_weight(module: nn.Module) -> Iterator[torch.Tensor]:
    """``module.weight`` holding its values within the block, also when accelerate offloaded it."""
    hook = _align_hook(module)
    if hook is None or not getattr(hook, "offload", False):
        yield module.weight
        return
    hook.pre_forward(module)  # what the hook does before each call: load the weight onto the execution device
    try:
        yield module.weight
    finally:
        hook.post_forward(module, None)


def _align_hook(module: nn.Module) -> Any:
    """The ``AlignDevicesHook`` on ``module`` (alone, or inside a ``SequentialHook``), or None."""
    hook = getattr(module, "_hf_hook", None)
    for candidate in getattr(hook, "hooks", (hook,)):
        if hasattr(candidate, "execution_device"):
            return candidate
    return None

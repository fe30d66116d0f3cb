"""Find the down projection a MemoirConfig points at, and check it, before anything is patched."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import DEFAULT_LAYER_FRACTION, MemoirConfig
from ..errors import PatchError, UnsupportedModelError
from .registry import get_spec, supported_model_types


@dataclass(frozen=True)
class PatchTarget:
    """The module a MemoirConfig targets on one model; see :func:`find_target`."""

    model_type: str
    layers_path: str
    """Path of the ModuleList of decoder layers, e.g. ``model.layers``."""
    layer_index: int
    num_layers: int
    module_name: str
    """Full name of the down projection, e.g. ``model.layers.25.mlp.down_proj``."""
    d_model: int
    d_ff: int
    top_k: int

    @property
    def parent_name(self) -> str:
        return self.module_name.rpartition(".")[0]

    @property
    def mlp_in_layer(self) -> str | None:
        """Path, within its decoder layer, of the module holding the down projection (``mlp``); None when
        the decoder layer holds it directly (OPT)."""
        return self.parent_name.removeprefix(f"{self.layers_path}.{self.layer_index}").lstrip(".") or None

    @property
    def attribute(self) -> str:
        return self.module_name.rpartition(".")[2]


def find_target(model: nn.Module, config: MemoirConfig | None = None) -> PatchTarget:
    """Show which module ``config`` would patch on ``model``, without changing anything."""
    check_config(config)
    config = config or MemoirConfig()
    model_type = _model_type(model)
    spec = get_spec(model_type)
    if spec is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported. Supported: {', '.join(supported_model_types())}. "
            "Add a family with memoir_hf.register_architecture(model_type, layers=..., down_proj=...)."
        )
    layers_path, layers = _decoder_layers(model, spec.layers, model_type)
    index = _layer_index(config.layer, len(layers), layers_path, spec.down_proj)
    module_name = f"{layers_path}.{index}.{spec.down_proj}"
    down_proj = _get_submodule(model, module_name)
    if down_proj is None:
        raise UnsupportedModelError(
            f"{model_type} layer {index} has no {spec.down_proj!r}; the model does not have the layout the registry "
            "expects. Re-register the family with memoir_hf.register_architecture(...)."
        )
    d_model, d_ff = projection_shape(down_proj, module_name)
    return PatchTarget(model_type, layers_path, index, len(layers), module_name, d_model, d_ff,
                       config.resolve_top_k(d_ff))


def check_config(config: Any) -> None:
    """Refuse anything but a MemoirConfig or None, with what to pass instead (users swap it with the tokenizer)."""
    if config is not None and not isinstance(config, MemoirConfig):
        hint = ("that looks like a tokenizer: pass it as tokenizer=..." if callable(config)
                else "build one with MemoirConfig(**settings) or MemoirConfig.from_yaml(path)")
        raise PatchError(f"config must be a MemoirConfig or None, got {type(config).__name__}; {hint}.")


def projection_shape(module: nn.Module, name: str) -> tuple[int, int]:
    """(d_model, d_ff) of a down projection: out and in features of an nn.Linear or a GPT-2 Conv1D."""
    if isinstance(module, Conv1D):
        d_ff, d_model = module.weight.shape
        return d_model, d_ff
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    raise UnsupportedModelError(
        f"{name} is a {type(module).__name__}; MEMOIR patches an nn.Linear or a transformers Conv1D down projection. "
        "Quantised or fused layers are not supported: load the model in float."
    )


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        raise UnsupportedModelError(
            f"expected a transformers model with a .config.model_type (e.g. from AutoModelForCausalLM), "
            f"got {type(model).__name__}."
        )
    return model_type


def _get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _decoder_layers(model: nn.Module, candidates: tuple[str, ...], model_type: str) -> tuple[str, nn.ModuleList]:
    for path in candidates:
        layers = _get_submodule(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return path, layers
    raise UnsupportedModelError(
        f"found no decoder layers at {' or '.join(candidates)} in this {model_type} model "
        f"({type(model).__name__}); patch the *ForCausalLM model, not its inner base model."
    )


def _layer_index(layer: int | str | None, num_layers: int, layers_path: str, down_proj: str) -> int:
    if layer is None:
        return int(num_layers * DEFAULT_LAYER_FRACTION)
    if isinstance(layer, str):
        return _index_from_name(layer, num_layers, layers_path, down_proj)
    index = layer + num_layers if layer < 0 else layer
    if not 0 <= index < num_layers:
        raise PatchError(f"layer={layer} is out of range: the model has {num_layers} decoder layers, "
                         f"so use 0..{num_layers - 1} or -{num_layers}..-1.")
    return index


def _index_from_name(name: str, num_layers: int, layers_path: str, down_proj: str) -> int:
    match = re.fullmatch(re.escape(layers_path) + r"\.(\d+)(?:\." + re.escape(down_proj) + r")?", name)
    if match is None:
        last = f"{layers_path}.{num_layers - 1}"
        raise PatchError(f"layer={name!r} is not a decoder layer of this model; use a name like "
                         f"'{last}' or '{last}.{down_proj}', or an int.")
    index = int(match.group(1))
    if index >= num_layers:
        raise PatchError(f"layer={name!r} is out of range: the model has {num_layers} decoder layers "
                         f"({layers_path}.0 .. {layers_path}.{num_layers - 1}).")
    return index

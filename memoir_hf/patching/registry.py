"""Where each supported model family keeps its decoder layers and MLP down projection.

Every row here has a test on a tiny model built from config (tests/test_families.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class ArchitectureSpec:
    """Layout of one model family, as attribute paths from the loaded *ForCausalLM model."""

    layers: tuple[str, ...]
    """Candidate paths to the ModuleList of decoder layers; the first that exists is used."""
    down_proj: str
    """Path inside one decoder layer to the MLP output projection (nn.Linear or Conv1D)."""


_GATED_MLP = ArchitectureSpec(layers=("model.layers",), down_proj="mlp.down_proj")

_REGISTRY: dict[str, ArchitectureSpec] = {
    "llama": _GATED_MLP,
    "mistral": _GATED_MLP,
    "qwen2": _GATED_MLP,
    "qwen3": _GATED_MLP,
    "gemma": _GATED_MLP,
    "gemma2": _GATED_MLP,
    "gemma3_text": _GATED_MLP,
    "gemma3": ArchitectureSpec(layers=("model.language_model.layers", "model.layers"), down_proj="mlp.down_proj"),
    "phi3": _GATED_MLP,
    "olmo2": _GATED_MLP,
    "smollm3": _GATED_MLP,
    "phi": ArchitectureSpec(layers=("model.layers",), down_proj="mlp.fc2"),
    "starcoder2": ArchitectureSpec(layers=("model.layers",), down_proj="mlp.c_proj"),
    "gpt2": ArchitectureSpec(layers=("transformer.h",), down_proj="mlp.c_proj"),
    "gptj": ArchitectureSpec(layers=("transformer.h",), down_proj="mlp.fc_out"),
    "gpt_neox": ArchitectureSpec(layers=("gpt_neox.layers",), down_proj="mlp.dense_4h_to_h"),
    "falcon": ArchitectureSpec(layers=("transformer.h",), down_proj="mlp.dense_4h_to_h"),
    "opt": ArchitectureSpec(layers=("model.decoder.layers",), down_proj="fc2"),
}


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(model_type: str) -> ArchitectureSpec | None:
    return _REGISTRY.get(model_type)


def register_architecture(model_type: str, *, layers: str | tuple[str, ...], down_proj: str) -> None:
    """Teach memoir_hf a new family: where its decoder layers and down projection live.

    Example: ``register_architecture("olmo", layers="model.layers", down_proj="mlp.down_proj")``.
    """
    paths = (layers,) if isinstance(layers, str) else layers
    if not isinstance(model_type, str) or not model_type:
        raise UnsupportedModelError(f"model_type must be the non-empty string of the model's config.model_type, "
                                    f"got {model_type!r}.")
    if not isinstance(paths, (tuple, list)) or not paths or not all(_is_module_path(path) for path in paths):
        raise UnsupportedModelError(f"layers must be the dotted path to the ModuleList of decoder layers (e.g. "
                                    f"'model.layers'), or a tuple of candidate paths; got {layers!r}.")
    if not _is_module_path(down_proj):
        raise UnsupportedModelError(f"down_proj must be the dotted path, inside one decoder layer, to the MLP output "
                                    f"projection (e.g. 'mlp.down_proj'); got {down_proj!r}.")
    _REGISTRY[model_type] = ArchitectureSpec(layers=tuple(paths), down_proj=down_proj)


def _is_module_path(path: object) -> bool:
    return isinstance(path, str) and all(part.isidentifier() or part.isdigit() for part in path.split("."))

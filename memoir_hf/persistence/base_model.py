"""Save the base model (weights, config, tokenizer) beside the memoir state, when it can be saved."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import MemoirError

# What a transformers save writes: with save_base, stale copies of these must not be carried over.
BASE_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                    "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model-*-of-*.bin",
                    "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                    "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "vocab.json", "vocab.txt",
                    "merges.txt", "added_tokens.json")


def save_base_model(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """model.save_pretrained + tokenizer.save_pretrained. A GGUF-loaded model is written as the
    dequantised float checkpoint it already is in memory, so it loads back with from_pretrained."""
    if not hasattr(model, "save_pretrained"):
        raise MemoirError(f"save_base=True needs a transformers model; {type(model).__name__} has no "
                          "save_pretrained. Save the memoir state only (save_base=False).")
    with _saveable(model):
        model.save_pretrained(folder)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)


@contextmanager
def _saveable(model: nn.Module) -> Iterator[None]:
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        yield
        return
    method = getattr(quantizer.quantization_config.quant_method, "value", quantizer.quantization_config.quant_method)
    if method != "gguf":
        raise MemoirError(f"the base model is quantized with {method}, which transformers cannot save; use "
                          "save_pretrained(path) without save_base and load the base from its original source.")
    config = model.config
    quantization_config = config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if quantization_config is not None:
            config.quantization_config = quantization_config

"""The background vector: what every prompt activates, removed before top-k."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any

import torch
from torch import nn

from ..memory.layer import MemoirLayer
from .activations import down_proj_inputs_in_batches
from .tophash import TopHash, mean_over_tokens

BATCH_SIZE = 16


def default_background_prompts() -> list[str]:
    """The fixed list of generic prompts shipped with memoir_hf (one per line)."""
    text = resources.files("memoir_hf.fingerprint").joinpath("background_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


@torch.no_grad()
def compute_background(
    model: nn.Module, tokenizer: Any, layer: MemoirLayer, tophash: TopHash, texts: Sequence[str]
) -> None:
    """Set ``tophash.background`` and ``spread`` from the prompt-mean activations of ``texts``."""
    batches = text_activations(model, tokenizer, layer, texts)
    tophash.set_background(torch.cat([mean_over_tokens(activations, mask) for activations, mask in batches]))


def text_activations(model: nn.Module, tokenizer: Any, layer: MemoirLayer, texts: Sequence[str],
                     batch_size: int = BATCH_SIZE) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The memory layer's inputs for ``texts``, batch by batch: float32 ([batch, seq, d_ff], [batch, seq] mask)."""
    rows = [tokenizer(text)["input_ids"] for text in texts]
    for activations, mask in down_proj_inputs_in_batches(model, layer, rows, pad_id=pad_token_id(tokenizer),
                                                         batch_size=batch_size):
        yield activations.float(), mask.float()


def pad_token_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0

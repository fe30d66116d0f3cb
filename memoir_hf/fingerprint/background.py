"""The background vector: what every prompt activates, removed before top-k."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources

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
    model: nn.Module, tokenizer, layer: MemoirLayer, tophash: TopHash, texts: Sequence[str]
) -> None:
    """Set ``tophash.background`` and ``spread`` from the prompt-mean activations of ``texts``."""
    rows = [tokenizer(text)["input_ids"] for text in texts]
    batches = down_proj_inputs_in_batches(model, layer, rows, pad_id=pad_token_id(tokenizer), batch_size=BATCH_SIZE)
    tophash.set_background(torch.cat([mean_over_tokens(a.float(), mask.float()) for a, mask in batches]))


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0

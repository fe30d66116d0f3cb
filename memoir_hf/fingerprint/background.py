"""The background vector: what every prompt activates, removed before top-k."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources

import torch
from torch import nn

from ..memory.layer import MemoirLayer
from .activations import capture_down_proj_inputs
from .batching import pad_batch
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
    """Set ``tophash.background`` to the mean over ``texts`` of their prompt-mean activations."""
    means = []
    for start in range(0, len(texts), BATCH_SIZE):
        rows = [tokenizer(text)["input_ids"] for text in texts[start:start + BATCH_SIZE]]
        input_ids, attention_mask = pad_batch(rows, pad_id=pad_token_id(tokenizer), device=layer.device)
        activations = capture_down_proj_inputs(model, layer, input_ids, attention_mask)
        means.append(mean_over_tokens(activations.float(), attention_mask.float()))
    tophash.set_background(torch.cat(means))


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0

"""Context prefixes for prefix augmentation, generated once by the model itself."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import GenerationConfig

from ..fingerprint.background import pad_token_id


@torch.no_grad()
def generate_prefixes(model: nn.Module, tokenizer, starts: Sequence[str], lengths: Sequence[int]) -> list[str]:
    """One greedy continuation of each start for each length (shorter ones are prefixes of longer)."""
    if not starts or not lengths:
        return []
    device = next(model.parameters()).device
    settings = GenerationConfig(max_new_tokens=max(lengths), do_sample=False, pad_token_id=pad_token_id(tokenizer),
                                eos_token_id=tokenizer.eos_token_id)
    prefixes = []
    for start in starts:
        start_ids = torch.tensor([tokenizer(start)["input_ids"]], device=device)
        output = model.generate(input_ids=start_ids, attention_mask=torch.ones_like(start_ids),
                                generation_config=settings)
        new_tokens = output[0, start_ids.shape[1]:].tolist()
        for length in lengths:
            continuation = tokenizer.decode(new_tokens[:length], skip_special_tokens=True)
            prefixes.append(" ".join(f"{start}{continuation}".split()))
    return prefixes


def with_prefix(prefix: str, prompt: str) -> str:
    """The prompt behind a context prefix, as a new sentence."""
    separator = " " if prefix.endswith((".", "!", "?", ":")) else ". "
    return f"{prefix}{separator}{prompt}"

"""Greedy continuations, the one way the library itself asks a model for an answer, and the generate
options routing cannot serve."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig

from .errors import MemoirError
from .fingerprint.background import pad_token_id
from .routing.router import RoutingDecision


@dataclass(frozen=True)
class Answer:
    """What ``MemoirModel.ask`` returns: the greedy continuation and what the prompt read."""

    prompt: str
    text: str
    routing: RoutingDecision


SPLIT_PROMPT_OPTIONS = ("prefill_chunk_size", "prompt_lookup_num_tokens", "assistant_model", "assistant_early_exit")
"""Generate options whose first forward holds part of the prompt, or draft tokens beside it."""


def check_generate_options(kwargs: dict[str, Any], default_config: Any) -> None:
    """Refuse the options under which routing would decide from something other than the whole prompt."""
    if "prompt_mask" in kwargs:
        raise MemoirError("generate takes no prompt_mask: it routes from the whole prompt, as its attention_mask "
                          "marks it; prompt_mask is for forward calls whose input also holds an answer.")
    config = kwargs.get("generation_config") or default_config
    for name in SPLIT_PROMPT_OPTIONS:
        if kwargs.get(name) is not None or getattr(config, name, None) is not None:
            raise MemoirError(f"generate with {name} is not supported on a patched model: routing decides from the "
                              f"prompt in the first forward, and {name} splits the prompt or adds draft tokens to it. "
                              f"Drop {name}.")


@torch.no_grad()
def greedy_new_tokens(model: Any, tokenizer: Any, prompt_ids: Sequence[int], max_new_tokens: int,
                      device: torch.device) -> list[int]:
    """The tokens ``model.generate`` appends to ``prompt_ids`` without sampling (stops at EOS)."""
    settings = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id(tokenizer),
                                eos_token_id=tokenizer.eos_token_id)
    input_ids = torch.tensor([list(prompt_ids)], device=device)
    output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=settings)
    return output[0, input_ids.shape[1]:].tolist()

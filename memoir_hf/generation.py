"""Greedy continuations, the one way the library itself asks a model for an answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig

from .fingerprint.background import pad_token_id
from .routing.router import RoutingDecision


@dataclass(frozen=True)
class Answer:
    """What ``MemoirModel.ask`` returns: the greedy continuation and what the prompt read."""

    prompt: str
    text: str
    routing: RoutingDecision


@torch.no_grad()
def greedy_new_tokens(model: Any, tokenizer: Any, prompt_ids: Sequence[int], max_new_tokens: int,
                      device: torch.device) -> list[int]:
    """The tokens ``model.generate`` appends to ``prompt_ids`` without sampling (stops at EOS)."""
    settings = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id(tokenizer),
                                eos_token_id=tokenizer.eos_token_id)
    input_ids = torch.tensor([list(prompt_ids)], device=device)
    output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=settings)
    return output[0, input_ids.shape[1]:].tolist()

"""Teacher-forced scoring of (prompt, answer) pairs in batches, with each sequence's routing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..editing.inputs import target_text
from ..fingerprint.activations import position_ids
from ..fingerprint.background import pad_token_id
from ..fingerprint.batching import pad_batch
from ..model import MemoirModel
from ..routing.router import RoutingDecision


@dataclass(frozen=True)
class Scored:
    """One pair: the argmax token at each answer position, the answer's tokens and their NLL."""

    predicted: list[int]
    target: list[int]
    token_nll: list[float]
    routing: RoutingDecision | None


@torch.no_grad()
def score_pairs(memoir: MemoirModel, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16) -> list[Scored]:
    """Feed prompt + answer (right padded) and read the answer positions; only prompt tokens route."""
    tokenizer = memoir.tokenizer
    scored: list[Scored] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        prompts = [tokenizer(prompt)["input_ids"] for prompt, _ in chunk]
        answers = [tokenizer(target_text(prompt, answer), add_special_tokens=False)["input_ids"]
                   for prompt, answer in chunk]
        rows = [p + a for p, a in zip(prompts, answers, strict=True)]
        device = memoir.layer.device
        input_ids, attention_mask = pad_batch(rows, pad_id=pad_token_id(tokenizer), device=device, side="right")
        _, prompt_mask = pad_batch(prompts, pad_id=0, device=device, side="right")
        prompt_mask = F.pad(prompt_mask, (0, input_ids.shape[1] - prompt_mask.shape[1]))
        with memoir._inference_mode():  # dropout off, as when the edit was written
            logits = memoir(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids(attention_mask), prompt_mask=prompt_mask, use_cache=False).logits
        for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            span = slice(len(prompt) - 1, len(prompt) - 1 + len(answer))
            row_logits = logits[row, span].float()
            target = torch.tensor(answer, device=row_logits.device)
            nll = F.cross_entropy(row_logits, target, reduction="none")
            routing = memoir.routing[row] if memoir.routing else None
            scored.append(Scored(row_logits.argmax(-1).tolist(), answer, nll.tolist(), routing))
    return scored

"""TopHash: the sparse mask of a prompt, from its down projection inputs."""

from __future__ import annotations

import torch
from torch import nn

from ..config import SPREAD_AGGREGATION

BACKGROUND_AGGREGATIONS = ("mean_minus_background", SPREAD_AGGREGATION)
"""Aggregations that subtract the background, which is then computed when a model is patched."""
SPREAD_FLOOR = 0.1
"""Fraction of the median spread below which no feature's spread is taken."""


class TopHash(nn.Module):
    """Turns the down projection inputs of the prompt tokens into a k-of-d_ff bit mask.

    Aggregate the prompt tokens to one vector (optionally minus a background vector, and optionally
    divided by the background's spread), keep the top-k entries by magnitude, and map their indices
    through a fixed permutation. The permutation, background and spread are buffers: they are part of
    the memory's saved state and are never regenerated from a global random generator.

    ``standardized`` exists because on small models a few features are large for every prompt: by
    raw deviation they enter nearly every mask, and every edit then rewrites the same columns.
    Dividing by each feature's spread over unrelated text ranks features by how unusual the prompt
    makes them instead. It does keep those features out, but on SmolLM2 and ZsRE it did not make
    edits disturb each other less (README, Evaluate); the paper's aggregation stays the default.
    """

    def __init__(self, d_ff: int, top_k: int, aggregation: str, seed: int, device: torch.device | None = None):
        super().__init__()
        self.d_ff = d_ff
        self.top_k = top_k
        self.aggregation = aggregation
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("permutation", torch.randperm(d_ff, generator=generator).to(device))
        self.register_buffer("background", torch.zeros(d_ff, dtype=torch.float32, device=device))
        self.register_buffer("spread", torch.ones(d_ff, dtype=torch.float32, device=device))

    def forward(self, activations: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Bool masks [batch, d_ff] from activations [batch, seq, d_ff] and prompt tokens [batch, seq]."""
        return self.mask_from_vector(self.summarize(activations, token_mask))

    @torch.no_grad()
    def summarize(self, activations: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """One float32 vector per sequence, over its prompt tokens only."""
        token_mask = token_mask.to(device=activations.device, dtype=torch.float32)
        activations = activations.float()
        if self.aggregation == "last":
            return activations[torch.arange(activations.shape[0], device=activations.device), last_token(token_mask)]
        vector = mean_over_tokens(activations, token_mask)
        if self.aggregation in BACKGROUND_AGGREGATIONS:
            vector = vector - self.background
        if self.aggregation == SPREAD_AGGREGATION:
            vector = vector / self.spread
        return vector

    @torch.no_grad()
    def mask_from_vector(self, vector: torch.Tensor) -> torch.Tensor:
        top = vector.abs().topk(self.top_k, dim=-1).indices
        mask = torch.zeros(vector.shape[0], self.d_ff, dtype=torch.bool, device=vector.device)
        mask[torch.arange(vector.shape[0], device=vector.device)[:, None], self.permutation[top]] = True
        return mask

    @torch.no_grad()
    def set_background(self, prompt_means: torch.Tensor) -> None:
        """Background and spread = mean and standard deviation of the prompt means of unrelated texts.

        The spread of a feature is floored at a tenth of the median spread, so that a feature that
        barely moves on the background texts cannot win every mask on a tiny shift.
        """
        prompt_means = prompt_means.float()
        self.background.copy_(prompt_means.mean(dim=0).to(self.background.device))
        if prompt_means.shape[0] < 2:
            self.spread.fill_(1.0)
            return
        spread = prompt_means.std(dim=0)
        floor = max(float(spread.median()) * SPREAD_FLOOR, 1e-12)
        self.spread.copy_(spread.clamp_min(floor).to(self.spread.device))


def mean_over_tokens(activations: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    counts = token_mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return (activations * token_mask[..., None]).sum(dim=1) / counts


def last_token(token_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last prompt token of each row; works with left and right padding."""
    positions = torch.arange(token_mask.shape[1], device=token_mask.device).expand_as(token_mask)
    return torch.where(token_mask > 0, positions, -1).max(dim=1).values.clamp(min=0)

"""What earlier edits read from W_m, so that a new edit can be written where it disturbs them least.

A token of edit j reads ``W_m (M_j ⊙ a)``. A new edit that changes columns S of W_m by ΔW moves
that read by ``ΔW (M_j ⊙ a)[S]``. Summed over earlier edits of the mean squared move over each
one's tokens, that is ``tr(ΔW C[S, S] ΔW^T)`` with C the sum over edits of the mean of
``(M_j ⊙ a)(M_j ⊙ a)^T`` over their tokens: one d_ff x d_ff matrix, whatever the number of edits.
Each edit weighs the same, however many tokens it was trained on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class EarlierKeys:
    """Sum over written edits of the second moment of their tokens' masked down projection inputs."""

    def __init__(self, d_ff: int, device: torch.device | None = None):
        self.moment_sum = torch.zeros(d_ff, d_ff, dtype=torch.float32, device=device)
        self.edits = 0

    @staticmethod
    @torch.no_grad()
    def moment(activations: torch.Tensor, attention_mask: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """One edit's second moment on its columns [k, k]: its activations [batch, seq, d_ff] at its real tokens.

        Only this block of the edit's ``(M ⊙ a)(M ⊙ a)^T`` can be non-zero, so the d_ff x d_ff matrix is never
        built (it would take 822 MB on LLaMA-3-8B's d_ff).
        """
        keys = activations[attention_mask.bool()][:, columns.to(activations.device)].float()
        return keys.T @ keys / keys.shape[0]

    def add(self, columns: torch.Tensor, moment: torch.Tensor) -> None:
        """Count one more edit, with its :meth:`moment` on its ``columns``."""
        self.moment_sum[self._block(columns)] += moment.to(self.moment_sum.device)
        self.edits += 1

    @contextmanager
    def added(self, columns: torch.Tensor, moment: torch.Tensor) -> Iterator[None]:
        """:meth:`add` for the block, taken back bit for bit if the block raises (an edit's commit is all or
        nothing)."""
        index = self._block(columns)
        block = self.moment_sum[index].clone()
        self.add(columns, moment)
        try:
            yield
        except BaseException:
            self.moment_sum[index] = block
            self.edits -= 1
            raise

    def restricted_to(self, columns: torch.Tensor) -> torch.Tensor | None:
        """The summed second moment on these columns [k, k] (on their device), or None before any edit was recorded.

        The moment stays on the device it was made on, wherever the model has moved since.
        """
        if not self.edits:
            return None
        return self.moment_sum[self._block(columns)].to(columns.device)

    def _block(self, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The index of the [k, k] block of ``moment_sum`` on these columns."""
        kept = columns.to(self.moment_sum.device)
        return kept.unsqueeze(1), kept

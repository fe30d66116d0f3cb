"""EditStore: the record and the mask of every edit, with the index that routes to them."""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..index.mask_index import MaskIndex


@dataclass
class EditRecord:
    """One stored edit."""

    edit_id: int
    prompt: str
    target: str
    metadata: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    """UTC time the edit was written, ISO 8601."""
    success: bool = False
    loss: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class EditStore:
    """Edit records in write order, their masks in a MaskIndex, and the next fresh edit id."""

    def __init__(self, d_ff: int, top_k: int, *, use_faiss: bool | None = None):
        self.index = MaskIndex(d_ff, top_k, use_faiss=use_faiss)
        self.records: list[EditRecord] = []
        self.next_id = 0

    def __len__(self) -> int:
        return len(self.records)

    def add(self, record: EditRecord, mask: torch.Tensor) -> None:
        self.index.add(mask.detach().cpu().numpy()[None, :])
        self.records.append(record)
        self.next_id = max(self.next_id, record.edit_id + 1)

    def mask(self, position: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(self.index.mask(position)).to(device=device, dtype=dtype)

    def nearest(self, query_masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(positions, overlaps) of the best-overlapping stored edit for each query mask."""
        return self.index.search(query_masks.detach().cpu().numpy())

"""EditStore: the record and the mask of every edit, with the index that routes to them."""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import MemoirError
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


@dataclass
class EditDelta:
    """What one edit added to W_m: float32 ``values`` [d_model, c] on sorted ``columns`` (long [c]), on the CPU."""

    columns: torch.Tensor
    values: torch.Tensor

    def merged_with(self, other: EditDelta) -> EditDelta:
        """The sum of two deltas, on the union of their columns."""
        columns = torch.unique(torch.cat([self.columns, other.columns]))
        values = torch.zeros(self.values.shape[0], len(columns), dtype=self.values.dtype)
        for delta in (self, other):
            values[:, torch.searchsorted(columns, delta.columns)] += delta.values.to(values.dtype)
        return EditDelta(columns, values)


@dataclass
class RemovedEdit:
    """What :meth:`EditStore.remove` took out."""

    record: EditRecord
    delta: EditDelta | None
    """What the edit added to W_m (None when it was not kept)."""


class EditStore:
    """Edit records in write order, their masks in a MaskIndex, and the next fresh edit id.

    ``deltas`` maps an edit id to what that edit added to W_m's masked columns, float32 [d_model, k]
    on the CPU (float32 holds the difference of two fp16/bf16 weights exactly), for the edits written
    while ``keep_edit_deltas`` was on: it is what makes an edit removable. While every edit was
    written with it on and none was consolidated or withdrawn from routing only, the deltas of the
    stored edits sum to W_m.
    """

    def __init__(self, d_ff: int, top_k: int, *, use_faiss: bool | None = None):
        self.index = MaskIndex(d_ff, top_k, use_faiss=use_faiss)
        self.records: list[EditRecord] = []
        self.deltas: dict[int, EditDelta] = {}
        self.removed: list[EditRecord] = []
        """Records of removed edits, oldest removal first (so feedback is not applied again)."""
        self.next_id = 0

    def __len__(self) -> int:
        return len(self.records)

    def add(self, record: EditRecord, mask: torch.Tensor, delta: EditDelta | None = None) -> None:
        self.index.add(mask.detach().cpu().numpy()[None, :])
        self.records.append(record)
        if delta is not None:
            self.deltas[record.edit_id] = delta
        self.next_id = max(self.next_id, record.edit_id + 1)

    def position_of(self, edit_id: int) -> int:
        """Where the edit sits in write order; MemoirError naming the known ids when it is not stored."""
        if not isinstance(edit_id, int) or isinstance(edit_id, bool):
            raise MemoirError(f"edit ids are ints, got {type(edit_id).__name__} {edit_id!r}.")
        for position, record in enumerate(self.records):
            if record.edit_id == edit_id:
                return position
        known = [r.edit_id for r in self.records]
        shown = f"{known[:5]}...{known[-5:]}" if len(known) > 10 else str(known)
        raise MemoirError(f"no stored edit has id {edit_id}; the stored ids are {shown}.")

    def remove(self, edit_ids: list[int]) -> list[RemovedEdit]:
        """Take these edits' records, masks and deltas out (one index rebuild); nothing routes to them."""
        positions = [self.position_of(edit_id) for edit_id in edit_ids]
        if len(set(positions)) != len(positions):
            raise MemoirError(f"an edit id is given twice in {edit_ids}.")
        removed = [RemovedEdit(self.records[p], self.deltas.pop(self.records[p].edit_id, None)) for p in positions]
        self.index.remove(positions)
        gone = set(positions)
        self.records = [record for position, record in enumerate(self.records) if position not in gone]
        self.removed += [r.record for r in removed]
        return removed

    def mask(self, position: int, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(self.index.mask(position)).to(device=device, dtype=dtype)

    def nearest(self, query_masks: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(positions, overlaps) of the best-overlapping stored edit for each query mask."""
        return self.index.search(query_masks.detach().cpu().numpy())

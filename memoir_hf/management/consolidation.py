"""Find stored edits whose masks overlap heavily: duplicates (same target) are merged, conflicts reported.

Two prompts of the same fact give nearly the same TopHash mask, so a pair of stored masks with an
overlap near 1 is the same fact edited twice. Groups are the connected components of the pairs at
or above ``min_overlap``. In a group the newest edit is the one routing already prefers on a tie,
and the one trained last on the shared columns: it is kept. Merging an older duplicate withdraws it
from routing and folds its W_m delta into the kept edit's, so W_m itself does not change and
removing the kept edit later takes both out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..editing.inputs import MERGED_KEY
from ..errors import MemoirError
from ..feedback.answers import normalize_answer
from ..index.mask_index import MaskIndex, unpack_masks
from ..memory.store import EditStore


@dataclass
class OverlapGroup:
    """Edits whose masks overlap at or above the threshold, oldest first."""

    edit_ids: list[int]
    targets: list[str]
    kind: str
    """"duplicate" when every target is the same after normalisation, else "conflict"."""
    kept: int
    """The newest edit: what these prompts read."""
    merged: list[int] = field(default_factory=list)
    """Edits withdrawn into ``kept`` by this consolidation."""


@dataclass
class ConsolidationReport:
    min_overlap: float
    groups: list[OverlapGroup]

    @property
    def duplicates(self) -> list[OverlapGroup]:
        return [group for group in self.groups if group.kind == "duplicate"]

    @property
    def conflicts(self) -> list[OverlapGroup]:
        return [group for group in self.groups if group.kind == "conflict"]

    @property
    def merged(self) -> list[int]:
        return [edit_id for group in self.groups for edit_id in group.merged]


def check_min_overlap(min_overlap: float) -> None:
    if isinstance(min_overlap, bool) or not isinstance(min_overlap, (int, float)) or not 0.0 < min_overlap <= 1.0:
        raise MemoirError(f"min_overlap must be a number in (0, 1], got {min_overlap!r}.")


def overlapping_pairs(index: MaskIndex, min_overlap: float, *, chunk: int = 1024) -> list[tuple[int, int]]:
    """Positions (i < j) of stored masks with overlap >= min_overlap. O(n^2 d_ff) in chunks of rows."""
    masks = unpack_masks(index.codes, index.n_bits).astype(np.float32)
    least = min_overlap * index.top_k - 1e-6
    pairs = []
    for start in range(0, len(masks), chunk):
        shared = masks[start:start + chunk] @ masks.T
        rows, columns = np.nonzero(shared >= least)
        pairs += [(start + i, j) for i, j in zip(rows.tolist(), columns.tolist(), strict=True) if start + i < j]
    return pairs


def connected_groups(pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components of the pairs, each sorted, in order of their first member."""
    parent: dict[int, int] = {}

    def root(node: int) -> int:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for a, b in pairs:
        parent[root(a)] = root(b)
    groups: dict[int, list[int]] = {}
    for node in sorted(parent):
        groups.setdefault(root(node), []).append(node)
    return sorted(groups.values())


def consolidate(store: EditStore, min_overlap: float, *, merge_duplicates: bool,
                resolve_conflicts: bool) -> ConsolidationReport:
    """Group overlapping edits; merge duplicates (and, if asked, conflicts) into the newest of each group."""
    check_min_overlap(min_overlap)
    for name, flag in (("merge_duplicates", merge_duplicates), ("resolve_conflicts", resolve_conflicts)):
        if not isinstance(flag, bool):
            raise MemoirError(f"{name} must be True or False, got {flag!r}.")
    groups = []
    for positions in connected_groups(overlapping_pairs(store.index, min_overlap)):
        records = [store.records[p] for p in positions]
        targets = [r.target for r in records]
        kind = "duplicate" if len({normalize_answer(t) for t in targets}) == 1 else "conflict"
        groups.append(OverlapGroup([r.edit_id for r in records], targets, kind, kept=records[-1].edit_id))
    for group in groups:
        if merge_duplicates if group.kind == "duplicate" else resolve_conflicts:
            group.merged = group.edit_ids[:-1]
            _merge_into(store, group.kept, group.merged)
    return ConsolidationReport(min_overlap, groups)


def _merge_into(store: EditStore, kept: int, older: list[int]) -> None:
    merged = set(older)
    for removed in store.remove(older):
        merged.update(removed.record.metadata.get(MERGED_KEY, []))
        kept_delta = store.deltas.pop(kept, None)
        if kept_delta is not None and removed.delta is not None:
            store.deltas[kept] = kept_delta.merged_with(removed.delta)
    record = store.records[store.position_of(kept)]
    record.metadata[MERGED_KEY] = sorted(merged.union(record.metadata.get(MERGED_KEY, [])))

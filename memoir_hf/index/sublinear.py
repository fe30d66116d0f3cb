"""When the exact scan grows slow: try a FAISS binary IVF index, and keep it only if it earns its place.

A sub-linear index trades recall for speed. Whether the trade is good depends on how the stored
masks cluster, which differs by model and data, so the choice is measured on the stored masks
themselves: queries are stored masks with part of their bits moved elsewhere (so that they overlap
their source at ``query_overlap``, the hard end of what routing accepts), the exact scan gives the
right answers, and the IVF index is worth using only at a probe count where it finds a mask as near as
the exact scan's for at least ``MIN_RECALL`` of the queries, searched as routing searches it
(``IVF_CANDIDATES`` nearest), at least ``MIN_SPEEDUP`` times faster than the exact scan.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import faiss
except ImportError:  # pragma: no cover - the caller checks faiss_available() first
    faiss = None

MIN_RECALL = 0.99
MIN_SPEEDUP = 1.5
LOWEST_ROUTED_OVERLAP = 0.3
"""Query overlap of the trial: below every threshold calibrated on the measured runs (0.33 to 0.80), since the
threshold may change after the index is chosen and a query IVF misses at τ would read no edit."""
IVF_CANDIDATES = 8
"""Nearest masks an IVF search returns for the exact tie-breaking among them."""


@dataclass
class IvfTrial:
    """What one measured IVF configuration gave against the exact scan."""

    n_masks: int
    nlist: int
    nprobe: int
    recall: float
    exact_ms: float
    ivf_ms: float
    """Milliseconds per query, queries searched as one batch."""

    @property
    def speedup(self) -> float:
        return self.exact_ms / self.ivf_ms if self.ivf_ms > 0 else math.inf

    @property
    def worth_using(self) -> bool:
        return self.recall >= MIN_RECALL and self.speedup >= MIN_SPEEDUP


def default_nlist(n_masks: int) -> int:
    """About sqrt(n) lists: each probe scans ~sqrt(n) masks, and training stays seconds at a million."""
    return max(1, min(65536, int(math.sqrt(n_masks))))


def build_ivf(codes: np.ndarray, nlist: int, *, rng: np.random.Generator, train_per_list: int = 40) -> Any:
    """An IVF binary index over ``codes``, trained on a sample of them."""
    n_bits = codes.shape[1] * 8
    quantizer = faiss.IndexBinaryFlat(n_bits)
    index = faiss.IndexBinaryIVF(quantizer, n_bits, nlist)
    index.own_fields = True
    quantizer.this.disown()
    sample = rng.choice(len(codes), size=min(len(codes), nlist * train_per_list), replace=False)
    index.train(codes[np.sort(sample)])
    index.add(codes)
    return index


def perturbed_queries(codes: np.ndarray, top_k: int, n_bits: int, n_queries: int, overlap: float,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Stored masks with ``(1 - overlap) k`` of their bits moved elsewhere: (packed queries, source rows)."""
    sources = rng.integers(0, len(codes), size=n_queries)
    masks = np.unpackbits(codes[sources], axis=1, count=n_bits, bitorder="little").astype(bool)
    moved = top_k - int(round(overlap * top_k))
    for row in masks:
        on, off = np.flatnonzero(row), np.flatnonzero(~row)
        row[rng.choice(on, size=moved, replace=False)] = False
        row[rng.choice(off, size=moved, replace=False)] = True
    return np.packbits(masks, axis=1, bitorder="little"), sources


def measure_ivf(codes: np.ndarray, exact_index: Any, top_k: int, *, query_overlap: float = LOWEST_ROUTED_OVERLAP,
                n_queries: int = 200, min_recall: float = MIN_RECALL,
                rng: np.random.Generator | None = None) -> tuple[Any, IvfTrial]:
    """Build an IVF index and find the smallest probe count reaching ``min_recall``.

    Returns the index and its best trial: the first nprobe that reaches ``min_recall``, else the one
    with the highest recall. The search for nprobe does not stop on timings: one noisy measurement
    would then decide the recall; whether the result is fast enough is judged once, by ``worth_using``.
    """
    rng = rng or np.random.default_rng(0)
    n_bits = codes.shape[1] * 8
    queries, _ = perturbed_queries(codes, top_k, n_bits, n_queries, query_overlap, rng)
    start = time.perf_counter()
    exact, _ = exact_index.search(queries, 2)
    exact_ms = 1e3 * (time.perf_counter() - start) / n_queries
    ivf = build_ivf(codes, default_nlist(len(codes)), rng=rng)
    best = None
    nprobe = 1
    while True:
        ivf.nprobe = nprobe
        start = time.perf_counter()
        found, _ = ivf.search(queries, IVF_CANDIDATES)
        ivf_ms = 1e3 * (time.perf_counter() - start) / n_queries
        # Recall by distance, since a tie at the best distance is broken afterwards among the candidates; a
        # query IVF finds nothing for counts as missed (the library then asks the exact index, at its cost).
        trial = IvfTrial(len(codes), ivf.nlist, nprobe, float((found[:, 0] == exact[:, 0]).mean()), exact_ms, ivf_ms)
        if best is None or trial.recall > best.recall:
            best = trial
        if trial.recall >= min_recall or nprobe >= ivf.nlist:
            break
        nprobe = min(2 * nprobe, ivf.nlist)
    if best.recall >= min_recall:
        ivf.nprobe = best.nprobe
    return ivf, best

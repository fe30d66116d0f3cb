"""MaskIndex: nearest stored mask by overlap, over packed bit masks.

Every mask has exactly k bits set, so overlap(a, b) = |a ∧ b| / k = (2k - hamming(a, b)) / 2k, and
the nearest mask by overlap is the nearest by Hamming distance. FAISS's IndexBinaryFlat does that
search; an exact NumPy scan gives identical answers when faiss is not importable.
"""

from __future__ import annotations

import numpy as np

from ..errors import MemoirError

try:
    import faiss
except ImportError:  # pragma: no cover - exercised by forcing use_faiss=False in tests
    faiss = None

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int32)


def faiss_available() -> bool:
    return faiss is not None


def _on_fastest_device(index):
    """The index on a GPU when faiss-gpu and a GPU are present, else the CPU index itself."""
    if not hasattr(faiss, "GpuIndexBinaryFlat") or faiss.get_num_gpus() < 1:
        return index
    resources = faiss.StandardGpuResources()
    gpu_index = faiss.GpuIndexBinaryFlat(resources, index)
    gpu_index.resources = resources  # keep the GPU resources alive as long as the index
    return gpu_index


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """Bool [n, bits] to uint8 [n, ceil(bits / 8)] (little-endian bits, zero padded)."""
    return np.packbits(np.asarray(masks, dtype=bool), axis=1, bitorder="little")


def unpack_masks(codes: np.ndarray, n_bits: int) -> np.ndarray:
    return np.unpackbits(codes, axis=1, count=n_bits, bitorder="little").astype(bool)


class MaskIndex:
    """Stores k-of-n_bits masks and finds, for each query mask, the stored one it overlaps most.

    Ties at the best overlap go to the most recently added mask.
    """

    def __init__(self, n_bits: int, top_k: int, *, use_faiss: bool | None = None):
        if use_faiss and faiss is None:
            raise MemoirError("use_faiss=True but faiss is not installed: pip install faiss-cpu (or faiss-gpu), or "
                              "pass use_faiss=None to fall back to the exact NumPy search.")
        self.n_bits = n_bits
        self.top_k = top_k
        self.n_bytes = (n_bits + 7) // 8
        self.use_faiss = faiss_available() if use_faiss is None else use_faiss
        self.codes = np.zeros((0, self.n_bytes), dtype=np.uint8)
        self._faiss_index = _on_fastest_device(faiss.IndexBinaryFlat(self.n_bytes * 8)) if self.use_faiss else None

    def __len__(self) -> int:
        return self.codes.shape[0]

    def add(self, masks: np.ndarray) -> None:
        self.add_codes(self._pack(masks))

    def add_codes(self, codes: np.ndarray) -> None:
        """Add masks already packed by :func:`pack_masks`."""
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != self.n_bytes:
            raise ValueError(f"packed masks must be uint8 [n, {self.n_bytes}], got {codes.dtype} {codes.shape}")
        self.codes = np.concatenate([self.codes, codes])
        if self._faiss_index is not None:
            self._faiss_index.add(codes)

    def write_faiss(self, path: str) -> bool:
        """Write a FAISS index of the masks to ``path`` (also when searching on NumPy); False without faiss."""
        if faiss is None:
            return False
        index = self._faiss_index
        if not isinstance(index, faiss.IndexBinaryFlat):  # searching on NumPy or on a GPU
            index = faiss.IndexBinaryFlat(self.n_bytes * 8)
            index.add(self.codes)
        faiss.write_index_binary(index, str(path))
        return True

    def adopt_faiss(self, path: str) -> bool:
        """Use a saved FAISS index if it holds exactly this index's masks; False otherwise."""
        if self._faiss_index is None:
            return False
        try:
            saved = faiss.read_index_binary(str(path))
        except RuntimeError:
            return False
        if saved.d != self.n_bytes * 8 or saved.ntotal != len(self):
            return False
        stored = faiss.vector_to_array(saved.xb).reshape(-1, self.n_bytes) if len(self) else self.codes
        if not np.array_equal(stored, self.codes):
            return False
        self._faiss_index = _on_fastest_device(saved)
        return True

    def mask(self, position: int) -> np.ndarray:
        return unpack_masks(self.codes[position:position + 1], self.n_bits)[0]

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions, overlaps) of the best stored mask for each query; (-1, nan) when empty."""
        codes = self._pack(queries)
        if len(self) == 0 or len(codes) == 0:
            return np.full(len(codes), -1, dtype=np.int64), np.full(len(codes), np.nan)
        distances, positions = self._search_faiss(codes) if self._faiss_index is not None else self._search_numpy(codes)
        return positions, (2 * self.top_k - distances) / (2 * self.top_k)

    def _pack(self, masks: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 2 or masks.shape[1] != self.n_bits:
            raise ValueError(f"masks must be [n, {self.n_bits}] bool, got shape {masks.shape}")
        return pack_masks(masks)

    def _search_faiss(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        distances, candidates = self._faiss_index.search(codes, min(2, len(self)))
        best, chosen = distances[:, 0].astype(np.int64), candidates[:, 0].astype(np.int64)
        # FAISS breaks ties arbitrarily: where the two nearest tie, scan exactly and take the newest.
        tied = np.flatnonzero(distances[:, -1] == best) if distances.shape[1] > 1 else []
        if len(tied):
            chosen[tied] = self._search_numpy(codes[tied])[1]
        return best, chosen

    def _search_numpy(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        distances = np.stack([_POPCOUNT[self.codes ^ code].sum(axis=1) for code in codes])
        best = distances.min(axis=1)
        last = distances.shape[1] - 1 - np.argmin(distances[:, ::-1] != best[:, None], axis=1)
        return best.astype(np.int64), last.astype(np.int64)

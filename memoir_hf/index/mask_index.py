"""MaskIndex: nearest stored mask by overlap, over packed bit masks.

Every mask has exactly k bits set, so overlap(a, b) = |a ∧ b| / k = (2k - hamming(a, b)) / 2k, and
the nearest mask by overlap is the nearest by Hamming distance. FAISS's IndexBinaryFlat does that
search; an exact NumPy scan gives identical answers when faiss is not importable. Past
``SUBLINEAR_FROM`` masks (and at every doubling after), a FAISS binary IVF index is tried on the
stored masks and used only if it is measured faster with recall >= 0.99 (see
:mod:`memoir_hf.index.sublinear` for the exact rule).
"""

from __future__ import annotations

import numpy as np

from ..errors import MemoirError
from .sublinear import IVF_CANDIDATES, IvfTrial, measure_ivf

try:
    import faiss
except ImportError:  # pragma: no cover - exercised by forcing use_faiss=False in tests
    faiss = None

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int32)
SUBLINEAR_FROM = 1 << 17
"""Below this many masks the exact scan takes well under a millisecond a query: never try IVF."""


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
        if use_faiss not in (None, True, False):
            raise MemoirError(f"use_faiss must be True, False or None (use it when installed), got {use_faiss!r}.")
        if use_faiss and faiss is None:
            raise MemoirError("use_faiss=True but faiss is not installed: pip install faiss-cpu (or faiss-gpu), or "
                              "pass use_faiss=None to fall back to the exact NumPy search.")
        self.n_bits = n_bits
        self.top_k = top_k
        self.n_bytes = (n_bits + 7) // 8
        self.use_faiss = faiss_available() if use_faiss is None else use_faiss
        self._buffer = np.zeros((0, self.n_bytes), dtype=np.uint8)
        self._count = 0
        self._faiss_index = _on_fastest_device(faiss.IndexBinaryFlat(self.n_bytes * 8)) if self.use_faiss else None
        self._ivf = None
        self.ivf_trial: IvfTrial | None = None
        """The last measurement of a sub-linear index on these masks (None until SUBLINEAR_FROM)."""
        self._next_ivf_check = SUBLINEAR_FROM

    def __len__(self) -> int:
        return self._count

    def __getstate__(self) -> dict:
        """Copies and pickles carry the masks; the FAISS indexes (SWIG objects) are rebuilt from them."""
        return {"n_bits": self.n_bits, "top_k": self.top_k, "use_faiss": self.use_faiss, "codes": self.codes.copy()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["n_bits"], state["top_k"], use_faiss=state["use_faiss"])
        self.add_codes(state["codes"])

    @property
    def codes(self) -> np.ndarray:
        """The packed masks, uint8 [n, n_bytes] (a view: copy it to keep it)."""
        return self._buffer[:self._count]

    def add(self, masks: np.ndarray) -> None:
        self.add_codes(self._pack(masks))

    def add_codes(self, codes: np.ndarray) -> None:
        """Add masks already packed by :func:`pack_masks`."""
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != self.n_bytes:
            raise ValueError(f"packed masks must be uint8 [n, {self.n_bytes}], got {codes.dtype} {codes.shape}")
        self._grow_to(self._count + len(codes))
        self._buffer[self._count:self._count + len(codes)] = codes
        self._count += len(codes)
        if self._faiss_index is not None:
            self._faiss_index.add(codes)
            if self._ivf is not None:
                self._ivf.add(codes)
            if self._count >= self._next_ivf_check:
                self._choose_sublinear()

    def remove(self, positions: list[int]) -> None:
        """Drop the masks at these positions; later masks move up, keeping their order."""
        codes = np.delete(self.codes, positions, axis=0)
        self.__init__(self.n_bits, self.top_k, use_faiss=self.use_faiss)
        self.add_codes(codes)

    def _grow_to(self, size: int) -> None:
        """Room for ``size`` masks, doubling capacity so n adds cost O(n) copies, not O(n^2)."""
        if size > len(self._buffer):
            buffer = np.zeros((max(size, 2 * len(self._buffer), 64), self.n_bytes), dtype=np.uint8)
            buffer[:self._count] = self.codes
            self._buffer = buffer

    def _choose_sublinear(self) -> None:
        """Measure an IVF index on the stored masks; search it from now on only if it wins."""
        ivf, trial = measure_ivf(self.codes, self._faiss_index, self.top_k)
        self.ivf_trial = trial
        self._ivf = ivf if trial.worth_using else None
        self._next_ivf_check = 2 * self._count

    @property
    def search_method(self) -> str:
        """"ivf", "flat" (FAISS exact) or "numpy" (exact scan without faiss)."""
        return "ivf" if self._ivf is not None else "flat" if self._faiss_index is not None else "numpy"

    def write_faiss(self, path: str) -> bool:
        """Write a FAISS index of the masks to ``path`` (also when searching on NumPy); False without faiss."""
        if faiss is None:
            return False
        index = self._faiss_index
        if not isinstance(index, faiss.IndexBinaryFlat):  # searching on NumPy or on a GPU
            index = faiss.IndexBinaryFlat(self.n_bytes * 8)
            index.add(self.codes)
        try:
            faiss.write_index_binary(index, str(path))
        except RuntimeError as error:  # faiss reports I/O failures (a full disk) as RuntimeError
            raise OSError(f"could not write the FAISS index {path}: {error}") from error
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
        if self._ivf is None:
            return self._search_in(self._faiss_index, codes, 2)
        best, chosen = self._search_in(self._ivf, codes, IVF_CANDIDATES)
        # IVF probes only some lists, and finds nothing for a query far from all of them: ask the exact index.
        missed = np.flatnonzero(chosen < 0)
        if len(missed):
            best[missed], chosen[missed] = self._search_in(self._faiss_index, codes[missed], 2)
        return best, chosen

    def _search_in(self, index, codes: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        distances, candidates = index.search(codes, min(width, len(self)))
        best, chosen = distances[:, 0].astype(np.int64), candidates[:, 0].astype(np.int64)
        # FAISS breaks ties arbitrarily: take the newest of the masks tied at the best distance. (A row an IVF
        # index missed, chosen -1, is left to the caller.)
        tied = np.flatnonzero((distances[:, 1] == best) & (chosen >= 0)) if distances.shape[1] > 1 else []
        for row in tied:
            chosen[row] = self._newest_at(codes[row:row + 1], int(best[row]), index, distances[row], candidates[row])
        return best, chosen

    def _newest_at(self, code: np.ndarray, distance: int, index, distances: np.ndarray,
                   candidates: np.ndarray) -> int:
        """The newest stored mask at ``distance`` from ``code``, asking the index for more when all tie."""
        while distances[-1] == distance and len(distances) < len(self):
            found_distances, found = index.search(code, min(2 * len(distances), len(self)))
            kept = found[0] >= 0  # an IVF index pads with -1 once its probed lists are exhausted
            if kept.sum() <= len(distances):
                break
            distances, candidates = found_distances[0][kept], found[0][kept]
            if not kept.all():
                break
        return int(candidates[(distances == distance) & (candidates >= 0)].max())

    def _search_numpy(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        distances = np.stack([_POPCOUNT[self.codes ^ code].sum(axis=1) for code in codes])
        best = distances.min(axis=1)
        last = distances.shape[1] - 1 - np.argmin(distances[:, ::-1] != best[:, None], axis=1)
        return best.astype(np.int64), last.astype(np.int64)

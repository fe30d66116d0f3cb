"""Unit tests of memoir_hf.index.mask_index: bit packing, the overlap formula, and the two search backends."""

from __future__ import annotations

import numpy as np
import pytest

from memoir_hf.index.mask_index import MaskIndex, pack_masks, unpack_masks

BACKENDS = [pytest.param(True, id="faiss"), pytest.param(False, id="numpy")]


def need_backend(use_faiss: bool) -> None:
    if use_faiss:
        pytest.importorskip("faiss")


def random_masks(rng: np.random.Generator, n: int, n_bits: int, k: int) -> np.ndarray:
    """n bool masks of width n_bits with exactly k bits set each."""
    masks = np.zeros((n, n_bits), dtype=bool)
    for row in masks:
        row[rng.choice(n_bits, size=k, replace=False)] = True
    return masks


def bits(n_bits: int, *on: int) -> np.ndarray:
    mask = np.zeros(n_bits, dtype=bool)
    mask[list(on)] = True
    return mask


def brute_force(stored: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference answer: best overlap |a & b| / k, ties to the highest (newest) position."""
    shared = (queries[:, None, :] & stored[None, :, :]).sum(axis=2)
    best = shared.max(axis=1)
    positions = np.array([np.flatnonzero(row == b).max() for row, b in zip(shared, best, strict=True)])
    return positions, best / k


# -- pack / unpack --------------------------------------------------------------------------------


@pytest.mark.parametrize("n_bits", [8, 128, 130, 13])
def test_pack_unpack_round_trip(n_bits):
    rng = np.random.default_rng(0)
    masks = rng.random((7, n_bits)) < 0.3
    codes = pack_masks(masks)
    assert codes.dtype == np.uint8
    assert codes.shape == (7, (n_bits + 7) // 8)
    restored = unpack_masks(codes, n_bits)
    assert restored.dtype == bool
    assert restored.shape == masks.shape
    np.testing.assert_array_equal(restored, masks)


def test_pack_is_little_endian_and_zero_padded():
    codes = pack_masks(bits(10, 0, 9)[None])
    np.testing.assert_array_equal(codes, np.array([[0b00000001, 0b00000010]], dtype=np.uint8))
    # padding bits beyond n_bits are zero
    codes = pack_masks(np.ones((1, 10), dtype=bool))
    np.testing.assert_array_equal(codes, np.array([[0xFF, 0b00000011]], dtype=np.uint8))


# -- the overlap formula on hand-made masks -------------------------------------------------------


@pytest.mark.parametrize("use_faiss", BACKENDS)
def test_overlap_on_hand_made_masks(use_faiss):
    need_backend(use_faiss)
    index = MaskIndex(16, 4, use_faiss=use_faiss)
    stored = np.stack([bits(16, 0, 1, 2, 3), bits(16, 4, 5, 6, 7), bits(16, 8, 9, 10, 11)])
    index.add(stored)
    assert len(index) == 3
    queries = np.stack([
        bits(16, 4, 5, 6, 7),  # identical to position 1
        bits(16, 12, 13, 14, 15),  # disjoint from every stored mask (ties at 0.0 go to the newest)
        bits(16, 8, 12, 13, 14),  # shares one bit with position 2
        bits(16, 0, 1, 12, 13),  # shares two bits with position 0
        bits(16, 0, 1, 2, 4),  # three with position 0, one with position 1
    ])
    positions, overlaps = index.search(queries)
    np.testing.assert_array_equal(positions, [1, 2, 2, 0, 0])
    np.testing.assert_allclose(overlaps, [1.0, 0.0, 0.25, 0.5, 0.75])
    assert positions.dtype == np.int64


@pytest.mark.parametrize("use_faiss", BACKENDS)
def test_mask_returns_stored_mask(use_faiss):
    need_backend(use_faiss)
    rng = np.random.default_rng(1)
    stored = random_masks(rng, 5, 130, 9)
    index = MaskIndex(130, 9, use_faiss=use_faiss)
    index.add(stored[:2])
    index.add(stored[2:])
    for position in range(5):
        np.testing.assert_array_equal(index.mask(position), stored[position])


# -- FAISS and NumPy agree ------------------------------------------------------------------------


def random_case(n_bits: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """300 stored masks (with duplicates) and queries: random, exact copies, and copies of duplicated masks."""
    rng = np.random.default_rng(1234)
    stored = random_masks(rng, 300, n_bits, k)
    # duplicates: later copies of earlier masks must win ties
    stored[250] = stored[10]
    stored[299] = stored[10]
    stored[270] = stored[42]
    queries = np.concatenate([
        random_masks(rng, 150, n_bits, k),
        stored[rng.choice(300, size=60, replace=False)],  # exact copies of stored masks
        stored[[10, 42, 250, 299, 270, 0]],
    ])
    return stored, queries


def filled_index(stored: np.ndarray, n_bits: int, k: int, use_faiss: bool) -> MaskIndex:
    index = MaskIndex(n_bits, k, use_faiss=use_faiss)
    assert index.use_faiss is use_faiss
    for chunk in np.array_split(stored, 7):  # edits arrive in several calls
        index.add(chunk)
    assert len(index) == len(stored)
    return index


@pytest.mark.parametrize("n_bits, k", [(128, 16), (130, 13), (40, 5)])
def test_numpy_search_matches_brute_force(n_bits, k):
    stored, queries = random_case(n_bits, k)
    positions, overlaps = filled_index(stored, n_bits, k, use_faiss=False).search(queries)
    expected_positions, expected_overlaps = brute_force(stored, queries, k)
    np.testing.assert_array_equal(positions, expected_positions)
    np.testing.assert_array_equal(overlaps, expected_overlaps)
    np.testing.assert_array_equal(positions[-6:], [299, 270, 299, 299, 270, 0])
    np.testing.assert_array_equal(overlaps[150:], np.ones(len(queries) - 150))


@pytest.mark.parametrize("n_bits, k", [(128, 16), (130, 13), (40, 5)])
def test_faiss_and_numpy_agree_on_random_masks(n_bits, k):
    pytest.importorskip("faiss")
    stored, queries = random_case(n_bits, k)
    faiss_positions, faiss_overlaps = filled_index(stored, n_bits, k, use_faiss=True).search(queries)
    numpy_positions, numpy_overlaps = filled_index(stored, n_bits, k, use_faiss=False).search(queries)
    np.testing.assert_array_equal(faiss_positions, numpy_positions)
    np.testing.assert_array_equal(faiss_overlaps, numpy_overlaps)
    expected_positions, expected_overlaps = brute_force(stored, queries, k)
    np.testing.assert_array_equal(faiss_positions, expected_positions)
    np.testing.assert_array_equal(faiss_overlaps, expected_overlaps)
    np.testing.assert_array_equal(faiss_positions[-6:], [299, 270, 299, 299, 270, 0])


@pytest.mark.parametrize("use_faiss", BACKENDS)
def test_identical_stored_masks_tie_to_newest(use_faiss):
    need_backend(use_faiss)
    rng = np.random.default_rng(7)
    a, b, c = random_masks(rng, 3, 64, 8)
    index = MaskIndex(64, 8, use_faiss=use_faiss)
    index.add(np.stack([a, b, a, c]))
    positions, overlaps = index.search(np.stack([a, b, c]))
    np.testing.assert_array_equal(positions, [2, 1, 3])
    np.testing.assert_array_equal(overlaps, [1.0, 1.0, 1.0])
    index.add(a[None])
    positions, _ = index.search(a[None])
    assert positions.tolist() == [4]


def test_faiss_tie_to_newest_with_many_identical_masks():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    others = random_masks(rng, 3, 64, 8)
    same = random_masks(rng, 1, 64, 8)
    stored = np.concatenate([others, np.repeat(same, 20, axis=0)])
    index = MaskIndex(64, 8, use_faiss=True)
    index.add(stored)
    positions, _ = index.search(same)
    assert positions.tolist() == [22]


# -- empty index and bad widths -------------------------------------------------------------------


@pytest.mark.parametrize("use_faiss", BACKENDS)
def test_empty_index_returns_minus_one_and_nan(use_faiss):
    need_backend(use_faiss)
    index = MaskIndex(130, 13, use_faiss=use_faiss)
    assert len(index) == 0
    queries = random_masks(np.random.default_rng(3), 4, 130, 13)
    positions, overlaps = index.search(queries)
    assert positions.shape == (4,) and overlaps.shape == (4,)
    np.testing.assert_array_equal(positions, [-1, -1, -1, -1])
    assert np.isnan(overlaps).all()


@pytest.mark.parametrize("use_faiss", BACKENDS)
@pytest.mark.parametrize("width", [120, 144, 16])
def test_add_wrong_width_raises(use_faiss, width):
    need_backend(use_faiss)
    index = MaskIndex(130, 4, use_faiss=use_faiss)
    with pytest.raises(ValueError, match="130"):
        index.add(np.zeros((1, width), dtype=bool))
    assert len(index) == 0


@pytest.mark.parametrize("width", [129, 136])
def test_add_wrong_width_in_same_byte_count_raises(width):
    index = MaskIndex(130, 4, use_faiss=False)
    with pytest.raises(ValueError):
        index.add(np.zeros((1, width), dtype=bool))


# -- growth and the sub-linear index --------------------------------------------------------------
def test_many_single_adds_keep_every_mask_in_order():
    rng = np.random.default_rng(3)
    masks = random_masks(rng, 300, 64, 8)
    index = MaskIndex(64, 8, use_faiss=False)
    for mask in masks:
        index.add(mask[None, :])
    assert len(index) == 300
    assert np.array_equal(index.codes, pack_masks(masks))
    assert np.array_equal(index.mask(299), masks[299])


def clustered_masks(rng: np.random.Generator, n: int, n_bits: int, k: int, n_clusters: int) -> np.ndarray:
    """Masks drawn around a few centres (each keeps 3/4 of its centre's bits): a structure IVF can use."""
    centres = random_masks(rng, n_clusters, n_bits, k)
    masks = centres[rng.integers(0, n_clusters, size=n)].copy()
    keep = k - k // 4
    for row in masks:
        on, off = np.flatnonzero(row), np.flatnonzero(~row)
        row[rng.choice(on, size=k - keep, replace=False)] = False
        row[rng.choice(off, size=k - keep, replace=False)] = True
    return masks


def test_measured_ivf_finds_what_the_exact_search_finds_on_clustered_masks():
    faiss = pytest.importorskip("faiss")
    from memoir_hf.index.sublinear import measure_ivf

    rng = np.random.default_rng(4)
    codes = pack_masks(clustered_masks(rng, 4000, 256, 64, n_clusters=16))
    exact = faiss.IndexBinaryFlat(256)
    exact.add(codes)
    ivf, trial = measure_ivf(codes, exact, 64, query_overlap=0.6, rng=rng)
    assert trial.n_masks == 4000 and trial.nlist == 63
    assert trial.recall >= 0.99
    assert ivf.nprobe == trial.nprobe


def test_ivf_trial_queries_at_the_lowest_routed_overlap_and_counts_ties_as_found(monkeypatch):
    """The trial asks what routing asks: queries as far from their mask as any calibrated τ lets through, and
    a mask as near as the exact one (which of two tied masks each index returns first does not matter)."""
    faiss = pytest.importorskip("faiss")
    import memoir_hf.index.sublinear as sublinear

    asked = []
    real_queries = sublinear.perturbed_queries
    monkeypatch.setattr(sublinear, "perturbed_queries", lambda *a: asked.append(a[4]) or real_queries(*a))
    rng = np.random.default_rng(4)
    codes = pack_masks(clustered_masks(rng, 2000, 256, 64, n_clusters=16))
    codes = np.concatenate([codes, codes])  # every mask stored twice: every answer is a tie

    class ExactReturningTheOtherTwin:
        def __init__(self):
            self.flat = faiss.IndexBinaryFlat(256)
            self.flat.add(codes)

        def search(self, queries, width):
            distances, labels = self.flat.search(queries, width)
            return distances, (labels + 2000) % 4000

    _, trial = sublinear.measure_ivf(codes, ExactReturningTheOtherTwin(), 64, rng=rng)
    assert asked == [sublinear.LOWEST_ROUTED_OVERLAP] and sublinear.LOWEST_ROUTED_OVERLAP <= 0.33
    assert trial.recall >= 0.99


def test_slow_ivf_timings_do_not_cut_the_probe_search_short(monkeypatch):
    """A noisy clock once made the search stop below the recall goal; speed is judged once, at the end."""
    faiss = pytest.importorskip("faiss")
    import memoir_hf.index.sublinear as sublinear

    ticks = iter([0.0, 1.0] + [t for start in range(10, 1000, 100) for t in (start, start + 50)])
    monkeypatch.setattr(sublinear.time, "perf_counter", lambda: next(ticks))
    rng = np.random.default_rng(4)
    codes = pack_masks(clustered_masks(rng, 4000, 256, 64, n_clusters=16))
    exact = faiss.IndexBinaryFlat(256)
    exact.add(codes)
    _, trial = sublinear.measure_ivf(codes, exact, 64, query_overlap=0.6, rng=rng)
    assert trial.nprobe > 1 and trial.recall >= 0.99
    assert trial.speedup < 1 and not trial.worth_using


def test_adopted_ivf_answers_like_the_exact_search_with_ties_to_newest(monkeypatch):
    pytest.importorskip("faiss")
    import memoir_hf.index.mask_index as mask_index
    from memoir_hf.index.sublinear import IvfTrial

    real_measure = mask_index.measure_ivf

    def always_adopt(codes, exact, top_k, **kwargs):
        ivf, trial = real_measure(codes, exact, top_k, **kwargs)
        ivf.nprobe = ivf.nlist  # every list probed: exact answers, so they can be compared
        return ivf, IvfTrial(trial.n_masks, ivf.nlist, ivf.nlist, 1.0, 1.0, 0.1)

    monkeypatch.setattr(mask_index, "SUBLINEAR_FROM", 500)
    monkeypatch.setattr(mask_index, "measure_ivf", always_adopt)
    rng = np.random.default_rng(5)
    stored = clustered_masks(rng, 600, 128, 32, n_clusters=8)
    stored[550] = stored[10]  # a tie: the newer copy must win
    index = MaskIndex(128, 32, use_faiss=True)
    index.add(stored[:400])
    assert index.search_method == "flat"
    index.add(stored[400:])
    assert index.search_method == "ivf" and index.ivf_trial.n_masks == 600
    queries = np.concatenate([stored[[10, 3, 599]], clustered_masks(rng, 20, 128, 32, n_clusters=8)])
    positions, overlaps = index.search(queries)
    expected_positions, expected_overlaps = brute_force(stored, queries, 32)
    assert positions[0] == 550
    np.testing.assert_allclose(overlaps, expected_overlaps)
    assert np.array_equal(positions, expected_positions)


def test_a_query_the_ivf_misses_is_answered_by_the_exact_search(monkeypatch):
    """An IVF index whose probed lists are empty returns label -1; that must not become "the newest edit"."""
    pytest.importorskip("faiss")
    import memoir_hf.index.mask_index as mask_index
    from memoir_hf.index.sublinear import IvfTrial

    def adopt(codes, exact, top_k, **kwargs):
        ivf, trial = real_measure(codes, exact, top_k, **kwargs)
        return ivf, IvfTrial(trial.n_masks, ivf.nlist, ivf.nprobe, 1.0, 1.0, 0.1)

    real_measure = mask_index.measure_ivf
    monkeypatch.setattr(mask_index, "SUBLINEAR_FROM", 100)
    monkeypatch.setattr(mask_index, "measure_ivf", adopt)
    rng = np.random.default_rng(6)
    stored = clustered_masks(rng, 200, 128, 32, n_clusters=4)
    stored[150] = stored[7]  # a tie among the rows the IVF answers: the newer copy must still win
    index = MaskIndex(128, 32, use_faiss=True)
    index.add(stored)
    assert index.search_method == "ivf"

    class MissesOddRows:
        def __init__(self, ivf):
            self.ivf = ivf

        def search(self, codes, width):
            distances, labels = self.ivf.search(codes, width)
            distances[1::2], labels[1::2] = np.iinfo(np.int32).max, -1
            return distances, labels

    index._ivf = MissesOddRows(index._ivf)
    queries = stored[[7, 3, 42, 199]]
    positions, overlaps = index.search(queries)
    expected_positions, expected_overlaps = brute_force(stored, queries, 32)
    assert positions[0] == 150
    assert np.array_equal(positions, expected_positions)
    np.testing.assert_allclose(overlaps, expected_overlaps)


def test_ivf_that_loses_to_the_exact_search_is_not_used(monkeypatch):
    pytest.importorskip("faiss")
    import memoir_hf.index.mask_index as mask_index
    from memoir_hf.index.sublinear import IvfTrial

    monkeypatch.setattr(mask_index, "SUBLINEAR_FROM", 100)
    monkeypatch.setattr(mask_index, "measure_ivf",
                        lambda codes, exact, top_k, **kw: (object(), IvfTrial(len(codes), 8, 8, 0.9, 1.0, 0.1)))
    index = MaskIndex(64, 8, use_faiss=True)
    index.add(random_masks(np.random.default_rng(6), 150, 64, 8))
    assert index.search_method == "flat" and index.ivf_trial.recall == 0.9


@pytest.mark.parametrize("use_faiss", BACKENDS)
def test_pickled_index_answers_like_the_original(use_faiss):
    import pickle

    need_backend(use_faiss)
    rng = np.random.default_rng(7)
    index = MaskIndex(96, 12, use_faiss=use_faiss)
    index.add(random_masks(rng, 50, 96, 12))
    restored = pickle.loads(pickle.dumps(index))
    queries = random_masks(rng, 10, 96, 12)
    for got, want in zip(restored.search(queries), index.search(queries), strict=True):
        np.testing.assert_array_equal(got, want)
    restored.add(random_masks(rng, 1, 96, 12))
    assert len(restored) == 51 and len(index) == 50


# -- removal --------------------------------------------------------------------------------------


def removal_case() -> tuple[np.ndarray, np.ndarray]:
    """40 stored masks with three copies of one mask, and queries: random, copies of stored masks."""
    rng = np.random.default_rng(8)
    stored = random_masks(rng, 40, 96, 12)
    stored[30] = stored[5]
    stored[35] = stored[5]
    queries = np.concatenate([random_masks(rng, 30, 96, 12), stored[[5, 0, 17, 30, 39, 12, 38]]])
    return stored, queries


@pytest.mark.parametrize("use_faiss", BACKENDS)
def test_remove_keeps_the_order_and_answers_like_a_fresh_index(use_faiss):
    need_backend(use_faiss)
    stored, queries = removal_case()
    index = filled_index(stored, 96, 12, use_faiss)
    removed = [30, 0, 39, 17]  # any order, first, last, one copy of the triplicated mask
    index.remove(removed)
    kept = np.delete(stored, removed, axis=0)
    assert len(index) == 36 and index.use_faiss is use_faiss
    assert index.search_method == ("flat" if use_faiss else "numpy")
    np.testing.assert_array_equal(index.codes, pack_masks(kept))
    for position in (0, 4, 16, 35):
        np.testing.assert_array_equal(index.mask(position), kept[position])
    fresh = filled_index(kept, 96, 12, use_faiss)
    positions, overlaps = index.search(queries)
    for got, want in zip((positions, overlaps), fresh.search(queries), strict=True):
        np.testing.assert_array_equal(got, want)
    expected_positions, expected_overlaps = brute_force(kept, queries, 12)
    np.testing.assert_array_equal(positions, expected_positions)
    np.testing.assert_allclose(overlaps, expected_overlaps)
    assert positions[30] == 35 - 3  # the copy of stored[5]: the newest remaining copy (stored[35]) wins
    # the queries that were removed masks no longer find themselves at overlap 1
    assert overlaps[[32, 34]].max() < 1.0


@pytest.mark.parametrize("use_faiss", BACKENDS)
def test_remove_then_add_and_remove_everything(use_faiss):
    need_backend(use_faiss)
    stored, queries = removal_case()
    index = filled_index(stored, 96, 12, use_faiss)
    index.remove([])
    np.testing.assert_array_equal(index.codes, pack_masks(stored))
    index.remove([5, 6])
    extra = random_masks(np.random.default_rng(9), 3, 96, 12)
    index.add(extra)
    expected = np.concatenate([np.delete(stored, [5, 6], axis=0), extra])
    np.testing.assert_array_equal(index.codes, pack_masks(expected))
    for got, want in zip(index.search(queries), brute_force(expected, queries, 12), strict=True):
        np.testing.assert_allclose(got, want)
    if use_faiss:
        assert index._faiss_index.ntotal == len(index) == 41
    index.remove(list(range(len(index))))
    assert len(index) == 0 and index.codes.shape == (0, 12)
    positions, overlaps = index.search(queries[:2])
    np.testing.assert_array_equal(positions, [-1, -1])
    assert np.isnan(overlaps).all()


def test_remove_from_an_adopted_ivf_index_answers_like_the_exact_search(monkeypatch):
    pytest.importorskip("faiss")
    import memoir_hf.index.mask_index as mask_index
    from memoir_hf.index.sublinear import IvfTrial

    real_measure = mask_index.measure_ivf

    def always_adopt(codes, exact, top_k, **kwargs):
        ivf, trial = real_measure(codes, exact, top_k, **kwargs)
        ivf.nprobe = ivf.nlist
        return ivf, IvfTrial(trial.n_masks, ivf.nlist, ivf.nlist, 1.0, 1.0, 0.1)

    monkeypatch.setattr(mask_index, "SUBLINEAR_FROM", 500)
    monkeypatch.setattr(mask_index, "measure_ivf", always_adopt)
    rng = np.random.default_rng(10)
    stored = clustered_masks(rng, 600, 128, 32, n_clusters=8)
    stored[590] = stored[10]
    index = MaskIndex(128, 32, use_faiss=True)
    index.add(stored)
    assert index.search_method == "ivf"
    index.remove([590, 3])
    kept = np.delete(stored, [590, 3], axis=0)
    assert len(index) == 598 and index.search_method == "ivf"
    queries = np.concatenate([stored[[10, 3, 599]], clustered_masks(rng, 20, 128, 32, n_clusters=8)])
    positions, overlaps = index.search(queries)
    expected_positions, expected_overlaps = brute_force(kept, queries, 32)
    assert positions[0] == 9  # stored[10], now at 9: its newer copy was removed
    np.testing.assert_array_equal(positions, expected_positions)
    np.testing.assert_allclose(overlaps, expected_overlaps)


class FakeGpuIndexBinaryFlat:
    """Stands in for faiss-gpu's GpuIndexBinaryFlat (no GPU here): built from a CPU index, whose masks it copies."""

    built = 0

    def __init__(self, resources, cpu_index):
        import faiss

        assert isinstance(resources, FakeGpuResources)
        FakeGpuIndexBinaryFlat.built += 1
        self.d = cpu_index.d
        self._inner = faiss.IndexBinaryFlat(cpu_index.d)
        if cpu_index.ntotal:
            self._inner.add(faiss.vector_to_array(cpu_index.xb).reshape(cpu_index.ntotal, -1))

    @property
    def ntotal(self) -> int:
        return self._inner.ntotal

    def add(self, codes):
        self._inner.add(codes)

    def search(self, codes, k):
        return self._inner.search(codes, k)


class FakeGpuResources:
    pass


def test_with_a_gpu_the_index_searches_there_and_saves_a_cpu_index(monkeypatch, tmp_path):
    faiss = pytest.importorskip("faiss")
    import memoir_hf.index.mask_index as mask_index

    monkeypatch.setattr(faiss, "GpuIndexBinaryFlat", FakeGpuIndexBinaryFlat, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", FakeGpuResources, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(FakeGpuIndexBinaryFlat, "built", 0)
    stored, queries = random_case(128, 16)
    index = filled_index(stored, 128, 16, use_faiss=True)
    assert isinstance(index._faiss_index, FakeGpuIndexBinaryFlat) and index.search_method == "flat"
    positions, overlaps = index.search(queries)
    expected_positions, expected_overlaps = brute_force(stored, queries, 16)
    np.testing.assert_array_equal(positions, expected_positions)
    np.testing.assert_array_equal(overlaps, expected_overlaps)

    path = tmp_path / "masks.faiss"
    assert index.write_faiss(str(path))
    assert isinstance(faiss.read_index_binary(str(path)), faiss.IndexBinaryFlat)
    reloaded = mask_index.MaskIndex(128, 16, use_faiss=True)
    reloaded.add_codes(index.codes.copy())
    assert reloaded.adopt_faiss(str(path))
    assert isinstance(reloaded._faiss_index, FakeGpuIndexBinaryFlat)
    assert FakeGpuIndexBinaryFlat.built == 3  # the first index, the reloaded one, and the adopted saved one
    np.testing.assert_array_equal(reloaded.search(queries)[0], expected_positions)


def test_ties_go_to_the_newest_copy_also_when_the_ivf_lists_run_out():
    """The same mask stored 20 times (one fact edited again and again) fills IVF's probed list: the tie search
    that asks for more candidates gets -1 padding back, and must still keep the newest copy it found."""
    pytest.importorskip("faiss")
    from memoir_hf.index.sublinear import build_ivf

    rng = np.random.default_rng(0)
    masks = random_masks(rng, 40, 64, 8)
    masks = np.concatenate([masks, np.repeat(masks[:1], 20, axis=0)])
    index = MaskIndex(64, 8, use_faiss=True)
    index.add(masks)
    index._ivf = build_ivf(index.codes, 4, rng=np.random.default_rng(1), train_per_list=10)
    index._ivf.nprobe = 1
    positions, _ = index.search(masks[:1])
    assert positions[0] == len(masks) - 1

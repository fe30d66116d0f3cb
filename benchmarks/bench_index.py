"""Mask-index retrieval at 1e4 to 1e6 stored edits: exact flat search against a FAISS binary IVF index.

Synthetic masks with the real k and d_ff of SmolLM2-135M (439 of 1536 bits) and of LLaMA-3-8B (4096
of 14336 bits), each bit set uniformly at random: the worst case for clustering indexes. Queries are
stored masks with 1 - overlap of their bits moved elsewhere (overlap 0.3 by default, the library's own
IVF trial's: below every calibrated τ, the hard end of what routing accepts). Each row reports, in one
run: the exact search one query at a time and batched, the same through memoir_hf's MaskIndex, the IVF
index at the smallest probe count that reaches recall 0.99 (or its best), and what MaskIndex chooses
under its rule.

    python benchmarks/bench_index.py            # ~10 minutes, 1 thread
"""

from __future__ import annotations

import argparse
import time

from _common import machine, markdown_table, parse_args, peak_rss_mb, write_report

WIDTHS = {"smollm2 (1536 bits, k 439)": (1536, 439), "llama3-8b (14336 bits, k 4096)": (14336, 4096)}


def random_codes(n: int, n_bits: int, k: int, rng, chunk: int = 10000):
    import numpy as np

    codes = np.empty((n, n_bits // 8), dtype=np.uint8)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        on = np.argpartition(rng.random((rows, n_bits), dtype=np.float32), k, axis=1)[:, :k]
        masks = np.zeros((rows, n_bits), dtype=bool)
        np.put_along_axis(masks, on, True, axis=1)
        codes[start:start + rows] = np.packbits(masks, axis=1, bitorder="little")
    return codes


def per_query_ms(search, queries, single: int = 50) -> tuple[float, float]:
    """(ms for one query searched alone, ms per query in one batched call)."""
    start = time.perf_counter()
    for row in range(single):
        search(queries[row:row + 1])
    alone = 1e3 * (time.perf_counter() - start) / single
    start = time.perf_counter()
    search(queries)
    return alone, 1e3 * (time.perf_counter() - start) / len(queries)


def bench_one(n: int, n_bits: int, k: int, overlap: float, n_queries: int, seed: int) -> dict:
    import faiss
    import numpy as np

    from memoir_hf.index.mask_index import MaskIndex
    from memoir_hf.index.sublinear import measure_ivf, perturbed_queries

    rng = np.random.default_rng(seed)
    codes = random_codes(n, n_bits, k, rng)
    index = MaskIndex(n_bits, k, use_faiss=True)
    start = time.perf_counter()
    index.add_codes(codes)  # runs MaskIndex's own IVF trial when n >= SUBLINEAR_FROM
    add_s = time.perf_counter() - start
    queries, sources = perturbed_queries(codes, k, n_bits, n_queries, overlap, rng)
    flat = faiss.IndexBinaryFlat(n_bits)
    flat.add(codes)
    flat_alone, flat_batched = per_query_ms(lambda q: flat.search(q, 1), queries)
    query_masks = np.unpackbits(queries, axis=1, count=n_bits, bitorder="little").astype(bool)
    lib_alone, lib_batched = per_query_ms(index.search, query_masks)
    positions, _ = index.search(query_masks)
    trial = index.ivf_trial or measure_ivf(codes, flat, k, query_overlap=overlap, n_queries=n_queries, rng=rng)[1]
    return {
        "n_masks": n, "n_bits": n_bits, "k": k, "query_overlap": overlap,
        "exact_ms_alone": flat_alone, "exact_ms_batched": flat_batched,
        "memoir_ms_alone": lib_alone, "memoir_ms_batched": lib_batched,
        "memoir_method": index.search_method, "memoir_top1_is_source": float((positions == sources).mean()),
        "ivf_nlist": trial.nlist, "ivf_nprobe": trial.nprobe, "ivf_recall": trial.recall,
        "ivf_ms_batched": trial.ivf_ms, "ivf_speedup": trial.speedup,
        "index_bytes_per_mask": 2 * (n_bits // 8), "add_seconds": add_s, "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6])
    parser.add_argument("--wide-sizes", type=float, nargs="*", default=[1e4, 1e5, 1e6],
                        help="sizes for the 14336-bit masks")
    parser.add_argument("--overlap", type=float, default=None,
                        help="query overlap (default: the library's own IVF trial's, LOWEST_ROUTED_OVERLAP)")
    parser.add_argument("--queries", type=int, default=200)
    args = parse_args(parser, name="bench_index", threads=1)
    from memoir_hf.index.sublinear import LOWEST_ROUTED_OVERLAP  # after parse_args has quieted the threads

    overlap = LOWEST_ROUTED_OVERLAP if args.overlap is None else args.overlap

    rows = []
    for label, (n_bits, k) in WIDTHS.items():
        sizes = args.sizes if n_bits == 1536 else args.wide_sizes
        for n in sizes:
            result = bench_one(int(n), n_bits, k, overlap, args.queries, seed=int(n) + n_bits)
            result["masks"] = label
            rows.append(result)
            print(f"{label} n={int(n):>8}: exact {result['exact_ms_batched']:.3f} ms/query, "
                  f"ivf recall {result['ivf_recall']:.3f} at {result['ivf_ms_batched']:.3f} ms", flush=True)
    header = ["masks", "stored", "exact ms (1 query)", "exact ms/query (batch)", "memoir ms/query (batch)",
              "memoir search", "IVF nprobe/nlist", "IVF recall", "IVF ms/query", "bytes/mask"]
    table = [[r["masks"], f"{r['n_masks']:,}", f"{r['exact_ms_alone']:.3f}", f"{r['exact_ms_batched']:.3f}",
              f"{r['memoir_ms_batched']:.3f}", r["memoir_method"], f"{r['ivf_nprobe']}/{r['ivf_nlist']}",
              f"{r['ivf_recall']:.3f}", f"{r['ivf_ms_batched']:.3f}", r["index_bytes_per_mask"]] for r in rows]
    print(markdown_table(header, table))
    path = write_report(args.name, {"benchmark": "index", "machine": machine(args.threads), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

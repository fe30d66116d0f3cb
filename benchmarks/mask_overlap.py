"""How much the stored masks of a saved memory share: pairwise overlap against chance, and hub columns.

    python benchmarks/mask_overlap.py benchmarks/checkpoints/zsre_smollm2_memoir_T1000 \
        benchmarks/checkpoints/zsre_smollm2_memoir_sparse_T1000

Reads only ``memoir_masks.safetensors`` (packed k-of-d_ff bits, one row an edit), so it needs no model.
Prints a table and adds each checkpoint's entry to benchmarks/results/mask_overlap.json (keyed by the
checkpoint folder's name; the other entries are kept).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from _common import markdown_table, merge_run, parse_args
from safetensors.numpy import load_file


def mask_statistics(checkpoint: Path) -> dict:
    bits = np.unpackbits(load_file(checkpoint / "memoir_masks.safetensors")["codes"], axis=1).astype(np.float32)
    edits, d_ff = bits.shape
    k = int(bits[0].sum())
    overlaps = (bits @ bits.T)[np.triu_indices(edits, 1)] / k
    uses = bits.sum(axis=0)  # per column: how many edits' masks hold it
    return {"checkpoint": str(checkpoint), "edits": edits, "d_ff": d_ff, "k": k, "chance_overlap": k / d_ff,
            "mean_overlap": float(overlaps.mean()), "p95_overlap": float(np.percentile(overlaps, 95)),
            "edits_per_column_mean": float(uses.mean()), "edits_per_column_p99": float(np.percentile(uses, 99)),
            "edits_per_column_max": int(uses.max()),
            "columns_in_over_half": int((uses > edits / 2).sum()),
            "columns_in_over_quarter": int((uses > edits / 4).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    args = parse_args(parser, name="mask_overlap", threads=1)
    missing = [path for path in args.checkpoints if not (path / "memoir_masks.safetensors").is_file()]
    if missing:
        parser.error(f"{missing[0]} holds no memoir_masks.safetensors: pass saved memoir checkpoints")
    rows = [mask_statistics(path) for path in args.checkpoints]
    header = ["checkpoint", "edits", "k", "chance overlap", "mean overlap", "p95",
              "edits a column: mean / p99 / max", "columns in > 1/2 / > 1/4 of masks"]
    print(markdown_table(header, [
        [Path(r["checkpoint"]).name, r["edits"], r["k"], f"{r['chance_overlap']:.3f}", f"{r['mean_overlap']:.3f}",
         f"{r['p95_overlap']:.3f}",
         f"{r['edits_per_column_mean']:.0f} / {r['edits_per_column_p99']:.0f} / {r['edits_per_column_max']}",
         f"{r['columns_in_over_half']} / {r['columns_in_over_quarter']}"] for r in rows]))
    for row in rows:
        merge_run(args.name, Path(row["checkpoint"]).name, row)


if __name__ == "__main__":
    main()

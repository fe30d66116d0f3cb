"""Compare fingerprints before spending hours on a run: overlap, routing and interference of ZsRE masks.

    python benchmarks/fingerprint_probe.py --records 1000

No edit is written. The script reads the memory layer's inputs for the edit prompts, rephrases and
loc prompts of the first ``--records`` ZsRE records (about 4 minutes on 2 cores for 1,000), and for
each aggregation and k reports:

- the mean overlap of two edits' masks against chance, and the columns that sit in over half of them;
- how many rephrases route to their own edit at the τ that keeps 99% of loc prompts out;
- the interference: at an edit's last prompt token, what the writes of all the other edits add,
  relative to the edit's own write (median over edits). Edit j writes along its masked activation
  v_j (a least-change write is δ_j v_jᵀ / |v_j|²), which changes what edit i reads by
  δ_j <v_j, v_i> / |v_j|²; with unrelated δ_j these add up as sqrt(Σ_j (<v_j, v_i> / |v_j|²)²).
  It ranks fingerprints, it does not predict Rel: the optimiser does not write least-change updates.

Prints a table and writes benchmarks/results/fingerprint_probe.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _common import ZSRE_EDITS, machine, markdown_table, parse_args, write_report

ROOT = Path(__file__).resolve().parents[1]
AGGREGATIONS = ("mean_minus_background", "standardized")
SPARSE_TOP_K = 0.1


def prompt_activations(memoir, texts: list[str]):
    """(prompt mean, last prompt token) of the memory layer's input for each text: two [n, d_ff] tensors."""
    import torch

    from memoir_hf.fingerprint.background import text_activations
    from memoir_hf.fingerprint.tophash import last_token, mean_over_tokens

    means, lasts = [], []
    with torch.no_grad():
        for activations, mask in text_activations(memoir.base_model, memoir.tokenizer, memoir.layer, texts,
                                                  batch_size=32):
            means.append(mean_over_tokens(activations, mask))
            lasts.append(activations[torch.arange(len(activations)), last_token(mask)])
    return torch.cat(means), torch.cat(lasts)


def probe(aggregation: str, k: int, background, edits, rephrases, locs, last_tokens) -> dict:
    import torch

    from memoir_hf.fingerprint.tophash import TopHash

    tophash = TopHash(edits.shape[1], k, aggregation, seed=0)
    tophash.set_background(background)

    def masks(means: torch.Tensor) -> torch.Tensor:
        return tophash(means[:, None, :], torch.ones(len(means), 1)).float()

    edit_masks = masks(edits)
    n = len(edits)
    pairwise = (edit_masks @ edit_masks.T / k)[~torch.eye(n, dtype=torch.bool)]
    rephrase_overlap, loc_overlap = masks(rephrases) @ edit_masks.T / k, masks(locs) @ edit_masks.T / k
    tau = torch.quantile(loc_overlap.max(dim=1).values, 0.99)
    best, nearest = rephrase_overlap.max(dim=1)
    written = last_tokens * edit_masks
    gram = written @ written.T
    relative = gram / gram.diag()[None, :]  # <v_i, v_j> / |v_j|^2 at [i, j]
    relative.fill_diagonal_(0.0)
    return {"aggregation": aggregation, "k": k, "mean_overlap": float(pairwise.mean()),
            "chance_overlap": k / edits.shape[1], "columns_in_over_half": int((edit_masks.sum(0) > n / 2).sum()),
            "tau_99_loc": float(tau),
            "rephrase_routed_right": float(((nearest == torch.arange(n)) & (best >= tau)).float().mean()),
            "interference_median": float(relative.pow(2).sum(dim=1).sqrt().median()),
            "norm_kept_median": float((gram.diag().sqrt() / last_tokens.norm(dim=1)).median())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1000, help="ZsRE records (default 1000)")
    parser.add_argument("--data", type=Path, default=ZSRE_EDITS, help="ZsRE edit file (zsre_mend_edit.json)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs/smollm2-135m.yaml",
                        help="MemoirConfig YAML: the layer to probe")
    args = parse_args(parser, name="fingerprint_probe", threads=2)

    import memoir_hf
    from memoir_hf.config import DEFAULT_TOP_K
    from memoir_hf.evaluation import load_records
    from memoir_hf.fingerprint.background import default_background_prompts
    from memoir_hf.offline_models import load_builtin

    model, tokenizer = load_builtin("smollm2")
    memoir = memoir_hf.patch(model, memoir_hf.MemoirConfig.from_yaml(args.config), tokenizer)
    records = load_records(args.data, "zsre", limit=args.records)
    background, _ = prompt_activations(memoir, default_background_prompts())
    edits, last_tokens = prompt_activations(memoir, [r.prompt for r in records])
    rephrases, _ = prompt_activations(memoir, [r.rephrase for r in records])
    locs, _ = prompt_activations(memoir, [r.loc for r in records])
    d_ff = edits.shape[1]
    runs = [probe(aggregation, round(fraction * d_ff), background, edits, rephrases, locs, last_tokens)
            for fraction in (DEFAULT_TOP_K, SPARSE_TOP_K) for aggregation in AGGREGATIONS]
    header = ["aggregation", "k", "mean overlap (chance)", "columns in > 1/2 of masks", "τ (99% loc out)",
              "rephrases routed right", "interference (median)", "norm kept (median)"]
    print(markdown_table(header, [
        [r["aggregation"], r["k"], f"{r['mean_overlap']:.3f} ({r['chance_overlap']:.3f})", r["columns_in_over_half"],
         f"{r['tau_99_loc']:.3f}", f"{r['rephrase_routed_right']:.3f}", f"{r['interference_median']:.1f}",
         f"{r['norm_kept_median']:.2f}"] for r in runs]))
    write_report(args.name, {"records": len(records), "layer": memoir.target.module_name,
                             "machine": machine(args.threads), "runs": runs})


if __name__ == "__main__":
    main()

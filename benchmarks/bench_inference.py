"""Inference cost of the memory: patched against unpatched SmolLM2-135M with 0, 1,000 and 10,000 stored edits.

Two copies of the model, one patched, timed in alternation so machine noise hits both alike; every cell
is the median of ``--repeats`` runs. Stored edits are synthetic (random TopHash-sized masks, random
W_m), except that the "routed" prompts' own masks are among them, so those prompts read the memory.
Prompts are 32 tokens of generic text. Also checks that the logits of every prompt that routes to no
edit are bit-identical to the unpatched model's.

    python benchmarks/bench_inference.py        # ~10 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

from _common import current_rss_mb, machine, markdown_table, parse_args, peak_rss_mb, write_report

PROMPT_TOKENS = 32


def prompts_of_length(tokenizer, texts: list[str], n: int, length: int) -> list[list[int]]:
    """``n`` token lists of exactly ``length`` tokens, from consecutive texts glued together."""
    ids = []
    for text in texts * (1 + n * length // max(1, sum(len(tokenizer(t)["input_ids"]) for t in texts))):
        ids += tokenizer(" " + text)["input_ids"]
        if len(ids) >= n * length:
            break
    return [ids[i * length:(i + 1) * length] for i in range(n)]


def add_synthetic_edits(memoir, n: int, must_include, rng) -> None:
    """Store ``n`` edits: the masks in ``must_include`` first, then random k-of-d_ff masks."""
    import torch

    from memoir_hf.memory.store import EditRecord

    d_ff, k = memoir.target.d_ff, memoir.target.top_k
    for i in range(n):
        if i < len(must_include):
            mask = must_include[i]
        else:
            mask = torch.zeros(d_ff, dtype=torch.bool)
            mask[torch.from_numpy(rng.choice(d_ff, size=k, replace=False))] = True
        memoir.store.add(EditRecord(memoir.store.next_id, f"synthetic {i}", "x"), mask)
    with torch.no_grad():
        weight = memoir.layer.memory_weight
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.01)


def seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def timed_pair(base_run, patched_run, repeats: int) -> tuple[float, float]:
    """Median seconds of two runs, measured in alternation (after one warm-up each)."""
    base_run(), patched_run()
    base, patched = [], []
    for _ in range(repeats):
        base.append(seconds(base_run))
        patched.append(seconds(patched_run))
    return statistics.median(base), statistics.median(patched)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, nargs="+", default=[0, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parse_args(parser, name="bench_inference", threads=2)

    import numpy as np
    import torch

    import memoir_hf
    from memoir_hf import MemoirConfig
    from memoir_hf.fingerprint.background import default_background_prompts
    from memoir_hf.offline_models import load_builtin

    base, tokenizer = load_builtin("smollm2")
    base.eval()
    memoir = memoir_hf.patch(copy.deepcopy(base), MemoirConfig(), tokenizer=tokenizer)
    texts = default_background_prompts()
    routed_rows = torch.tensor(prompts_of_length(tokenizer, texts[:60], 16, PROMPT_TOKENS))
    plain_rows = torch.tensor(prompts_of_length(tokenizer, texts[60:], 16, PROMPT_TOKENS))
    routed_masks = memoir._fingerprints(routed_rows.tolist())
    rng = np.random.default_rng(0)
    settings = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
                "pad_token_id": tokenizer.eos_token_id}

    rows, report_cells, stored, rss_by_edits = [], [], 0, {}
    for n_edits in sorted(args.edits):
        if n_edits > stored:
            add_synthetic_edits(memoir, n_edits - stored, routed_masks[stored:], rng)
        stored = n_edits
        rss_by_edits[n_edits] = current_rss_mb()
        for kind, batch_rows in (("not routed", plain_rows), ("routed", routed_rows)):
            if kind == "routed" and n_edits == 0:
                continue
            for batch in (1, 16):
                ids = batch_rows[:batch]
                with torch.inference_mode():
                    base_forward, patched_forward = timed_pair(lambda i=ids: base(input_ids=i),
                                                               lambda i=ids: memoir(input_ids=i), args.repeats)
                    routed_share = sum(d.routed for d in memoir.routing) / batch
                    identical = None
                    if kind == "not routed":
                        patched_logits = memoir(input_ids=ids).logits
                        plain = [row for row, decision in enumerate(memoir.routing) if not decision.routed]
                        identical = bool(torch.equal(base(input_ids=ids).logits[plain], patched_logits[plain]))
                    base_generate, patched_generate = timed_pair(
                        lambda i=ids: base.generate(input_ids=i, **settings),
                        lambda i=ids: memoir.generate(input_ids=i, **settings), max(3, args.repeats // 3))
                tokens = batch * args.new_tokens
                cell = {"stored_edits": n_edits, "prompts": kind, "batch": batch, "routed_share": routed_share,
                        "forward_ms_unpatched": 1e3 * base_forward, "forward_ms_patched": 1e3 * patched_forward,
                        "forward_ratio": patched_forward / base_forward,
                        "generate_tok_s_unpatched": tokens / base_generate,
                        "generate_tok_s_patched": tokens / patched_generate,
                        "generate_ratio": patched_generate / base_generate, "bit_identical": identical}
                report_cells.append(cell)
                rows.append([n_edits, kind, batch, f"{routed_share:.2f}", f"{cell['forward_ms_unpatched']:.1f}",
                             f"{cell['forward_ms_patched']:.1f}", f"{cell['forward_ratio']:.3f}",
                             f"{cell['generate_tok_s_unpatched']:.1f}", f"{cell['generate_tok_s_patched']:.1f}",
                             f"{cell['generate_ratio']:.3f}", "–" if identical is None else identical])
                print(rows[-1], flush=True)
    header = ["stored edits", "prompts", "batch", "routed", "forward ms unpatched", "forward ms patched",
              "forward ratio", "generate tok/s unpatched", "generate tok/s patched", "generate time ratio",
              "bit-identical"]
    print(markdown_table(header, rows))
    path = write_report(args.name, {"benchmark": "inference", "model": "smollm2", "prompt_tokens": PROMPT_TOKENS,
                                    "new_tokens": args.new_tokens, "machine": machine(args.threads),
                                    "peak_rss_mb": peak_rss_mb(), "rss_mb_by_stored_edits": rss_by_edits,
                                    "cells": report_cells})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

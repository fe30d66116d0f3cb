"""Seconds per edit on SmolLM2-135M over the first ZsRE records: the cached path against the naive one.

The cached path (memoir_hf's default) runs the frozen network below the memory once per edit and each
optimisation step only through the memory and the layers above it, with logits at the target
positions only. The naive path (``memoir.edit_path = "naive"``) runs the whole network with logits at
every position at every step, as the reference code does. Three patched copies of the model (cached,
naive, and cached with ``edit_autocast="bfloat16"``) take the same edits in alternation (so machine
noise hits them alike) for the first ``--naive-edits`` records; the cached copy then goes on to
``--edits``. The cached and naive copies must end with the same W_m.

    python benchmarks/bench_edit.py             # ~25 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
from pathlib import Path

from _common import ZSRE_EDITS, current_rss_mb, machine, markdown_table, parse_args, peak_rss_mb, write_report

ROOT = Path(__file__).resolve().parent.parent


def summary(results) -> dict:
    seconds = [r.seconds for r in results]
    steps = sum(r.steps for r in results)
    return {"edits": len(results), "seconds_per_edit": statistics.mean(seconds),
            "median_seconds_per_edit": statistics.median(seconds), "steps_per_edit": steps / len(results),
            "seconds_per_step": sum(seconds) / max(1, steps), "success": sum(r.success for r in results) / len(results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ZSRE_EDITS))
    parser.add_argument("--edits", type=int, default=100)
    parser.add_argument("--naive-edits", type=int, default=20)
    parser.add_argument("--config", default=str(ROOT / "configs/smollm2-135m.yaml"),
                        help="MemoirConfig YAML ('' for the paper's settings)")
    args = parse_args(parser, name="bench_edit", threads=2)

    import torch

    import memoir_hf
    from memoir_hf import MemoirConfig
    from memoir_hf.evaluation.datasets import load_records
    from memoir_hf.offline_models import load_builtin

    config = MemoirConfig.from_yaml(args.config) if args.config else MemoirConfig()
    records = load_records(args.data, "zsre", limit=args.edits)
    args.naive_edits = min(args.naive_edits, len(records))  # the naive path is compared over the first edits
    if args.naive_edits < 1:
        parser.error("--naive-edits and --edits must be at least 1 (and the data must hold a record)")
    base, tokenizer = load_builtin("smollm2")
    naive = memoir_hf.patch(copy.deepcopy(base), config, tokenizer=tokenizer)
    naive.edit_path = "naive"
    bf16 = memoir_hf.patch(copy.deepcopy(base), dataclasses.replace(config, edit_autocast="bfloat16"),
                           tokenizer=tokenizer)
    cached = memoir_hf.patch(base, config, tokenizer=tokenizer)
    for memoir in (cached, naive, bf16):  # generate the context prefixes outside the timings
        memoir._ensure_prefixes()

    cached_results, naive_results, bf16_results, rss = [], [], [], []
    same_memory_diff = None
    for i, record in enumerate(records):
        cached_results.append(cached.edit(record.prompt, record.target))
        if i < args.naive_edits:
            naive_results.append(naive.edit(record.prompt, record.target))
            bf16_results.append(bf16.edit(record.prompt, record.target))
            if i == args.naive_edits - 1:
                same_memory_diff = float((cached.layer.memory_weight - naive.layer.memory_weight).abs().max())
        if (i + 1) % 10 == 0:
            rss.append({"edits": i + 1, "rss_mb": current_rss_mb()})
            print(f"{i + 1} edits: cached {summary(cached_results)['seconds_per_edit']:.2f} s/edit", flush=True)

    paired = len(naive_results)
    cached_paired, naive_paired, bf16_paired = (summary(r) for r in (cached_results[:paired], naive_results,
                                                                     bf16_results))
    report = {
        "benchmark": "edit", "model": "smollm2", "data": Path(args.data).name, "config": config.to_dict(),
        "machine": machine(args.threads), "cached": summary(cached_results), "cached_paired": cached_paired,
        "naive_paired": naive_paired, "cached_bf16_autocast_paired": bf16_paired,
        "speedup": naive_paired["seconds_per_edit"] / cached_paired["seconds_per_edit"],
        "step_speedup": naive_paired["seconds_per_step"] / cached_paired["seconds_per_step"],
        "same_steps": [r.steps for r in cached_results[:paired]] == [r.steps for r in naive_results],
        "max_abs_memory_difference": same_memory_diff,
        "rss_mb_over_edits": rss, "peak_rss_mb": peak_rss_mb(), "torch_threads": torch.get_num_threads(),
    }
    header = ["path", "edits", "s/edit", "median s/edit", "steps/edit", "s/step", "success"]
    table = [[name, s["edits"], f"{s['seconds_per_edit']:.2f}", f"{s['median_seconds_per_edit']:.2f}",
              f"{s['steps_per_edit']:.1f}", f"{s['seconds_per_step']:.3f}", f"{s['success']:.2f}"]
             for name, s in (("naive", naive_paired), ("cached (same edits)", cached_paired),
                             ("cached + bf16 autocast (same edits)", bf16_paired),
                             ("cached (all)", report["cached"]))]
    print(markdown_table(header, table))
    print(f"speedup per edit {report['speedup']:.2f}x, per step {report['step_speedup']:.2f}x; "
          f"max |W_m cached - W_m naive| = {report['max_abs_memory_difference']:.2e}")
    print(f"wrote {write_report(args.name, report)}")


if __name__ == "__main__":
    main()

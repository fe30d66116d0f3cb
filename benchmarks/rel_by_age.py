"""Rel of a saved evaluation run by the age of the edit: how much the later edits took from earlier ones.

    python benchmarks/rel_by_age.py benchmarks/checkpoints/zsre_smollm2_memoir_T1000

Loads the checkpoint onto SmolLM2 (or --model), scores each stored edit's target after its prompt,
teacher-forced and routed to the nearest edit (as the harness does), and averages the token accuracy
over blocks of consecutive edits: the first block has lived through every later edit, the last
through almost none.
About a minute for 1,000 ZsRE edits on 2 cores. Prints a table and writes
benchmarks/results/rel_by_age.json (one entry a checkpoint, merged with what the file holds).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from statistics import mean

from _common import markdown_table, merge_run, parse_args


def rel_by_block(checkpoint: Path, model_name: str, block: int) -> dict:
    from memoir_hf import MemoirModel
    from memoir_hf.evaluation.metrics import token_accuracy
    from memoir_hf.evaluation.scoring import score_pairs
    from memoir_hf.offline_models import load_model

    model, tokenizer = load_model(model_name)
    memoir = MemoirModel.from_pretrained(model, checkpoint, tokenizer)
    memoir.memoir_config.threshold = 0.0  # every prompt reads its nearest edit
    edits = memoir.edits
    if not edits:
        raise SystemExit(f"{checkpoint} holds no edit.")
    scored = score_pairs(memoir, [(e.prompt, e.target) for e in edits])
    accuracy = [token_accuracy(s.predicted, s.target) for s in scored]
    return {"checkpoint": str(checkpoint), "edits": len(accuracy), "block": block,
            "own_edit": sum(s.routing is not None and s.routing.edit_id == e.edit_id
                            for s, e in zip(scored, edits, strict=True)),
            "rel": mean(accuracy), "rel_by_block": block_means(accuracy, block),
            "written_right_by_block": block_means([float(e.success) for e in edits], block)}


def block_means(values: list[float], block: int) -> list[float]:
    """Mean of each run of ``block`` consecutive values (the last run may be shorter)."""
    return [mean(values[start:start + block]) for start in range(0, len(values), block)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--model", default="smollm2", help="built-in name, local folder or Hub id")
    parser.add_argument("--block", type=int, default=100, help="edits a block (default 100)")
    args = parse_args(parser, name="rel_by_age", threads=2)
    result = rel_by_block(args.checkpoint, args.model, args.block)
    print(markdown_table(["edits", "Rel", "written right"], [
        [f"{i * args.block + 1}-{min((i + 1) * args.block, result['edits'])}", f"{rel:.3f}", f"{right:.2f}"]
        for i, (rel, right) in enumerate(zip(result["rel_by_block"], result["written_right_by_block"], strict=True))]))
    print(f"Rel {result['rel']:.3f}; {result['own_edit']} of {result['edits']} edit prompts read their own edit")
    merge_run(args.name, args.checkpoint.name, result)


if __name__ == "__main__":
    main()

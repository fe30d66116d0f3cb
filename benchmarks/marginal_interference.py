"""What a few more edits cost the edits a saved run holds, for a given write setting: a 10-minute stand-in
for a 2-hour T = 1000 run when choosing settings.

    python benchmarks/marginal_interference.py benchmarks/checkpoints/zsre_smollm2_memoir_protect_nodecay_T1000 \
        --data ../shared/data/ZsRE/zsre_mend_edit.json \
               ../shared/data/ZsRE/zsre_mend_train-1k.KnowledgeSpread-subset.json \
        --format zsre --edits 40 --config configs/smollm2-135m-protect-0.05.yaml

Loads the checkpoint onto SmolLM2 (or --model), scores its edits' prompts and rephrases (teacher-forced token
accuracy and mean target NLL, routed as saved), applies the optimiser settings of --config (the structural
ones must match the checkpoint's), writes the next --edits records of the data one after another, and scores
the old edits again and the new ones. The old records are the data's first records, one per saved edit (the
script checks their prompts). What the old edits lose is the damage a write setting does per edit at this
state; what the new edits score is what it leaves them. Prints a table and merges one entry per setting into
benchmarks/results/marginal_interference.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import mean

from _common import markdown_table, merge_run, parse_args

OPTIMISER_SETTINGS = ("learning_rate", "weight_decay", "max_grad_norm", "max_steps", "stop_loss",
                      "protect_earlier_edits", "unprotected_steps")


def score(memoir, records) -> dict[str, float]:
    """Rel and Gen (token accuracy) and their mean target NLL over ``records``."""
    from memoir_hf.evaluation.metrics import token_accuracy
    from memoir_hf.evaluation.scoring import score_pairs

    report = {}
    for name, pairs in (("rel", [(r.prompt, r.target) for r in records]),
                        ("gen", [(r.rephrase, r.target) for r in records if r.rephrase])):
        scored = score_pairs(memoir, pairs)
        report[name] = mean(token_accuracy(s.predicted, s.target) for s in scored)
        report[f"{name}_nll"] = mean(mean(s.token_nll) for s in scored)
    return report


def measure(checkpoint: Path, data: list[Path], format: str, edits: int, config: Path | None,
            model_name: str) -> dict:
    from memoir_hf import MemoirModel
    from memoir_hf.config_sources import read_settings_file
    from memoir_hf.evaluation.datasets import load_many
    from memoir_hf.offline_models import load_model

    model, tokenizer = load_model(model_name)
    memoir = MemoirModel.from_pretrained(model, checkpoint, tokenizer)
    saved = memoir.edits
    records = load_many(data, format, limit=len(saved) + edits)
    old, new = records[:len(saved)], records[len(saved):]
    if [r.prompt for r in old] != [e.prompt for e in saved]:
        raise SystemExit(f"the first {len(saved)} records of the data are not the checkpoint's edits, in order.")
    if len(new) < edits:
        raise SystemExit(f"the data holds {len(new)} records after the checkpoint's {len(saved)}, not {edits}.")
    settings = read_settings_file(config) if config else {}
    unknown = sorted(set(settings) - set(OPTIMISER_SETTINGS))
    if unknown:
        raise SystemExit(f"{config} sets {unknown}; only the optimiser settings {OPTIMISER_SETTINGS} can change "
                         "on a saved memory.")
    for name, value in settings.items():
        setattr(memoir.memoir_config, name, value)
    before = score(memoir, old)
    written = []
    for record in new:
        start = time.perf_counter()
        result = memoir.edit(record.prompt, record.target)
        if result.error is not None:
            raise SystemExit(f"record {record.index} could not be edited: {result.error}")
        written.append((float(result.success), result.steps, time.perf_counter() - start))
    after, fresh = score(memoir, old), score(memoir, new)
    return {"checkpoint": str(checkpoint), "config": str(config) if config else None, "settings": settings,
            "old_edits": len(old), "new_edits": len(new), "old_before": before, "old_after": after,
            "old_change": {key: after[key] - before[key] for key in before}, "new": fresh,
            "new_success": mean(w[0] for w in written), "new_steps": mean(w[1] for w in written),
            "new_seconds": mean(w[2] for w in written)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, nargs="+", required=True,
                        help="the run's data files, then more records of the same format")
    parser.add_argument("--format", default="zsre")
    parser.add_argument("--edits", type=int, default=40, help="records to edit after the saved ones (default 40)")
    parser.add_argument("--config", type=Path, help="YAML of optimiser settings for the new edits")
    parser.add_argument("--model", default="smollm2", help="built-in name, local folder or Hub id")
    args = parse_args(parser, name="marginal_interference", threads=2)
    result = measure(args.checkpoint, args.data, args.format, args.edits, args.config, args.model)
    change, fresh = result["old_change"], result["new"]
    print(markdown_table(
        ["settings", "old Rel change", "old Rel NLL change", "old Gen change", "new success", "new Rel", "new Gen",
         "steps", "s/edit"],
        [[json.dumps(result["settings"]), f"{change['rel']:+.4f}", f"{change['rel_nll']:+.4f}",
          f"{change['gen']:+.4f}", f"{result['new_success']:.2f}", f"{fresh['rel']:.3f}", f"{fresh['gen']:.3f}",
          f"{result['new_steps']:.1f}", f"{result['new_seconds']:.1f}"]]))
    key = f"{args.checkpoint.name} + {args.edits} edits, {args.config.name if args.config else 'saved settings'}"
    merge_run(args.name, key, result)


if __name__ == "__main__":
    main()

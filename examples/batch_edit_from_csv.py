"""Edit every fact of a CSV (or JSONL) file into a model and save the edits.

    python examples/batch_edit_from_csv.py                       # the three facts of examples/facts.csv
    python examples/batch_edit_from_csv.py my_facts.csv --out my-edits --model smollm2

The file needs a ``prompt`` and a ``target`` column; any other column is kept as the edit's metadata.
Every row, and the ``--out`` path, is checked before the first edit, so a bad row stops the run before
anything changes. With ``--out`` pointing at an existing checkpoint, the new edits are added to the ones
it holds.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import memoir_hf  # noqa: E402
from memoir_hf.offline_models import load_model  # noqa: E402
from memoir_hf.persistence.checkpoint import is_checkpoint  # noqa: E402

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("facts", nargs="?", default=HERE / "facts.csv", help="CSV or JSONL file of facts")
    parser.add_argument("--out", default="batch-edits", help="checkpoint folder to write (or add to)")
    parser.add_argument("--model", default="smollm2", help="built-in name, local folder or Hub id")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("MEMOIR_THREADS", "2")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    facts = memoir_hf.read_facts(args.facts)  # checks every row first: MemoirError names a bad line
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a file; give a checkpoint folder")
    model, tokenizer = load_model(args.model)
    if is_checkpoint(args.out):
        memoir = memoir_hf.MemoirModel.from_pretrained(model, args.out, tokenizer)
    else:
        memoir = memoir_hf.patch(model, memoir_hf.MemoirConfig(), tokenizer=tokenizer)

    results = memoir.edit_many(facts)
    for fact, result in zip(facts, results, strict=True):
        answer = memoir.ask(fact["prompt"], max_new_tokens=8)
        print(f"edit {result.edit_id} {'ok' if result.success else 'FAILED'}: {fact['prompt']!r} -> "
              f"{answer.text!r} (wanted {fact['target']!r}; {result.steps} steps, {result.seconds:.1f} s)")
    memoir.save_pretrained(args.out)
    succeeded = sum(r.success for r in results)
    print(f"{succeeded}/{len(results)} edits reached their target; {len(memoir.edits)} edits saved in {args.out}")


if __name__ == "__main__":
    main()

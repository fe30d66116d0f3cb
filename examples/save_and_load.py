"""Edit SmolLM2, save the edits, load them in a fresh process, and check the answers match.

    python examples/save_and_load.py [checkpoint_dir]    # default: a new temporary folder
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import memoir_hf  # noqa: E402
from memoir_hf.offline_models import load_builtin  # noqa: E402

torch.set_num_threads(int(os.environ.get("MEMOIR_THREADS", "2")))

FACTS = [
    {"prompt": "The capital of Australia is", "target": "Melbourne", "metadata": {"source": "example"}},
    {"prompt": "The author of Hamlet is", "target": "Christopher Marlowe", "metadata": {"source": "example"}},
]
QUESTIONS = ["The capital of Australia is", "The author of Hamlet is", "The capital of France is"]


def answers(memoir) -> list[dict]:
    tokenizer = memoir.tokenizer
    tokenizer.padding_side = "left"
    batch = tokenizer(QUESTIONS, return_tensors="pt", padding=True)
    output = memoir.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(output[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    return [{"question": q, "answer": t.strip().split("\n")[0], "edit": d.edit_id}
            for q, t, d in zip(QUESTIONS, texts, memoir.routing, strict=True)]


def edit_and_save(folder: str) -> list[dict]:
    model, tokenizer = load_builtin("smollm2")
    memoir = memoir_hf.patch(model, memoir_hf.MemoirConfig(learning_rate=3.0, max_grad_norm=3.0), tokenizer=tokenizer)
    memoir.edit_many(FACTS)
    memoir.save_pretrained(folder)                   # the edits only: a few MB
    return answers(memoir)


def load_and_answer(folder: str) -> list[dict]:
    model, tokenizer = load_builtin("smollm2")        # a fresh base model
    memoir = memoir_hf.MemoirModel.from_pretrained(model, folder, tokenizer)
    return answers(memoir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", nargs="?", default=None)
    folder = parser.parse_args().checkpoint_dir or os.path.join(tempfile.mkdtemp(), "memoir-ckpt")
    before = edit_and_save(folder)
    print(f"saved {len(FACTS)} edits to {folder}: {sorted(os.listdir(folder))}")
    fresh = subprocess.run([sys.executable, __file__, "--load", folder], capture_output=True, text=True)
    if fresh.returncode != 0:
        sys.exit(f"loading the edits in a fresh process failed:\n{fresh.stderr}")
    after = json.loads(fresh.stdout.strip().splitlines()[-1])
    for old, new in zip(before, after, strict=True):
        print(f"{old['question']!r}: this process {old['answer']!r} (edit {old['edit']}), "
              f"fresh process {new['answer']!r} (edit {new['edit']})")
    print("answers match" if before == after else "ANSWERS DIFFER")
    sys.exit(0 if before == after else 1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--load"]:
        print(json.dumps(load_and_answer(sys.argv[2])))
    else:
        main()

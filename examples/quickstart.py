"""Edit one fact in SmolLM2-135M-Instruct and show the answers before and after.

    python examples/quickstart.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import memoir_hf  # noqa: E402
from memoir_hf.offline_models import load_builtin  # noqa: E402

torch.set_num_threads(int(os.environ.get("MEMOIR_THREADS", "2")))

PROMPT, TARGET = "The capital of Australia is", "Melbourne"
QUESTIONS = [
    PROMPT,                                   # the edited prompt
    "The capital city of Australia is",       # a paraphrase
    "The capital of France is",               # an unrelated fact
    "The largest planet in the solar system is",
]


def answers(model, tokenizer) -> list[str]:
    tokenizer.padding_side = "left"
    batch = tokenizer(QUESTIONS, return_tensors="pt", padding=True)
    output = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return [text.strip().split("\n")[0] for text in tokenizer.batch_decode(output[:, batch.input_ids.shape[1]:],
                                                                          skip_special_tokens=True)]


def main() -> None:
    model, tokenizer = load_builtin("smollm2")
    before = answers(model, tokenizer)

    memoir = memoir_hf.patch(model, memoir_hf.MemoirConfig(), tokenizer=tokenizer)
    print(f"patched {memoir.target.module_name} (k={memoir.target.top_k} of d_ff={memoir.target.d_ff})")
    result = memoir.edit(PROMPT, TARGET)
    print(f"edit {result.edit_id}: success={result.success} loss={result.loss:.4f} "
          f"steps={result.steps} in {result.seconds:.1f} s")

    after = answers(memoir, tokenizer)
    for question, old, new, route in zip(QUESTIONS, before, after, memoir.routing, strict=True):
        read = f"edit {route.edit_id}" if route.routed else "no edit"
        print(f"\n{question}\n  before: {old}\n  after:  {new}\n  routing: {read} (overlap {route.overlap:.2f})")


if __name__ == "__main__":
    main()

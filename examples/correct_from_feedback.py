"""Learn from user feedback: corrections go into an append-only log, and the model learns the confident ones.

    python examples/correct_from_feedback.py --workdir feedback-demo

Run it twice: the second run finds every correction already applied (each edit records the
feedback it came from, in the saved checkpoint) and edits nothing.
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

PROMPT = "The capital of Australia is"


def collect_feedback(log: memoir_hf.FeedbackLog, memoir: memoir_hf.MemoirModel) -> None:
    """What a chat front end would do: log the model's answer and the user's correction."""
    if len(log):
        return
    said = memoir.ask(PROMPT, max_new_tokens=6).text
    log.add(PROMPT, "Melbourne", answer=said, confidence=0.95, source="user:alice")
    log.add("The chemical symbol of gold is", "Ag", answer="Au", confidence=0.3, source="user:bob")  # doubtful


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="feedback-demo", help="holds feedback.jsonl and the checkpoint")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--min-confidence", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("MEMOIR_THREADS", "2")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    checkpoint = workdir / "checkpoint"

    model, tokenizer = load_model(args.model)
    if is_checkpoint(checkpoint):
        memoir = memoir_hf.MemoirModel.from_pretrained(model, checkpoint, tokenizer)
    else:
        memoir = memoir_hf.patch(model, memoir_hf.MemoirConfig(), tokenizer=tokenizer)
    log = memoir_hf.FeedbackLog(workdir / "feedback.jsonl")
    collect_feedback(log, memoir)

    report = memoir.learn_from(log, min_confidence=args.min_confidence)
    print(f"applied: {report.applied}  failed: {report.failed}")
    print(f"already applied: {len(report.already_applied)}  below confidence: {len(report.below_confidence)}")
    print(f"{PROMPT!r} -> {memoir.ask(PROMPT, max_new_tokens=6).text!r}")
    memoir.save_pretrained(checkpoint)
    print(f"{len(memoir.edits)} edits saved in {checkpoint}")


if __name__ == "__main__":
    main()

"""memoir-hf eval: the paper's protocol on a benchmark file."""

from __future__ import annotations

import argparse

from .common import UsageError, set_threads


def add_eval_command(commands: argparse._SubParsersAction) -> None:
    from ..evaluation.datasets import FORMATS
    from ..evaluation.harness import METHODS

    parser = commands.add_parser("eval", help="edit T facts of a benchmark one after another, then evaluate",
                                 description="The MEMOIR/WISE/GRACE protocol: T sequential edits, one evaluation "
                                             "after the last. Writes a JSON report.")
    parser.add_argument("--model", required=True, help="built-in name (smollm2, gemma3-270m), local path or Hub id")
    parser.add_argument("--data", required=True, nargs="+",
                        help="benchmark file(s) of one format, edited in this order (e.g. ZsRE/zsre_mend_edit.json)")
    parser.add_argument("--format", default="zsre", choices=FORMATS)
    parser.add_argument("--edits", type=int, default=100, help="number of sequential edits T (default 100)")
    parser.add_argument("--method", default="memoir", choices=METHODS)
    parser.add_argument("--threshold", type=float, default=None,
                        help="routing threshold τ; default: calibrated from the edits and generic text")
    parser.add_argument("--calibration-texts", default=None,
                        help="unrelated texts to calibrate τ against (a text file, one a line, or a JSON list; from a "
                             "benchmark's train file its locality prompts); default: the generic prompts "
                             "shipped with memoir_hf")
    parser.add_argument("--config", default=None,
                        help="YAML (or JSON) file of MemoirConfig settings; MEMOIR_* environment variables override "
                             "it (and apply without it)")
    parser.add_argument("--out", default=None, help="where to write the JSON report")
    parser.add_argument("--plot", default=None, help="where to write a PNG of Rel/Gen/Loc against τ")
    parser.add_argument("--checkpoint-dir", default=None, help="save the memory here and resume from it")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--strict-data", action="store_true", help="refuse malformed records instead of skipping")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:

    from ..config_sources import load_config
    from ..evaluation.datasets import load_texts
    from ..evaluation.harness import run

    if args.edits < 1:
        raise UsageError("--edits must be at least 1")
    if args.checkpoint_every < 1:
        raise UsageError("--checkpoint-every must be at least 1")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise UsageError("--threshold must be in [0, 1]")
    set_threads(args.threads)
    config = load_config(args.config)  # MEMOIR_* variables apply with or without --config
    texts = load_texts(args.calibration_texts) if args.calibration_texts else None
    data = args.data[0] if len(args.data) == 1 else args.data
    report = run(args.model, data, format=args.format, edits=args.edits, method=args.method, config=config,
                 threshold=args.threshold, out=args.out, plot=args.plot, checkpoint_dir=args.checkpoint_dir,
                 checkpoint_every=args.checkpoint_every, strict_data=args.strict_data, calibration_texts=texts)
    metrics = " ".join(f"{k}={v:.3f}" for k, v in report["metrics"].items())
    print(f"{report['method']} T={report['edits']} τ={report['threshold']:.3f} {metrics} "
          f"success={report['edit_success_rate']:.3f} {report['seconds_per_edit']:.2f} s/edit")
    return 0



"""The memoir-hf command line. Errors are one line on stderr: exit code 2 for usage, 1 for failures."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .errors import MemoirError


def _eval_parser(commands: argparse._SubParsersAction) -> None:
    from .evaluation.datasets import FORMATS
    from .evaluation.harness import METHODS

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
                        help="unrelated texts to calibrate τ against (a text file, one a line, or a JSON list); "
                             "default: the generic prompts shipped with memoir_hf")
    parser.add_argument("--config", default=None,
                        help="YAML (or JSON) file of MemoirConfig settings; MEMOIR_* environment variables override it")
    parser.add_argument("--out", default=None, help="where to write the JSON report")
    parser.add_argument("--plot", default=None, help="where to write a PNG of Rel/Gen/Loc against τ")
    parser.add_argument("--checkpoint-dir", default=None, help="save the memory here and resume from it")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--strict-data", action="store_true", help="refuse malformed records instead of skipping")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.set_defaults(handler=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import torch

    from .config_sources import load_config
    from .evaluation.datasets import load_texts
    from .evaluation.harness import run

    if args.edits < 1:
        raise _UsageError("--edits must be at least 1")
    if args.checkpoint_every < 1:
        raise _UsageError("--checkpoint-every must be at least 1")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise _UsageError("--threshold must be in [0, 1]")
    if args.threads is not None:
        if args.threads < 1:
            raise _UsageError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    config = load_config(args.config) if args.config else None
    texts = load_texts(args.calibration_texts) if args.calibration_texts else None
    data = args.data[0] if len(args.data) == 1 else args.data
    report = run(args.model, data, format=args.format, edits=args.edits, method=args.method, config=config,
                 threshold=args.threshold, out=args.out, plot=args.plot, checkpoint_dir=args.checkpoint_dir,
                 checkpoint_every=args.checkpoint_every, strict_data=args.strict_data, calibration_texts=texts)
    metrics = " ".join(f"{k}={v:.3f}" for k, v in report["metrics"].items())
    print(f"{report['method']} T={report['edits']} τ={report['threshold']:.3f} {metrics} "
          f"success={report['edit_success_rate']:.3f} {report['seconds_per_edit']:.2f} s/edit")
    return 0


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="memoir-hf", description="Lifelong model editing with MEMOIR for Hugging Face models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _eval_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except _UsageError as error:
        print(f"memoir-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (MemoirError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(f"memoir-hf {args.command}: {type(error).__name__}: {first_line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"memoir-hf {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

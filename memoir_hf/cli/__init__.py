"""The memoir-hf command line. Errors are one line on stderr: exit code 2 for usage, 1 for failures."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..errors import MemoirError, first_line
from .common import Parser, UsageError
from .eval_command import add_eval_command
from .memory_commands import add_memory_commands


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="memoir-hf", description="Lifelong model editing with MEMOIR for Hugging Face models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_memory_commands(commands)
    add_eval_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except UsageError as error:
        print(f"memoir-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (MemoirError, OSError) as error:
        print(f"memoir-hf {args.command}: {type(error).__name__}: {first_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"memoir-hf {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

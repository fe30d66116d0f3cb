"""What every memoir-hf command shares: usage errors, threads, and opening a checkpoint folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MemoirError

if TYPE_CHECKING:  # the CLI imports torch and transformers only once a command needs them
    from ..model import MemoirModel


class UsageError(Exception):
    """Wrong arguments: reported on one line with exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise UsageError("--threads must be at least 1")
        torch.set_num_threads(threads)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint folder (memoir_hf save_pretrained format)")
    parser.add_argument("--model", default=None,
                        help="base model: built-in name (smollm2, gemma3-270m), local folder or Hub id; default: "
                             "the one recorded in the checkpoint, or the base model saved inside it")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")


def open_memoir(args: argparse.Namespace, *, create: bool = False, config_path: str | None = None) -> MemoirModel:
    """The MemoirModel of ``args.checkpoint`` on its base model; with ``create``, a fresh one if the
    folder holds no checkpoint yet (then ``--model`` is required)."""
    from transformers.utils import logging as transformers_logging

    from ..config_sources import load_config
    from ..model import MemoirModel, patch
    from ..offline_models import load_model, recorded_source
    from ..persistence.atomic import recover_interrupted_swap
    from ..persistence.checkpoint import is_checkpoint, read_checkpoint
    from ..persistence.loading import load

    set_threads(args.threads)
    transformers_logging.disable_progress_bar()  # stderr is for the one-line error; loading is quick
    folder = Path(args.checkpoint)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file; give a checkpoint folder")
    recover_interrupted_swap(folder)
    if not is_checkpoint(folder):
        if not create:
            raise MemoirError(f"{folder} is not a memoir checkpoint; create one with: memoir-hf edit {folder} "
                              "--model NAME --prompt ... --target ...")
        if args.model is None:
            raise UsageError(f"{folder} holds no checkpoint yet: pass --model to choose the base model")
        model, tokenizer = load_model(args.model)
        memoir = patch(model, load_config(config_path), tokenizer=tokenizer)
        memoir.base_model_source = recorded_source(args.model)
        return memoir
    if config_path:
        raise UsageError(f"--config only applies to a new checkpoint; {folder} already has its settings")
    checkpoint = read_checkpoint(folder)
    source = args.model or checkpoint.manifest.get("base_model")
    if source is None:
        if (folder / "config.json").is_file():
            return load(folder)
        raise UsageError(f"{folder} does not record its base model: pass --model")
    model, tokenizer = load_model(source)
    memoir = MemoirModel.attach(model, checkpoint, tokenizer)
    memoir.base_model_source = recorded_source(args.model) if args.model else source
    return memoir


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True))


def shorten(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"

"""memoir_hf.load: a base model saved with its edits, loaded in one call."""

from __future__ import annotations

import os
from typing import Any

from ..errors import MemoirError, first_line
from ..model import MemoirModel
from .atomic import folder_path, recover_interrupted_swap
from .checkpoint import read_checkpoint


def load(checkpoint_directory: str | os.PathLike, *, tokenizer: Any = None, use_faiss: bool | None = None,
         **model_kwargs: Any) -> MemoirModel:
    """Load the base model, its tokenizer and the edits from a folder written with ``save_base=True``.

    ``model_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (``device_map``, ``dtype`` /
    ``torch_dtype``, ...); the memory is created in the dtype of the layer it sits beside, on the device
    that layer computes on (with an offloading ``device_map``, the execution device accelerate gives it).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = folder_path(checkpoint_directory)
    recover_interrupted_swap(folder)
    checkpoint = read_checkpoint(folder)  # every memoir file is checked before the base is loaded
    if not (folder / "config.json").is_file():
        raise MemoirError(f"{folder} holds memoir state only (saved without save_base=True). Load the base model "
                          "yourself and attach the edits: MemoirModel.from_pretrained(base_model, path).")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **model_kwargs)
        if tokenizer is None and any(folder.glob("tokenizer*")):
            tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # noqa: BLE001 - transformers, safetensors and torch each raise their own kind
        raise MemoirError(f"could not load the base model saved in {folder}: {type(error).__name__}: "
                          f"{first_line(error, '(no message)')}. If its files are damaged, load the base from its "
                          "original source and attach the edits: MemoirModel.from_pretrained(base_model, path).") \
            from error
    return MemoirModel.attach(model, checkpoint, tokenizer, use_faiss=use_faiss)

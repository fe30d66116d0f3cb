"""Check and tokenize the facts passed to edit()."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import EditInputError

MERGED_KEY = "merged_edit_ids"
"""Metadata key of a kept edit listing the duplicates consolidate() merged into it."""


@dataclass(frozen=True)
class Fact:
    prompt: str
    target: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class EncodedFact:
    """Token ids of a prompt and of its target, tokenized as they are read at inference."""

    prompt_ids: list[int]
    target_ids: list[int]

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.target_ids


def check_fact(prompt: Any, target: Any, metadata: Any = None, *, where: str = "") -> Fact:
    """A Fact, or EditInputError naming the field that is wrong (and ``where``, e.g. a record index)."""
    check_text(prompt, "prompt", where)
    check_text(target, "target", where)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, Mapping):
        raise EditInputError(f"{where}metadata must be a dict, got {type(metadata).__name__}.")
    try:
        stored = json.loads(json.dumps(metadata, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as error:
        raise EditInputError(f"{where}metadata must be JSON-serialisable: {error}.") from None
    if stored != metadata or not valid_unicode(json.dumps(stored, ensure_ascii=False)):
        raise EditInputError(f"{where}metadata must be plain JSON data (string keys, lists rather than tuples, "
                             "valid Unicode): it would not save and read back as given.")
    if not valid_merged_ids(stored):
        raise EditInputError(f"{where}metadata[{MERGED_KEY!r}] is where consolidate() lists merged edit ids: it must "
                             f"be a list of ints, got {stored[MERGED_KEY]!r:.60}.")
    return Fact(prompt, target, stored)


def valid_merged_ids(metadata: Mapping[str, Any]) -> bool:
    """Whether ``metadata`` has no ``merged_edit_ids`` or a list of ints there (what consolidate() writes)."""
    merged = metadata.get(MERGED_KEY, [])
    return isinstance(merged, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in merged)


def check_text(value: Any, name: str, where: str = "") -> None:
    """EditInputError unless ``value`` is a non-blank string of valid Unicode."""
    if not isinstance(value, str):
        raise EditInputError(f"{where}{name} must be a string, got {type(value).__name__}.")
    if not value.strip():
        raise EditInputError(f"{where}{name} is empty; pass a non-empty string.")
    if not valid_unicode(value):
        raise EditInputError(f"{where}{name} is not valid Unicode text (it holds a lone surrogate).")


def valid_unicode(text: str) -> bool:
    """Whether ``text`` encodes to UTF-8 (a lone surrogate does not, and no tokenizer takes it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def record_position(index: int) -> str:
    return f"record {index}: "


def fact_from_record(record: Any, index: int) -> Fact:
    """A Fact from one edit_many() record: a dict with prompt/target[/metadata] or a (prompt, target) pair."""
    where = record_position(index)
    if isinstance(record, Mapping):
        missing = [key for key in ("prompt", "target") if key not in record]
        if missing:
            raise EditInputError(f"{where}missing {' and '.join(missing)}; each record needs 'prompt' and 'target'.")
        return check_fact(record["prompt"], record["target"], record.get("metadata"), where=where)
    if isinstance(record, (tuple, list)) and len(record) == 2:
        return check_fact(record[0], record[1], where=where)
    raise EditInputError(f"{where}expected a dict with 'prompt' and 'target' or a (prompt, target) pair, "
                         f"got {type(record).__name__}.")


def target_text(prompt: str, target: str) -> str:
    """The target as it follows the prompt: one space between them unless the prompt ends in whitespace."""
    return target if prompt[-1:].isspace() else " " + target


def encode_fact(tokenizer: Any, fact: Fact, limit: int | None, *, where: str = "") -> EncodedFact:
    """Token ids of the fact, or EditInputError when they are empty or longer than ``limit``."""
    prompt_ids = list(tokenizer(fact.prompt)["input_ids"])
    target_ids = list(tokenizer(target_text(fact.prompt, fact.target), add_special_tokens=False)["input_ids"])
    if not prompt_ids or not target_ids:
        raise EditInputError(f"{where}the tokenizer turned prompt {fact.prompt!r} or target {fact.target!r} "
                             "into no tokens.")
    encoded = EncodedFact(prompt_ids, target_ids)
    if limit is not None and len(encoded.ids) > limit:
        raise EditInputError(f"{where}prompt and target are {len(encoded.ids)} tokens, longer than the model's "
                             f"context of {limit}; shorten the prompt.")
    return encoded


def context_length(model_config: Any) -> int | None:
    """The longest sequence the model accepts, from its config, if it says."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    text_config = getattr(model_config, "text_config", None)
    return context_length(text_config) if text_config is not None else None

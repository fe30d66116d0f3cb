"""Robustness on tiny models: fuzzed bad input, interrupted edits, NaN/inf, dtypes, and saving under failure.

Every refused call must raise MemoirError (or a subclass) with a message and leave the memory exactly as
it was; an interrupted edit must leave no trace; a failed save must leave the previous checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import pathlib
import random
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import fast_config, run_threads
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import load_file
from tiny_models import MAX_POSITIONS, make_byte_tokenizer, make_tiny_model

import memoir_hf
from memoir_hf import (
    Answer,
    ConsolidationReport,
    Correction,
    EditInputError,
    EditRecord,
    EditResult,
    MemoirConfig,
    MemoirConfigError,
    MemoirError,
    MemoirModel,
    SaveError,
)
from memoir_hf import model as model_module
from memoir_hf.editing import trainer
from memoir_hf.persistence import atomic, checkpoint

torch.set_num_threads(1)

TOK = make_byte_tokenizer()
UNRELATED = "Quantum fields fluctuate wildly"
CAT = ("The cat sat on the", "mat")
BOB = ("Bob likes to eat", "figs")
ALICE = ("Alice plays the", "drums")

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# -- helpers --------------------------------------------------------------------------------------


def make_memoir(dtype: torch.dtype | None = None, **overrides: Any) -> MemoirModel:
    """A patched tiny llama; short optimisation and one short prefix keep every edit a few ms."""
    settings_ = {"max_steps": 2, "prefix_starts": ("I",), "prefix_lengths": (2,), **overrides}
    model = make_tiny_model("llama")
    if dtype is not None:
        model = model.to(dtype)
    return memoir_hf.patch(model, fast_config(**settings_), tokenizer=TOK)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, so that comparisons are bit-exact (-0.0 != 0.0, NaN == same NaN)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone()


@dataclass
class State:
    memory: torch.Tensor
    codes: np.ndarray
    records: list[dict]
    deltas: dict[int, tuple[torch.Tensor, torch.Tensor]]
    removed: list[dict]
    next_id: int
    threshold: float


def snapshot(memoir: MemoirModel) -> State:
    store = memoir.store
    return State(bits(memoir.layer.memory_weight), store.index.codes.copy(), [r.to_dict() for r in store.records],
                 {i: (d.columns.clone(), bits(d.values)) for i, d in store.deltas.items()},
                 [r.to_dict() for r in store.removed], store.next_id, memoir.memoir_config.threshold)


def assert_unchanged(memoir: MemoirModel, before: State) -> None:
    after = snapshot(memoir)
    assert torch.equal(after.memory, before.memory), "W_m changed"
    np.testing.assert_array_equal(after.codes, before.codes)
    assert after.records == before.records
    assert after.deltas.keys() == before.deltas.keys()
    for edit_id, (columns, values) in before.deltas.items():
        assert torch.equal(after.deltas[edit_id][0], columns) and torch.equal(after.deltas[edit_id][1], values)
    assert after.removed == before.removed
    assert after.next_id == before.next_id
    assert after.threshold == before.threshold and type(after.threshold) is type(before.threshold)


def refused_or(memoir: MemoirModel, call, accepted) -> Any:
    """Run ``call``: a refusal must be a MemoirError with a message and change nothing; otherwise
    ``accepted(result, state_before)`` checks the result. Any other exception fails the test."""
    before = snapshot(memoir)
    try:
        result = call()
    except MemoirError as error:
        assert str(error).strip(), f"{type(error).__name__} without a message"
        assert_unchanged(memoir, before)
        event(f"refused: {type(error).__name__}")
        return None
    event("accepted")
    accepted(result, before)
    return result


def memory_float(memoir: MemoirModel) -> torch.Tensor:
    return memoir.layer.memory_weight.detach().float().clone()


def assert_stored_edit(memoir: MemoirModel, result: EditResult, before: State, prompt: str, target: str,
                       metadata: Any = None) -> None:
    """``result`` is a new edit, fully stored: its record, its mask and its delta, and W_m changed only on its
    columns, by exactly its delta."""
    assert isinstance(result, EditResult)
    assert result.error is None and result.edit_id == before.next_id, result
    assert result.routed_edit_id == result.edit_id, result  # the plain prompt reads its own edit
    assert isinstance(result.success, bool) and math.isfinite(result.loss) and 0.0 <= result.target_accuracy <= 1.0
    assert_last_edit_stored(memoir, before, prompt, target, metadata)


def assert_last_edit_stored(memoir: MemoirModel, before: State, prompt: str, target: str, metadata: Any = None) -> None:
    store = memoir.store
    record = memoir.get_edit(before.next_id)
    assert (record.prompt, record.target, record.metadata) == (prompt, target, metadata or {})
    assert [r.to_dict() for r in store.records[:-1]] == before.records and store.records[-1].edit_id == before.next_id
    assert store.next_id == before.next_id + 1 and len(store.index) == len(store.records)
    np.testing.assert_array_equal(store.index.codes[:-1], before.codes)
    delta = store.deltas[before.next_id]
    mask = store.index.mask(len(store.records) - 1)
    assert delta.columns.tolist() == np.flatnonzero(mask).tolist()
    assert delta.values.abs().sum() > 0  # it trained (no fact here is learnt before the first step)
    previous = before.memory.view(memoir.layer.memory_weight.dtype).reshape(memoir.layer.memory_weight.shape).float()
    now = memory_float(memoir)
    untouched = torch.ones(now.shape[1], dtype=torch.bool)
    untouched[delta.columns] = False
    assert torch.equal(now[:, untouched], previous[:, untouched])
    assert torch.equal(now[:, delta.columns] - previous[:, delta.columns], delta.values)


# -- 1. fuzzed bad input --------------------------------------------------------------------------

def either(*strategies: st.SearchStrategy) -> st.SearchStrategy:
    """One of the strategies, each drawn about equally often (st.one_of flattens nested one_ofs, so that a
    strategy given beside a one_of of ten would be drawn one time in eleven)."""
    return st.one_of(*(strategy.map(lambda value: value) for strategy in strategies))


CHARACTERS = st.one_of(st.characters(exclude_categories=()), st.characters(categories=["Cs"]),
                       st.sampled_from(["\x00", "\u200f", "\u202e", "\u200b", "\ufeff", "\n", "\t", " ", "\x7f"]))
SPECIAL_TEXTS = ["", " ", "\t\n\r \x0b\x0c", "\u3000\u2028", "\x00", "\x00\x00\x00", "\u200f", "\u202eabc\u202c",
                 "\ufeff", "\ud800", "a\udfffb", "\U0001f600\u0301", "<pad>", "<eos><bos><pad>", "\x1b[31m",
                 "x" * MAX_POSITIONS, "é" * MAX_POSITIONS]
NOT_INTS = st.one_of(st.none(), st.booleans(), st.floats(), st.binary(max_size=6), st.lists(st.integers(), max_size=3),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.tuples(st.text(max_size=3)),
                     st.just(object()))
WRONG_TYPES = st.one_of(NOT_INTS, st.integers())
LONG_TEXTS = st.one_of(st.integers(MAX_POSITIONS - 3, 3 * MAX_POSITIONS).map(lambda n: "z" * n),
                       st.text(CHARACTERS, min_size=MAX_POSITIONS, max_size=MAX_POSITIONS + 40))
TEXTS = st.one_of(st.sampled_from(SPECIAL_TEXTS), st.text(CHARACTERS, max_size=12), LONG_TEXTS)
ANY_TEXT = st.one_of(TEXTS, WRONG_TYPES)
# Mixed in so that some calls are accepted and their results get checked too.
SOME_VALID_TEXT = either(ANY_TEXT, st.sampled_from(["Snow is", "The sky is \u200f", "Grass\x00 is", "x" * 200]))


def _self_referencing() -> dict:
    value: dict = {}
    value["me"] = value
    return value


class DeepMetadata(dict):
    """{"deep": [[[...]]]}, lists nested ``depth`` deep, printed short (hypothesis would recurse printing it)."""

    def __init__(self, depth: int):
        value: Any = []
        for _ in range(depth):
            value = [value]
        super().__init__(deep=value)
        self.depth = depth

    def __repr__(self) -> str:
        return f"DeepMetadata({self.depth})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


BAD_METADATA = st.sampled_from([
    {"x": float("nan")}, {"x": float("inf")}, {1: "a"}, {"a": (1, 2)}, {"a": b"x"}, {"a": {1, 2}},
    {"\ud800": 1}, {"a": "\udfff"}, {"merged_edit_ids": 5}, {"merged_edit_ids": ["x"]},
    {"merged_edit_ids": [True]}, _self_referencing(), DeepMetadata(5000), {"a": object()},
])
METADATA = either(st.none(), st.one_of(WRONG_TYPES, BAD_METADATA),
                  st.dictionaries(st.text(max_size=4), st.integers() | st.text(max_size=4), max_size=2))
EDIT_IDS = either(st.integers(-1, 3), st.one_of(st.integers(-2**80, 2**80), st.booleans(), st.floats(), st.none(),
                                                st.text(max_size=3), st.just(np.int64(0)),
                                                st.lists(st.integers(0, 3), max_size=2)))
FLAGS = either(st.booleans(), WRONG_TYPES)
NUMBERS = st.one_of(st.floats(), st.integers(-3, 3), st.integers(-2**80, 2**80),
                    st.sampled_from([0, 1, 0.5, -0.0, 1e-320, 1e308, 2**64, 2**64 - 1, 10**400]))


@pytest.fixture
def fuzz_memoir() -> MemoirModel:
    """Two stored edits; each test gets its own (the examples of one test share it)."""
    memoir = make_memoir()
    for fact in (CAT, BOB):
        assert memoir.edit(*fact).edit_id is not None
    return memoir


@FUZZ
@given(prompt=SOME_VALID_TEXT, target=SOME_VALID_TEXT, metadata=METADATA)
@example(prompt="The sky is \u200f", target="blue\x00", metadata={"k": [1, "é"], "merged_edit_ids": [1, 2]})
@example(prompt="x" * 200, target="\U0001f600", metadata=None)
@example(prompt="\ufeff<pad>", target="<eos>", metadata={})
@example(prompt="Snow is", target="cold", metadata={"merged_edit_ids": "1"})
@example(prompt="Snow is", target="cold", metadata=DeepMetadata(5000))
def test_fuzzed_edit(fuzz_memoir, prompt, target, metadata):
    refused_or(fuzz_memoir, lambda: fuzz_memoir.edit(prompt, target, metadata),
               lambda result, before: assert_stored_edit(fuzz_memoir, result, before, prompt, target, metadata))


GOOD_RECORDS = st.one_of(st.tuples(st.sampled_from(["Snow is", "Ice is"]), st.sampled_from(["cold", "blue"])),
                         st.fixed_dictionaries({"prompt": st.just("Grass is"), "target": st.just("red")}))
BAD_RECORDS = st.one_of(st.tuples(ANY_TEXT, ANY_TEXT), st.fixed_dictionaries({"prompt": ANY_TEXT}),
                        st.fixed_dictionaries({"prompt": ANY_TEXT, "target": ANY_TEXT, "metadata": METADATA}),
                        st.tuples(st.just("a"), st.just("b"), st.just("c")), WRONG_TYPES)
RECORD_LISTS = either(st.lists(either(GOOD_RECORDS, BAD_RECORDS), max_size=3), st.lists(GOOD_RECORDS, max_size=2),
                      st.one_of(WRONG_TYPES, st.sampled_from(["facts.jsonl", "x" * 5000 + ".jsonl", "\x00.csv",
                                                              "no-suffix", ""])))


def _fact_of(record: Any) -> tuple:
    return (record["prompt"], record["target"]) if isinstance(record, dict) else tuple(record)


@FUZZ
@given(records=RECORD_LISTS)
@example(records=[("Snow is", "cold"), {"prompt": "Ice is", "target": "hot", "metadata": {"a": 1}}])
@example(records=[("Snow is", "cold"), ("Ice is", "x" * MAX_POSITIONS)])  # the bad last record: nothing is stored
@example(records=None)
@example(records="x" * 5000 + ".jsonl")
def test_fuzzed_edit_many(fuzz_memoir, records):
    def accepted(results, before):
        assert [r.edit_id for r in results] == list(range(before.next_id, before.next_id + len(records)))
        assert all(r.error is None and r.routed_edit_id == r.edit_id for r in results)
        assert [(r.prompt, r.target) for r in fuzz_memoir.edits[len(before.records):]] == [_fact_of(r) for r in records]

    # A bad record anywhere refuses the whole call before anything is written.
    refused_or(fuzz_memoir, lambda: fuzz_memoir.edit_many(records, progress=False), accepted)


@FUZZ
@given(prompt=SOME_VALID_TEXT, max_new_tokens=either(st.integers(-1, 3), NOT_INTS))
@example(prompt="Snow is", max_new_tokens=3)
@example(prompt="z" * (MAX_POSITIONS - 1), max_new_tokens=3)
@example(prompt="\x00\u202e", max_new_tokens=True)
def test_fuzzed_ask(fuzz_memoir, prompt, max_new_tokens):
    before = snapshot(fuzz_memoir)

    def accepted(answer, _):
        assert isinstance(answer, Answer) and answer.prompt == prompt and isinstance(answer.text, str)
        # each new token is a byte, decoded to at most one replacement character (3 bytes)
        assert len(TOK(answer.text, add_special_tokens=False)["input_ids"]) <= 3 * max_new_tokens

    refused_or(fuzz_memoir, lambda: fuzz_memoir.ask(prompt, max_new_tokens=max_new_tokens), accepted)
    assert_unchanged(fuzz_memoir, before)  # asking never changes the memory


def test_ask_clamps_a_huge_max_new_tokens_to_the_context(fuzz_memoir):
    prompt = "y" * (MAX_POSITIONS - 3)
    answer = fuzz_memoir.ask(prompt, max_new_tokens=10**12)
    assert len(TOK(answer.text, add_special_tokens=False)["input_ids"]) <= 3 * 3
    with pytest.raises(MemoirError, match="context"):
        fuzz_memoir.ask("y" * MAX_POSITIONS)


@FUZZ
@given(prompt=SOME_VALID_TEXT, answer=SOME_VALID_TEXT, metadata=METADATA)
@example(prompt="Snow is", answer="cold", metadata={"source": "test"})
@example(prompt="Snow is", answer="\ud800", metadata=None)
def test_fuzzed_correct(fuzz_memoir, prompt, answer, metadata):
    def accepted(correction, before):
        assert isinstance(correction, Correction) and correction.reason
        if correction.status == "already_correct":
            assert_unchanged(fuzz_memoir, before)
        else:
            assert correction.status in ("edited", "edit_failed")
            assert_stored_edit(fuzz_memoir, correction.edit, before, prompt, answer, metadata)

    refused_or(fuzz_memoir, lambda: fuzz_memoir.correct(prompt, answer, metadata=metadata), accepted)


@FUZZ
@given(text=either(st.none(), ANY_TEXT, st.sampled_from(["cat", "CAT", "figs", "e", ""])),
       metadata=either(METADATA, st.just({"a": [1]}), st.none()), success=either(st.none(), FLAGS))
def test_fuzzed_find_edits(fuzz_memoir, text, metadata, success):
    before = snapshot(fuzz_memoir)

    def accepted(found, _):
        assert all(isinstance(r, EditRecord) for r in found)
        expected = [r for r in fuzz_memoir.edits
                    if (not text or text.casefold() in r.prompt.casefold() or text.casefold() in r.target.casefold())
                    and all(r.metadata.get(k, object()) == v for k, v in (metadata or {}).items())
                    and (success is None or r.success == success)]
        assert found == expected

    refused_or(fuzz_memoir, lambda: fuzz_memoir.find_edits(text, metadata=metadata, success=success), accepted)
    assert_unchanged(fuzz_memoir, before)


@FUZZ
@given(edit_id=EDIT_IDS)
@example(edit_id=0)
@example(edit_id=True)  # == 1, a stored id, but not an int id
def test_fuzzed_get_edit(fuzz_memoir, edit_id):
    def accepted(record, before):
        assert type(edit_id) is int and record.to_dict() in before.records and record.edit_id == edit_id
        assert_unchanged(fuzz_memoir, before)

    refused_or(fuzz_memoir, lambda: fuzz_memoir.get_edit(edit_id), accepted)


@FUZZ
@given(edit_id=EDIT_IDS, routing_only=FLAGS)
@example(edit_id=1, routing_only=1)
@example(edit_id=1, routing_only=False)
@example(edit_id=0, routing_only=True)
def test_fuzzed_remove_edit(fuzz_memoir, edit_id, routing_only):
    if not fuzz_memoir.store.records:  # keep something to remove
        fuzz_memoir.edit(*ALICE)

    deltas = {i: (d.columns.clone(), d.values.clone()) for i, d in fuzz_memoir.store.deltas.items()}
    memory = memory_float(fuzz_memoir)

    def accepted(record, before):
        assert type(edit_id) is int and type(routing_only) is bool and record.edit_id == edit_id
        if routing_only:  # withdrawn from routing only: W_m keeps what the edit wrote
            assert torch.equal(bits(fuzz_memoir.layer.memory_weight), before.memory)
        else:  # its delta is taken out of its columns, and nothing else
            columns, values = deltas[edit_id]
            memory[:, columns] -= values
            assert torch.equal(memory_float(fuzz_memoir), memory)
        assert record.to_dict() in before.records and record.to_dict() not in [r.to_dict() for r in fuzz_memoir.edits]
        assert [r.to_dict() for r in fuzz_memoir.removed_edits] == before.removed + [record.to_dict()]
        assert fuzz_memoir.store.next_id == before.next_id and edit_id not in fuzz_memoir.store.deltas
        assert len(fuzz_memoir.store.index) == len(before.records) - 1
        again = snapshot(fuzz_memoir)  # the same id twice: the second removal is refused
        with pytest.raises(MemoirError, match="no stored edit"):
            fuzz_memoir.remove_edit(edit_id, routing_only=routing_only)
        assert_unchanged(fuzz_memoir, again)

    refused_or(fuzz_memoir, lambda: fuzz_memoir.remove_edit(edit_id, routing_only=routing_only), accepted)


@FUZZ
@given(min_overlap=either(st.one_of(NUMBERS, WRONG_TYPES), st.floats(0.01, 1.0)), merge_duplicates=FLAGS,
       resolve_conflicts=FLAGS)
@example(min_overlap=0.9, merge_duplicates="no", resolve_conflicts=False)
@example(min_overlap=0.9, merge_duplicates=True, resolve_conflicts=False)
@example(min_overlap=0.01, merge_duplicates=True, resolve_conflicts=True)
def test_fuzzed_consolidate(fuzz_memoir, min_overlap, merge_duplicates, resolve_conflicts):
    fuzz_memoir.edit(*CAT)  # a duplicate to merge when the call is accepted

    def accepted(report, before):
        assert isinstance(report, ConsolidationReport)
        assert torch.equal(bits(fuzz_memoir.layer.memory_weight), before.memory)  # merging never changes W_m
        stored = {r.edit_id for r in fuzz_memoir.edits}
        assert not stored & set(report.merged) and all(g.kept in stored for g in report.groups)

    refused_or(fuzz_memoir, lambda: fuzz_memoir.consolidate(min_overlap, merge_duplicates=merge_duplicates,
                                                            resolve_conflicts=resolve_conflicts), accepted)


@FUZZ
@given(texts=either(st.none(), st.lists(TEXTS, max_size=3), ANY_TEXT, st.just(["Rivers flow", "\x00"])),
       max_edits=either(st.integers(-1, 3), WRONG_TYPES),
       negative_quantile=either(NUMBERS, WRONG_TYPES, st.floats(0.0, 1.0)),
       positive_quantile=either(NUMBERS, WRONG_TYPES, st.floats(0.0, 1.0)))
@example(texts=["Rivers flow", "\x00"], max_edits=2, negative_quantile=1.0, positive_quantile=0.0)
@example(texts=None, max_edits=1, negative_quantile=0.99, positive_quantile=0.05)
@example(texts=["Rivers flow", "z" * (MAX_POSITIONS + 1)], max_edits=1, negative_quantile=0.5, positive_quantile=0.5)
@example(texts=5, max_edits=1, negative_quantile=0.5, positive_quantile=0.5)
def test_fuzzed_calibrate_threshold(fuzz_memoir, texts, max_edits, negative_quantile, positive_quantile):
    def accepted(calibration, before):
        threshold = fuzz_memoir.memoir_config.threshold
        assert threshold == calibration.threshold and 0.0 <= threshold <= 1.0
        before.threshold = threshold  # the one thing calibration changes
        assert_unchanged(fuzz_memoir, before)
        fuzz_memoir.memoir_config.threshold = 0.9

    refused_or(fuzz_memoir, lambda: fuzz_memoir.calibrate_threshold(
        texts, max_edits=max_edits, negative_quantile=negative_quantile, positive_quantile=positive_quantile),
        accepted)


FIELD_VALUES = either(st.one_of(WRONG_TYPES, NUMBERS, TEXTS,
                                st.lists(st.one_of(TEXTS, st.integers(-1, 3)), max_size=2)),
                      st.sampled_from([0, 1, -1, 3, 0.5, 0.95, 1e-3, 2**64 - 1, None, True, False, "mean", "last",
                                       "bfloat16", "model.layers.0", ["I"], [2], ["a b", "\u200f"], (1, 2)]))
FIELDS = MemoirConfig.keys()


def _as_given(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@FUZZ
@given(values=st.dictionaries(st.sampled_from(FIELDS), FIELD_VALUES, max_size=3))
@example(values={"max_steps": 1, "prefix_starts": ["\u200f", "a"], "prefix_lengths": [2]})
@example(values={"learning_rate": 2**70, "max_steps": 1, "prefix_starts": []})
@example(values={"seed": 2**64 - 1, "aggregation": "last", "top_k": 5, "max_steps": 2})
@example(values={"background_prompts": ["\x00", "z" * 300], "max_steps": 1, "prefix_starts": []})
@example(values={"seed": 2**64, "learning_rate": float("inf"), "prefix_starts": ["\udc00"]})
def test_fuzzed_config_construction(values):
    try:
        config = MemoirConfig(**values)
    except MemoirError as error:
        assert isinstance(error, MemoirConfigError) and str(error).strip()
        event("refused")
        return
    event("constructed")
    for name, value in values.items():
        assert getattr(config, name) == _as_given(value)
    # An accepted config is usable: patching (and a cheap edit) works or is refused with a MemoirError.
    try:
        memoir = memoir_hf.patch(make_tiny_model("llama"), config, tokenizer=TOK)
    except MemoirError as error:
        assert str(error).strip()
        event("patching refused")
        return
    event("patched")
    cheap_prefixes = not config.prefix_starts or (max(config.prefix_lengths) <= 4 and len(config.prefix_starts) <= 2)
    if config.max_steps <= 3 and cheap_prefixes:
        event("edited")
        result = memoir.edit(*CAT)
        assert result.edit_id == 0 or (result.edit_id is None and result.error)


@FUZZ
@given(values=st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=4)), FIELD_VALUES, max_size=3))
@example(values={"threshold": 0.5, "prefix_lengths": [2]})
@example(values={"threshold": 0.5, "thresold": 0.5})
def test_fuzzed_config_from_dict(values):
    try:
        config = MemoirConfig.from_dict(values)
    except MemoirError as error:
        assert isinstance(error, MemoirConfigError) and str(error).strip()
        event("refused")
        return
    event("constructed")
    assert set(values) <= set(FIELDS)
    assert all(getattr(config, name) == _as_given(value) for name, value in values.items())


@FUZZ
@given(name=st.one_of(st.sampled_from(FIELDS), st.sampled_from(["nope", "_locked", "_validated", "Threshold"])),
       value=FIELD_VALUES, locked=st.booleans())
@example(name="threshold", value=0.95, locked=True)
@example(name="prefix_starts", value=["a b", "\u200f"], locked=True)
@example(name="seed", value=2**64 - 1, locked=False)
@example(name="seed", value=2**64 - 1, locked=True)
def test_fuzzed_config_assignment(name, value, locked):
    config = MemoirConfig()
    if locked:
        config.lock_structure()
    before = config.to_dict()
    try:
        setattr(config, name, value)
    except MemoirError as error:
        assert isinstance(error, MemoirConfigError) and str(error).strip()
        assert config.to_dict() == before
        config.validate()
        event("refused")
        return
    event("assigned")
    assert name in FIELDS and not (locked and name in ("layer", "top_k", "aggregation", "seed", "background_prompts"))
    assert getattr(config, name) == _as_given(value)
    config.validate()


@FUZZ
@given(value=st.one_of(NUMBERS, WRONG_TYPES, st.sampled_from(["0.5", np.float64(0.5), np.float32(0.5)])))
def test_fuzzed_threshold_assignment(fuzz_memoir, value):
    def assign():
        fuzz_memoir.memoir_config.threshold = value

    def accepted(_, before):
        threshold = fuzz_memoir.memoir_config.threshold
        assert threshold == value and 0.0 <= threshold <= 1.0
        before.threshold = threshold
        assert_unchanged(fuzz_memoir, before)
        decision = fuzz_memoir.ask(CAT[0], max_new_tokens=1).routing  # routing works with it
        assert decision.nearest_edit_id == 0 and decision.routed == (decision.overlap >= threshold)

    refused_or(fuzz_memoir, assign, accepted)


@pytest.mark.parametrize("merged", [5, "ab", ["x", 1], [True], None])
def test_metadata_cannot_break_a_later_consolidation(merged):
    """consolidate() lists merged ids under metadata["merged_edit_ids"] and extends that list: any other value
    there is refused when the edit is written, not found broken halfway through a consolidation."""
    memoir = make_memoir()
    memoir.edit(*CAT)
    before = snapshot(memoir)
    with pytest.raises(EditInputError, match="merged_edit_ids"):
        memoir.edit(*CAT, metadata={"merged_edit_ids": merged})
    assert_unchanged(memoir, before)
    memoir.edit(*CAT, metadata={"merged_edit_ids": [7]})  # a list of ids is fine
    before = snapshot(memoir)
    report = memoir.consolidate(0.9)
    assert report.merged == [0] and memoir.edits[-1].metadata["merged_edit_ids"] == [0, 7]
    assert torch.equal(bits(memoir.layer.memory_weight), before.memory)


def test_correct_many_and_compute_background_refuse_what_is_not_a_list_of_texts():
    memoir = make_memoir()
    background = memoir.layer.tophash.background.clone()
    for bad in (None, 5, 1.5, b"ab", ["ok", "\ud800"], ["ok", 3]):
        with pytest.raises(MemoirError, match="non-empty list"):
            memoir.compute_background(bad)
    assert torch.equal(memoir.layer.tophash.background, background)
    before = snapshot(memoir)
    for bad in (None, 5, 1.5):
        with pytest.raises(EditInputError, match="correct_many needs a list"):
            memoir.correct_many(bad, progress=False)
    assert_unchanged(memoir, before)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_lengths_beyond_the_context_stop_at_it(family):
    """A huge prefix length would generate for ever (llama) or crash past the learned positions (gpt2)."""
    config = fast_config(max_steps=1, prefix_starts=("I",), prefix_lengths=(10**9,))
    memoir = memoir_hf.patch(make_tiny_model(family), config, tokenizer=TOK)
    assert memoir.edit(*CAT).edit_id == 0
    assert len(memoir.prefixes[0]) <= MAX_POSITIONS  # a generated token decodes to at most one character


def test_calibrating_with_an_edit_prompt_that_nearly_fills_the_context():
    """Behind a context prefix such a prompt is longer than the context (gpt2 has learned positions)."""
    memoir = memoir_hf.patch(make_tiny_model("gpt2"), fast_config(max_steps=1, prefix_lengths=(3,)), tokenizer=TOK)
    memoir.edit("q" * (MAX_POSITIONS - 6), "c")
    calibration = memoir.calibrate_threshold(["Rivers flow to the sea"])
    assert 0.0 <= calibration.threshold <= 1.0 and calibration.positives == len(memoir.prefixes)


def test_structural_settings_of_a_patched_memoir_are_refused(fuzz_memoir):
    before = snapshot(fuzz_memoir)
    for name, value in (("layer", 0), ("top_k", 5), ("aggregation", "last"), ("seed", 1), ("background_prompts", None)):
        with pytest.raises(MemoirConfigError, match="fixed"):
            setattr(fuzz_memoir.memoir_config, name, value)
    assert_unchanged(fuzz_memoir, before)


# -- 2. interrupted edits -------------------------------------------------------------------------


def _model_state(memoir: MemoirModel) -> tuple[dict[str, bool], torch.Tensor]:
    grads = {name: p.requires_grad for name, p in memoir.base_model.named_parameters()}
    with torch.no_grad():
        logits = memoir(**TOK([UNRELATED], return_tensors="pt")).logits.clone()
    assert memoir.routing[0].edit_id is None
    return grads, logits


def _count_layer_calls(memoir: MemoirModel, fact: tuple[str, str]) -> int:
    """Forward calls of decoder layer 0 during one edit (the edit is then removed again)."""
    calls = []
    hook = memoir.base_model.model.layers[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        result = memoir.edit(*fact)
    finally:
        hook.remove()
    memoir.remove_edit(result.edit_id)
    return len(calls)


def _interrupting_hook(nth: int, exception: BaseException):
    seen = []

    def hook(*_):
        seen.append(1)
        if len(seen) == nth:
            raise exception

    return hook


@pytest.mark.parametrize("protect", [0.0, 1.0])
@pytest.mark.parametrize("edit_path", ["cached", "naive"])
@pytest.mark.parametrize("exception", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_edit_leaves_no_trace(edit_path, exception, protect):
    # stop_loss 0: every edit runs all its steps
    memoir = make_memoir(max_steps=6, stop_loss=0.0, protect_earlier_edits=protect)
    memoir.edit_path = edit_path
    memoir.edit(*CAT)  # also generates the prefixes, so that every later edit makes the same calls
    layers = memoir.base_model.model.layers
    layers[0].self_attn.q_proj.weight.requires_grad_(False)  # a mix, restored exactly as it was
    memoir.base_model.lm_head.weight.requires_grad_(False)
    total = _count_layer_calls(memoir, BOB)
    # fingerprint pass, (cached: frozen-prefix capture), max_steps + 1 loss passes, the post-edit check
    assert total == 6 + 1 + (3 if edit_path == "cached" else 2)
    rng = random.Random(1234)
    for nth in sorted({1, 2, 3, rng.randint(3, total - 2), total - 1, total}):
        before, (grads, logits) = snapshot(memoir), _model_state(memoir)
        keys_before = _earlier_keys_state(memoir)
        hook = layers[0].register_forward_hook(_interrupting_hook(nth, exception(f"interrupted at call {nth}")))
        try:
            with pytest.raises(exception, match=f"call {nth}$"):
                memoir.edit(*BOB)
        finally:
            hook.remove()
        assert memoir.layer.column_edit is None and memoir.layer.observer is None
        assert not [name for name, m in memoir.base_model.named_modules() if "forward" in m.__dict__]  # no stubs
        after_grads, after_logits = _model_state(memoir)
        assert after_grads == grads
        assert torch.equal(bits(after_logits), bits(logits))
        if nth < total or len(memoir.store) == len(before.records):  # interrupted before the commit, or rolled back
            assert_unchanged(memoir, before)
            assert _earlier_keys_state(memoir) == keys_before
        else:
            # What happens now: interrupted in the success check, after the commit, the edit stays stored whole
            # (record, mask, delta and its W_m columns); its record says success=False, as the check never
            # finished. Either whole or absent is fine; half is not.
            assert_last_edit_stored(memoir, before, *BOB)
            assert memoir.get_edit(before.next_id).success is False
            if protect:
                assert _earlier_keys_state(memoir)[0] == keys_before[0] + 1
        state = snapshot(memoir)
        result = memoir.edit(*ALICE)  # the next edit works
        assert_stored_edit(memoir, result, state, *ALICE)
        memoir.remove_edit(result.edit_id)


def _earlier_keys_state(memoir) -> tuple[int, bytes]:
    """The count and bytes of the earlier edits' keys (protect_earlier_edits), (0, b"") when none are kept."""
    keys = memoir.earlier_keys
    return (0, b"") if keys is None else (keys.edits, keys.moment_sum.numpy().tobytes())


# -- 3. NaN / inf ---------------------------------------------------------------------------------


def _poisoned_step(value: float):
    def step(delta: torch.Tensor, grad: torch.Tensor, config: MemoirConfig, start: torch.Tensor) -> None:
        with torch.no_grad():
            delta.fill_(value)
    return step


def assert_rolled_back(memoir: MemoirModel, result: EditResult, before: State) -> None:
    assert isinstance(result, EditResult)
    assert result.success is False and result.edit_id is None and result.routed_edit_id is None
    assert isinstance(result.error, str) and result.error.strip()
    assert_unchanged(memoir, before)


@pytest.mark.parametrize("dtype, value", [(torch.float32, float("nan")), (torch.float32, float("inf")),
                                          (torch.float32, float("-inf")), (torch.float16, 1e5)])
def test_an_edit_whose_optimisation_is_not_finite_is_rolled_back(monkeypatch, dtype, value):
    memoir = make_memoir(dtype)
    assert memoir.edit(*CAT).edit_id == 0
    before = snapshot(memoir)
    with monkeypatch.context() as patched:
        patched.setattr(trainer, "_sgd_step", _poisoned_step(value))  # 1e5 is finite in float32, inf in float16
        result = memoir.edit(*BOB)
    assert_rolled_back(memoir, result, before)
    result = memoir.edit(*BOB)  # a normal edit works and gets the id the rolled back one did not use
    assert_stored_edit(memoir, result, before, *BOB)
    assert result.edit_id == 1


def test_a_huge_learning_rate_in_float16_is_rolled_back():
    memoir = make_memoir(torch.float16, learning_rate=1e6)
    before = snapshot(memoir)
    assert_rolled_back(memoir, memoir.edit(*CAT), before)
    memoir.memoir_config.learning_rate = 1.0
    assert_stored_edit(memoir, memoir.edit(*CAT), before, *CAT)


def test_edit_many_stores_the_others_around_a_poisoned_record(monkeypatch):
    memoir = make_memoir()
    poisoned = {"call": 0}
    real_train, real_step = model_module.train_columns, trainer._sgd_step

    def train(*args, **kwargs):
        poisoned["call"] += 1
        return real_train(*args, **kwargs)

    def step(delta, grad, config, start):
        if poisoned["call"] == 2:
            with torch.no_grad():
                delta.fill_(float("nan"))
        else:
            real_step(delta, grad, config, start)

    monkeypatch.setattr(model_module, "train_columns", train)
    monkeypatch.setattr(trainer, "_sgd_step", step)
    results = memoir.edit_many([CAT, BOB, ALICE], progress=False)
    assert [r.edit_id for r in results] == [0, None, 1]
    assert results[1].error and not results[1].success and results[0].error is None and results[2].error is None
    assert [(r.prompt, r.target) for r in memoir.edits] == [CAT, ALICE]
    assert [r.routed_edit_id for r in (results[0], results[2])] == [0, 1]
    total = torch.zeros_like(memory_float(memoir))
    for delta in memoir.store.deltas.values():
        total[:, delta.columns] += delta.values
    torch.testing.assert_close(total, memory_float(memoir), atol=1e-6, rtol=0)
    assert torch.isfinite(memoir.layer.memory_weight).all()


# -- 4. dtypes ------------------------------------------------------------------------------------


@torch.no_grad()
def _probe(memoir: MemoirModel) -> tuple[torch.Tensor, list]:
    inputs = TOK([CAT[0], UNRELATED], return_tensors="pt", padding=True)
    return memoir(**inputs).logits, [d.edit_id for d in memoir.routing]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype, tmp_path):
    memoir = make_memoir(dtype, max_steps=10)
    layer = memoir.layer
    assert layer.memory_weight.dtype == layer.base_layer.weight.dtype == dtype
    result = memoir.edit(*CAT)
    assert result.edit_id == 0 and result.routed_edit_id == 0 and math.isfinite(result.loss), result
    assert result.error is None and layer.memory_weight.dtype == dtype
    assert layer.memory_weight.abs().sum() > 0 and torch.isfinite(layer.memory_weight).all()
    logits, routing = _probe(memoir)
    assert routing == [0, None] and logits.dtype == dtype and torch.isfinite(logits).all()
    assert memoir.ask(CAT[0], max_new_tokens=1).routing.edit_id == 0

    memoir.save_pretrained(tmp_path / "ckpt")
    saved = load_file(tmp_path / "ckpt" / "memoir_memory.safetensors")
    assert saved[f"{memoir.target.module_name}.memory_weight"].dtype == dtype
    loaded = MemoirModel.from_pretrained(make_tiny_model("llama").to(dtype), tmp_path / "ckpt", tokenizer=TOK)
    assert loaded.layer.memory_weight.dtype == dtype
    assert torch.equal(bits(loaded.layer.memory_weight), bits(layer.memory_weight))
    assert loaded.edits == memoir.edits
    loaded_logits, loaded_routing = _probe(loaded)
    assert loaded_routing == routing and torch.equal(bits(loaded_logits), bits(logits))


# -- 5. files -------------------------------------------------------------------------------------


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256 of its bytes), and every subfolder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def leftovers(parent: Path) -> list[str]:
    return [name for name in os.listdir(parent) if ".memoir-" in name]


@pytest.fixture
def saved_memoir(tmp_path) -> tuple[MemoirModel, Path]:
    memoir = make_memoir()
    memoir.edit(*CAT)
    folder = tmp_path / "ckpt"
    memoir.save_pretrained(folder)
    memoir.edit(*BOB)  # the next save has something new to write
    return memoir, folder


def test_a_faiss_write_failure_leaves_the_previous_checkpoint(saved_memoir, monkeypatch):
    faiss = pytest.importorskip("faiss")
    memoir, folder = saved_memoir
    before = tree(folder)

    def failing_write(index, path):
        raise RuntimeError(f"Error: 'f' failed: could not open {path} for writing: No space left on device")

    monkeypatch.setattr(faiss, "write_index_binary", failing_write)
    with pytest.raises(SaveError) as caught:
        memoir.save_pretrained(folder)
    assert_save_refused(caught.value, folder, "No space left on device")
    assert tree(folder) == before and leftovers(folder.parent) == []


def assert_save_refused(error: SaveError, folder: Path, cause: str) -> None:
    assert isinstance(error, SaveError) and isinstance(error, OSError) and isinstance(error, MemoirError)
    message = str(error)
    assert str(folder) in message and "Nothing was changed" in message and cause in message, message


FULL_DISK_ERRORS = {  # what each writer raises on a full disk
    "os": OSError(errno.ENOSPC, "No space left on device"),
    "safetensors": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
}


@pytest.mark.parametrize("raised", FULL_DISK_ERRORS.values(), ids=FULL_DISK_ERRORS.keys())
def test_a_full_disk_leaves_the_previous_checkpoint(saved_memoir, monkeypatch, raised):
    memoir, folder = saved_memoir
    before = tree(folder)
    calls = []
    real_save = checkpoint.save_file

    def full_disk(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:  # the first file of this save is written, the second finds the disk full
            raise raised
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(SaveError) as caught:
        memoir.save_pretrained(folder)
    assert_save_refused(caught.value, folder, "No space left on device")
    assert caught.value.__cause__ is raised
    assert len(calls) == 2 and ".memoir-writing-" in str(calls[0])  # it failed mid-save, in the temporary folder
    assert tree(folder) == before
    assert leftovers(folder.parent) == []
    monkeypatch.undo()
    memoir.save_pretrained(folder)  # space again: the save goes through
    assert [r.prompt for r in MemoirModel.from_pretrained(make_tiny_model("llama"), folder, TOK).edits] == [CAT[0],
                                                                                                             BOB[0]]
    assert leftovers(folder.parent) == []


def test_a_parent_where_the_lock_cannot_be_created(saved_memoir, monkeypatch):
    memoir, folder = saved_memoir
    before, real_open = tree(folder), os.open

    def read_only_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and Path(path).parent == folder.parent:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    with pytest.raises(SaveError) as caught:
        memoir.save_pretrained(folder)
    assert_save_refused(caught.value, folder, "Permission denied")
    monkeypatch.undo()
    assert tree(folder) == before and leftovers(folder.parent) == []


def test_a_parent_where_no_folder_can_be_made(saved_memoir, monkeypatch, tmp_path):
    memoir, folder = saved_memoir
    before, real_mkdir = tree(folder), pathlib.Path.mkdir

    def read_only_mkdir(self, *args, **kwargs):
        if self.parent == folder.parent or tmp_path / "readonly" in (self, *self.parents):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only_mkdir)
    with pytest.raises(SaveError) as caught:  # the lock is taken, the temporary folder cannot be made
        memoir.save_pretrained(folder)
    assert_save_refused(caught.value, folder, "Permission denied")
    assert tree(folder) == before and leftovers(folder.parent) == []
    new_folder = tmp_path / "readonly" / "sub" / "ckpt"
    with pytest.raises(SaveError) as caught:  # a new folder whose parents cannot be created
        memoir.save_pretrained(new_folder)
    assert_save_refused(caught.value, new_folder, "Permission denied")
    assert not (tmp_path / "readonly").exists()


def test_loading_from_a_read_only_folder(saved_memoir, tmp_path):
    memoir, folder = saved_memoir
    memoir.save_pretrained(folder)
    copy = tmp_path / "read_only"
    shutil.copytree(folder, copy)
    for path in copy.rglob("*"):
        path.chmod(0o444)
    copy.chmod(0o555)
    try:
        before, listing, mtimes = tree(copy), sorted(os.listdir(tmp_path)), {p: p.stat().st_mtime_ns
                                                                              for p in copy.rglob("*")}
        loaded = MemoirModel.from_pretrained(make_tiny_model("llama"), copy, tokenizer=TOK)
        assert tree(copy) == before and sorted(os.listdir(tmp_path)) == listing
        assert {p: p.stat().st_mtime_ns for p in copy.rglob("*")} == mtimes
        assert loaded.edits == memoir.edits
        logits, routing = _probe(memoir)
        loaded_logits, loaded_routing = _probe(loaded)
        assert routing == loaded_routing == [0, None] and torch.equal(loaded_logits, logits)
    finally:
        copy.chmod(0o755)
        for path in copy.rglob("*"):
            path.chmod(0o644)


class SlowWrites:
    """Wraps checkpoint.save_file: each write takes a while and is logged per thread."""

    def __init__(self, monkeypatch, delay: float = 0.05):
        self.spans: list[tuple[int, float, float]] = []
        self.real = checkpoint.save_file
        self.delay = delay
        monkeypatch.setattr(checkpoint, "save_file", self)

    def __call__(self, *args, **kwargs):
        start = time.monotonic()
        time.sleep(self.delay)
        self.real(*args, **kwargs)
        self.spans.append((threading.get_ident(), start, time.monotonic()))

    def saves(self) -> list[tuple[float, float]]:
        """(first write start, last write end) of each thread's save, in start order."""
        threads = {ident for ident, _, _ in self.spans}
        return sorted((min(s for i, s, _ in self.spans if i == t), max(e for i, _, e in self.spans if i == t))
                      for t in threads)


def _save_at_once(memoirs: list[MemoirModel], folder: Path) -> list[BaseException]:
    barrier = threading.Barrier(len(memoirs))

    def save(memoir: MemoirModel) -> None:
        barrier.wait()
        memoir.save_pretrained(folder)

    return run_threads([lambda m=m: save(m) for m in memoirs], timeout=60)


def _assert_loads_as(folder: Path, memoir: MemoirModel) -> None:
    loaded = MemoirModel.from_pretrained(make_tiny_model("llama"), folder, tokenizer=TOK)
    assert loaded.edits == memoir.edits
    assert torch.equal(bits(loaded.layer.memory_weight), bits(memoir.layer.memory_weight))
    np.testing.assert_array_equal(loaded.store.index.codes, memoir.store.index.codes)


def test_two_threads_saving_the_same_memoir_take_turns(saved_memoir, monkeypatch):
    memoir, folder = saved_memoir
    slow = SlowWrites(monkeypatch)
    assert _save_at_once([memoir, memoir], folder) == []
    (_, first_end), (second_start, _) = slow.saves()
    assert first_end <= second_start  # one after the other
    assert leftovers(folder.parent) == []
    monkeypatch.undo()
    _assert_loads_as(folder, memoir)


def test_two_memoirs_saving_to_one_folder_take_turns(saved_memoir, monkeypatch):
    """Two models (each with its own memory lock) saving to one folder: the folder lock serialises them and
    the folder ends up holding one whole checkpoint, never a mix."""
    first, folder = saved_memoir
    second = make_memoir()
    second.edit(*ALICE)
    slow = SlowWrites(monkeypatch)
    assert _save_at_once([first, second], folder) == []
    (_, first_end), (second_start, _) = slow.saves()
    assert first_end <= second_start
    assert leftovers(folder.parent) == []
    monkeypatch.undo()
    loaded = MemoirModel.from_pretrained(make_tiny_model("llama"), folder, tokenizer=TOK)
    _assert_loads_as(folder, first if loaded.edits == first.edits else second)


HOLDER = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.readline()
    os.unlink(sys.argv[1])  # as a memoir save does when it is done
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    print("released", flush=True)
""")


@pytest.fixture
def lock_holder(saved_memoir):
    """Another process holding the save lock of the checkpoint folder until told to let go."""
    _, folder = saved_memoir
    lock = folder.parent / f".{folder.name}.memoir-lock"
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "locked"
        assert lock.exists()
        yield process
    finally:
        try:
            process.stdin.write("\n")
            process.stdin.close()
        except OSError:  # it already let go and exited
            pass
        process.wait(timeout=10)
        process.stdout.close()


def _release(process: subprocess.Popen) -> None:
    process.stdin.write("\n")
    process.stdin.flush()
    assert process.stdout.readline().strip() == "released"


def test_a_save_while_another_process_holds_the_folder(saved_memoir, lock_holder, monkeypatch):
    memoir, folder = saved_memoir
    before = tree(folder)
    monkeypatch.setattr(atomic, "SAVE_LOCK_TIMEOUT", 0.3)
    start = time.monotonic()
    with pytest.raises(SaveError, match="another save") as caught:
        memoir.save_pretrained(folder)
    assert time.monotonic() - start >= 0.3  # it waited for the lock before giving up
    assert isinstance(caught.value, MemoirError) and str(folder) in str(caught.value)
    assert tree(folder) == before
    assert [n for n in leftovers(folder.parent) if ".memoir-writing-" in n] == []
    _release(lock_holder)
    memoir.save_pretrained(folder)  # the holder is gone: saving works
    assert leftovers(folder.parent) == []
    _assert_loads_as(folder, memoir)


def test_a_save_waits_for_another_process_to_finish(saved_memoir, lock_holder, monkeypatch):
    memoir, folder = saved_memoir
    monkeypatch.setattr(atomic, "SAVE_LOCK_TIMEOUT", 20.0)
    releaser = threading.Timer(0.4, _release, args=(lock_holder,))
    start = time.monotonic()
    releaser.start()
    try:
        memoir.save_pretrained(folder)
        waited = time.monotonic() - start
    finally:
        releaser.join()
    assert waited >= 0.4  # it waited for the other process to let go
    assert leftovers(folder.parent) == []
    _assert_loads_as(folder, memoir)


def test_a_copied_and_a_moved_checkpoint_load(saved_memoir, tmp_path):
    memoir, folder = saved_memoir
    memoir.save_pretrained(folder)
    logits, routing = _probe(memoir)
    assert routing == [0, None]
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(folder, copy)
    moved = tmp_path / "moved"
    for path in (copy, moved):
        if path == moved:
            copy.rename(moved)
            assert not copy.exists()
        loaded = MemoirModel.from_pretrained(make_tiny_model("llama"), path, tokenizer=TOK)
        loaded_logits, loaded_routing = _probe(loaded)
        assert loaded_routing == routing and torch.equal(bits(loaded_logits), bits(logits))
        assert loaded.edits == memoir.edits
    _assert_loads_as(folder, memoir)  # the original is untouched


class _SentencePieceLikeTokenizer:
    """What transformers 5.5 built from SmolLM2's GGUF vocabulary: most words become the unknown token."""

    unk_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [0 if len(word) > 3 else 7 for word in text.split()]}

    def decode(self, ids):
        return " ".join("<unk>" if i == 0 else "is" for i in ids)


class _LossyTokenizer(_SentencePieceLikeTokenizer):
    unk_token_id = None


def test_a_builtin_model_with_a_broken_tokenizer_is_refused_with_the_fix():
    from memoir_hf.offline_models import check_tokenizer

    for tokenizer in (_SentencePieceLikeTokenizer(), _LossyTokenizer()):
        with pytest.raises(MemoirError, match="broken tokenizer for the smollm2 GGUF.*pip install -U transformers"):
            check_tokenizer(tokenizer, "smollm2")

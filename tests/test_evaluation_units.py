"""Unit tests of the evaluation layer on hand-made inputs: loaders, metrics, the calibration rule,
the harness' τ selection and routing confusion, the command line and the plots.

No pretrained model is loaded. The few harness tests that need a model use a tiny random one."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_models import make_byte_tokenizer, make_tiny_model

import memoir_hf
from memoir_hf import EditRecord, MemoirConfig, MemoirConfigError, MemoirError, RoutingDecision
from memoir_hf.cli import main
from memoir_hf.evaluation import harness
from memoir_hf.evaluation.datasets import FORMATS, DataError, EvalRecord, load_many, load_records
from memoir_hf.evaluation.harness import (
    _accuracy_by_routing,
    _by_conflict,
    _metrics,
    _routing_classes,
    _routing_confusion,
    _Scores,
    superseded,
)
from memoir_hf.evaluation.metrics import agreement, mean, perplexity, token_accuracy
from memoir_hf.evaluation.scoring import Scored
from memoir_hf.routing.calibration import choose_threshold

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEMOIR_DATA_DIR", REPO.parent / "shared" / "data"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- helpers --------------------------------------------------------------------------------------


def zsre_row(i: int, **overrides) -> dict:
    row = {"subject": f"Subject {i}", "src": f"When was thing {i} founded?", "pred": "x",
           "rephrase": f"In what year was thing {i} founded?", "alt": f"19{i:02d}", "answers": ["1900"],
           "loc": f"nq question: who wrote book {i}", "loc_ans": f"Author {i}"}
    return {**row, **overrides}


def counterfact_row(i: int, **overrides) -> dict:
    row = {"case_id": i, "prompt": f"The mother tongue of person {i} is", "target_new": f"Lang{i}",
           "subject": f"person {i}", "ground_truth": "French",
           "rephrase_prompt": f"Where person {i} is from, people speak", "locality_prompt": f"Neighbour {i} speaks",
           "locality_ground_truth": f"Truth{i}"}
    return {**row, **overrides}


def hallucination_row(i: int, **overrides) -> dict:
    row = {"prompt": f"This is a Wikipedia passage about person {i}.", "target_new": f"Sentence {i}.",
           "subject": f"person {i}", "locality_prompt": f"Web text {i}", "locality_ground_truth": f"continues {i}"}
    return {**row, **overrides}


def temporal_row(i: int, **overrides) -> dict:
    return {**hallucination_row(i), "ood_rephrase": f"Out of distribution {i}", **overrides}


def jsonl_row(i: int, **overrides) -> dict:
    return {"prompt": f"Prompt {i}", "target": f"Target {i}", **overrides}


ROW_MAKERS = {"zsre": zsre_row, "counterfact": counterfact_row, "hallucination": hallucination_row,
              "temporal": temporal_row, "jsonl": jsonl_row}


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def write_jsonl(path: Path, lines: list) -> Path:
    """Each item: a dict/list/number (dumped as JSON) or a str (written as the raw line)."""
    text = "".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in lines)
    path.write_text(text, encoding="utf-8")
    return path


def write_rows(tmp_path: Path, format: str, rows: list) -> Path:
    if format == "jsonl":
        return write_jsonl(tmp_path / "data.jsonl", rows)
    return write_json(tmp_path / f"{format}.json", rows)


def load_quietly(*args, **kwargs) -> tuple[list[EvalRecord], list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = load_records(*args, **kwargs)
    return records, caught


def only_warning(caught: list[warnings.WarningMessage]) -> str:
    assert len(caught) == 1, [str(w.message) for w in caught]
    assert caught[0].category is UserWarning
    return str(caught[0].message)


def cli(argv: list[str]) -> int:
    """main()'s exit code, whether it returns it or argparse raises SystemExit."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def one_line(text: str) -> str:
    text = text.strip()
    assert text, "expected an error message on stderr"
    assert "\n" not in text, f"expected one line, got:\n{text}"
    assert "Traceback" not in text
    return text


# -- loaders: field mapping -----------------------------------------------------------------------


def test_zsre_fields_are_mapped(tmp_path):
    path = write_json(tmp_path / "zsre.json", [zsre_row(0), zsre_row(1, subject=None)])
    records, caught = load_quietly(path, "zsre")
    assert not caught
    assert records[0] == EvalRecord(index=0, prompt="When was thing 0 founded?", target="1900",
                                    rephrase="In what year was thing 0 founded?",
                                    loc="nq question: who wrote book 0", loc_ans="Author 0", subject="Subject 0")
    assert records[1].index == 1 and records[1].subject is None and records[1].target == "1901"


def test_counterfact_fields_are_mapped(tmp_path):
    path = write_json(tmp_path / "cf.json", [counterfact_row(5), counterfact_row(6)])
    records, caught = load_quietly(path, "counterfact")
    assert not caught
    assert [r.index for r in records] == [0, 1]
    assert records[1] == EvalRecord(index=1, prompt="The mother tongue of person 6 is", target="Lang6",
                                    rephrase="Where person 6 is from, people speak", loc="Neighbour 6 speaks",
                                    loc_ans="Truth6", subject="person 6")


def test_hallucination_fields_are_mapped_without_rephrase(tmp_path):
    # A stray rephrase-like key must not be picked up: hallucination has no generalisation prompt.
    path = write_json(tmp_path / "h.json", [hallucination_row(0, rephrase="ignored", ood_rephrase="ignored")])
    (record,), caught = load_quietly(path, "hallucination")
    assert not caught
    assert record == EvalRecord(index=0, prompt="This is a Wikipedia passage about person 0.",
                                target="Sentence 0.", rephrase=None, loc="Web text 0", loc_ans="continues 0",
                                subject="person 0")


def test_temporal_uses_ood_rephrase(tmp_path):
    path = write_json(tmp_path / "t.json", [temporal_row(0), temporal_row(1)])
    records, caught = load_quietly(path, "temporal")
    assert not caught
    assert [r.rephrase for r in records] == ["Out of distribution 0", "Out of distribution 1"]
    assert records[1].target == "Sentence 1." and records[1].loc_ans == "continues 1"


def test_temporal_requires_ood_rephrase(tmp_path):
    row = temporal_row(0)
    del row["ood_rephrase"]
    with pytest.raises(DataError, match="ood_rephrase"):
        load_records(write_json(tmp_path / "t.json", [row]), "temporal", strict=True)


def test_jsonl_fields_optional_parts_and_line_indexes(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        jsonl_row(0),
        "",  # a blank line is not a record, but it still counts as a line
        jsonl_row(2, rephrase="R2", loc="L2", loc_ans="A2", subject="S2"),
        "   ",
        jsonl_row(4, loc="L4", loc_ans="A4"),
    ])
    records, caught = load_quietly(path, "jsonl")
    assert not caught
    assert [r.index for r in records] == [0, 2, 4]
    assert records[0] == EvalRecord(index=0, prompt="Prompt 0", target="Target 0")
    assert records[1] == EvalRecord(index=2, prompt="Prompt 2", target="Target 2", rephrase="R2", loc="L2",
                                    loc_ans="A2", subject="S2")
    assert records[2].rephrase is None and records[2].loc == "L4" and records[2].loc_ans == "A4"


def test_no_data_file_is_a_data_error():
    with pytest.raises(DataError, match="no data file"):
        load_many([], "zsre")


def test_path_may_be_a_string(tmp_path):
    path = write_json(tmp_path / "zsre.json", [zsre_row(0)])
    assert load_records(str(path), "zsre") == load_records(path, "zsre")


# -- loaders: the real shared files ---------------------------------------------------------------

REAL_FILES = {
    "ZsRE/zsre_mend_edit.json": "zsre",
    "ZsRE/zsre_mend_train-1k.KnowledgeSpread-subset.json": "zsre",
    "counterfact/counterfact-edit.json": "counterfact",
    "counterfact/counterfact-train.json": "counterfact",
    "hallucination/hallucination-edit.json": "hallucination",
    "hallucination/hallucination-train.json": "hallucination",
    "temporal/temporal-edit.json": "temporal",
    "temporal/temporal-train.json": "temporal",
}
SOURCE_KEYS = {  # EvalRecord field -> source key, as README.md documents each format
    "zsre": {"prompt": "src", "target": "alt", "rephrase": "rephrase", "loc": "loc", "loc_ans": "loc_ans"},
    "counterfact": {"prompt": "prompt", "target": "target_new", "rephrase": "rephrase_prompt",
                    "loc": "locality_prompt", "loc_ans": "locality_ground_truth"},
    "hallucination": {"prompt": "prompt", "target": "target_new", "rephrase": None, "loc": "locality_prompt",
                      "loc_ans": "locality_ground_truth"},
    "temporal": {"prompt": "prompt", "target": "target_new", "rephrase": "ood_rephrase", "loc": "locality_prompt",
                 "loc_ans": "locality_ground_truth"},
}


def real_file(relative: str) -> Path:
    path = DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} not found; set MEMOIR_DATA_DIR to the shared data folder")
    return path


@pytest.mark.parametrize("relative", sorted(REAL_FILES))
def test_real_files_first_three_records(relative):
    path = real_file(relative)
    format = REAL_FILES[relative]
    raw = json.loads(path.read_text(encoding="utf-8"))[:3]
    records, caught = load_quietly(path, format, limit=3)
    assert not caught
    assert [r.index for r in records] == [0, 1, 2]
    for record, row in zip(records, raw, strict=True):
        for field, key in SOURCE_KEYS[format].items():
            assert getattr(record, field) == (row[key] if key else None), (field, key)
        assert record.subject == row["subject"]
        if format == "zsre":
            assert record.loc.startswith("nq question:")


def test_real_zsre_and_counterfact_record_zero():
    zsre = load_records(real_file("ZsRE/zsre_mend_edit.json"), "zsre", limit=1)[0]
    assert zsre.prompt == "When was the inception of IAAF Combined Events Challenge?"
    assert zsre.target == "2006" and zsre.loc_ans == "The String"
    assert zsre.rephrase == "When was the IAAF Combined Events Challenge launched?"
    counterfact = load_records(real_file("counterfact/counterfact-edit.json"), "counterfact", limit=1)[0]
    assert (counterfact.prompt, counterfact.target) == ("The mother tongue of Danielle Darrieux is", "English")
    assert counterfact.loc == "Michel Rocard is a native speaker of" and counterfact.loc_ans == "French"


@pytest.mark.parametrize("relative", ["ZsRE/zsre_mend_edit.json", "counterfact/counterfact-edit.json",
                                      "temporal/temporal-edit.json"])
def test_real_edit_sets_load_completely(relative):
    path = real_file(relative)
    records, caught = load_quietly(path, REAL_FILES[relative])
    assert not caught
    assert [r.index for r in records] == list(range(len(json.loads(path.read_text(encoding="utf-8")))))


def test_real_knowledgespread_subset_skips_exactly_the_empty_targets():
    # Records 534 and 723 have alt == "": no edit can be made of them.
    records, caught = load_quietly(real_file("ZsRE/zsre_mend_train-1k.KnowledgeSpread-subset.json"), "zsre")
    message = only_warning(caught)
    assert "skipped 2 " in message and "record 534" in message and "record 723" in message and "'alt'" in message
    assert len(records) == 998 and {534, 723}.isdisjoint(r.index for r in records)


def test_real_hallucination_edit_set_keeps_every_edit():
    path = real_file("hallucination/hallucination-edit.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    records, _ = load_quietly(path, "hallucination")
    assert [(r.index, r.prompt, r.target) for r in records] == [
        (i, row["prompt"], row["target_new"]) for i, row in enumerate(raw)]


# -- loaders: malformed records -------------------------------------------------------------------

# (format, bad row or raw line, text the message must contain besides the index)
MALFORMED = {
    "zsre missing alt": ("zsre", {k: v for k, v in zsre_row(1).items() if k != "alt"}, "'alt'"),
    "zsre null src": ("zsre", zsre_row(1, src=None), "'src'"),
    "zsre empty alt": ("zsre", zsre_row(1, alt=""), "'alt'"),
    "zsre blank rephrase": ("zsre", zsre_row(1, rephrase="   "), "'rephrase'"),
    "zsre number loc_ans": ("zsre", zsre_row(1, loc_ans=42), "'loc_ans'"),
    "zsre number subject": ("zsre", zsre_row(1, subject=7), "'subject'"),
    "zsre list loc": ("zsre", zsre_row(1, loc=["a"]), "'loc'"),
    "zsre not an object": ("zsre", ["src", "alt"], "object"),
    "zsre string record": ("zsre", "When was it?", "object"),
    "counterfact number target_new": ("counterfact", counterfact_row(1, target_new=3), "'target_new'"),
    "hallucination empty prompt": ("hallucination", hallucination_row(1, prompt=""), "'prompt'"),
    "temporal bool ood_rephrase": ("temporal", temporal_row(1, ood_rephrase=True), "'ood_rephrase'"),
    "jsonl missing target": ("jsonl", {"prompt": "P"}, "'target'"),
    "jsonl number prompt": ("jsonl", {"prompt": 5, "target": "T"}, "'prompt'"),
    "jsonl empty optional rephrase": ("jsonl", jsonl_row(1, rephrase=""), "'rephrase'"),
    "jsonl unparsable": ("jsonl", '{"prompt": "P", "target": ', "not valid JSON"),
    "jsonl not an object": ("jsonl", [1, 2], "object"),
}


def malformed_file(tmp_path: Path, case: str) -> tuple[Path, str, str, str]:
    """A file of good, bad, good; returns it, its format and what names the bad one."""
    format, bad, text = MALFORMED[case]
    make = ROW_MAKERS[format]
    path = write_rows(tmp_path, format, [make(0), bad, make(2)])
    where = f"{path.name} line 2" if format == "jsonl" else f"{path.name} record 1"
    return path, format, where, text


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_record_is_skipped_with_one_warning(tmp_path, case):
    path, format, where, text = malformed_file(tmp_path, case)
    records, caught = load_quietly(path, format)
    assert [r.index for r in records] == [0, 2]
    message = only_warning(caught)
    assert "skipped 1 " in message and where in message and text in message


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_record_is_refused_in_strict_mode(tmp_path, case):
    path, format, where, text = malformed_file(tmp_path, case)
    with pytest.raises(DataError) as info:
        load_records(path, format, strict=True)
    assert isinstance(info.value, MemoirError) and isinstance(info.value, ValueError)
    assert where in str(info.value) and text in str(info.value)


def test_several_malformed_records_one_warning_naming_each(tmp_path):
    rows = [zsre_row(0), zsre_row(1, alt=""), zsre_row(2), 5, zsre_row(4, rephrase=7)]
    records, caught = load_quietly(write_json(tmp_path / "z.json", rows), "zsre")
    assert [r.index for r in records] == [0, 2]
    message = only_warning(caught)
    assert "skipped 3 " in message
    for where in ("record 1: field 'alt'", "record 3: expected a JSON object", "record 4: field 'rephrase'"):
        assert where in message


@pytest.mark.parametrize("format, row", [
    ("counterfact", {k: v for k, v in counterfact_row(1).items() if k != "locality_prompt"}),
    ("zsre", zsre_row(1, loc_ans="")),
    ("jsonl", jsonl_row(1, loc="L")),
    ("jsonl", jsonl_row(1, loc_ans="A")),
])
def test_record_without_a_usable_locality_pair_is_kept_without_one(tmp_path, format, row):
    path = write_json(tmp_path / "d.json", [row]) if format != "jsonl" else write_jsonl(tmp_path / "d.jsonl", [row])
    records, caught = load_quietly(path, format)
    assert len(records) == 1 and records[0].loc is None and records[0].loc_ans is None
    assert records[0].prompt and records[0].target
    message = only_warning(caught)
    assert "no usable locality pair" in message and ("record 0" in message or "line 1" in message)
    with pytest.raises(DataError, match="locality"):
        load_records(path, format, strict=True)


def test_strict_mode_accepts_a_clean_file(tmp_path):
    records, caught = load_quietly(write_json(tmp_path / "z.json", [zsre_row(0), zsre_row(1)]), "zsre", strict=True)
    assert len(records) == 2 and not caught


def test_limit_counts_good_records_only(tmp_path):
    rows = [zsre_row(0), zsre_row(1, alt=""), zsre_row(2), zsre_row(3), zsre_row(4)]
    path = write_json(tmp_path / "z.json", rows)
    records, caught = load_quietly(path, "zsre", limit=2)
    assert [r.index for r in records] == [0, 2]
    assert "record 1" in only_warning(caught)
    assert [r.index for r in load_quietly(path, "zsre", limit=10)[0]] == [0, 2, 3, 4]
    assert [r.index for r in load_quietly(path, "zsre", limit=1)[0]] == [0]


def test_limit_with_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["not json", jsonl_row(1), "", jsonl_row(3), jsonl_row(4)])
    records, caught = load_quietly(path, "jsonl", limit=2)
    assert [r.index for r in records] == [1, 3]
    assert "line 1" in only_warning(caught)


# -- loaders: unusable files ----------------------------------------------------------------------


@pytest.mark.parametrize("content, text", [
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    ('{"src": "a", "alt": "b"}', "list"),
    ('"just a string"', "list"),
    ("[]", "no usable"),
])
def test_unusable_json_file(tmp_path, content, text):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=text) as info:
        load_records(path, "zsre")
    assert str(path) in str(info.value)


def test_non_utf8_json_file_is_a_data_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b'[{"src": "\xff\xfe"}]')
    with pytest.raises(DataError, match="not valid JSON"):
        load_records(path, "zsre")


def test_non_utf8_jsonl_file_is_a_data_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"prompt": "a", "target": "\xff\xfe"}\n')
    with pytest.raises(DataError):
        load_records(path, "jsonl")


def test_missing_file_and_directory(tmp_path):
    for path in (tmp_path / "nope.json", tmp_path):
        with pytest.raises(DataError, match="does not exist") as info:
            load_records(path, "zsre")
        assert str(path) in str(info.value)


@pytest.mark.parametrize("format", FORMATS)
def test_file_of_only_malformed_records(tmp_path, format):
    path = write_rows(tmp_path, format, [{"unrelated": "x"}, 3])
    with pytest.warns(UserWarning, match="skipped 2 "), pytest.raises(DataError, match="no usable"):
        load_records(path, format)
    with pytest.raises(DataError, match="record 0|line 1"):
        load_records(path, format, strict=True)


def test_empty_jsonl_file(tmp_path):
    with pytest.raises(DataError, match="no usable"):
        load_records(write_jsonl(tmp_path / "d.jsonl", ["", "  "]), "jsonl")


def test_unknown_format_lists_the_formats(tmp_path):
    path = write_json(tmp_path / "z.json", [zsre_row(0)])
    with pytest.raises(DataError, match="nope") as info:
        load_records(path, "nope")
    assert set(FORMATS) == {"zsre", "counterfact", "hallucination", "temporal", "jsonl"}
    for format in FORMATS:
        assert format in str(info.value)
    with pytest.raises(DataError):  # the format is checked before the path
        load_records(tmp_path / "missing.json", "ZsRE")


# -- metrics ----------------------------------------------------------------------------------------


def test_token_accuracy():
    assert token_accuracy([1, 2, 3], [1, 5, 3]) == pytest.approx(2 / 3)
    assert token_accuracy([4], [4]) == 1.0
    assert token_accuracy([1, 2], [3, 4]) == 0.0
    assert token_accuracy((7, 8, 9, 10), (7, 0, 9, 0)) == 0.5


def test_agreement():
    assert agreement([1, 2, 3, 4], [1, 0, 3, 0]) == 0.5
    assert agreement([5, 6], [5, 6]) == 1.0
    assert agreement([5], [6]) == 0.0


def test_perplexity():
    assert perplexity([math.log(2), math.log(2)]) == pytest.approx(2.0, abs=1e-12)
    assert perplexity([0.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert perplexity([math.log(2), math.log(8)]) == pytest.approx(4.0)  # exp of the mean, not the mean of exps


def test_mean():
    assert math.isnan(mean([]))
    assert mean([1.0, 2.0]) == 1.5
    assert mean([0.25]) == 0.25


@pytest.mark.parametrize("call", [
    lambda: token_accuracy([1, 2], [1]),
    lambda: token_accuracy([], []),
    lambda: token_accuracy([1], []),
    lambda: agreement([1, 2, 3], [1, 2]),
    lambda: agreement([], []),
    lambda: perplexity([]),
])
def test_metrics_refuse_bad_lengths(call):
    with pytest.raises(ValueError):
        call()


# -- calibration rule -------------------------------------------------------------------------------


def test_calibration_separated_distributions_midpoint():
    negatives = np.linspace(0.0, 0.4, 101)
    positives = np.linspace(0.6, 1.0, 41)
    result = choose_threshold(negatives, positives, negative_q=0.99, positive_q=0.05)
    high_negative, low_positive = np.quantile(negatives, 0.99), np.quantile(positives, 0.05)
    assert result.negative_quantile == pytest.approx(high_negative)
    assert result.positive_quantile == pytest.approx(low_positive)
    assert result.threshold == pytest.approx((high_negative + low_positive) / 2, abs=1e-6)
    assert all(result.threshold > n for n in negatives if n <= high_negative)
    assert all(result.threshold <= p for p in positives if p >= low_positive)
    assert (result.negatives, result.positives) == (101, 41)


def test_calibration_constant_distributions_hand_computed():
    result = choose_threshold(np.full(100, 0.125), np.full(20, 0.875))
    assert result.threshold == pytest.approx(0.5, abs=1e-6)
    assert (result.negative_quantile, result.positive_quantile) == (0.125, 0.875)
    assert (result.negatives, result.positives) == (100, 20)


def test_calibration_overlap_stays_just_above_the_negative_quantile():
    negatives = np.linspace(0.2, 0.8, 101)
    positives = np.linspace(0.3, 0.9, 57)
    result = choose_threshold(negatives, positives)
    high_negative = np.quantile(negatives, 0.99)
    assert result.positive_quantile < result.negative_quantile
    assert high_negative < result.threshold <= high_negative + 1e-6
    assert all(result.threshold > n for n in negatives if n <= high_negative)
    assert (result.negatives, result.positives) == (101, 57)


def test_calibration_overlaps_are_multiples_of_one_over_k():
    # k = 8: a negative at exactly the quantile (3/8) must not be routed (routing is overlap >= τ).
    negatives = np.array([1 / 8] * 50 + [3 / 8] * 50)
    positives = np.array([2 / 8] * 10 + [6 / 8] * 10)
    result = choose_threshold(negatives, positives)
    assert result.negative_quantile == 3 / 8
    assert result.threshold > 3 / 8
    assert result.threshold == pytest.approx(3 / 8, abs=1e-6)
    # Equal quantiles also keep τ just above the negatives.
    equal = choose_threshold(np.full(10, 0.5), np.full(10, 0.5))
    assert 0.5 < equal.threshold <= 0.5 + 1e-6


@pytest.mark.parametrize("negatives, positives", [
    (np.ones(10), np.ones(10)),
    (np.full(10, 1.0), np.full(3, 0.2)),
    (np.full(10, 0.999999999), np.ones(4)),
])
def test_calibration_never_exceeds_one(negatives, positives):
    result = choose_threshold(negatives, positives)
    assert result.threshold <= 1.0
    assert result.threshold >= result.negative_quantile - 1e-12


def test_calibration_quantile_arguments_are_used():
    negatives = np.arange(101) / 100  # quantile q is q itself
    positives = np.full(5, 1.0)
    assert choose_threshold(negatives, positives, negative_q=0.5).negative_quantile == pytest.approx(0.5)
    assert choose_threshold(negatives, positives, negative_q=0.5).threshold == pytest.approx(0.75, abs=1e-6)
    positives = np.arange(101) / 100
    assert choose_threshold(np.zeros(3), positives, positive_q=0.2).threshold == pytest.approx(0.1, abs=1e-6)


# -- harness: τ selection and routing confusion -----------------------------------------------------


def scored(predicted, target, nll=None, overlap=None, nearest=None):
    routing = None if overlap is None else RoutingDecision(nearest, overlap, nearest)
    return Scored(list(predicted), list(target), list(nll or [0.0] * len(target)), routing)


LN2, LN4 = math.log(2), math.log(4)
RECORDS = [
    EvalRecord(index=0, prompt="p0", target="t0", rephrase="r0", loc="l0", loc_ans="a0", subject="S"),
    EvalRecord(index=1, prompt="p1", target="t1", rephrase=None, loc="l1", loc_ans="a1", subject="S"),
    EvalRecord(index=2, prompt="p2", target="t2", rephrase="r2", loc=None, loc_ans=None, subject="T"),
]


def hand_scores() -> _Scores:
    """rel: record 0 routed right at 0.6, record 1 routed half right at 0.8, record 2 never routed.
    The memory-off answers are all wrong. gen: records 0 and 2. loc: records 0 and 1."""
    routed = {
        "rel": [scored([1, 2], [1, 2], [LN2, LN2], 0.6, 10), scored([3, 9], [3, 4], [LN2, LN2], 0.8, 11),
                scored([5, 6], [5, 6], [LN2, LN2], None)],
        "gen": [scored([1, 2], [1, 2], overlap=0.55, nearest=10), scored([5, 6], [5, 6], overlap=0.65, nearest=12)],
        "loc": [scored([5, 0, 7], [8, 8, 8], overlap=0.6, nearest=10),
                scored([0, 0, 0], [8, 8, 8], overlap=0.3, nearest=11)],
    }
    off = {
        "rel": [scored([9, 9], [1, 2], [LN4, LN4]), scored([9, 9], [3, 4], [LN4, LN4]),
                scored([9, 6], [5, 6], [LN4, LN4])],
        "gen": [scored([9, 9], [1, 2]), scored([9, 9], [5, 6])],
        # Loc compares with these memory-off predictions, never with the loc answer (8 8 8).
        "loc": [scored([5, 6, 7], [8, 8, 8]), scored([1, 2, 3], [8, 8, 8])],
    }
    return _Scores(routed, off)


@pytest.mark.parametrize("tau, expected", [
    (0.0, {"rel": (1 + 0.5 + 0.5) / 3, "gen": 1.0, "loc": (2 / 3 + 0) / 2}),
    (0.5, {"rel": (1 + 0.5 + 0.5) / 3, "gen": 1.0, "loc": (2 / 3 + 1) / 2}),
    (0.6, {"rel": (1 + 0.5 + 0.5) / 3, "gen": 0.5, "loc": (2 / 3 + 1) / 2}),  # overlap == τ routes
    (0.7, {"rel": (0 + 0.5 + 0.5) / 3, "gen": 0.0, "loc": 1.0}),
    (0.9, {"rel": (0 + 0 + 0.5) / 3, "gen": 0.0, "loc": 1.0}),
    (2.0, {"rel": (0 + 0 + 0.5) / 3, "gen": 0.0, "loc": 1.0}),  # the "unedited" row of a report
])
def test_metrics_choose_routed_or_off_per_prompt(tau, expected):
    metrics = _metrics(hand_scores(), tau)
    assert set(metrics) == {"rel", "rel_ppl", "gen", "gen_ppl", "loc"}
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key


def test_metrics_rel_ppl_follows_the_choice():
    scores = hand_scores()
    assert _metrics(scores, 0.5)["rel_ppl"] == pytest.approx((2 + 2 + 4) / 3)
    assert _metrics(scores, 0.7)["rel_ppl"] == pytest.approx((4 + 2 + 4) / 3)
    assert _metrics(scores, 0.9)["rel_ppl"] == pytest.approx(4.0)


def test_metrics_gen_ppl_follows_the_choice():
    """The temporal set's metric (WISE's ood_ppl): perplexity of the target after the rephrase."""
    scores = hand_scores()
    scores.routed["gen"][0] = scored([1, 2], [1, 2], [LN2, LN2], overlap=0.55, nearest=10)
    scores.off["gen"] = [scored([9, 9], [1, 2], [LN4, LN4]), scored([9, 9], [5, 6], [LN4, LN4])]
    assert _metrics(scores, 0.5)["gen_ppl"] == pytest.approx((2 + 1) / 2)
    assert _metrics(scores, 0.6)["gen_ppl"] == pytest.approx((4 + 1) / 2)
    assert _metrics(scores, 0.9)["gen_ppl"] == pytest.approx(4.0)


def test_metrics_single_record_rel_flips_at_the_overlap():
    scores = _Scores({"rel": [scored([1, 2], [1, 2], overlap=0.6, nearest=0)], "gen": [], "loc": []},
                     {"rel": [scored([7, 7], [1, 2])], "gen": [], "loc": []})
    assert _metrics(scores, 0.5)["rel"] == 1.0
    assert _metrics(scores, 0.7)["rel"] == 0.0
    assert set(_metrics(scores, 0.5)) == {"rel", "rel_ppl"}  # no gen / loc prompts, no gen / loc keys


def memoir_like(*edits: tuple[int, int]) -> SimpleNamespace:
    """A stand-in with store.records: (edit_id, eval_index) pairs."""
    records = [EditRecord(edit_id=e, prompt=f"p{i}", target=f"t{i}", metadata={"eval_index": i}) for e, i in edits]
    return SimpleNamespace(store=SimpleNamespace(records=records))


def test_routing_confusion_counts():
    memoir = memoir_like((10, 0), (11, 1), (12, 2))
    routed = {
        "rel": [scored([1], [1], overlap=0.9, nearest=10),   # record 0 reads its own edit
                scored([1], [1], overlap=0.9, nearest=10),   # record 1 (subject S) reads record 0's (subject S)
                scored([1], [1], overlap=0.9, nearest=10)],  # record 2 (subject T) reads record 0's (subject S)
        "gen": [scored([1], [1], overlap=0.2, nearest=10),   # record 0's rephrase: below τ
                scored([1], [1], overlap=0.8, nearest=12)],  # record 2's rephrase reads its own edit
        "loc": [scored([1], [1], overlap=0.9, nearest=12),   # record 0's loc reads edit 12 (subject T)
                scored([1], [1], overlap=None)],             # no decision at all
    }
    scores = _Scores(routed, {name: [] for name in routed})
    confusion = _routing_confusion(_routing_classes(scores, RECORDS, memoir, 0.5))
    assert confusion == {
        "rel": {"own_edit": 1, "other_edit_same_subject": 1, "other_edit": 1, "no_edit": 0},
        "gen": {"own_edit": 1, "other_edit_same_subject": 0, "other_edit": 0, "no_edit": 1},
        "loc": {"own_edit": 0, "other_edit_same_subject": 0, "other_edit": 1, "no_edit": 1},
    }
    high = _routing_confusion(_routing_classes(scores, RECORDS, memoir, 0.95))
    assert high["rel"] == {"own_edit": 0, "other_edit_same_subject": 0, "other_edit": 0, "no_edit": 3}
    assert high["gen"]["no_edit"] == 2 and high["loc"]["no_edit"] == 2
    boundary = _routing_confusion(_routing_classes(scores, RECORDS, memoir, 0.8))  # overlap == τ reads the edit
    assert boundary["gen"] == {"own_edit": 1, "other_edit_same_subject": 0, "other_edit": 0, "no_edit": 1}


def test_routing_confusion_uses_eval_index_not_edit_order():
    # Edit ids need not follow record order: edit 7 belongs to record 2 and edit 3 to record 0.
    memoir = memoir_like((7, 2), (3, 0))
    records = [EvalRecord(index=0, prompt="a", target="b", subject=None),
               EvalRecord(index=2, prompt="c", target="d", loc="l", loc_ans="m", subject=None)]
    routed = {"rel": [scored([1], [1], overlap=1.0, nearest=3), scored([1], [1], overlap=1.0, nearest=3)],
              "gen": [], "loc": [scored([1], [1], overlap=1.0, nearest=7)]}
    confusion = _routing_confusion(_routing_classes(_Scores(routed, {}), records, memoir, 0.5))
    # No subject: reading another record's edit is plain other_edit, never same-subject.
    assert confusion["rel"] == {"own_edit": 1, "other_edit_same_subject": 0, "other_edit": 1, "no_edit": 0}
    # A loc prompt never reads "its own" edit: any edit it reads is a false positive.
    assert confusion["loc"] == {"own_edit": 0, "other_edit_same_subject": 0, "other_edit": 1, "no_edit": 0}


def test_accuracy_by_routing_averages_each_class_as_the_metrics_choose_it():
    # Edit 11 is record 0's second edit, so record 1 (subject S) reads an edit of the same subject.
    scores = hand_scores()
    memoir = memoir_like((10, 0), (11, 0), (12, 2))
    split = _accuracy_by_routing(scores, _routing_classes(scores, RECORDS, memoir, 0.6), 0.6)
    # rel: record 0 own edit (1.0), record 1 same subject (0.5), record 2 no decision (memory off: 0.5).
    assert split["rel"] == {"own_edit": 1.0, "other_edit_same_subject": 0.5, "other_edit": None, "no_edit": 0.5}
    # gen: record 0's rephrase is below τ (memory off: 0.0), record 2's reads its own edit (1.0).
    assert split["gen"] == {"own_edit": 1.0, "other_edit_same_subject": None, "other_edit": None, "no_edit": 0.0}
    json.dumps(split, allow_nan=False)


def test_superseded_marks_records_a_later_same_subject_record_contradicts():
    def record(i, subject, target):
        return EvalRecord(index=i, prompt=f"p{i}", target=target, subject=subject)
    records = [record(0, "S", "x"), record(1, "S", "x"), record(2, "T", "y"), record(3, "S", "z"),
               record(4, None, "a"), record(5, None, "b"), record(6, "T", "y")]
    # 0 and 1 agree with each other but 3 (same subject) says otherwise; T's two records agree;
    # records without a subject are never compared.
    assert superseded(records) == [True, True, False, False, False, False, False]
    assert superseded([]) == []


def test_by_conflict_splits_rel_and_gen_into_superseded_and_others():
    # Record 0 (subject S) is superseded by record 1 (subject S, another target).
    split = _by_conflict(hand_scores(), RECORDS, 0.6)
    assert split["superseded_records"] == 1
    assert split["rel"] == {"superseded": 1.0, "others": pytest.approx(0.5)}
    # gen: record 0's rephrase overlaps 0.55 < τ (memory off: wrong), record 2's reads its edit.
    assert split["gen"] == {"superseded": 0.0, "others": 1.0}
    # Without conflicts the superseded group is empty: None, not NaN (a report must stay valid JSON).
    alone = _by_conflict(hand_scores(), [dataclasses.replace(r, subject=None) for r in RECORDS], 0.6)
    assert alone["superseded_records"] == 0 and alone["rel"]["superseded"] is None
    json.dumps(alone, allow_nan=False)


# -- harness: run() on a tiny model (no pretrained weights) ----------------------------------------


def tiny_run_inputs(tmp_path: Path) -> tuple:
    data = write_jsonl(tmp_path / "d.jsonl", [jsonl_row(0, rephrase="R0", loc="L0", loc_ans="A0"), jsonl_row(1)])
    model = make_tiny_model("llama")
    config = MemoirConfig(threshold=0.9, prefix_starts=("I",), prefix_lengths=(3,))
    return model, data, config


def has_memoir_layer(model) -> bool:
    return any(isinstance(m, memoir_hf.memory.layer.MemoirLayer) for m in model.modules())


def test_run_unpatches_the_model_when_it_fails(tmp_path, monkeypatch):
    model, data, config = tiny_run_inputs(tmp_path)

    def failing_edits(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(harness, "_apply_edits", failing_edits)
    with pytest.raises(RuntimeError, match="boom"):
        harness.run((model, make_byte_tokenizer()), data, format="jsonl", edits=2, config=config, threshold=0.5,
                    progress=False)
    assert not has_memoir_layer(model) and not model._forward_pre_hooks


def test_run_checks_threshold_before_editing(tmp_path, monkeypatch):
    model, data, config = tiny_run_inputs(tmp_path)
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return []

    monkeypatch.setattr(harness, "_apply_edits", spy)
    with pytest.raises(MemoirConfigError, match="threshold"):
        harness.run((model, make_byte_tokenizer()), data, format="jsonl", edits=2, config=config, threshold=5.0,
                    progress=False)
    assert not calls


def test_run_refuses_checkpoint_every_zero(tmp_path):
    model, data, config = tiny_run_inputs(tmp_path)
    with pytest.raises(MemoirError):
        harness.run((model, make_byte_tokenizer()), data, format="jsonl", edits=2, config=config, threshold=0.5,
                    progress=False, checkpoint_dir=tmp_path / "ck", checkpoint_every=0)


def test_the_evaluation_package_exposes_run_and_the_loaders():
    import memoir_hf.evaluation as evaluation

    assert evaluation.run is harness.run and evaluation.load_records is load_records
    assert set(evaluation.FORMATS) == set(FORMATS) and "ft-l" in evaluation.METHODS


def never_edit(monkeypatch) -> list:
    """Record calls to _edit_and_evaluate instead of editing; returns the call list."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return {"sweep": None}

    monkeypatch.setattr(harness, "_edit_and_evaluate", spy)
    return calls


@pytest.mark.parametrize("what", ["out is a folder", "plot is a folder", "plot of ft-l", "plot, no matplotlib",
                                  "checkpoint_dir is a file", "calibration texts for ft-l",
                                  "calibration texts with a threshold"])
def test_run_refuses_an_output_it_could_not_write_before_editing(tmp_path, monkeypatch, what):
    model, data, config = tiny_run_inputs(tmp_path)
    calls = never_edit(monkeypatch)
    folder = tmp_path / "folder"
    folder.mkdir()
    arguments = {"out is a folder": {"out": folder}, "plot is a folder": {"plot": folder},
                 "plot of ft-l": {"plot": tmp_path / "p.png", "method": "ft-l", "threshold": None},
                 "plot, no matplotlib": {"plot": tmp_path / "p.png"},
                 "checkpoint_dir is a file": {"checkpoint_dir": data},
                 "calibration texts for ft-l": {"method": "ft-l", "threshold": None, "calibration_texts": ["a b"]},
                 "calibration texts with a threshold": {"calibration_texts": ["a b"]}}[what]
    if what == "plot, no matplotlib":
        monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MemoirError, match="folder|ft-l|matplotlib|is a file|--threshold already sets"):
        harness.run((model, make_byte_tokenizer()), data, **{"format": "jsonl", "edits": 2, "config": config,
                                                             "threshold": 0.5, "progress": False, **arguments})
    assert not calls


def test_run_makes_the_report_folder_before_editing(tmp_path, monkeypatch):
    model, data, config = tiny_run_inputs(tmp_path)
    out = tmp_path / "new" / "deeper" / "report.json"
    folder_at_edit_time = []
    monkeypatch.setattr(harness, "_edit_and_evaluate",
                        lambda *args: folder_at_edit_time.append(out.parent.is_dir()) or {"sweep": None})
    harness.run((model, make_byte_tokenizer()), data, format="jsonl", edits=2, config=config, threshold=0.5,
                progress=False, out=out)
    assert folder_at_edit_time == [True] and json.loads(out.read_text())["format"] == "jsonl"


def test_run_warns_when_the_data_holds_fewer_records_than_asked(tmp_path, monkeypatch):
    model, data, config = tiny_run_inputs(tmp_path)
    never_edit(monkeypatch)
    with pytest.warns(UserWarning, match="2 usable records, fewer than the 5 edits"):
        harness.run((model, make_byte_tokenizer()), data, format="jsonl", edits=5, config=config, threshold=0.5,
                    progress=False)


@pytest.mark.parametrize("format, split", [("zsre", True), ("counterfact", False), ("hallucination", False)])
def test_conflict_split_only_for_zsre(tmp_path, format, split):
    """Same-subject records contradict each other in ZsRE only (other relations in CounterFact,
    successive sentences of one passage in the hallucination set)."""
    _, _, config = tiny_run_inputs(tmp_path)
    data = write_rows(tmp_path, format, [ROW_MAKERS[format](0), ROW_MAKERS[format](1)])
    report = harness.run((make_tiny_model("llama"), make_byte_tokenizer()), data, format=format, edits=2,
                         config=config, threshold=0.5, progress=False)
    assert (report["by_conflict"] is not None) == split


def test_calibration_leaves_out_the_run_prompts_with_a_warning():
    records = [EvalRecord(0, "P0", "T0", rephrase="R0", loc="L0", loc_ans="A0"), EvalRecord(1, "P1", "T1")]
    texts = ["unrelated", "P0", " R0", "L0", "L0 A0", "P1", "L0 other"]
    with pytest.warns(UserWarning, match="5 calibration text"):
        assert harness._without_run_prompts(texts, records) == ["unrelated", "L0 other"]
    with pytest.raises(MemoirError, match="every calibration text"):
        harness._without_run_prompts(["P0"], records)


def failed_edit_result(self, prompt, target, **kwargs):
    return memoir_hf.EditResult(None, False, float("nan"), 1, 0.1, 0.0, None, error="values not finite")


def edit_raises(self, prompt, target, **kwargs):
    raise RuntimeError("out of memory")


@pytest.mark.parametrize("failing_edit, error, message", [
    (failed_edit_result, MemoirError, "record 1 .*after 1 edits: values not finite"),  # names the record
    (edit_raises, RuntimeError, "out of memory"),  # any error, not only a failed edit
])
def test_an_edit_that_fails_mid_run_saves_the_edits_before_it(tmp_path, monkeypatch, failing_edit, error, message):
    model, data, config = tiny_run_inputs(tmp_path)
    real_edit = memoir_hf.MemoirModel.edit

    def second_edit_fails(self, prompt, target, **kwargs):
        if len(self.edits) == 1:
            return failing_edit(self, prompt, target, **kwargs)
        return real_edit(self, prompt, target, **kwargs)

    monkeypatch.setattr(memoir_hf.MemoirModel, "edit", second_edit_fails)
    checkpoint = tmp_path / "ck"
    with pytest.raises(error, match=message):
        harness.run((model, make_byte_tokenizer()), data, format="jsonl", edits=2, config=config, threshold=0.5,
                    progress=False, checkpoint_dir=checkpoint, checkpoint_every=100)
    assert [e.prompt for e in memoir_hf.MemoirModel.from_pretrained(model, checkpoint).edits] == ["Prompt 0"]


def test_a_failed_rescue_save_warns_and_the_error_that_stopped_the_run_is_raised(tmp_path, monkeypatch):
    model, data, config = tiny_run_inputs(tmp_path)

    def save_fails(*args, **kwargs):
        raise memoir_hf.SaveError("disk full")

    monkeypatch.setattr(memoir_hf.MemoirModel, "edit", edit_raises)
    monkeypatch.setattr(memoir_hf.MemoirModel, "save_pretrained", save_fails)
    with pytest.raises(RuntimeError, match="out of memory"), pytest.warns(UserWarning, match="disk full"):
        harness.run((model, make_byte_tokenizer()), data, format="jsonl", edits=2, config=config, threshold=0.5,
                    progress=False, checkpoint_dir=tmp_path / "ck", checkpoint_every=100)


@pytest.mark.parametrize("field", ["prompt", "rephrase", "loc"])
def test_run_refuses_a_record_longer_than_the_context_before_editing(tmp_path, monkeypatch, field):
    """Scoring a too-long rephrase or loc prompt would fail after every edit (learned positions) or score
    garbage (rotary ones): the run refuses it before the first edit, naming the record and the field."""
    long_text = "word " * 300  # the byte tokenizer makes this 1,500 tokens; the tiny models read 256
    row = {"prompt": jsonl_row(1, prompt=long_text), "rephrase": jsonl_row(1, rephrase=long_text),
           "loc": jsonl_row(1, loc=long_text, loc_ans="A")}[field]
    model, _, config = tiny_run_inputs(tmp_path)
    data = write_jsonl(tmp_path / "long.jsonl", [jsonl_row(0), row])
    calls = never_edit(monkeypatch)
    with pytest.raises(memoir_hf.EditInputError, match=f"record 1 \\({field} .*longer than the model's context"):
        harness.run((model, make_byte_tokenizer()), data, format="jsonl", edits=2, config=config, threshold=0.5,
                    progress=False)
    assert not calls


def test_a_report_write_that_fails_midway_leaves_the_older_report_whole(tmp_path, monkeypatch):
    model, data, config = tiny_run_inputs(tmp_path)
    monkeypatch.setattr(harness, "_edit_and_evaluate", lambda *args: {"sweep": None, "big": "x" * 100_000})
    out = tmp_path / "report.json"
    out.write_text('{"old": true}', encoding="utf-8")
    real_write_text = Path.write_text

    def disk_full_halfway(self, text, *args, **kwargs):
        real_write_text(self, text[:len(text) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", disk_full_halfway)
    with pytest.raises(OSError, match="disk full"):
        harness.run((model, make_byte_tokenizer()), data, format="jsonl", edits=2, config=config, threshold=0.5,
                    progress=False, out=out)
    assert json.loads(out.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "report.json"]  # no temporary left
    monkeypatch.setattr(Path, "write_text", real_write_text)
    harness.run((model, make_byte_tokenizer()), data, format="jsonl", edits=2, config=config, threshold=0.5,
                progress=False, out=out)
    assert json.loads(out.read_text())["big"] == "x" * 100_000


def test_ctrl_c_saves_the_edits_before_it_and_a_rerun_resumes_after_them(tmp_path, monkeypatch):
    model, data, config = tiny_run_inputs(tmp_path)
    real_edit = memoir_hf.MemoirModel.edit
    calls = []

    def interrupted_at_the_second_edit(self, prompt, target, **kwargs):
        calls.append(prompt)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_edit(self, prompt, target, **kwargs)

    monkeypatch.setattr(memoir_hf.MemoirModel, "edit", interrupted_at_the_second_edit)
    checkpoint = tmp_path / "ck"
    arguments = dict(format="jsonl", edits=2, config=config, threshold=0.5, progress=False,
                     checkpoint_dir=checkpoint, checkpoint_every=100)
    with pytest.raises(KeyboardInterrupt):
        harness.run((model, make_byte_tokenizer()), data, **arguments)
    saved = memoir_hf.MemoirModel.from_pretrained(model, checkpoint)
    assert [e.prompt for e in saved.edits] == ["Prompt 0"]
    saved.unpatch()
    report = harness.run((model, make_byte_tokenizer()), data, **arguments)
    assert calls == ["Prompt 0", "Prompt 1", "Prompt 1"] and report["edits"] == 2


def test_the_report_gives_the_mean_steps_of_the_edits(tmp_path, monkeypatch):
    model, data, config = tiny_run_inputs(tmp_path)
    real_edit = memoir_hf.MemoirModel.edit
    steps = []

    def recording(self, prompt, target, **kwargs):
        result = real_edit(self, prompt, target, **kwargs)
        steps.append(result.steps)
        return result

    monkeypatch.setattr(memoir_hf.MemoirModel, "edit", recording)
    config = dataclasses.replace(config, learning_rate=3.0, stop_loss=2.0)
    report = harness.run((model, make_byte_tokenizer()), data, format="jsonl", edits=2, config=config,
                         threshold=0.5, progress=False)
    assert len(set(steps)) == 2  # the edits stop after different numbers of steps
    assert report["steps_per_edit"] == sum(steps) / 2


def test_ctrl_c_in_the_success_check_stores_the_edit_and_the_rerun_checks_it(tmp_path, monkeypatch):
    model, data, config = tiny_run_inputs(tmp_path)
    arguments = dict(format="jsonl", edits=2, config=config, threshold=0.5, progress=False, checkpoint_every=100)
    uninterrupted = harness.run((model, make_byte_tokenizer()), data, **arguments)
    real_check = memoir_hf.MemoirModel._check_edit

    def interrupted_once(self, encoded):
        if len(self.edits) == 2 and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        return real_check(self, encoded)

    interrupted: list[bool] = []
    monkeypatch.setattr(memoir_hf.MemoirModel, "_check_edit", interrupted_once)
    checkpoint = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        harness.run((model, make_byte_tokenizer()), data, checkpoint_dir=checkpoint, **arguments)
    saved = memoir_hf.MemoirModel.from_pretrained(model, checkpoint)
    assert [e.metadata.get(harness.UNCHECKED) for e in saved.edits] == [None, True]
    saved.unpatch()
    resumed = harness.run((model, make_byte_tokenizer()), data, checkpoint_dir=checkpoint, **arguments)
    # The first edit misses its target in 30 steps at lr 1, the second reaches it: counted unchecked as a
    # failure, the rate would be 0.0.
    assert resumed["edit_success_rate"] == uninterrupted["edit_success_rate"] == 0.5


def test_sweep_grid():
    assert harness.SWEEP[0] == 0.3 and harness.SWEEP[-1] == 1.0 and len(harness.SWEEP) == 36
    assert all(b - a == pytest.approx(0.02) for a, b in zip(harness.SWEEP[:-1], harness.SWEEP[1:], strict=True))


# -- command line -----------------------------------------------------------------------------------


@pytest.fixture
def good_data(tmp_path) -> Path:
    return write_json(tmp_path / "zsre.json", [zsre_row(0)])


def test_cli_eval_help(capsys):
    assert cli(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--threshold", "--model", "--data", "--format", "--edits", "--strict-data"):
        assert option in out


def test_installed_console_script_help():
    script = shutil.which("memoir-hf") or str(Path(sys.executable).with_name("memoir-hf"))
    if not Path(script).exists():
        pytest.skip("memoir-hf console script not installed")
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert done.returncode == 0, done.stderr
    assert "eval" in done.stdout and "usage: memoir-hf" in done.stdout


@pytest.mark.parametrize("argv, text", [
    ([], "required"),
    (["eval"], "--model"),
    (["eval", "--data", "x.json"], "--model"),
    (["frobnicate"], "frobnicate"),
    (["eval", "--model", "m", "--data", "x.json", "--format", "nope"], "nope"),
    (["eval", "--model", "m", "--data", "x.json", "--edits", "ten"], "ten"),
    (["eval", "--model", "m", "--data", "x.json", "--method", "rome"], "rome"),
])
def test_cli_usage_errors_exit_2_with_one_line(capsys, argv, text):
    assert cli(argv) == 2
    captured = capsys.readouterr()
    assert text in one_line(captured.err) and "error" in captured.err
    assert captured.out == ""


@pytest.mark.parametrize("edits", ["0", "-3"])
def test_cli_edits_must_be_positive(capsys, good_data, edits):
    assert cli(["eval", "--model", "m", "--data", str(good_data), "--edits", edits]) == 2
    assert "--edits" in one_line(capsys.readouterr().err)


def test_cli_missing_data_file_exit_1(capsys, tmp_path):
    missing = tmp_path / "no_such_file.json"
    assert cli(["eval", "--model", "smollm2", "--data", str(missing)]) == 1
    err = one_line(capsys.readouterr().err)
    assert str(missing) in err and "DataError" in err


def test_cli_unusable_data_exit_1(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops", encoding="utf-8")
    assert cli(["eval", "--model", "smollm2", "--data", str(bad)]) == 1
    assert str(bad) in one_line(capsys.readouterr().err)


def test_cli_strict_data_exit_1_naming_the_record(capsys, tmp_path):
    path = write_json(tmp_path / "z.json", [zsre_row(0), zsre_row(1, alt="")])
    assert cli(["eval", "--model", "smollm2", "--data", str(path), "--strict-data"]) == 1
    err = one_line(capsys.readouterr().err)
    assert "record 1" in err and "'alt'" in err


def test_cli_bad_config_keys_exit_1(capsys, tmp_path, good_data):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"bogus": 1}), encoding="utf-8")
    assert cli(["eval", "--model", "smollm2", "--data", str(good_data), "--config", str(config)]) == 1
    assert "bogus" in one_line(capsys.readouterr().err)
    assert cli(["eval", "--model", "smollm2", "--data", str(good_data), "--config", str(tmp_path / "none")]) == 1
    assert "none" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("with_config_file", [False, True])
def test_cli_memoir_environment_variables_apply_with_or_without_config(monkeypatch, tmp_path, good_data,
                                                                     with_config_file):
    seen = []
    monkeypatch.setattr(harness, "run", lambda *args, config, **kwargs: seen.append(config) or
                        {"method": "memoir", "edits": 1, "threshold": 0.5, "metrics": {},
                                                           "edit_success_rate": 1.0, "seconds_per_edit": 1.0})
    monkeypatch.setenv("MEMOIR_MAX_STEPS", "7")
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"learning_rate": 2.0}), encoding="utf-8")
    argv = ["eval", "--model", "smollm2", "--data", str(good_data)]
    assert cli(argv + (["--config", str(config_file)] if with_config_file else [])) == 0
    assert seen[0].max_steps == 7
    assert seen[0].learning_rate == (2.0 if with_config_file else MemoirConfig().learning_rate)


def test_cli_config_not_json_one_line_error(capsys, tmp_path, good_data):
    config = tmp_path / "config.json"
    config.write_text("{threshold: 0.5", encoding="utf-8")
    assert cli(["eval", "--model", "smollm2", "--data", str(good_data), "--config", str(config)]) in (1, 2)
    assert str(config) in one_line(capsys.readouterr().err)


def test_cli_negative_threads_is_a_usage_error(capsys, good_data):
    assert cli(["eval", "--model", "smollm2", "--data", str(good_data), "--threads", "-1"]) == 2
    assert "--threads" in one_line(capsys.readouterr().err)


def test_cli_non_utf8_jsonl_exit_1(capsys, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "target": "\xff"}\n')
    assert cli(["eval", "--model", "smollm2", "--data", str(path), "--format", "jsonl"]) == 1
    assert str(path) in one_line(capsys.readouterr().err)


def test_cli_unloadable_model_folder_one_line(capsys, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [jsonl_row(0)])
    folder = tmp_path / "empty_model"
    folder.mkdir()
    assert cli(["eval", "--model", str(folder), "--data", str(data), "--format", "jsonl"]) == 1
    assert str(folder) in one_line(capsys.readouterr().err)


# -- plots ------------------------------------------------------------------------------------------


def report(method: str = "memoir", edits: int = 10, with_gen: bool = True) -> dict:
    sweep = []
    for tau in (0.3, 0.5, 0.7, 0.9):
        row = {"threshold": tau, "rel": 1 - tau / 2, "loc": tau}
        if with_gen:
            row["gen"] = 0.8 - tau / 2
        sweep.append(row)
    metrics = {"rel": 0.9 - edits / 1000, "loc": 0.95}
    if with_gen:
        metrics["gen"] = 0.7
    return {"model": "tiny", "format": "zsre" if with_gen else "hallucination", "edits": edits, "method": method,
            "threshold": 0.62, "sweep": sweep, "metrics": metrics}


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


@pytest.mark.parametrize("with_gen", [True, False])
def test_plot_sweep_writes_png(tmp_path, with_gen):
    pytest.importorskip("matplotlib")
    from memoir_hf.evaluation.plots import plot_sweep

    path = tmp_path / "sweep.png"
    plot_sweep(report(with_gen=with_gen), path)
    assert_png(path)


def test_plot_without_a_suffix_is_a_png_as_matplotlib_names_it(tmp_path):
    pytest.importorskip("matplotlib")
    from memoir_hf.evaluation.plots import plot_sweep

    plot_sweep(report(with_gen=True), tmp_path / "sweep")
    assert_png(tmp_path / "sweep.png")
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.png"]


def test_series_label_tells_mask_settings_apart():
    from memoir_hf.config import DEFAULT_TOP_K
    from memoir_hf.evaluation.plots import series_label

    paper = {"method": "memoir", "memoir_config": {"top_k": DEFAULT_TOP_K, "max_steps": 30}}
    sparse = {"method": "memoir", "memoir_config": {"top_k": 0.1, "max_steps": 60}}
    standardized = {"method": "memoir", "memoir_config": {"top_k": 0.1, "max_steps": 60,
                                                          "aggregation": "standardized"}}
    protected = {"method": "memoir", "memoir_config": {"top_k": DEFAULT_TOP_K, "max_steps": 30,
                                                       "protect_earlier_edits": 0.01}}
    unprotected = {"method": "memoir", "memoir_config": {"top_k": DEFAULT_TOP_K, "max_steps": 30,
                                                         "protect_earlier_edits": 0.0}}
    undecayed = {"method": "memoir", "memoir_config": {"top_k": DEFAULT_TOP_K, "max_steps": 30,
                                                       "protect_earlier_edits": 0.01, "weight_decay": 0.0}}
    relaxed = {"method": "memoir", "memoir_config": {"top_k": DEFAULT_TOP_K, "max_steps": 30, "weight_decay": 0.0,
                                                     "protect_earlier_edits": 0.05, "unprotected_steps": 20}}
    ft_l = {"method": "ft-l", "memoir_config": {"top_k": 1536, "max_steps": 30}}
    assert [series_label(r) for r in (paper, sparse, standardized, protected, unprotected, undecayed, relaxed,
                                      ft_l)] == [
        "memoir", "memoir k=0.1, 60 steps", "memoir k=0.1, 60 steps, standardized", "memoir protect 0.01", "memoir",
        "memoir protect 0.01, no weight decay", "memoir protect 0.05, 20 unprotected steps, no weight decay", "ft-l"]


def test_plot_series_styles_stay_distinct_past_the_number_of_line_styles():
    from memoir_hf.evaluation.plots import series_style

    styles = [(str(style["linestyle"]), style["marker"]) for style in map(series_style, range(36))]
    assert len(set(styles)) == 36
    assert styles[6] != styles[0] and styles[7] != styles[1]  # where plain cycling repeated itself


def test_plot_scaling_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from memoir_hf.evaluation.plots import plot_scaling

    reports = [report("memoir", 1000), report("memoir", 10), report("ft-l", 100), report("memoir", 100),
               report("ft-l", 10)]
    path = tmp_path / "scaling.png"
    plot_scaling(reports, str(path))
    assert_png(path)
    single = tmp_path / "single.png"
    plot_scaling([report("memoir", 10, with_gen=False)], single)
    assert_png(single)


def test_scaling_plot_legends_name_each_series_once_and_each_metric_once():
    pytest.importorskip("matplotlib")
    from memoir_hf.evaluation.plots import _pyplot, scaling_figure

    plt = _pyplot()
    reports = [report("memoir", 10), report("memoir", 100), report("ft-l", 10), report("ft-l", 100, with_gen=False)]
    figure = scaling_figure(plt, reports)
    try:
        axis = figure.axes[0]
        series_legend = axis.get_legend()
        metric_legend = next(artist for artist in axis.artists if artist is not series_legend)
        assert [text.get_text() for text in series_legend.get_texts()] == ["memoir", "ft-l"]
        assert [text.get_text() for text in metric_legend.get_texts()] == ["Rel", "Gen", "Loc"]
        assert len(axis.lines) == 6  # three metrics of two series
    finally:
        plt.close(figure)


def test_plots_without_matplotlib_raise_memoir_error(tmp_path, monkeypatch):
    from memoir_hf.evaluation import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(MemoirError, match="matplotlib"):
        plots.plot_sweep(report(), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# -- calibration texts ---------------------------------------------------------------------------


def test_calibration_texts_from_text_and_json_files(tmp_path):
    from memoir_hf.evaluation.datasets import load_texts

    (tmp_path / "t.txt").write_text("first text\n\n  second text  \n", encoding="utf-8")
    assert load_texts(tmp_path / "t.txt") == ["first text", "second text"]
    write_json(tmp_path / "s.json", ["a question", "another"])
    assert load_texts(tmp_path / "s.json") == ["a question", "another"]
    write_json(tmp_path / "o.json", [{"index": 0, "loc_prompt": "nq question: x y"}, {"prompt": "p"}])
    assert load_texts(tmp_path / "o.json") == ["nq question: x y", "p"]


def test_calibration_texts_from_a_benchmark_train_file_are_its_locality_prompts(tmp_path):
    """A CounterFact or hallucination train record holds an edit prompt too: the negatives must be
    the locality prompts (what must not read an edit), never the edit prompts."""
    from memoir_hf.evaluation.datasets import load_texts

    rows = [{"prompt": "Toko Yasuda, the", "target_new": "piano", "locality_prompt": "John Lennon performs on the",
             "locality_ground_truth": "guitar"},
            {"prompt": "The mother tongue of X is", "locality_prompt": "Y speaks", "target_new": "English"}]
    assert load_texts(write_json(tmp_path / "train.json", rows)) == ["John Lennon performs on the", "Y speaks"]
    zsre_train = [zsre_row(0), zsre_row(1)]  # ZsRE's own train file: its NQ loc questions
    assert load_texts(write_json(tmp_path / "zsre.json", zsre_train)) == [r["loc"] for r in zsre_train]
    jsonl = write_jsonl(tmp_path / "t.jsonl", [{"locality_prompt": "line one\u2028still one"}, "not json"])
    with pytest.raises(DataError, match="t.jsonl line 2: not valid JSON"):
        load_texts(jsonl)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_texts(tmp_path / "latin1.txt")
    rows[1]["locality_prompt"] = " "
    with pytest.raises(DataError, match="record 1"):
        load_texts(write_json(tmp_path / "blank.json", rows))


@pytest.mark.parametrize("content", [[{"index": 0}], [""], [3]])
def test_calibration_texts_refuse_unusable_items(tmp_path, content):
    from memoir_hf.evaluation.datasets import load_texts

    with pytest.raises(DataError, match="record 0"):
        load_texts(write_json(tmp_path / "bad.json", content))


def test_calibration_texts_refuse_missing_or_empty_files(tmp_path):
    from memoir_hf.evaluation.datasets import load_texts

    with pytest.raises(DataError, match="does not exist"):
        load_texts(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(DataError, match="no text"):
        load_texts(tmp_path / "empty.txt")


def test_several_data_files_are_edited_in_order_with_unique_indices(tmp_path):
    from memoir_hf.evaluation.datasets import load_many

    first = write_json(tmp_path / "a.json", [zsre_row(0), zsre_row(1)])
    second = write_json(tmp_path / "b.json", [zsre_row(10), zsre_row(11), zsre_row(12)])
    records = load_many([first, second], "zsre")
    assert [r.index for r in records] == [0, 1, 2, 3, 4]
    assert [r.prompt for r in records] == [r.prompt for r in load_records(first, "zsre") + load_records(second, "zsre")]
    assert [r.index for r in load_many([first, second], "zsre", limit=3)] == [0, 1, 2]
    assert [r.index for r in load_many([first, second], "zsre", limit=2)] == [0, 1]
    assert load_many(first, "zsre") == load_records(first, "zsre")


# -- refused before the first edit, and what a run records ------------------------------------------


def no_edits_allowed(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the run edited before refusing")

    monkeypatch.setattr(harness, "_apply_edits", fail)


@pytest.mark.parametrize("texts, message", [
    ("train.json", "list of non-empty strings"),  # a path where texts belong: not split into characters
    (["fine", " "], "list of non-empty strings"),
    (["fine", "word " * 500], "calibration texts"),  # longer than the tiny model's context
])
def test_unusable_calibration_texts_are_refused_before_editing(tmp_path, monkeypatch, texts, message):
    model, data, config = tiny_run_inputs(tmp_path)
    config = dataclasses.replace(config, threshold=MemoirConfig().threshold)  # calibrated: no τ of its own
    no_edits_allowed(monkeypatch)
    with pytest.raises(MemoirError, match=message):
        harness.run((model, make_byte_tokenizer()), data, format="jsonl", edits=2, config=config, progress=False,
                    calibration_texts=texts)


def test_a_plot_format_matplotlib_cannot_write_is_refused_before_editing(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    model, data, config = tiny_run_inputs(tmp_path)
    no_edits_allowed(monkeypatch)
    with pytest.raises(MemoirError, match="matplotlib writes"):
        harness.run((model, make_byte_tokenizer()), data, format="jsonl", edits=2, config=config, progress=False,
                    plot=tmp_path / "sweep.txt")


def test_a_threshold_in_the_config_that_calibration_replaces_is_warned_about(tmp_path, monkeypatch):
    model, data, config = tiny_run_inputs(tmp_path)  # the config sets threshold 0.9
    no_edits_allowed(monkeypatch)
    with pytest.warns(UserWarning, match="threshold 0.9 is not used"), pytest.raises(AssertionError):
        harness.run((model, make_byte_tokenizer()), data, format="jsonl", edits=2, config=config, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit τ: nothing to warn about
        with pytest.raises(AssertionError):
            harness.run((model, make_byte_tokenizer()), data, format="jsonl", edits=2, config=config,
                        threshold=0.9, progress=False)


def test_resuming_on_another_layer_is_refused(tmp_path):
    model, data, config = tiny_run_inputs(tmp_path)
    arguments = dict(format="jsonl", edits=1, threshold=0.5, progress=False, checkpoint_dir=tmp_path / "ck")
    harness.run((model, make_byte_tokenizer()), data, config=dataclasses.replace(config, layer=1), **arguments)
    with pytest.raises(MemoirError, match="layer"):
        harness.run((model, make_byte_tokenizer()), data, config=dataclasses.replace(config, layer=0), **arguments)
    assert not has_memoir_layer(model)


def test_a_run_from_a_model_folder_records_it_in_its_checkpoints(tmp_path):
    _, data, config = tiny_run_inputs(tmp_path)
    folder = tmp_path / "tiny-llama"
    make_tiny_model("llama").save_pretrained(folder)
    make_byte_tokenizer().save_pretrained(folder)
    harness.run(str(folder), data, format="jsonl", edits=1, config=config, threshold=0.5, progress=False,
                checkpoint_dir=tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "memoir_config.json").read_text(encoding="utf-8"))
    assert manifest["base_model"] == str(folder)


def test_a_field_with_a_lone_surrogate_is_a_malformed_record(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(jsonl_row(0)) + "\n" + json.dumps(jsonl_row(1, prompt="bad \ud800")) + "\n",
                    encoding="utf-8")
    with pytest.warns(UserWarning, match="line 2.*not valid Unicode"):
        assert [r.prompt for r in load_records(path, "jsonl")] == ["Prompt 0"]
    with pytest.raises(DataError, match="not valid Unicode"):
        load_records(path, "jsonl", strict=True)


def test_calibration_texts_from_edit_records_without_locality_prompts_skip_them(tmp_path):
    from memoir_hf.evaluation.datasets import load_texts

    rows = [{"prompt": "The capital of X is", "target": "Y"}, {"prompt": "P", "target": "T", "loc": "an NQ question"}]
    with pytest.warns(UserWarning, match="1 edit record"):
        assert load_texts(write_jsonl(tmp_path / "train.jsonl", rows)) == ["an NQ question"]

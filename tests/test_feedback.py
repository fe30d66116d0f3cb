"""FeedbackLog (append-only JSONL of corrections) and MemoirModel.learn_from (each correction edited once)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import fast_config, run_threads
from tiny_models import make_tiny_model

import memoir_hf
from memoir_hf import FeedbackLog, MemoirError, MemoirModel


def test_added_feedback_reads_back_in_order_with_fresh_ids(tmp_path):
    log = FeedbackLog(tmp_path / "sub" / "feedback.jsonl")
    assert log.entries() == [] and len(log) == 0
    first = log.add("The capital of Australia is", "Canberra", answer="Sydney", confidence=0.9, source="alice")
    second = log.add("Ünïcode prompt ✓", "réponse")
    assert [e.feedback_id for e in log] == [first.feedback_id, second.feedback_id]
    assert first.feedback_id != second.feedback_id
    assert log.entries()[0] == first and log.entries()[1].prompt == "Ünïcode prompt ✓"
    assert len((tmp_path / "sub" / "feedback.jsonl").read_text(encoding="utf-8").splitlines()) == 2


@pytest.mark.parametrize("kwargs", [
    {"prompt": "", "correction": "x"}, {"prompt": "   ", "correction": "x"}, {"prompt": "p", "correction": ""},
    {"prompt": "p", "correction": 3}, {"prompt": "p", "correction": "x", "confidence": 1.5},
    {"prompt": "p", "correction": "x", "confidence": float("nan")},
    {"prompt": "p", "correction": "x", "confidence": True}, {"prompt": "p", "correction": "x", "answer": 7},
])
def test_bad_feedback_is_refused_and_nothing_is_written(tmp_path, kwargs):
    log = FeedbackLog(tmp_path / "feedback.jsonl")
    log.add("kept", "yes")
    before = log.path.read_bytes()
    with pytest.raises(MemoirError):
        log.add(**kwargs)
    assert log.path.read_bytes() == before


def test_malformed_line_is_reported_with_its_number(tmp_path):
    log = FeedbackLog(tmp_path / "feedback.jsonl")
    log.add("a", "b")
    with open(log.path, "a", encoding="utf-8") as handle:
        handle.write("{not json}\n")
    log_text = log.path.read_text(encoding="utf-8")
    with pytest.raises(MemoirError, match="line 2"):
        log.entries()
    log.path.write_text(log_text.replace("{not json}", json.dumps({"prompt": "x"})), encoding="utf-8")
    with pytest.raises(MemoirError, match="line 2"):
        log.entries()


def test_an_incomplete_last_line_is_skipped_and_dropped_by_the_next_add(tmp_path):
    log = FeedbackLog(tmp_path / "feedback.jsonl")
    kept = log.add("a", "b")
    with open(log.path, "a", encoding="utf-8") as handle:
        handle.write('{"prompt": "half')
    with pytest.warns(UserWarning, match="incomplete"):
        assert log.entries() == [kept]
    with pytest.warns(UserWarning, match="incomplete"):
        newer = log.add("c", "d")
    assert log.entries() == [kept, newer]
    assert log.path.read_text(encoding="utf-8").count("\n") == 2


def test_a_write_torn_inside_a_character_is_skipped_and_dropped(tmp_path):
    log = FeedbackLog(tmp_path / "feedback.jsonl")
    kept = log.add("café", "crème")
    with open(log.path, "ab") as handle:
        handle.write(b'{"prompt": "caf' + "é".encode()[:1])
    with pytest.warns(UserWarning, match="incomplete"):
        assert log.entries() == [kept]
    with pytest.warns(UserWarning, match="incomplete"):
        newer = log.add("c", "d")
    assert log.entries() == [kept, newer]


def test_a_complete_but_invalid_last_line_is_refused_not_dropped(tmp_path):
    log = FeedbackLog(tmp_path / "feedback.jsonl")
    log.add("a", "b")
    with open(log.path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"prompt": "x", "correction": "y", "confidence": 80}))  # edited by hand
    text = log.path.read_text(encoding="utf-8")
    with pytest.raises(MemoirError, match="line 2 is not a feedback record"):
        log.entries()
    with pytest.raises(MemoirError, match="last line is not a feedback record"):
        log.add("c", "d")
    assert log.path.read_text(encoding="utf-8") == text


def test_a_line_that_is_not_utf8_is_named(tmp_path):
    log = FeedbackLog(tmp_path / "feedback.jsonl")
    log.add("a", "b")
    log.path.write_bytes(b'{"prompt": "\xff"}\n' + log.path.read_bytes())
    with pytest.raises(MemoirError, match="line 1 is not UTF-8"):
        log.entries()


def test_a_log_saved_with_a_byte_order_mark_is_read(tmp_path):
    log = FeedbackLog(tmp_path / "feedback.jsonl")
    kept = log.add("a", "b")
    log.path.write_bytes(b"\xef\xbb\xbf" + log.path.read_bytes())
    assert log.entries() == [kept]


def test_a_last_record_without_its_newline_is_read_and_kept(tmp_path):
    log = FeedbackLog(tmp_path / "feedback.jsonl")
    kept = log.add("a", "b")
    log.path.write_text(log.path.read_text(encoding="utf-8").rstrip("\n"), encoding="utf-8")  # edited by hand
    assert log.entries() == [kept]
    newer = log.add("c", "d")
    assert log.entries() == [kept, newer]


def test_duplicate_feedback_ids_are_refused(tmp_path):
    log = FeedbackLog(tmp_path / "feedback.jsonl")
    log.add("a", "b")
    line = log.path.read_text(encoding="utf-8")
    log.path.write_text(line + line, encoding="utf-8")
    with pytest.raises(MemoirError, match="twice"):
        log.entries()


@pytest.fixture
def memoir(byte_tokenizer):
    return memoir_hf.patch(make_tiny_model("llama"), fast_config(max_steps=30), tokenizer=byte_tokenizer)


def test_learn_from_applies_confident_feedback_once(memoir, tmp_path):
    log = FeedbackLog(tmp_path / "feedback.jsonl")
    cat = log.add("The cat sat on the", "mat", answer="sofa", confidence=0.95)
    unsure = log.add("The sky is", "green", confidence=0.3)
    bob = log.add("Bob likes to eat", "figs")
    report = memoir.learn_from(log, progress=False)
    assert set(report.applied) | set(report.failed) == {cat.feedback_id, bob.feedback_id}
    assert report.below_confidence == [unsure.feedback_id] and report.already_applied == []
    by_feedback = {e.metadata["feedback_id"]: e for e in memoir.edits}
    assert by_feedback[cat.feedback_id].target == "mat" and by_feedback[cat.feedback_id].metadata["confidence"] == 0.95
    produced = {**report.applied, **report.failed}
    assert produced[cat.feedback_id] == by_feedback[cat.feedback_id].edit_id

    memory = memoir.layer.memory_weight.clone()
    again = memoir.learn_from(log, progress=False)
    assert again.applied == {} and again.failed == {}
    assert sorted(again.already_applied) == sorted([cat.feedback_id, bob.feedback_id])
    assert len(memoir.edits) == 2 and torch.equal(memoir.layer.memory_weight, memory)

    newer = log.add("Alice plays the", "drums")
    third = memoir.learn_from(log, progress=False)
    assert set(third.applied) | set(third.failed) == {newer.feedback_id} and len(memoir.edits) == 3
    lenient = memoir.learn_from(log, min_confidence=0.2, progress=False)
    assert set(lenient.applied) | set(lenient.failed) == {unsure.feedback_id} and lenient.below_confidence == []


def test_learn_from_stays_idempotent_across_save_and_load(memoir, tmp_path, byte_tokenizer):
    log = FeedbackLog(tmp_path / "feedback.jsonl")
    log.add("The cat sat on the", "mat")
    memoir.learn_from(log, progress=False)
    memoir.save_pretrained(tmp_path / "ckpt")
    reloaded = MemoirModel.from_pretrained(make_tiny_model("llama"), tmp_path / "ckpt", byte_tokenizer)
    report = reloaded.learn_from(log, progress=False)
    assert report.applied == {} and report.failed == {} and len(report.already_applied) == 1
    assert len(reloaded.edits) == 1


def test_two_threads_learning_from_one_log_edit_each_correction_once(memoir, tmp_path):
    log = FeedbackLog(tmp_path / "feedback.jsonl")
    wanted = {log.add("The cat sat on the", "mat").feedback_id, log.add("Bob likes to eat", "figs").feedback_id}
    assert run_threads([lambda: memoir.learn_from(log, progress=False)] * 2) == []
    assert sorted(e.metadata["feedback_id"] for e in memoir.edits) == sorted(wanted)


def test_learn_from_takes_a_path_and_refuses_other_arguments(memoir, tmp_path):
    log = FeedbackLog(tmp_path / "feedback.jsonl")
    cat = log.add("The cat sat on the", "mat")
    report = memoir.learn_from(str(log.path), progress=False)
    assert set(report.applied) | set(report.failed) == {cat.feedback_id}
    with pytest.raises(MemoirError, match="FeedbackLog or the path"):
        memoir.learn_from(log.entries(), progress=False)
    with pytest.raises(MemoirError, match="no feedback log at"):
        memoir.learn_from(tmp_path / "typo.jsonl", progress=False)
    for bad in (1.5, -0.1, float("nan"), True, "0.5"):
        with pytest.raises(MemoirError, match="min_confidence"):
            memoir.learn_from(log, min_confidence=bad, progress=False)


def test_a_log_path_that_is_no_file_path_and_text_with_a_lone_surrogate_are_refused(tmp_path):
    for path in (None, 123, "", tmp_path):
        with pytest.raises(MemoirError, match="FeedbackLog needs the path"):
            FeedbackLog(path)
    log = FeedbackLog(tmp_path / "feedback.jsonl")
    with pytest.raises(MemoirError, match="not valid Unicode"):
        log.add("ab\ud800", "x")
    assert not log.path.exists()


def test_a_correction_that_cannot_be_edited_is_skipped_and_the_others_applied(memoir, tmp_path):
    log = FeedbackLog(tmp_path / "feedback.jsonl")
    good = log.add("The cat sat on the", "mat")
    too_long = log.add("a " * 200, "too long")
    with pytest.warns(UserWarning, match="1 correction"):
        report = memoir.learn_from(log, progress=False)
    assert set(report.applied) | set(report.failed) == {good.feedback_id}
    assert list(report.invalid) == [too_long.feedback_id] and "tokens" in report.invalid[too_long.feedback_id]
    assert [e.metadata["feedback_id"] for e in memoir.edits] == [good.feedback_id]

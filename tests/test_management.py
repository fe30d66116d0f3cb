"""Managing stored edits on tiny models: correct/correct_many, fact files, find/get, remove_edit, consolidate.

Everything runs on tiny random models built from config and the byte tokenizer (byte b is token b).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import fast_config, written_before_file_checksums
from safetensors.torch import load_file, save_file
from tiny_models import make_byte_tokenizer, make_tiny_model
from torch import nn

import memoir_hf
from memoir_hf import (
    CheckpointError,
    EditInputError,
    FeedbackLog,
    MemoirError,
    MemoirModel,
    PatchError,
    read_facts,
)
from memoir_hf.feedback.answers import answers_match, normalize_answer
from memoir_hf.management.consolidation import MERGED_KEY

torch.set_num_threads(1)

DELTAS_FILE = "memoir_deltas.safetensors"
CONFIG_FILE = "memoir_config.json"
CAT = ("The cat sat on the", "mat")
BOB = ("Bob likes to eat", "figs")
ALICE = ("Alice plays the", "drums")
# With the tiny llama (seed 0) the greedy continuation of this prompt starts with an ASCII word
# followed by a space and more text ("SSSS K+S..."), so a correction with its first word is already given.
WORDY_PROMPT = "my The Alice"


def make_memoir(model_type: str = "llama", *, seed: int = 0, use_faiss: bool | None = None,
                **overrides) -> MemoirModel:
    return memoir_hf.patch(make_tiny_model(model_type, seed=seed), fast_config(**overrides),
                           tokenizer=make_byte_tokenizer(), use_faiss=use_faiss)


def memory(memoir: MemoirModel) -> torch.Tensor:
    return memoir.layer.memory_weight.detach().clone()


def summed_deltas(memoir: MemoirModel) -> torch.Tensor:
    """The stored edits' deltas scattered into a zero matrix of W_m's shape."""
    total = torch.zeros_like(memoir.layer.memory_weight)
    for delta in memoir.store.deltas.values():
        assert len(torch.unique(delta.columns)) == len(delta.columns)
        total[:, delta.columns] += delta.values.to(total.dtype)
    return total


def snapshot(memoir: MemoirModel) -> tuple:
    """Everything an operation that must change nothing could change."""
    return (memory(memoir), [r.to_dict() for r in memoir.store.records], len(memoir.store.index),
            memoir.store.index.codes.copy(), sorted(memoir.store.deltas), [r.to_dict() for r in memoir.store.removed],
            memoir.store.next_id)


def assert_unchanged(memoir: MemoirModel, before: tuple) -> None:
    after = snapshot(memoir)
    assert torch.equal(after[0], before[0])
    assert after[1] == before[1]
    assert after[2] == before[2]
    np.testing.assert_array_equal(after[3], before[3])
    assert after[4:] == before[4:]


def route(memoir: MemoirModel, prompt: str):
    """The routing decision of ``prompt`` (a greedy one-token ask through the memory)."""
    return memoir.ask(prompt, max_new_tokens=1).routing


def logits(memoir: MemoirModel, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return memoir(**make_byte_tokenizer()([prompt], return_tensors="pt")).logits


def overlap(memoir: MemoirModel, a: int, b: int) -> float:
    """Overlap of the stored masks of edits ``a`` and ``b``."""
    masks = [memoir.store.index.mask(memoir.store.position_of(edit_id)) for edit_id in (a, b)]
    return float((masks[0] & masks[1]).sum()) / memoir.target.top_k


def first_word_the_model_says(memoir: MemoirModel, prompt: str) -> str:
    """The first word of the model's greedy continuation, checked to count as an already given answer."""
    text = memoir.ask(prompt, max_new_tokens=16).text
    words = text.split()
    assert len(words) >= 2 and normalize_answer(words[0]), f"unexpected continuation {text!r}"
    # correct() generates the answer's tokens (with the joining space) + 3 more: the same greedy text
    tokens = len(make_byte_tokenizer()(" " + words[0])["input_ids"]) + 3
    assert answers_match(memoir.ask(prompt, max_new_tokens=tokens).text, words[0]), text
    return words[0]


# -- 1. normalize_answer / answers_match ----------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("Paris", "paris"),
    ("  PARIS.  ", "paris"),
    ("The Eiffel Tower!", "eiffel tower"),
    ("an apple, a pear and the plum", "apple pear and plum"),
    ("“Paris”", "paris"),
    ("‘Rome’ — «Italy»…", "rome italy"),
    ("Théâtre", "théâtre"),
    ("ﬁsh", "fish"),  # NFKC: the ligature is two letters
    ("there", "there"),  # 'the' inside a word is not an article
    ("", ""),
    ("!!!", ""),
    ("a\tb\n\nc", "b c"),  # 'a' is an article
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("model_answer, expected, verdict", [
    ("Paris", "Paris", True),
    ("paris", "PARIS", True),
    ("Paris.", "Paris", True),
    ("The Paris", "paris", True),
    ("“Paris”", "Paris", True),
    ("Paris, the capital of France", "Paris", True),  # the answer followed by more words
    ("Paris is nice", "The Paris", True),
    ("New York City", "New York", True),
    ("Parisian food", "Paris", False),  # the answer inside a longer word
    ("Parisian", "Paris", False),
    ("Lyon", "Paris", False),
    ("I think Paris", "Paris", False),  # not at the start
    ("New", "New York", False),  # shorter than the answer
    ("Paris", "", False),  # nothing expected: never counts as given
    ("Paris", "the", False),  # only an article: nothing is left to expect
    ("", "Paris", False),
    ("", "", False),
])
def test_answers_match(model_answer, expected, verdict):
    assert answers_match(model_answer, expected) is verdict


# -- 2. correct() ---------------------------------------------------------------------------------


def test_correct_leaves_an_answer_the_model_already_gives():
    memoir = make_memoir()
    answer = first_word_the_model_says(memoir, WORDY_PROMPT)
    before = snapshot(memoir)
    correction = memoir.correct(WORDY_PROMPT, answer)
    assert correction.status == "already_correct" and correction.edit is None
    assert correction.prompt == WORDY_PROMPT and correction.answer == answer
    assert answers_match(correction.model_answer, answer)
    assert answer in correction.reason
    assert_unchanged(memoir, before)
    assert len(memoir.store) == 0 and not memoir.layer.memory_weight.any()


def test_correct_leaves_an_edited_fact_alone():
    memoir = make_memoir()
    result = memoir.edit(*CAT)
    assert result.success
    answer = first_word_the_model_says(memoir, CAT[0])
    assert answer == CAT[1]  # the edit is what the model now says
    before = snapshot(memoir)
    assert memoir.correct(*CAT).status == "already_correct"
    assert_unchanged(memoir, before)


def test_correct_edits_a_new_fact():
    memoir = make_memoir()
    said = memoir.ask(CAT[0], max_new_tokens=8).text
    assert not answers_match(said, CAT[1])
    correction = memoir.correct(*CAT, metadata={"source": "test"})
    assert correction.status in ("edited", "edit_failed")
    assert correction.edit is not None
    assert correction.status == ("edited" if correction.edit.success else "edit_failed")
    assert correction.model_answer == memoir_answer_without_memory(memoir, CAT[0], len(correction.model_answer))
    assert len(memoir.store) == 1 and memoir.layer.memory_weight.any()
    record = memoir.get_edit(correction.edit.edit_id)
    assert (record.prompt, record.target, record.metadata) == (CAT[0], CAT[1], {"source": "test"})
    assert record.success == correction.edit.success
    assert str(correction.edit.edit_id) in correction.reason


def memoir_answer_without_memory(memoir: MemoirModel, prompt: str, length: int) -> str:
    with memoir.disable_memory():
        text = memoir.ask(prompt, max_new_tokens=16).text
    return text[:length]


def test_accept_overrides_the_default_test():
    memoir = make_memoir()
    calls = []

    def always(model_answer, expected):
        calls.append((model_answer, expected))
        return True

    before = snapshot(memoir)
    correction = memoir.correct(*CAT, accept=always)
    assert correction.status == "already_correct"
    assert calls == [(correction.model_answer, CAT[1])]
    assert_unchanged(memoir, before)

    answer = first_word_the_model_says(memoir, WORDY_PROMPT)
    forced = memoir.correct(WORDY_PROMPT, answer, accept=lambda said, expected: False)
    assert forced.status in ("edited", "edit_failed") and len(memoir.store) == 1
    assert memoir.edits[0].prompt == WORDY_PROMPT and memoir.edits[0].target == answer


@pytest.mark.parametrize("accept", ["yes", 1, True, object()])
def test_accept_that_is_not_callable_is_refused(accept):
    memoir = make_memoir()
    before = snapshot(memoir)
    with pytest.raises(MemoirError, match="accept"):
        memoir.correct(*CAT, accept=accept)
    with pytest.raises(MemoirError, match="accept"):
        memoir.correct_many([CAT], accept=accept, progress=False)
    assert_unchanged(memoir, before)


@pytest.mark.parametrize("verdict", [None, 1, 0, "yes", [True]])
def test_accept_returning_a_non_bool_is_refused(verdict):
    memoir = make_memoir()
    before = snapshot(memoir)
    with pytest.raises(MemoirError, match="True or False"):
        memoir.correct(*CAT, accept=lambda said, expected: verdict)
    with pytest.raises(MemoirError, match="True or False"):
        memoir.correct_many([CAT, BOB], accept=lambda said, expected: verdict, progress=False)
    assert_unchanged(memoir, before)


@pytest.mark.parametrize("prompt, answer, metadata", [
    (123, "mat", None), (None, "mat", None), ("", "mat", None), ("   ", "mat", None), (b"bytes", "mat", None),
    ("The cat sat on the", "", None), ("The cat sat on the", 5, None), ("The cat sat on the", None, None),
    ("The cat sat on the", "mat", ["not", "a", "dict"]), ("x" * 300, "mat", None),
])
def test_correct_refuses_bad_input_and_changes_nothing(prompt, answer, metadata):
    memoir = make_memoir()
    memoir.edit(*BOB)
    before = snapshot(memoir)
    with pytest.raises(MemoirError):
        memoir.correct(prompt, answer, metadata=metadata)
    assert_unchanged(memoir, before)


# -- 3. correct_many ------------------------------------------------------------------------------


def check_report(report, memoir: MemoirModel, edits_before: int, expected_checked: int) -> None:
    assert report.checked == len(report.corrections) == expected_checked
    assert report.already_correct + report.edited + report.failed == report.checked
    assert len(memoir.store) - edits_before == report.edited + report.failed
    for correction in report.corrections:
        if correction.status == "already_correct":
            assert correction.edit is None
        else:
            assert correction.status == ("edited" if correction.edit.success else "edit_failed")
    summary = report.summary()
    for number in (report.checked, report.already_correct, report.edited, report.failed):
        assert str(number) in summary


def test_correct_many_over_a_list():
    memoir = make_memoir()
    answer = first_word_the_model_says(memoir, WORDY_PROMPT)
    items = [
        {"prompt": CAT[0], "answer": CAT[1], "metadata": {"source": "list"}},
        {"prompt": WORDY_PROMPT, "target": answer},
        BOB,
        [ALICE[0], ALICE[1]],
    ]
    report = memoir.correct_many(items, progress=False)
    check_report(report, memoir, 0, 4)
    assert [c.prompt for c in report.corrections] == [CAT[0], WORDY_PROMPT, BOB[0], ALICE[0]]
    assert [c.answer for c in report.corrections] == [CAT[1], answer, BOB[1], ALICE[1]]
    assert report.corrections[1].status == "already_correct"
    assert report.already_correct == 1 and report.edited + report.failed == 3
    assert [(e.prompt, e.target) for e in memoir.edits] == [CAT, BOB, ALICE]
    assert memoir.edits[0].metadata == {"source": "list"}


def test_correct_many_over_a_jsonl_file(tmp_path):
    memoir = make_memoir()
    answer = first_word_the_model_says(memoir, WORDY_PROMPT)
    path = tmp_path / "facts.jsonl"
    lines = [
        json.dumps({"prompt": CAT[0], "answer": CAT[1], "metadata": {"source": "file"}, "topic": "pets"}),
        "",  # blank lines are skipped
        json.dumps({"prompt": WORDY_PROMPT, "target": answer}),
        json.dumps({"prompt": BOB[0], "target": BOB[1], "answer": BOB[1]}),  # both, equal: fine
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = memoir.correct_many(path, progress=False)
    check_report(report, memoir, 0, 3)
    assert report.corrections[1].status == "already_correct"
    assert [(e.prompt, e.target) for e in memoir.edits] == [CAT, BOB]
    assert memoir.edits[0].metadata == {"source": "file", "topic": "pets"}
    assert memoir.correct_many(str(path), progress=False).checked == 3  # a str path works too


def test_correct_many_over_a_csv_file(tmp_path):
    memoir = make_memoir()
    answer = first_word_the_model_says(memoir, WORDY_PROMPT)
    path = tmp_path / "facts.csv"
    path.write_text(f'prompt,answer,source\n"{CAT[0]}",{CAT[1]},csv\n\n{WORDY_PROMPT},{answer},\n'
                    f'"{BOB[0]}","{BOB[1]}",csv\n', encoding="utf-8")
    report = memoir.correct_many(path, progress=False)
    check_report(report, memoir, 0, 3)
    assert report.corrections[1].status == "already_correct"
    assert [(e.prompt, e.target) for e in memoir.edits] == [CAT, BOB]
    assert memoir.edits[0].metadata == {"source": "csv"}


@pytest.mark.parametrize("items, where", [
    ([CAT, {"prompt": "Snow is"}], "record 1"),
    ([CAT, BOB, {"answer": "white"}], "record 2"),
    ([{"prompt": "Snow is", "answer": ""}, CAT], "record 0"),
    ([CAT, ("Grass is", "green", "extra")], "record 1"),
    ([CAT, "Grass is green"], "record 1"),
    ([CAT, BOB, ("x" * 300, "y")], "record 2"),
    ([CAT, {"prompt": "Snow is", "answer": "white", "metadata": "nope"}], "record 1"),
])
def test_correct_many_refuses_a_bad_record_before_editing(items, where):
    memoir = make_memoir()
    memoir.edit(*ALICE)
    before = snapshot(memoir)
    with pytest.raises(EditInputError, match=where):
        memoir.correct_many(items, progress=False)
    assert_unchanged(memoir, before)


@pytest.mark.parametrize("name, content, where", [
    ("facts.jsonl", "", "no facts"),
    ("facts.jsonl", "\n  \n", "no facts"),
    ("facts.jsonl", '{"prompt": "The sky is", "target": "blue"}\n{"prompt": "Snow is"}\n', "line 2: missing target"),
    ("facts.jsonl", '{"prompt": "The sky is", "target": "blue"}\n\n{not json}\n', "line 3: not valid JSON"),
    ("facts.jsonl", '{"prompt": "The sky is", "target": "blue"}\n["Snow is", "white"]\n', "line 2"),
    ("facts.jsonl", '{"prompt": "The sky is", "target": "blue"}\n{"prompt": "Snow is", "target": ""}\n', "line 2"),
    ("facts.csv", "", "no facts"),
    ("facts.csv", "prompt,target\n", "no facts"),
    ("facts.csv", "prompt,target\nThe sky is,blue\nSnow is,white,extra\n", "line 3: has more values"),
    ("facts.csv", "prompt,target\nThe sky is,blue\nSnow is\n", "line 3: missing target"),
    ("facts.csv", "prompt,answer,target\nThe sky is,blue,green\n", "line 2"),
    ("facts.txt", "prompt,target\nThe sky is,blue\n", "jsonl"),
])
def test_correct_many_refuses_a_bad_file_before_editing(tmp_path, name, content, where):
    memoir = make_memoir()
    memoir.edit(*ALICE)
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    before = snapshot(memoir)
    with pytest.raises(EditInputError, match=where):
        memoir.correct_many(path, progress=False)
    assert_unchanged(memoir, before)


def test_correct_many_refuses_a_too_long_fact_in_a_file_naming_its_record(tmp_path):
    memoir = make_memoir()
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p, "target": t}) for p, t in [CAT, ("x" * 300, "y")]),
                    encoding="utf-8")
    before = snapshot(memoir)
    with pytest.raises(EditInputError, match="record 1"):
        memoir.correct_many(path, progress=False)
    assert_unchanged(memoir, before)


def test_correct_many_refuses_a_list_record_with_conflicting_answer_and_target():
    memoir = make_memoir()
    before = snapshot(memoir)
    with pytest.raises(EditInputError, match="record 0"):
        memoir.correct_many([{"prompt": "The sky is", "answer": "blue", "target": "green"}], progress=False)
    assert_unchanged(memoir, before)


def test_edit_many_reads_a_fact_file_and_checks_it_whole(tmp_path):
    memoir = make_memoir()
    path = tmp_path / "facts.csv"
    path.write_text(f'prompt,target,source\n"{CAT[0]}",{CAT[1]},csv\n"{BOB[0]}",{BOB[1]},csv\n', encoding="utf-8")
    results = memoir.edit_many(path, progress=False)
    assert [r.edit_id for r in results] == [0, 1]
    assert [(e.prompt, e.target, e.metadata) for e in memoir.edits] == [(*CAT, {"source": "csv"}),
                                                                         (*BOB, {"source": "csv"})]
    path.write_text(f'prompt,target\n"{ALICE[0]}",{ALICE[1]}\nSnow is\n', encoding="utf-8")
    before = snapshot(memoir)
    with pytest.raises(EditInputError, match="line 3"):
        memoir.edit_many(path, progress=False)
    assert_unchanged(memoir, before)


@pytest.mark.parametrize("method", ["edit_many", "correct_many"])
def test_a_single_fact_dict_is_refused_with_how_to_wrap_it(method):
    memoir = make_memoir()
    before = snapshot(memoir)
    with pytest.raises(EditInputError, match=rf"single dict; wrap it in a list: {method}\(\[fact\]\)"):
        getattr(memoir, method)({"prompt": CAT[0], "target": CAT[1]}, progress=False)
    assert_unchanged(memoir, before)


def test_an_unpatched_model_refuses_the_management_calls():
    memoir = make_memoir()
    memoir.edit(*CAT)
    memoir.unpatch()
    for call in (lambda: memoir.correct(*BOB), lambda: memoir.correct_many([BOB], progress=False),
                 lambda: memoir.ask(BOB[0]), lambda: memoir.remove_edit(0), lambda: memoir.consolidate()):
        with pytest.raises(PatchError, match="unpatched"):
            call()


# -- 4. read_facts -------------------------------------------------------------------------------


def test_read_jsonl_keeps_metadata_and_extra_keys(tmp_path):
    path = tmp_path / "facts.jsonl"
    rows = [
        {"prompt": "The sky is", "target": "blue", "metadata": {"source": "a", "n": 1}, "topic": "nature"},
        {"prompt": "Snow is", "answer": "white"},
        {"prompt": "Grass is", "answer": "green", "target": "green", "metadata": {"topic": "inner wins"},
         "topic": "outer"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert read_facts(path) == [
        {"prompt": "The sky is", "target": "blue", "metadata": {"source": "a", "n": 1, "topic": "nature"}},
        {"prompt": "Snow is", "target": "white", "metadata": {}},
        {"prompt": "Grass is", "target": "green", "metadata": {"topic": "inner wins"}},
    ]


def test_read_jsonl_with_a_byte_order_mark_and_unicode(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps({"prompt": "Ünïcode ✓ is", "target": "réponse"}, ensure_ascii=False) + "\n",
                    encoding="utf-8-sig")
    assert read_facts(path) == [{"prompt": "Ünïcode ✓ is", "target": "réponse", "metadata": {}}]


def test_read_csv_turns_extra_columns_into_metadata(tmp_path):
    path = tmp_path / "facts.CSV"  # the suffix is not case-sensitive
    path.write_text('prompt,answer,source,note\n"The sky, at noon, is",blue,alice,\nSnow is,white,bob,cold\n',
                    encoding="utf-8")
    assert read_facts(path) == [
        {"prompt": "The sky, at noon, is", "target": "blue", "metadata": {"source": "alice"}},
        {"prompt": "Snow is", "target": "white", "metadata": {"source": "bob", "note": "cold"}},
    ]


def test_read_jsonl_keeps_unicode_line_separators_inside_values(tmp_path):
    path = tmp_path / "facts.jsonl"
    rows = [{"prompt": "Line\u2028separated is", "target": "kept"}, {"prompt": "Next\u0085one is", "target": "too"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert [fact["prompt"] for fact in read_facts(path)] == ["Line\u2028separated is", "Next\u0085one is"]


def test_read_csv_keeps_a_quoted_field_that_spans_lines(tmp_path):
    path = tmp_path / "facts.csv"
    path.write_text('prompt,target,note\nThe sky is,blue,"line one\nline two"\nSnow is,white,\n', encoding="utf-8")
    assert read_facts(path) == [
        {"prompt": "The sky is", "target": "blue", "metadata": {"note": "line one\nline two"}},
        {"prompt": "Snow is", "target": "white", "metadata": {}},
    ]


def test_a_bad_csv_row_is_named_by_the_line_it_starts_on(tmp_path):
    path = tmp_path / "facts.csv"
    path.write_text('prompt,target,note\n\nThe sky is,blue,"line one\nline two"\n\n"Snow\nis",,\n', encoding="utf-8")
    with pytest.raises(EditInputError, match="csv line 6:"):  # the reader has read to line 7
        read_facts(path)


@pytest.mark.parametrize("name, content", [
    ("facts.jsonl", '{"prompt": "The sky is", "target": "blue", "answer": "green"}\n'),
    ("facts.csv", "prompt,target,answer\nThe sky is,blue,green\n"),
])
def test_read_refuses_different_answer_and_target(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(EditInputError, match="line 1|line 2") as info:
        read_facts(path)
    assert "answer" in str(info.value) and "target" in str(info.value) and name in str(info.value)


@pytest.mark.parametrize("name", ["facts.txt", "facts.json", "facts", "facts.jsonl.bak"])
def test_read_refuses_a_wrong_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_text('{"prompt": "The sky is", "target": "blue"}\n', encoding="utf-8")
    with pytest.raises(EditInputError, match="jsonl"):
        read_facts(path)


def test_read_refuses_a_missing_file_an_empty_file_and_a_folder(tmp_path):
    with pytest.raises(EditInputError, match="does not exist"):
        read_facts(tmp_path / "nothing.jsonl")
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(EditInputError, match="is a folder"):
        read_facts(tmp_path / "folder.csv")
    for name in ("empty.jsonl", "empty.csv"):
        (tmp_path / name).write_text("", encoding="utf-8")
        with pytest.raises(EditInputError, match="no facts"):
            read_facts(tmp_path / name)


def test_read_refuses_non_utf8_and_bad_metadata(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("prompt,target\nCaf\xe9 is,open\n".encode("latin-1"))
    with pytest.raises(EditInputError, match="UTF-8"):
        read_facts(path)
    path = tmp_path / "facts.jsonl"
    path.write_text(json.dumps({"prompt": "The sky is", "target": "blue", "metadata": [1]}) + "\n", encoding="utf-8")
    with pytest.raises(EditInputError, match="line 1.*metadata"):
        read_facts(path)


# -- 5. find_edits / get_edit ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def searchable() -> MemoirModel:
    memoir = make_memoir()
    memoir.edit("The Capital of France is", "Paris", metadata={"source": "atlas", "tags": ["geo"]})
    memoir.edit("My cat is called", "Tom", metadata={"source": "user"})
    memoir.edit("The best city is", "paris", metadata={"source": "user", "n": 2})
    # a hopeless optimiser setting gives an unsuccessful edit
    memoir.memoir_config.max_steps, memoir.memoir_config.learning_rate = 1, 1e-6
    memoir.edit("The dog chased the", "mailman", metadata={"source": "user"})
    memoir.memoir_config.max_steps, memoir.memoir_config.learning_rate = 30, 1.0
    return memoir


def ids(records) -> list[int]:
    return [r.edit_id for r in records]


def test_find_edits_by_text(searchable):
    assert ids(searchable.find_edits()) == [0, 1, 2, 3]
    assert ids(searchable.find_edits("PARIS")) == [0, 2]  # the target, either case
    assert ids(searchable.find_edits("capital of")) == [0]  # the prompt
    assert ids(searchable.find_edits("cAt")) == [1]
    assert ids(searchable.find_edits("the")) == [0, 2, 3]
    assert ids(searchable.find_edits("is called Tom")) == []  # the prompt and target are searched apart
    assert searchable.find_edits("nowhere") == []
    assert ids(searchable.find_edits("")) == [0, 1, 2, 3]


def test_find_edits_by_metadata_and_success(searchable):
    assert [r.success for r in searchable.edits][3] is False
    succeeded = [r.edit_id for r in searchable.edits if r.success]
    assert ids(searchable.find_edits(metadata={"source": "user"})) == [1, 2, 3]
    assert ids(searchable.find_edits(metadata={"source": "user", "n": 2})) == [2]
    assert ids(searchable.find_edits(metadata={"tags": ["geo"]})) == [0]
    assert searchable.find_edits(metadata={"source": "user", "n": 3}) == []
    assert searchable.find_edits(metadata={"missing": None}) == []
    assert ids(searchable.find_edits(metadata={})) == [0, 1, 2, 3]
    assert ids(searchable.find_edits(success=False)) == [r.edit_id for r in searchable.edits if not r.success]
    assert ids(searchable.find_edits(success=True)) == succeeded
    assert ids(searchable.find_edits("the", metadata={"source": "user"}, success=False)) == [3]
    assert ids(searchable.find_edits("paris", metadata={"source": "user"})) == [2]


@pytest.mark.parametrize("kwargs", [
    {"text": 3}, {"text": ["paris"]}, {"metadata": "source"}, {"metadata": [("source", "user")]},
    {"success": 1}, {"success": "yes"},
])
def test_find_edits_refuses_bad_arguments(searchable, kwargs):
    with pytest.raises(MemoirError):
        searchable.find_edits(**kwargs)


def test_get_edit(searchable):
    record = searchable.get_edit(2)
    assert (record.edit_id, record.prompt, record.target) == (2, "The best city is", "paris")
    assert record.metadata == {"source": "user", "n": 2}
    assert record == searchable.edits[2]
    for bad in (99, -1, 4):
        with pytest.raises(MemoirError, match="no stored edit"):
            searchable.get_edit(bad)
    for bad in ("2", 2.0, True, None):
        with pytest.raises(MemoirError, match="ints"):
            searchable.get_edit(bad)


def test_returned_records_are_copies(searchable):
    before = [r.to_dict() for r in searchable.store.records]
    record = searchable.get_edit(0)
    record.prompt, record.target = "changed", "changed"
    record.metadata["source"] = "changed"
    record.metadata["tags"].append("changed")
    found = searchable.find_edits("paris")
    found[0].metadata.clear()
    found[1].success = not found[1].success
    found.clear()
    assert [r.to_dict() for r in searchable.store.records] == before
    assert searchable.get_edit(0).metadata == {"source": "atlas", "tags": ["geo"]}


# -- 6. remove_edit -------------------------------------------------------------------------------


def three_edits(**overrides) -> tuple[MemoirModel, list[torch.Tensor]]:
    """CAT, BOB, ALICE as edits 0, 1, 2, and W_m before each edit and after the last."""
    memoir = make_memoir(**overrides)
    weights = [memory(memoir)]
    for fact in (CAT, BOB, ALICE):
        memoir.edit(*fact)
        weights.append(memory(memoir))
    for a, b in ((0, 1), (0, 2), (1, 2)):  # distinct facts, distinct masks
        assert overlap(memoir, a, b) < memoir.memoir_config.threshold
    return memoir, weights


def test_deltas_sum_to_the_memory():
    memoir, weights = three_edits()
    assert sorted(memoir.store.deltas) == [0, 1, 2]
    for edit_id, delta in memoir.store.deltas.items():
        mask = memoir.store.index.mask(memoir.store.position_of(edit_id))
        assert delta.columns.tolist() == np.flatnonzero(mask).tolist()  # exactly the edit's columns
        assert delta.values.shape == (memoir.target.d_model, memoir.target.top_k)
        assert delta.columns.device.type == delta.values.device.type == "cpu"
    torch.testing.assert_close(summed_deltas(memoir), weights[-1], atol=1e-6, rtol=0)
    for edit_id in range(3):  # each delta is what its edit changed in W_m
        torch.testing.assert_close(full_delta(memoir, edit_id), weights[edit_id + 1] - weights[edit_id],
                                   atol=1e-6, rtol=0)


def test_removing_the_last_edit_restores_the_memory_exactly():
    memoir, weights = three_edits()
    record = memoir.remove_edit(2)
    assert (record.edit_id, record.prompt, record.target) == (2, *ALICE)
    torch.testing.assert_close(memory(memoir), weights[2], atol=1e-6, rtol=0)
    memoir.remove_edit(1)
    torch.testing.assert_close(memory(memoir), weights[1], atol=1e-6, rtol=0)
    memoir.remove_edit(0)
    torch.testing.assert_close(memory(memoir), torch.zeros_like(weights[0]), atol=1e-6, rtol=0)
    assert len(memoir.store) == 0 and len(memoir.store.index) == 0 and memoir.store.deltas == {}
    assert [r.edit_id for r in memoir.removed_edits] == [2, 1, 0]
    assert route(memoir, CAT[0]).edit_id is None
    assert memoir.edit(*CAT).edit_id == 3  # ids are never reused


def test_removing_a_middle_edit():
    memoir, weights = three_edits()
    record = memoir.remove_edit(1)
    assert (record.edit_id, record.prompt, record.target) == (1, *BOB)
    assert [e.edit_id for e in memoir.edits] == [0, 2]
    assert len(memoir.store.index) == 2 and sorted(memoir.store.deltas) == [0, 2]
    # W_m holds exactly what CAT and ALICE added
    torch.testing.assert_close(memory(memoir), summed_deltas(memoir), atol=1e-6, rtol=0)
    assert not torch.allclose(memory(memoir), weights[-1])
    # nothing routes to BOB any more: its prompt reads no edit and gets the base model
    decision = route(memoir, BOB[0])
    assert decision.edit_id != 1 and decision.nearest_edit_id != 1
    assert decision.edit_id is None
    with memoir.disable_memory():
        base = logits(memoir, BOB[0])
    assert torch.equal(logits(memoir, BOB[0]), base)
    # CAT and ALICE still route to themselves (ALICE's mask moved up a position)
    for edit_id, (prompt, _) in ((0, CAT), (2, ALICE)):
        decision = route(memoir, prompt)
        assert decision.edit_id == edit_id and decision.overlap == 1.0
    assert [r.edit_id for r in memoir.removed_edits] == [1]


def full_delta(memoir: MemoirModel, edit_id: int) -> torch.Tensor:
    """What one stored edit added, as a matrix of W_m's shape."""
    delta = memoir.store.deltas[edit_id]
    full = torch.zeros_like(memoir.layer.memory_weight)
    full[:, delta.columns] = delta.values.to(full.dtype)
    return full


def test_removing_an_unknown_id_changes_nothing():
    memoir, _ = three_edits()
    memoir.remove_edit(1)
    before = snapshot(memoir)
    for bad in (1, 3, 99, -1):
        with pytest.raises(MemoirError, match="no stored edit"):
            memoir.remove_edit(bad)
    for bad in ("0", 0.0, True, None):
        with pytest.raises(MemoirError, match="ints"):
            memoir.remove_edit(bad)
    assert_unchanged(memoir, before)


def test_edits_without_deltas_are_removed_from_routing_only():
    memoir, weights = three_edits(keep_edit_deltas=False)
    assert memoir.store.deltas == {}
    before = snapshot(memoir)
    with pytest.raises(MemoirError, match="routing_only=True"):
        memoir.remove_edit(1)
    assert_unchanged(memoir, before)
    record = memoir.remove_edit(1, routing_only=True)
    assert record.edit_id == 1
    assert torch.equal(memory(memoir), weights[-1])  # W_m untouched
    assert [e.edit_id for e in memoir.edits] == [0, 2]
    assert [r.edit_id for r in memoir.removed_edits] == [1]
    assert route(memoir, BOB[0]).edit_id != 1
    assert route(memoir, ALICE[0]).edit_id == 2 and route(memoir, CAT[0]).edit_id == 0


def test_routing_only_removal_keeps_the_memory_even_with_a_delta():
    memoir, weights = three_edits()
    memoir.remove_edit(2, routing_only=True)
    assert torch.equal(memory(memoir), weights[-1])
    assert sorted(memoir.store.deltas) == [0, 1]
    assert route(memoir, ALICE[0]).edit_id is None


def test_removed_records_and_edit_copies():
    memoir, _ = three_edits()
    memoir.edit("Another fact is", "here", metadata={"k": [1]})
    removed = memoir.remove_edit(3)
    assert removed.metadata == {"k": [1]}
    removed.metadata["k"].append(2)
    listed = memoir.removed_edits
    listed[0].metadata["k"].append(3)
    listed.clear()
    assert memoir.removed_edits[0].metadata == {"k": [1]}
    with pytest.raises(MemoirError, match="no stored edit"):
        memoir.get_edit(3)
    assert memoir.find_edits("Another") == []


def test_remove_edit_after_save_and_load(tmp_path):
    memoir, weights = three_edits()
    first = full_delta(memoir, 0)
    memoir.remove_edit(0)
    folder = tmp_path / "ckpt"
    memoir.save_pretrained(folder)
    assert (folder / DELTAS_FILE).is_file()
    manifest = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    assert [r["edit_id"] for r in manifest["removed_edits"]] == [0]
    loaded = MemoirModel.from_pretrained(make_tiny_model("llama"), folder, make_byte_tokenizer())
    assert sorted(loaded.store.deltas) == [1, 2]
    for edit_id, delta in memoir.store.deltas.items():
        assert torch.equal(loaded.store.deltas[edit_id].columns, delta.columns)
        assert torch.equal(loaded.store.deltas[edit_id].values, delta.values)
    assert [r.to_dict() for r in loaded.removed_edits] == [r.to_dict() for r in memoir.removed_edits]
    assert torch.equal(memory(loaded), memory(memoir))
    # removing the last edit after reloading is still exact
    loaded.remove_edit(2)
    torch.testing.assert_close(memory(loaded), weights[2] - first, atol=1e-6, rtol=0)
    torch.testing.assert_close(memory(loaded), summed_deltas(loaded), atol=1e-6, rtol=0)
    assert [r.edit_id for r in loaded.removed_edits] == [0, 2]
    assert loaded.edit("Another fact is", "here").edit_id == 3
    # and the removal itself survives another round trip
    loaded.save_pretrained(folder)
    again = MemoirModel.from_pretrained(make_tiny_model("llama"), folder, make_byte_tokenizer())
    assert [r.edit_id for r in again.removed_edits] == [0, 2]
    assert [e.edit_id for e in again.edits] == [1, 3]


@pytest.fixture
def saved_folder(tmp_path):
    memoir, weights = three_edits()
    folder = tmp_path / "ckpt"
    memoir.save_pretrained(folder)
    return folder, memoir, weights


def is_unpatched(model: nn.Module) -> bool:
    return not any(isinstance(m, memoir_hf.memory.layer.MemoirLayer) for m in model.modules())


def test_a_checkpoint_without_deltas_loads_and_removes_from_routing_only(saved_folder):
    folder, memoir, weights = saved_folder
    (folder / DELTAS_FILE).unlink()
    with pytest.warns(UserWarning, match="3 stored edits load without their W_m deltas"):
        loaded = MemoirModel.from_pretrained(make_tiny_model("llama"), folder, make_byte_tokenizer())
    assert loaded.store.deltas == {} and [e.edit_id for e in loaded.edits] == [0, 1, 2]
    assert torch.equal(memory(loaded), weights[-1])
    assert route(loaded, BOB[0]).edit_id == 1
    before = snapshot(loaded)
    with pytest.raises(MemoirError, match="routing_only=True"):
        loaded.remove_edit(1)
    assert_unchanged(loaded, before)
    loaded.remove_edit(1, routing_only=True)
    assert torch.equal(memory(loaded), weights[-1])
    assert route(loaded, BOB[0]).edit_id != 1 and [r.edit_id for r in loaded.removed_edits] == [1]
    # a new edit keeps its delta and is removable exactly
    before_new = memory(loaded)
    new_id = loaded.edit("Another fact is", "here").edit_id
    assert new_id == 3 and sorted(loaded.store.deltas) == [3]
    loaded.remove_edit(new_id)
    torch.testing.assert_close(memory(loaded), before_new, atol=1e-6, rtol=0)


def rewrite_deltas(folder, change) -> None:
    tensors = load_file(folder / DELTAS_FILE)
    change(tensors)
    save_file(tensors, folder / DELTAS_FILE, metadata={"format_version": "1"})


def narrower(tensors: dict) -> None:
    tensors["1.values"] = tensors["1.values"][:, :-1].contiguous()


def wider_model(tensors: dict) -> None:
    tensors["1.values"] = torch.cat([tensors["1.values"], tensors["1.values"][:1]]).contiguous()


def unknown_edit(tensors: dict) -> None:
    tensors["99.columns"], tensors["99.values"] = tensors["1.columns"].clone(), tensors["1.values"].clone()


def only_columns(tensors: dict) -> None:
    del tensors["1.values"]


def column_out_of_range(tensors: dict) -> None:
    tensors["1.columns"] = tensors["1.columns"].clone()
    tensors["1.columns"][-1] = 10_000


def float_columns(tensors: dict) -> None:
    tensors["1.columns"] = tensors["1.columns"].float()


def unknown_part(tensors: dict) -> None:
    tensors["1.bias"] = torch.zeros(3)


def not_an_id(tensors: dict) -> None:
    tensors["cat.columns"] = tensors["1.columns"].clone()


@pytest.mark.parametrize("change", [narrower, wider_model, unknown_edit, only_columns, column_out_of_range,
                                    float_columns, unknown_part, not_an_id])
def test_a_corrupt_deltas_file_is_refused(saved_folder, change):
    folder, _, _ = saved_folder
    rewrite_deltas(folder, change)
    model = make_tiny_model("llama")
    with pytest.raises(CheckpointError, match=DELTAS_FILE):
        MemoirModel.from_pretrained(model, folder, make_byte_tokenizer())
    assert is_unpatched(model)


def test_a_delta_of_a_removed_edit_is_refused(saved_folder):
    folder, memoir, _ = saved_folder
    deltas = load_file(folder / DELTAS_FILE)
    memoir.remove_edit(2)
    memoir.save_pretrained(folder)
    assert sorted(load_file(folder / DELTAS_FILE)) == ["0.columns", "0.values", "1.columns", "1.values"]
    save_file(deltas, folder / DELTAS_FILE)  # the older file still holds edit 2's delta
    with pytest.raises(CheckpointError, match=f"{DELTAS_FILE} does not match its checksum"):
        MemoirModel.from_pretrained(make_tiny_model("llama"), folder, make_byte_tokenizer())
    written_before_file_checksums(folder)
    with pytest.raises(CheckpointError, match="names no stored edit"):
        MemoirModel.from_pretrained(make_tiny_model("llama"), folder, make_byte_tokenizer())


def test_a_truncated_deltas_file_is_refused(saved_folder):
    folder, _, _ = saved_folder
    data = (folder / DELTAS_FILE).read_bytes()
    (folder / DELTAS_FILE).write_bytes(data[: len(data) // 2])
    written_before_file_checksums(folder)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        MemoirModel.from_pretrained(make_tiny_model("llama"), folder, make_byte_tokenizer())


def test_a_corrupt_removed_edit_record_is_refused(saved_folder):
    folder, memoir, _ = saved_folder
    memoir.remove_edit(0)
    memoir.save_pretrained(folder)
    manifest = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    del manifest["removed_edits"][0]["target"]
    (folder / CONFIG_FILE).write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(CheckpointError, match="removed_edits"):
        MemoirModel.from_pretrained(make_tiny_model("llama"), folder, make_byte_tokenizer())


def test_a_checkpoint_without_removed_edits_in_its_manifest_loads(saved_folder):
    folder, _, _ = saved_folder
    manifest = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    assert manifest.pop("removed_edits") == []
    (folder / CONFIG_FILE).write_text(json.dumps(manifest), encoding="utf-8")
    loaded = MemoirModel.from_pretrained(make_tiny_model("llama"), folder, make_byte_tokenizer())
    assert loaded.removed_edits == [] and len(loaded.edits) == 3


@pytest.mark.parametrize("value", [5, None])
def test_a_removed_edits_entry_that_is_not_a_list_is_refused(saved_folder, value):
    folder, _, _ = saved_folder
    manifest = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    manifest["removed_edits"] = value
    (folder / CONFIG_FILE).write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(CheckpointError, match="removed_edits"):
        MemoirModel.from_pretrained(make_tiny_model("llama"), folder, make_byte_tokenizer())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_removing_the_last_edit_restores_the_memory_to_float32_rounding_of_its_change(dtype):
    memoir = memoir_hf.patch(make_tiny_model("llama").to(dtype), fast_config(), tokenizer=make_byte_tokenizer())
    memoir.edit(*CAT)
    memoir.edit(*BOB)
    before = memory(memoir).clone()
    memoir.edit(*ALICE)
    change = (memory(memoir).float() - before.float()).abs()
    assert change.max() > 0 and memoir.store.deltas[2].values.dtype == torch.float32
    memoir.remove_edit(2)
    restored = memory(memoir)
    assert restored.dtype == dtype
    assert bool(((restored.float() - before.float()).abs() <= (change + before.float().abs()) * 2.0 ** -23).all())
    if dtype != torch.float32:  # half weights not far smaller than the change fit float32 beside it exactly
        exact = (before.float().abs() >= change * 2.0 ** -13) | (before == 0)
        assert exact.float().mean() > 0.9 and torch.equal(restored[exact], before[exact])


# -- 7. consolidate -------------------------------------------------------------------------------


def test_consolidate_merges_a_duplicate():
    memoir = make_memoir()
    memoir.edit(*BOB)
    before_both = memory(memoir)
    first = memoir.edit(*CAT, metadata={"try": 1})
    second = memoir.edit(CAT[0], CAT[1].upper() + ".", metadata={"try": 2})  # the same answer, normalised
    assert overlap(memoir, first.edit_id, second.edit_id) == 1.0
    before = memory(memoir)
    report = memoir.consolidate()
    assert report.min_overlap == 0.9 and len(report.groups) == 1
    group = report.groups[0]
    assert group.kind == "duplicate" and report.duplicates == [group] and report.conflicts == []
    assert group.edit_ids == [first.edit_id, second.edit_id] and group.targets == [CAT[1], "MAT."]
    assert group.kept == second.edit_id and group.merged == [first.edit_id] and report.merged == [first.edit_id]
    assert torch.equal(memory(memoir), before)  # W_m is unchanged
    assert [e.edit_id for e in memoir.edits] == [0, second.edit_id]
    assert [r.edit_id for r in memoir.removed_edits] == [first.edit_id]
    kept = memoir.get_edit(second.edit_id)
    assert kept.metadata == {"try": 2, MERGED_KEY: [first.edit_id]}
    assert sorted(memoir.store.deltas) == [0, second.edit_id]
    torch.testing.assert_close(memory(memoir), summed_deltas(memoir), atol=1e-6, rtol=0)
    assert route(memoir, CAT[0]).edit_id == second.edit_id
    # consolidating again finds nothing more to do
    again = memoir.consolidate()
    assert again.groups == [] and torch.equal(memory(memoir), before)
    # removing the kept edit takes both out
    memoir.remove_edit(second.edit_id)
    torch.testing.assert_close(memory(memoir), before_both, atol=1e-6, rtol=0)
    assert route(memoir, CAT[0]).edit_id is None
    assert [r.edit_id for r in memoir.removed_edits] == [first.edit_id, second.edit_id]


def test_consolidate_merges_three_edits_of_one_prompt():
    memoir = make_memoir()
    results = [memoir.edit(*CAT) for _ in range(3)]
    memoir.edit(*BOB)
    report = memoir.consolidate()
    assert [g.edit_ids for g in report.groups] == [[0, 1, 2]]
    assert report.merged == [0, 1] and report.groups[0].kept == results[-1].edit_id == 2
    assert memoir.get_edit(2).metadata == {MERGED_KEY: [0, 1]}
    assert [e.edit_id for e in memoir.edits] == [2, 3]
    memoir.remove_edit(3)
    memoir.remove_edit(2)
    torch.testing.assert_close(memory(memoir), torch.zeros_like(memory(memoir)), atol=1e-6, rtol=0)


def test_consolidate_can_only_report():
    memoir = make_memoir()
    memoir.edit(*CAT)
    memoir.edit(*CAT)
    before = snapshot(memoir)
    report = memoir.consolidate(merge_duplicates=False)
    assert [(g.kind, g.edit_ids, g.merged) for g in report.groups] == [("duplicate", [0, 1], [])]
    assert report.merged == []
    assert_unchanged(memoir, before)


def test_consolidate_of_edits_without_deltas_keeps_the_memory():
    memoir = make_memoir(keep_edit_deltas=False)
    memoir.edit(*CAT)
    memoir.edit(*CAT)
    before = memory(memoir)
    assert memoir.consolidate().merged == [0]
    assert torch.equal(memory(memoir), before) and memoir.store.deltas == {}
    with pytest.raises(MemoirError, match="routing_only=True"):
        memoir.remove_edit(1)


def test_an_edit_merged_with_one_without_delta_can_only_leave_routing_and_says_why():
    memoir = make_memoir(keep_edit_deltas=False)
    memoir.edit(*CAT)
    memoir.memoir_config.keep_edit_deltas = True
    memoir.edit(*CAT)
    assert sorted(memoir.store.deltas) == [1]
    before = memory(memoir)
    assert memoir.consolidate().merged == [0]
    assert memoir.store.deltas == {}  # what edit 0 added is unknown, so the sum of the two is too
    with pytest.raises(MemoirError, match="merged with an edit that was"):
        memoir.remove_edit(1)
    memoir.remove_edit(1, routing_only=True)
    assert torch.equal(memory(memoir), before) and len(memoir.store) == 0


def test_a_later_edit_of_the_same_prompt_wins_and_conflicts_are_reported():
    memoir = make_memoir()
    memoir.edit(*BOB)
    old = memoir.edit(CAT[0], "sofa")
    if old.success:
        assert memoir.ask(CAT[0], max_new_tokens=len(" sofa")).text == "sofa"
    new = memoir.edit(CAT[0], "mat")
    decision = route(memoir, CAT[0])
    assert decision.edit_id == new.edit_id and decision.overlap == 1.0
    if new.success:
        assert memoir.ask(CAT[0], max_new_tokens=len(" mat")).text == "mat"
    before = snapshot(memoir)
    report = memoir.consolidate()
    assert len(report.groups) == 1 and report.duplicates == []
    group = report.conflicts[0]
    assert group.kind == "conflict" and group.edit_ids == [old.edit_id, new.edit_id]
    assert group.targets == ["sofa", "mat"] and group.kept == new.edit_id and group.merged == []
    assert_unchanged(memoir, before)  # nothing merged by default

    resolved = memoir.consolidate(resolve_conflicts=True)
    assert resolved.merged == [old.edit_id] and resolved.conflicts[0].merged == [old.edit_id]
    assert torch.equal(memory(memoir), before[0])
    assert [e.edit_id for e in memoir.edits] == [0, new.edit_id]
    assert memoir.get_edit(new.edit_id).metadata == {MERGED_KEY: [old.edit_id]}
    assert route(memoir, CAT[0]).edit_id == new.edit_id
    memoir.remove_edit(new.edit_id)
    torch.testing.assert_close(memory(memoir), summed_deltas(memoir), atol=1e-6, rtol=0)
    torch.testing.assert_close(memory(memoir), full_delta(memoir, 0), atol=1e-6, rtol=0)


def test_distinct_prompts_form_no_group():
    memoir, _ = three_edits()
    overlaps = [overlap(memoir, a, b) for a, b in ((0, 1), (0, 2), (1, 2))]
    assert max(overlaps) < 0.9
    before = snapshot(memoir)
    report = memoir.consolidate(0.9, resolve_conflicts=True)
    assert report.groups == [] and report.merged == []
    assert_unchanged(memoir, before)
    # at a threshold below their overlap, the pair above it is grouped (a conflict: different targets)
    a, b = max(((0, 1), (0, 2), (1, 2)), key=lambda pair: overlap(memoir, *pair))
    low = memoir.consolidate(overlap(memoir, a, b))
    assert [a, b] in [g.edit_ids for g in low.groups] and all(g.kind == "conflict" for g in low.groups)
    assert_unchanged(memoir, before)


def test_consolidate_of_an_empty_memory():
    memoir = make_memoir()
    report = memoir.consolidate()
    assert report.groups == [] and report.merged == []


@pytest.mark.parametrize("min_overlap", [0, 0.0, -0.5, 1.0001, 2, float("nan"), float("inf"), "0.9", None, True])
def test_consolidate_refuses_a_bad_min_overlap(min_overlap):
    memoir = make_memoir()
    memoir.edit(*CAT)
    memoir.edit(*CAT)
    before = snapshot(memoir)
    with pytest.raises(MemoirError, match="min_overlap"):
        memoir.consolidate(min_overlap)
    assert_unchanged(memoir, before)


@pytest.mark.parametrize("min_overlap", [1, 1.0, 1e-9])
def test_consolidate_accepts_the_ends_of_the_range(min_overlap):
    memoir = make_memoir()
    memoir.edit(*CAT)
    memoir.edit(*CAT)
    memoir.edit(*BOB)
    groups = memoir.consolidate(min_overlap, merge_duplicates=False).groups
    if min_overlap == 1e-9:  # any shared column groups them: all three together
        assert [g.edit_ids for g in groups] == [[0, 1, 2]] and groups[0].kind == "conflict"
    else:
        assert [g.edit_ids for g in groups] == [[0, 1]]


# -- 8. learn_from after removal ------------------------------------------------------------------


def test_learn_from_does_not_reapply_removed_feedback(tmp_path):
    memoir = make_memoir()
    log = FeedbackLog(tmp_path / "feedback.jsonl")
    cat = log.add(*CAT)
    bob = log.add(*BOB)
    report = memoir.learn_from(log, progress=False)
    produced = {**report.applied, **report.failed}
    assert set(produced) == {cat.feedback_id, bob.feedback_id}
    memoir.remove_edit(produced[cat.feedback_id])
    before = snapshot(memoir)
    again = memoir.learn_from(log, progress=False)
    assert again.applied == {} and again.failed == {}
    assert sorted(again.already_applied) == sorted([cat.feedback_id, bob.feedback_id])
    assert_unchanged(memoir, before)
    # nor after saving and loading
    memoir.save_pretrained(tmp_path / "ckpt")
    loaded = MemoirModel.from_pretrained(make_tiny_model("llama"), tmp_path / "ckpt", make_byte_tokenizer())
    reloaded = loaded.learn_from(log, progress=False)
    assert reloaded.applied == {} and reloaded.failed == {} and len(loaded.edits) == 1
    # new feedback on the same prompt is applied
    newer = log.add(CAT[0], "rug")
    third = memoir.learn_from(log, progress=False)
    assert set(third.applied) | set(third.failed) == {newer.feedback_id}
    assert [e.target for e in memoir.edits] == [BOB[1], "rug"]


def test_learn_from_does_not_reapply_merged_feedback(tmp_path):
    memoir = make_memoir()
    log = FeedbackLog(tmp_path / "feedback.jsonl")
    first = log.add(*CAT)
    second = log.add(*CAT)
    memoir.learn_from(log, progress=False)
    assert memoir.consolidate().merged == [0]
    again = memoir.learn_from(log, progress=False)
    assert again.applied == {} and again.failed == {}
    assert sorted(again.already_applied) == sorted([first.feedback_id, second.feedback_id])
    assert len(memoir.edits) == 1


def test_merged_ids_carry_over_when_a_kept_edit_is_merged_again():
    memoir = make_memoir()
    memoir.edit(*CAT)
    memoir.edit(*CAT)
    assert memoir.consolidate().merged == [0]
    memoir.edit(*CAT)
    assert memoir.consolidate().merged == [1]
    assert memoir.get_edit(2).metadata["merged_edit_ids"] == [0, 1]
    assert [e.edit_id for e in memoir.removed_edits] == [0, 1]
    memoir.remove_edit(2)  # the kept delta holds all three: the memory is empty again (up to summation order)
    assert torch.allclose(memory(memoir), torch.zeros_like(memory(memoir)), atol=1e-6)


@pytest.mark.parametrize("argument, message", [(None, "path of a .jsonl or .csv file"), (5, "path of a .jsonl"),
                                               ("What is the capital of France?", "edit\\(prompt, target\\)")])
def test_read_facts_says_what_it_takes(argument, message):
    with pytest.raises(MemoirError, match=message):
        memoir_hf.read_facts(argument)

"""The memoir-hf commands that work on a checkpoint folder: edit, ask, list, remove, correct, info.

They run on a tiny Llama saved to a folder (loaded by path, as a Hub model would be), with fast settings.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import yaml
from tiny_models import make_byte_tokenizer, make_tiny_model

from memoir_hf import EditResult, MemoirModel
from memoir_hf.cli import main
from memoir_hf.feedback import correction
from memoir_hf.persistence.checkpoint import read_checkpoint

FAST = {"threshold": 0.9, "prefix_starts": ["I"], "prefix_lengths": [3], "max_steps": 30, "learning_rate": 3.0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama").save_pretrained(folder)
    make_byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "fast.yaml"
    path.write_text(yaml.safe_dump(FAST), encoding="utf-8")
    return path


@pytest.fixture
def checkpoint(tmp_path, model_dir, config_file, capsys):
    """A checkpoint with two edits, made through the CLI."""
    folder = tmp_path / "ckpt"
    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"prompt": "Water boils at", "target": "ninety degrees", "source": "test"}\n'
                     '{"prompt": "The moon is made of", "target": "cheese"}\n', encoding="utf-8")
    assert main(["edit", str(folder), "--model", str(model_dir), "--file", str(facts), "--config",
                 str(config_file), "--threads", "1"]) == 0
    capsys.readouterr()
    return folder


def folder_digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_edit_creates_a_checkpoint_that_records_its_base_model(checkpoint, model_dir):
    saved = read_checkpoint(checkpoint)
    assert [(r.prompt, r.target) for r in saved.records] == [("Water boils at", "ninety degrees"),
                                                               ("The moon is made of", "cheese")]
    assert saved.records[0].metadata == {"source": "test"}
    assert saved.manifest["base_model"] == str(model_dir)
    assert saved.config.learning_rate == 3.0 and set(saved.deltas) == {0, 1}


def test_a_relative_model_folder_is_recorded_so_the_checkpoint_works_from_anywhere(tmp_path, model_dir,
                                                                                   config_file, monkeypatch):
    monkeypatch.chdir(model_dir.parent)
    assert main(["edit", str(tmp_path / "ckpt"), "--model", model_dir.name, "--prompt", "Grass is", "--target",
                 "blue", "--config", str(config_file), "--threads", "1"]) == 0
    assert read_checkpoint(tmp_path / "ckpt").manifest["base_model"] == str(model_dir)
    monkeypatch.chdir(tmp_path)
    assert main(["edit", "ckpt", "--prompt", "Snow is", "--target", "green", "--threads", "1"]) == 0
    assert len(read_checkpoint(tmp_path / "ckpt").records) == 2


def test_edit_appends_to_an_existing_checkpoint_without_model_or_config(checkpoint, capsys):
    assert main(["edit", str(checkpoint), "--prompt", "Grass is", "--target", "blue", "--metadata",
                 '{"by": "cli"}']) == 0
    out = capsys.readouterr().out
    assert "edit 2" in out and "3 stored" in out
    saved = read_checkpoint(checkpoint)
    assert saved.records[-1].metadata == {"by": "cli"} and len(saved.records) == 3


def test_a_fact_that_could_not_be_stored_is_not_counted_and_fails_the_command(checkpoint, monkeypatch, capsys,
                                                                                tmp_path):
    real_edit_many = MemoirModel.edit_many

    def second_fails(self, facts, **kwargs):
        error = EditResult(None, False, float("nan"), 1, 0.1, 0.0, None, error="values not finite")
        return real_edit_many(self, facts[:1], **kwargs) + [error] * (len(facts) - 1)

    monkeypatch.setattr(MemoirModel, "edit_many", second_fails)
    facts = tmp_path / "two.jsonl"
    facts.write_text('{"prompt": "Grass is", "target": "blue"}\n{"prompt": "Snow is", "target": "black"}\n',
                     encoding="utf-8")
    assert main(["edit", str(checkpoint), "--file", str(facts)]) == 1
    out = capsys.readouterr().out
    assert "NOT STORED: 'Snow is': values not finite" in out
    assert re.search(r"^1 edits written \([01] did not reach their target; 1 NOT STORED\); 3 stored", out, re.M)
    assert len(read_checkpoint(checkpoint).records) == 3


def test_edit_from_csv(tmp_path, model_dir, config_file, capsys):
    facts = tmp_path / "facts.csv"
    facts.write_text("prompt,target,topic\nThe sky is,green,colour\n", encoding="utf-8")
    folder = tmp_path / "ckpt"
    assert main(["edit", str(folder), "--model", str(model_dir), "--file", str(facts), "--config",
                 str(config_file)]) == 0
    assert read_checkpoint(folder).records[0].metadata == {"topic": "colour"}


def test_ask_shows_the_routed_edit_and_its_overlap(checkpoint, capsys):
    assert main(["ask", str(checkpoint), "--prompt", "The moon is made of", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "[read edit 1, overlap 1.000" in out and "'cheese'" in out


def test_ask_unrelated_prompt_reads_no_edit(checkpoint, capsys):
    assert main(["ask", str(checkpoint), "--prompt", "zq xv 0193 ##", "--max-new-tokens", "2"]) == 0
    assert "[no edit read: best overlap" in capsys.readouterr().out


def test_list_search_and_json(checkpoint, capsys):
    assert main(["list", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "The moon is made of" in out and "Water boils at" in out and "2 of 2 edits" in out
    assert main(["list", str(checkpoint), "--search", "BOILS", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["edit_id"] for r in records] == [0]


def test_remove_withdraws_and_saves(checkpoint, capsys):
    assert main(["remove", str(checkpoint), "1"]) == 0
    saved = read_checkpoint(checkpoint)
    assert [r.edit_id for r in saved.records] == [0] and [r.edit_id for r in saved.removed] == [1]
    assert main(["list", str(checkpoint), "--removed"]) == 0
    assert "The moon is made of" in capsys.readouterr().out
    assert main(["ask", str(checkpoint), "--prompt", "The moon is made of", "--max-new-tokens", "2"]) == 0
    assert "read edit 1" not in capsys.readouterr().out


def test_correct_skips_what_the_model_already_says(tmp_path, model_dir, config_file, capsys, monkeypatch):
    checkpoint = tmp_path / "one"
    assert main(["edit", str(checkpoint), "--model", str(model_dir), "--config", str(config_file),
                 "--prompt", "The moon is made of", "--target", "cheese"]) == 0
    assert read_checkpoint(checkpoint).records[0].success
    # The random tiny model babbles on ("cheesesese"), which the default word-boundary match rightly
    # rejects; here any answer that begins with the expected letters counts.
    monkeypatch.setattr(correction, "answers_match", lambda said, wanted: said.lower().startswith(wanted.lower()))
    before = folder_digest(checkpoint)
    assert main(["correct", str(checkpoint), "--prompt", "The moon is made of", "--answer", "Cheese"]) == 0
    assert "already_correct" in capsys.readouterr().out
    assert folder_digest(checkpoint) == before  # nothing edited, nothing saved
    assert main(["correct", str(checkpoint), "--prompt", "The moon is made of", "--answer", "rock"]) == 0
    out = capsys.readouterr().out
    assert "checked 1: 0 already correct" in out
    assert len(read_checkpoint(checkpoint).records) == 2


def test_info_needs_no_model(checkpoint, capsys):
    assert main(["info", str(checkpoint), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["edits"] == 2 and info["removable"] == 2 and info["removed"] == 0 and info["top_k"] > 0
    assert "memoir_deltas.safetensors" in info["files"]
    assert main(["info", str(checkpoint)]) == 0
    assert "module" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["edit", "ask", "list", "remove", "correct", "info", "eval"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "usage: memoir-hf " + command in capsys.readouterr().out


@pytest.mark.parametrize("argv_tail", [
    ["edit", "--prompt", "p"],                                   # prompt without target
    ["edit", "--prompt", "p", "--target", "t", "--file", "x.jsonl"],  # both
    ["edit"],                                                    # neither
    ["edit", "--prompt", "p", "--target", "t", "--metadata", "[1]"],
    ["edit", "--prompt", "p", "--target", "t", "--config", "fast.yaml"],  # config on an existing checkpoint
    ["remove", "1", "1"],
    ["ask", "--prompt", "p", "--max-new-tokens", "0"],
    ["correct", "--answer", "a"],
])
def test_usage_errors_exit_2_with_one_line(checkpoint, argv_tail, capsys):
    before = folder_digest(checkpoint)
    assert main([argv_tail[0], str(checkpoint), *argv_tail[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err
    assert folder_digest(checkpoint) == before


def test_new_checkpoint_without_model_is_a_usage_error(tmp_path, capsys):
    assert main(["edit", str(tmp_path / "new"), "--prompt", "p", "--target", "t"]) == 2
    assert "--model" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("argv_tail", [
    ["remove", "7"],                            # unknown id
    ["remove", "0", "7"],                       # one unknown id: nothing removed
])
def test_failures_exit_1_and_leave_the_checkpoint_alone(checkpoint, argv_tail, capsys):
    before = folder_digest(checkpoint)
    assert main([argv_tail[0], str(checkpoint), *argv_tail[1:]]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "7" in err
    assert folder_digest(checkpoint) == before


@pytest.mark.parametrize("content, named", [
    ('{"prompt": "a", "target": "b"}\n{"prompt": "c"}\n', "line 2"),
    ('{"prompt": "a", "target": "b"}\nnot json\n', "line 2"),
    ("", "no facts"),
])
def test_bad_fact_file_edits_nothing(checkpoint, tmp_path, content, named, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content, encoding="utf-8")
    before = folder_digest(checkpoint)
    for command in ("edit", "correct"):
        assert main([command, str(checkpoint), "--file", str(bad)]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err
    assert folder_digest(checkpoint) == before


def test_a_command_interrupted_half_way_leaves_the_checkpoint_as_it_was(checkpoint, tmp_path, monkeypatch, capsys):
    facts = tmp_path / "more.jsonl"
    facts.write_text('{"prompt": "First new", "target": "one"}\n{"prompt": "Second new", "target": "two"}\n',
                     encoding="utf-8")
    before = folder_digest(checkpoint)
    real_write = MemoirModel._write
    calls = []

    def interrupted_write(self, fact, encoded):
        calls.append(fact.prompt)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(self, fact, encoded)

    monkeypatch.setattr(MemoirModel, "_write", interrupted_write)
    assert main(["edit", str(checkpoint), "--file", str(facts)]) == 130
    assert calls == ["First new", "Second new"]
    assert folder_digest(checkpoint) == before


@pytest.mark.parametrize("command", ["list", "info", "ask", "remove"])
def test_a_folder_without_a_checkpoint_is_a_one_line_failure(tmp_path, command, capsys):
    argv = [command, str(tmp_path)] + {"ask": ["--prompt", "p"], "remove": ["0"]}.get(command, [])
    assert main(argv) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_checkpoint_path_that_is_a_file_is_refused_before_loading_the_model(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert main(["edit", str(target), "--model", "no-such-model", "--prompt", "Grass is", "--target", "blue"]) == 2
    assert "is a file" in capsys.readouterr().err and target.read_text() == "mine"

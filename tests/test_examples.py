"""The examples run top to bottom on SmolLM2, offline: the notebook's code cells in order, the scripts as
a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).parent.parent / "examples"


def run_script(name: str, *args: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "MEMOIR_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_quickstart_changes_the_edited_answer_and_leaves_an_unrelated_one(tmp_path):
    """The README's first command: the edit is written, read back, and an unrelated question reads nothing."""
    output = run_script("quickstart.py", cwd=tmp_path)
    assert "success=True" in output
    blocks = {block.split("\n")[0]: block for block in output.split("\n\n")[1:]}
    edited, unrelated = blocks["The capital of Australia is"], blocks["The largest planet in the solar system is"]
    assert "after:  Melbourne" in edited and "routing: edit 0" in edited
    before, after = (line.split(":", 1)[1].strip() for line in unrelated.splitlines()[1:3])
    assert "routing: no edit" in unrelated and before == after


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    """Every code cell, in order, in one namespace, as Jupyter would; the cells assert what they show."""
    notebook = json.loads((EXAMPLES / "notebook.ipynb").read_text(encoding="utf-8"))
    cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert all(not cell["outputs"] for cell in cells), "commit the notebook without outputs"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    for number, cell in enumerate(cells):
        exec(compile("".join(cell["source"]), f"notebook cell {number}", "exec"), namespace)
    assert namespace["result"].success
    assert os.listdir(namespace["save_dir"])
    assert namespace["loaded"].edits == []  # the last cell withdrew the only edit


def test_batch_edit_from_csv(tmp_path):
    facts = tmp_path / "facts.csv"
    facts.write_text("prompt,target,topic\nThe capital of Australia is,Melbourne,geo\n", encoding="utf-8")
    out = run_script("batch_edit_from_csv.py", str(facts), "--out", "edits", cwd=tmp_path)
    assert "1/1 edits reached their target" in out and "Melbourne" in out
    records = (tmp_path / "edits" / "memoir_edits.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["metadata"] for line in records] == [{"topic": "geo"}]


def test_batch_edit_refuses_a_bad_row_before_loading_anything(tmp_path):
    facts = tmp_path / "facts.csv"
    facts.write_text("prompt,target\nGood prompt,fine\n,missing prompt\n", encoding="utf-8")
    done = subprocess.run([sys.executable, str(EXAMPLES / "batch_edit_from_csv.py"), str(facts), "--out", "edits"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "facts.csv line 3" in done.stderr
    assert not (tmp_path / "edits").exists()


def test_correct_from_feedback_applies_once(tmp_path):
    first = run_script("correct_from_feedback.py", "--workdir", "demo", cwd=tmp_path)
    assert "already applied: 0  below confidence: 1" in first and "'Melbourne" in first
    second = run_script("correct_from_feedback.py", "--workdir", "demo", cwd=tmp_path)
    assert "applied: {}" in second and "already applied: 1  below confidence: 1" in second
    assert "1 edits saved" in second

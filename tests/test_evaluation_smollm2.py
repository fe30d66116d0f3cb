"""The evaluation protocol end to end on SmolLM2: T=5 ZsRE edits, then one evaluation, MEMOIR and FT-L."""

from __future__ import annotations

import json

import pytest
from conftest import data_dir
from test_smollm2 import SMOLLM2_CONFIG

import memoir_hf
from memoir_hf.evaluation.harness import run

pytestmark = pytest.mark.slow

T = 5


def test_memoir_protocol_run_reports_and_resumes(smollm2, zsre_records, tmp_path):
    model, tokenizer = smollm2
    data = data_dir() / "ZsRE" / "zsre_mend_edit.json"
    config = memoir_hf.MemoirConfig(**SMOLLM2_CONFIG)
    # A first run stops after 3 edits (its checkpoint stays); the second resumes and finishes.
    run((model, tokenizer), data, edits=3, config=config, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=1,
        progress=False)
    report = run((model, tokenizer), data, edits=T, config=config, out=tmp_path / "report.json",
                 plot=tmp_path / "sweep.png", checkpoint_dir=tmp_path / "ckpt", progress=False)

    assert json.loads((tmp_path / "report.json").read_text())["metrics"] == report["metrics"]
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["edits"] == T and report["method"] == "memoir"
    assert report["metrics"]["rel"] >= 0.9
    assert report["metrics"]["loc"] >= 0.95
    assert report["unedited"]["rel"] < report["metrics"]["rel"]
    assert report["unedited"]["loc"] == 1.0
    assert report["calibration"]["negatives"] > 0 and 0 < report["threshold"] <= 1
    assert sum(report["routing"]["rel"].values()) == T and report["routing"]["rel"]["own_edit"] == T
    assert sum(report["routing"]["loc"].values()) == T
    # Every edit prompt reads its own edit, so the own-edit class holds all of Rel.
    assert report["accuracy_by_routing"]["rel"]["own_edit"] == pytest.approx(report["metrics"]["rel"])
    assert report["accuracy_by_routing"]["rel"]["no_edit"] is None
    assert len(report["sweep"]) > 10
    assert report["seconds_per_edit"] > 0 and report["peak_rss_mb"] > 0
    log = (tmp_path / "ckpt" / "memoir_edits.jsonl").read_text().splitlines()
    logged = [json.loads(line)["metadata"] for line in log]
    assert len(logged) == T
    assert all(m["seconds"] > 0 and 0 <= m["steps"] <= config.max_steps for m in logged)
    assert not any(isinstance(m, memoir_hf.memory.layer.MemoirLayer) for m in model.modules())


def test_fine_tuning_baseline_runs_in_the_same_harness(smollm2):
    model, tokenizer = smollm2
    data = data_dir() / "ZsRE" / "zsre_mend_edit.json"
    report = run((model, tokenizer), data, edits=2, method="ft-l",
                 config=memoir_hf.MemoirConfig(**SMOLLM2_CONFIG, max_steps=5), progress=False)
    assert report["memoir_config"]["top_k"] == 1536 and report["threshold"] == 0.0
    assert report["routing"] is None and report["accuracy_by_routing"] is None and report["sweep"] is None
    assert set(report["metrics"]) >= {"rel", "gen", "loc"}

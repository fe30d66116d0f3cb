"""SmolLM2 round trip: 20 ZsRE edits saved, then loaded onto a fresh base in a new process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_smollm2 import SMOLLM2_CONFIG

import memoir_hf

pytestmark = pytest.mark.slow

N_EDITS = 20

# Runs in a new process: the checkpoint must carry everything the answers depend on.
RELOAD = """
import json, sys, torch
from safetensors.torch import save_file
import memoir_hf
from memoir_hf.offline_models import load_builtin

folder, prompts_file, out_file = sys.argv[1:4]
prompts = json.load(open(prompts_file))
base, tokenizer = load_builtin("smollm2")
results = {}
for name, memoir in (("attached", memoir_hf.MemoirModel.from_pretrained(base, folder, tokenizer)),
                     ("loaded", memoir_hf.load(folder))):
    batch = memoir.tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        results[name] = memoir(**batch).logits
    results[name + "_routing"] = torch.tensor([-1 if d.edit_id is None else d.edit_id for d in memoir.routing])
new = memoir.edit("The official language of Wakanda is", "Latin")
results["new_id"] = torch.tensor([new.edit_id])
results["ids"] = torch.tensor([e.edit_id for e in memoir.edits])
save_file(results, out_file)
"""


def test_edits_survive_save_and_load_in_a_new_process(smollm2, zsre_records, tmp_path):
    model, tokenizer = smollm2
    records = zsre_records[:N_EDITS]
    prompts = [r["src"] for r in records] + [r["rephrase"] for r in records] + [r["loc"] for r in records]
    memoir = memoir_hf.patch(model, memoir_hf.MemoirConfig(**SMOLLM2_CONFIG), tokenizer=tokenizer)
    try:
        memoir.edit_many([{"prompt": r["src"], "target": r["alt"]} for r in records], progress=False)
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            expected = memoir(**batch).logits
        routing = [-1 if d.edit_id is None else d.edit_id for d in memoir.routing]
        memoir.save_pretrained(tmp_path / "state")
        memoir.save_pretrained(tmp_path / "ckpt", save_base=True)
    finally:
        memoir.unpatch()
    assert sum(r >= 0 for r in routing[:N_EDITS]) == N_EDITS
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [
        "memoir_config.json", "memoir_deltas.safetensors", "memoir_edits.jsonl", "memoir_index.faiss",
        "memoir_masks.safetensors", "memoir_memory.safetensors"]
    assert getattr(model, "hf_quantizer", None) is not None, "saving the base must leave its GGUF state in place"

    prompts_file, out_file = tmp_path / "prompts.json", tmp_path / "out.safetensors"
    prompts_file.write_text(json.dumps(prompts))
    environment = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "ckpt"), str(prompts_file), str(out_file)],
                   check=True, env=environment, timeout=900)
    reloaded = load_file(out_file)
    for name in ("attached", "loaded"):
        assert (reloaded[name] - expected).abs().max().item() == 0.0, name
        assert reloaded[name + "_routing"].tolist() == routing, name
    assert reloaded["new_id"].item() == N_EDITS
    assert reloaded["ids"].tolist() == list(range(N_EDITS + 1))


"""Behaviour tests of saving and loading memoir checkpoints, on tiny models built from config (no downloads)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import types
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fast_config, written_before_file_checksums
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import INTERMEDIATE_SIZE, make_byte_tokenizer, make_tiny_model
from torch import nn

import memoir_hf
from memoir_hf import CheckpointError, EditInputError, FingerprintMismatchError, MemoirError, MemoirModel
from memoir_hf.index.mask_index import unpack_masks
from memoir_hf.memory.layer import MemoirLayer
from memoir_hf.persistence import atomic, checkpoint

torch.set_num_threads(1)

TESTS_DIR = Path(__file__).resolve().parent
D_FF = INTERMEDIATE_SIZE
CONFIG_FILE = "memoir_config.json"
MEMORY_FILE = "memoir_memory.safetensors"
MASKS_FILE = "memoir_masks.safetensors"
INDEX_FILE = "memoir_index.faiss"
EDITS_FILE = "memoir_edits.jsonl"
DELTAS_FILE = "memoir_deltas.safetensors"
MEMOIR_FILES = {CONFIG_FILE, MEMORY_FILE, MASKS_FILE, INDEX_FILE, EDITS_FILE, DELTAS_FILE}
CHECKSUMMED_FILES = {MEMORY_FILE, EDITS_FILE, DELTAS_FILE}
RECORD_KEYS = {"edit_id", "prompt", "target", "metadata", "created", "success", "loss"}
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle"}

FACTS = [
    ("The capital of France is", "Rome"),
    ("My favourite colour is", "green"),
    ("The CEO of Apple is", "Bob"),
]
OTHER_FACTS = [
    ("The tallest mountain is", "Kilimanjaro"),
    ("Bob likes to eat", "figs"),
    ("The river in Paris is", "Thames"),
]
NEXT_FACT = ("Water boils at", "100 degrees")
PREFIX_OF_EDIT = "The capital of"
UNRELATED = "Quantum fields fluctuate wildly"
ROUND_TRIP_FAMILIES = ["llama", "gpt2", "gpt_neox", "opt", "gemma2", "falcon"]


# -- helpers --------------------------------------------------------------------------------------


def metadata_for(i: int) -> dict:
    return {"n": i, "source": "café ✓", "tags": ["a", {"b": None, "c": 1.5}]}


def make_memoir(model_type: str = "llama", *, seed: int = 0, facts=FACTS, use_faiss: bool | None = None,
                **overrides) -> MemoirModel:
    memoir = memoir_hf.patch(make_tiny_model(model_type, seed=seed), fast_config(**overrides),
                             tokenizer=make_byte_tokenizer(), use_faiss=use_faiss)
    for i, (prompt, target) in enumerate(facts):
        memoir.edit(prompt, target, metadata=metadata_for(i))
    return memoir


def attach(folder: Path, model_type: str = "llama", *, seed: int = 0, model: nn.Module | None = None,
           **kwargs) -> MemoirModel:
    model = make_tiny_model(model_type, seed=seed) if model is None else model
    return MemoirModel.from_pretrained(model, folder, tokenizer=make_byte_tokenizer(), **kwargs)


def probe_inputs() -> dict[str, torch.Tensor]:
    """The edit prompts, a prefix of one and unrelated text, right padded."""
    tok = make_byte_tokenizer()
    assert tok.padding_side == "right"
    inputs = tok([p for p, _ in FACTS] + [PREFIX_OF_EDIT, UNRELATED], return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any()  # some rows are padded
    return inputs


@torch.no_grad()
def run(memoir: MemoirModel, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list]:
    logits = memoir(**inputs).logits
    return logits, memoir.routing


def routed_ids(routing) -> list:
    return [decision.edit_id for decision in routing]


def is_unpatched(model: nn.Module) -> bool:
    return not any(isinstance(m, MemoirLayer) for m in model.modules()) and not model._forward_pre_hooks


def digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir() if path.is_file()}


def temporaries(parent: Path) -> list[str]:
    return [name for name in os.listdir(parent) if ".memoir-writing-" in name]


def check_sorted_keys(value) -> None:
    if isinstance(value, dict):
        assert list(value) == sorted(value), list(value)
        for item in value.values():
            check_sorted_keys(item)
    elif isinstance(value, list):
        for item in value:
            check_sorted_keys(item)


def assert_no_pickle(folder: Path) -> None:
    for path in folder.rglob("*"):
        assert path.suffix not in PICKLE_SUFFIXES, path
        if path.is_file() and path.stat().st_size:
            with open(path, "rb") as handle:
                assert handle.read(1) != b"\x80", f"{path} starts like a pickle"


def same_state(a: MemoirModel, b: MemoirModel) -> None:
    assert a.edits == b.edits
    assert torch.equal(a.layer.memory_weight, b.layer.memory_weight)
    assert torch.equal(a.layer.tophash.permutation, b.layer.tophash.permutation)
    assert torch.equal(a.layer.tophash.background, b.layer.tophash.background)
    assert torch.equal(a.layer.tophash.spread, b.layer.tophash.spread)
    assert a.prefixes == b.prefixes
    assert a.store.next_id == b.store.next_id


@dataclass
class Saved:
    memoir: MemoirModel
    path: Path
    logits: torch.Tensor
    routing: list


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Saved:
    """A llama memoir with 3 edits, saved once. Tests must not change it; copy the folder to corrupt it."""
    memoir = make_memoir()
    path = tmp_path_factory.mktemp("saved") / "ckpt"
    memoir.save_pretrained(path)
    logits, routing = run(memoir, probe_inputs())
    assert routed_ids(routing) == [0, 1, 2, None, None]
    return Saved(memoir, path, logits, routing)


@pytest.fixture
def copy_of(saved, tmp_path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(saved.path, folder)
    return folder


# -- 1. format ------------------------------------------------------------------------------------


def test_checkpoint_files_and_manifest(saved):
    memoir, folder = saved.memoir, saved.path
    assert set(os.listdir(folder)) == MEMOIR_FILES
    text = (folder / CONFIG_FILE).read_text(encoding="utf-8")
    manifest = json.loads(text)
    check_sorted_keys(manifest)
    assert manifest["format_version"] == 1
    assert manifest["library_version"] == memoir_hf.__version__
    # Settings newer than format 1 are left out at their default, so that readers of format 1 read the checkpoint.
    assert manifest["memoir_config"] == {name: value for name, value in memoir.memoir_config.to_dict().items()
                                         if name not in ("protect_earlier_edits", "unprotected_steps")}
    assert memoir_hf.MemoirConfig.from_dict(manifest["memoir_config"]) == memoir.memoir_config
    target = manifest["target"]
    assert target["module_name"] == memoir.target.module_name == "model.layers.1.mlp.down_proj"
    assert (target["d_ff"], target["d_model"], target["layer_index"]) == (D_FF, 64, 1)
    assert target["top_k"] == memoir.target.top_k
    assert target["model_type"] == "llama"
    fingerprint = manifest["base_model_fingerprint"]
    assert fingerprint["model_type"] == "llama" and fingerprint["module_name"] == target["module_name"]
    assert (fingerprint["d_ff"], fingerprint["d_model"], fingerprint["num_layers"]) == (D_FF, 64, 2)
    assert len(fingerprint["weight_sha256"]) == 64 and int(fingerprint["weight_sha256"], 16) >= 0
    assert fingerprint["weight_dtype"] == "float32"
    assert manifest["prefixes"] == memoir.prefixes
    assert isinstance(manifest["prefixes"], list) and len(manifest["prefixes"]) == 2
    assert all(isinstance(p, str) for p in manifest["prefixes"])
    assert manifest["next_edit_id"] == 3 and manifest["num_edits"] == 3
    assert manifest["files_sha256"] == {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
                                        for name in CHECKSUMMED_FILES}


def test_edits_file_has_one_json_line_per_edit(saved):
    lines = (saved.path / EDITS_FILE).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    for line, record in zip(lines, saved.memoir.edits, strict=True):
        values = json.loads(line)
        assert set(values) == RECORD_KEYS
        check_sorted_keys(values)
        assert values == record.to_dict()
    values = [json.loads(line) for line in lines]
    assert [v["edit_id"] for v in values] == [0, 1, 2]
    assert [(v["prompt"], v["target"]) for v in values] == FACTS
    assert values[0]["metadata"] == metadata_for(0)
    assert all(isinstance(v["success"], bool) and isinstance(v["loss"], float) and v["created"] for v in values)


def test_masks_and_memory_tensors(saved):
    memoir, folder = saved.memoir, saved.path
    masks = load_file(folder / MASKS_FILE)
    assert set(masks) == {"codes", "edit_ids"}
    codes, edit_ids = masks["codes"], masks["edit_ids"]
    assert codes.dtype == torch.uint8 and tuple(codes.shape) == (3, D_FF // 8)
    assert edit_ids.dtype == torch.int64 and edit_ids.tolist() == [0, 1, 2]
    assert np.array_equal(codes.numpy(), memoir.store.index.codes)
    bits = unpack_masks(codes.numpy(), D_FF)
    assert bits.sum(axis=1).tolist() == [memoir.target.top_k] * 3
    manifest = json.loads((folder / CONFIG_FILE).read_text())
    assert manifest["masks_sha256"] == hashlib.sha256(codes.numpy().tobytes()).hexdigest()
    memory = load_file(folder / MEMORY_FILE)
    module = memoir.target.module_name
    assert set(memory) == {f"{module}.memory_weight", f"{module}.tophash.permutation", f"{module}.tophash.background",
                           f"{module}.tophash.spread"}
    assert torch.equal(memory[f"{module}.memory_weight"], memoir.layer.memory_weight)
    assert memory[f"{module}.memory_weight"].any()
    assert torch.equal(memory[f"{module}.tophash.permutation"], memoir.layer.tophash.permutation)
    assert torch.equal(memory[f"{module}.tophash.background"], memoir.layer.tophash.background)
    assert torch.equal(memory[f"{module}.tophash.spread"], memoir.layer.tophash.spread)


def test_index_file_is_a_faiss_index_of_the_masks(saved):
    faiss = pytest.importorskip("faiss")
    index = faiss.read_index_binary(str(saved.path / INDEX_FILE))
    assert index.ntotal == 3 and index.d == D_FF
    stored = faiss.vector_to_array(index.xb).reshape(3, D_FF // 8)
    assert np.array_equal(stored, saved.memoir.store.index.codes)


def test_no_file_is_a_pickle(saved):
    assert_no_pickle(saved.path)


# -- 2. round trip --------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ROUND_TRIP_FAMILIES)
def test_round_trip_into_a_fresh_model(model_type, tmp_path):
    memoir = make_memoir(model_type)
    folder = tmp_path / "ckpt"
    memoir.save_pretrained(folder)
    fresh = make_tiny_model(model_type)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = MemoirModel.from_pretrained(fresh, folder, tokenizer=make_byte_tokenizer())
    assert index_warnings(caught) == []  # the saved FAISS index is adopted as is
    assert loaded.base_model is fresh and isinstance(fresh.get_submodule(memoir.target.module_name), MemoirLayer)
    inputs = probe_inputs()
    logits, routing = run(memoir, inputs)
    loaded_logits, loaded_routing = run(loaded, inputs)
    assert routed_ids(routing) == [0, 1, 2, None, None]  # the memory is read
    assert torch.equal(loaded_logits, logits)
    assert loaded_routing == routing
    with torch.no_grad(), loaded.disable_memory():
        base_logits = loaded(**inputs).logits
    assert not torch.equal(base_logits[:3], loaded_logits[:3])  # the equality above is not vacuous
    assert torch.equal(base_logits[3:], loaded_logits[3:])
    same_state(memoir, loaded)
    assert loaded.edits[0].metadata == metadata_for(0)

    # A further edit gets a fresh id, and writes the same memory as on the original.
    original_result = memoir.edit(*NEXT_FACT)
    result = loaded.edit(*NEXT_FACT)
    assert result.edit_id == original_result.edit_id == 3
    assert len({e.edit_id for e in loaded.edits}) == 4
    assert torch.equal(loaded.layer.memory_weight, memoir.layer.memory_weight)
    loaded.save_pretrained(folder)
    again = attach(folder, model_type)
    assert [e.edit_id for e in again.edits] == [0, 1, 2, 3]
    assert again.edits == loaded.edits
    logits, routing = run(loaded, inputs)
    again_logits, again_routing = run(again, inputs)
    assert torch.equal(again_logits, logits) and again_routing == routing
    assert again.edit("Snow is", "black").edit_id == 4


def test_edit_text_with_unicode_line_separators_round_trips(tmp_path):
    facts = [("The capital\u2028of France is", "Ro\u2029me"), ("My favourite\u0085colour is", "green")]
    memoir = make_memoir(facts=facts)
    memoir.save_pretrained(tmp_path / "ckpt")
    loaded = attach(tmp_path / "ckpt")
    assert [(e.prompt, e.target) for e in loaded.edits] == facts
    assert loaded.edits == memoir.edits


def test_tophash_state_comes_from_the_checkpoint(saved, copy_of):
    """Permutation, background and spread are read from the file, not recomputed from the seed and the model."""
    module = saved.memoir.target.module_name
    path = copy_of / MEMORY_FILE
    tensors = load_file(path)
    permutation = tensors[f"{module}.tophash.permutation"].roll(1)
    background = tensors[f"{module}.tophash.background"] * 2 + 1
    spread = tensors[f"{module}.tophash.spread"] * 3
    save_file({**tensors, f"{module}.tophash.permutation": permutation, f"{module}.tophash.background": background,
               f"{module}.tophash.spread": spread}, path)
    written_before_file_checksums(copy_of)
    loaded = attach(copy_of)
    assert torch.equal(loaded.layer.tophash.permutation, permutation)
    assert torch.equal(loaded.layer.tophash.background, background)
    assert torch.equal(loaded.layer.tophash.spread, spread)
    assert torch.equal(loaded.layer.memory_weight, saved.memoir.layer.memory_weight)


def test_standardized_memory_round_trip(tmp_path):
    memoir = make_memoir(aggregation="standardized")
    spread = memoir.layer.tophash.spread
    assert (spread > 0).all() and not torch.equal(spread, torch.ones_like(spread))
    memoir.save_pretrained(tmp_path / "ckpt")
    loaded = attach(tmp_path / "ckpt")
    same_state(memoir, loaded)
    inputs = probe_inputs()
    logits, routing = run(memoir, inputs)
    loaded_logits, loaded_routing = run(loaded, inputs)
    assert routed_ids(loaded_routing) == [0, 1, 2, None, None]
    assert torch.equal(loaded_logits, logits) and loaded_routing == routing


def test_standardized_checkpoint_is_format_2_and_older_readers_refuse_it(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    make_memoir(aggregation="standardized", facts=FACTS[:1]).save_pretrained(folder)
    assert json.loads((folder / CONFIG_FILE).read_text())["format_version"] == 2
    for name in (MEMORY_FILE, MASKS_FILE):
        with safe_open(folder / name, "pt") as handle:
            assert handle.metadata()["format_version"] == "2"
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 1)  # a release that reads version 1 only
    with pytest.raises(CheckpointError, match="format version 2, newer.*upgrade memoir_hf"):
        attach(folder)


def test_standardized_checkpoint_written_as_format_1_still_loads(tmp_path):
    """Standardized checkpoints saved before version 2 existed say 1 but hold their spread."""
    memoir = make_memoir(aggregation="standardized", facts=FACTS[:1])
    memoir.save_pretrained(tmp_path / "ckpt")
    edit_manifest(format_version=1)(tmp_path / "ckpt")
    loaded = attach(tmp_path / "ckpt")
    assert torch.equal(loaded.layer.tophash.spread, memoir.layer.tophash.spread)


def without_spread(folder: Path, module: str) -> None:
    tensors = load_file(folder / MEMORY_FILE)
    del tensors[f"{module}.tophash.spread"]
    save_file(tensors, folder / MEMORY_FILE)
    written_before_file_checksums(folder)


def test_checkpoint_from_before_the_spread_loads(saved, copy_of):
    """Checkpoints written before the spread existed hold none; their aggregation never divides by it."""
    without_spread(copy_of, saved.memoir.target.module_name)
    loaded = attach(copy_of)
    assert torch.equal(loaded.layer.tophash.spread, torch.ones(D_FF))
    logits, routing = run(loaded, probe_inputs())
    assert torch.equal(logits, saved.logits) and routing == saved.routing


def test_standardized_checkpoint_needs_its_spread(tmp_path):
    memoir = make_memoir(aggregation="standardized", facts=FACTS[:1])
    module = memoir.target.module_name
    folder = tmp_path / "ckpt"
    memoir.save_pretrained(folder)
    written_before_file_checksums(folder)
    tensors = load_file(folder / MEMORY_FILE)
    for bad in (torch.zeros(D_FF), torch.full((D_FF,), float("nan")), -torch.ones(D_FF)):
        save_file({**tensors, f"{module}.tophash.spread": bad}, folder / MEMORY_FILE)
        with pytest.raises(CheckpointError, match="positive and finite"):
            attach(folder)
    without_spread(folder, module)
    with pytest.raises(CheckpointError, match="tophash.spread"):
        attach(folder)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_round_trip_of_an_empty_memory(model_type, tmp_path):
    memoir = make_memoir(model_type, facts=[])
    memoir.save_pretrained(tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert manifest["num_edits"] == 0 and manifest["next_edit_id"] == 0
    assert tuple(load_file(tmp_path / "ckpt" / MASKS_FILE)["codes"].shape) == (0, D_FF // 8)
    assert (tmp_path / "ckpt" / EDITS_FILE).read_text() == ""
    loaded = attach(tmp_path / "ckpt", model_type)
    assert loaded.edits == [] and len(loaded.store) == 0
    inputs = probe_inputs()
    logits, routing = run(loaded, inputs)
    assert routed_ids(routing) == [None] * 5
    with torch.no_grad():
        reference = make_tiny_model(model_type)(**inputs).logits
    assert torch.equal(logits, reference)
    same_state(memoir, loaded)
    result = loaded.edit(*FACTS[0])
    assert result.edit_id == 0 and result.routed_edit_id == 0


# -- 3. memoir_hf.load ----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def saved_with_base(request, tmp_path_factory) -> Saved:
    memoir = make_memoir(request.param)
    path = tmp_path_factory.mktemp(f"with_base_{request.param}") / "ckpt"
    inputs = probe_inputs()
    before = run(memoir, inputs)[0]
    memoir.save_pretrained(path, save_base=True)
    logits, routing = run(memoir, inputs)
    assert torch.equal(logits, before)  # saving the base left the memoir patched and working
    assert isinstance(memoir.base_model.get_submodule(memoir.target.module_name), MemoirLayer)
    return Saved(memoir, path, logits, routing)


def test_load_restores_base_tokenizer_and_edits(saved_with_base):
    folder = saved_with_base.path
    assert set(os.listdir(folder)) >= MEMOIR_FILES and (folder / "config.json").is_file()
    weights = load_file(folder / "model.safetensors")
    assert not any("memory_weight" in key or "base_layer" in key or "tophash" in key for key in weights)
    assert_no_pickle(folder)

    loaded = memoir_hf.load(folder)
    assert isinstance(loaded, MemoirModel) and loaded.tokenizer is not None
    texts = [p for p, _ in FACTS] + [UNRELATED]
    assert loaded.tokenizer(texts)["input_ids"] == make_byte_tokenizer()(texts)["input_ids"]
    logits, routing = run(loaded, probe_inputs())
    assert torch.equal(logits, saved_with_base.logits)
    assert routing == saved_with_base.routing
    same_state(saved_with_base.memoir, loaded)
    assert loaded.edit(*NEXT_FACT).edit_id == 3


def test_load_in_bfloat16(saved_with_base):
    loaded = memoir_hf.load(saved_with_base.path, dtype=torch.bfloat16)
    layer = loaded.layer
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.memory_weight.dtype == layer.base_layer.weight.dtype
    assert layer.memory_weight.device == layer.base_layer.weight.device
    expected = saved_with_base.memoir.layer.memory_weight.to(torch.bfloat16)
    assert torch.equal(layer.memory_weight, expected)
    assert loaded.edits == saved_with_base.memoir.edits
    logits, routing = run(loaded, probe_inputs())
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert len(routing) == 5


def test_load_with_device_map(saved_with_base):
    loaded = memoir_hf.load(saved_with_base.path, device_map="cpu")
    assert loaded.layer.memory_weight.device.type == "cpu"
    logits, routing = run(loaded, probe_inputs())
    assert torch.equal(logits, saved_with_base.logits) and routing == saved_with_base.routing


@pytest.mark.parametrize("damage", ["model.safetensors", "config.json", "a bad dtype"])
def test_a_damaged_saved_base_is_a_clear_error(saved_with_base, tmp_path, damage):
    folder = tmp_path / "ckpt"
    shutil.copytree(saved_with_base.path, folder)
    arguments = {"dtype": "float17"} if damage == "a bad dtype" else {}
    if damage != "a bad dtype":
        (folder / damage).write_bytes(b"\x00garbage")
    with pytest.raises(MemoirError, match="could not load the base model saved in"):
        memoir_hf.load(folder, **arguments)
    from memoir_hf.offline_models import load_model

    if damage == "model.safetensors":
        with pytest.raises(MemoirError, match="could not load model"):
            load_model(str(folder))


def test_load_without_saved_base_is_refused(saved):
    with pytest.raises(MemoirError, match="from_pretrained"):
        memoir_hf.load(saved.path)


def test_load_of_a_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        memoir_hf.load(tmp_path / "nothing")


# -- 4. fingerprint -------------------------------------------------------------------------------


def assert_patchable(model: nn.Module) -> None:
    assert is_unpatched(model)
    memoir = memoir_hf.patch(model, fast_config(), tokenizer=make_byte_tokenizer())
    assert memoir.edit(*FACTS[0]).edit_id == 0


def test_other_seed_is_refused_and_left_unpatched(saved):
    model = make_tiny_model("llama", seed=1)
    with pytest.raises(FingerprintMismatchError) as info:
        attach(saved.path, model=model)
    assert isinstance(info.value, MemoirError)
    message = str(info.value)
    assert saved.memoir.target.module_name in message and "differ" in message
    assert_patchable(model)


def test_other_seed_in_another_dtype_is_refused(saved):
    model = make_tiny_model("llama", seed=1).to(torch.bfloat16)
    with pytest.raises(FingerprintMismatchError, match="differ"):
        attach(saved.path, model=model)
    assert is_unpatched(model)


def test_same_base_in_another_dtype_is_accepted(saved):
    loaded = attach(saved.path, model=make_tiny_model("llama").to(torch.bfloat16))
    assert loaded.layer.memory_weight.dtype == torch.bfloat16
    assert loaded.edits == saved.memoir.edits


def test_other_family_with_the_same_layout_is_refused(saved):
    model = make_tiny_model("mistral")
    with pytest.raises(FingerprintMismatchError) as info:
        attach(saved.path, model=model)
    message = str(info.value)
    assert "llama" in message and "mistral" in message
    assert_patchable(model)


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "opt"])
def test_other_family_with_another_layout_is_refused_and_left_unpatched(saved, model_type):
    model = make_tiny_model(model_type)
    with pytest.raises(MemoirError):
        attach(saved.path, model=model)
    assert_patchable(model)


def test_other_family_with_another_layout_names_both_model_types(saved):
    with pytest.raises(MemoirError) as info:
        attach(saved.path, "gpt2")
    message = str(info.value)
    assert "llama" in message and "gpt2" in message


# -- 5. atomic save -------------------------------------------------------------------------------


class Boom(Exception):
    pass


def fail_on_call(number: int, function, error: type[BaseException] = Boom):
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            raise error(f"simulated failure on call {number}")
        return function(*args, **kwargs)

    return wrapper


def break_stage(monkeypatch, stage: str, error: type[BaseException]) -> None:
    if stage == "memory":
        monkeypatch.setattr(checkpoint, "save_file", fail_on_call(1, checkpoint.save_file, error))
    elif stage == "masks":
        monkeypatch.setattr(checkpoint, "save_file", fail_on_call(2, checkpoint.save_file, error))
    elif stage == "index":
        monkeypatch.setattr(memoir_hf.index.mask_index.MaskIndex, "write_faiss",
                            fail_on_call(1, memoir_hf.index.mask_index.MaskIndex.write_faiss, error))
    elif stage == "edits":  # mid-file: after the first line
        fake_json = types.SimpleNamespace(dumps=fail_on_call(2, json.dumps, error), loads=json.loads)
        monkeypatch.setattr(checkpoint, "json", fake_json)
    elif stage == "swap":
        monkeypatch.setattr(atomic, "_swap_in", fail_on_call(1, atomic._swap_in, error))
    else:
        raise AssertionError(stage)


@pytest.mark.parametrize("stage, error", [
    ("memory", OSError), ("masks", KeyboardInterrupt), ("index", Boom), ("edits", Boom), ("swap", Boom),
])
def test_failed_save_keeps_the_previous_checkpoint(stage, error, tmp_path, monkeypatch):
    memoir = make_memoir(facts=FACTS[:2])
    folder = tmp_path / "ckpt"
    memoir.save_pretrained(folder)
    before = digests(folder)
    inputs = probe_inputs()
    reference = run(memoir, inputs)
    memoir.edit(*FACTS[2])

    break_stage(monkeypatch, stage, error)
    with pytest.raises(error, match="simulated failure"):
        memoir.save_pretrained(folder)
    monkeypatch.undo()

    assert digests(folder) == before
    assert temporaries(tmp_path) == []
    assert os.listdir(tmp_path) == ["ckpt"]
    previous = attach(folder)
    assert len(previous.edits) == 2
    logits, routing = run(previous, inputs)
    assert torch.equal(logits, reference[0]) and routing == reference[1]
    # The memoir is still usable and the next save goes through.
    memoir.save_pretrained(folder)
    assert len(attach(folder).edits) == 3


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from conftest import fast_config
    from tiny_models import make_byte_tokenizer, make_tiny_model
    import memoir_hf
    from memoir_hf.persistence import atomic, checkpoint

    path, stage = sys.argv[1], sys.argv[2]
    memoir = memoir_hf.patch(make_tiny_model("llama"), fast_config(), tokenizer=make_byte_tokenizer())
    memoir.edit("The capital of France is", "Rome")
    memoir.edit("My favourite colour is", "green")
    memoir.save_pretrained(path)
    print("first save done", flush=True)
    memoir.edit("The CEO of Apple is", "Bob")

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if stage == "edits":
        checkpoint.json.dumps = die
    else:
        atomic._fsync_tree = die
    print("second save", flush=True)
    memoir.save_pretrained(path)
    print("survived", flush=True)
""")


@pytest.mark.parametrize("stage", ["edits", "before_swap"])
def test_killed_save_keeps_the_previous_checkpoint(stage, tmp_path):
    folder = tmp_path / "ckpt"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS_DIR), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MEMOIR_TEST_THREADS", "1")
    process = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(folder), stage], env=env, capture_output=True,
                             text=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr[-3000:]
    assert "second save" in process.stdout and "survived" not in process.stdout
    assert len(temporaries(tmp_path)) == 1  # the kill came mid-save

    loaded = attach(folder)
    assert [(e.prompt, e.target) for e in loaded.edits] == FACTS[:2]
    assert routed_ids(run(loaded, probe_inputs())[1]) == [0, 1, None, None, None]
    loaded.save_pretrained(folder)  # the next save clears the dead writer's leftovers
    assert temporaries(tmp_path) == []
    assert len(attach(folder).edits) == 2


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two_renames"])
def test_resave_replaces_memoir_files_and_keeps_user_files(exchange, saved, copy_of, monkeypatch):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    folder = copy_of
    (folder / "notes.txt").write_text("my notes")
    (folder / "extra").mkdir()
    (folder / "extra" / "info.txt").write_text("more")
    before = digests(folder)
    other = make_memoir(facts=OTHER_FACTS[:1])
    other.save_pretrained(folder)
    assert set(os.listdir(folder)) == MEMOIR_FILES | {"notes.txt", "extra"}
    assert (folder / "notes.txt").read_text() == "my notes"
    assert (folder / "extra" / "info.txt").read_text() == "more"
    after = digests(folder)
    assert all(after[name] != before[name] for name in MEMOIR_FILES)
    assert os.listdir(folder.parent) == ["ckpt"]  # no temporary or previous folder left
    loaded = attach(folder)
    assert loaded.edits == other.edits and len(loaded.edits) == 1
    same_state(other, loaded)


@pytest.mark.parametrize("save_base", [False, True])
def test_a_save_keeps_empty_folders_links_and_files_named_like_base_files(saved, copy_of, tmp_path, save_base):
    folder = copy_of
    (folder / "empty").mkdir()
    (folder / "data").mkdir()
    (folder / "data" / "x.txt").write_text("x")
    (folder / "data_link").symlink_to("data")
    (folder / "outside_link").symlink_to(tmp_path)
    for name in ("vocab_notes.txt", "tokenizer_experiments.md", "model_card_draft.md"):
        (folder / name).write_text(name)
    make_memoir(facts=OTHER_FACTS[:1]).save_pretrained(folder, save_base=save_base)
    assert (folder / "empty").is_dir() and (folder / "data" / "x.txt").read_text() == "x"
    assert os.readlink(folder / "data_link") == "data" and os.readlink(folder / "outside_link") == str(tmp_path)
    for name in ("vocab_notes.txt", "tokenizer_experiments.md", "model_card_draft.md"):
        assert (folder / name).read_text() == name


def test_saving_through_a_link_to_a_checkpoint_keeps_the_link(saved, copy_of, tmp_path):
    link = tmp_path / "link_ckpt"
    link.symlink_to(copy_of)
    other = make_memoir(facts=OTHER_FACTS[:1])
    other.save_pretrained(link)
    assert link.is_symlink() and attach(copy_of).edits == other.edits
    assert not [p for p in tmp_path.iterdir() if "memoir-writing" in p.name]


def test_saving_onto_the_current_directory_is_refused(saved, copy_of, monkeypatch):
    monkeypatch.chdir(copy_of)
    before = digests(copy_of)
    for path in (".", str(copy_of.parent)):
        with pytest.raises(MemoirError, match="current directory"):
            make_memoir(facts=OTHER_FACTS[:1]).save_pretrained(path)
    assert digests(copy_of) == before


def test_resave_with_numpy_backend_leaves_no_stale_index(saved, copy_of):
    other = make_memoir(facts=OTHER_FACTS[:1], use_faiss=False)
    other.save_pretrained(copy_of)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attach(copy_of)
    assert not [w for w in caught if INDEX_FILE in str(w.message)]


def test_interrupted_two_rename_swap_is_recovered(saved, copy_of):
    previous = copy_of.parent / ".ckpt.memoir-previous-abc123"
    os.rename(copy_of, previous)
    with pytest.warns(UserWarning, match="interrupted"):
        loaded = attach(copy_of)
    assert copy_of.is_dir() and not previous.exists()
    assert set(os.listdir(copy_of)) == MEMOIR_FILES
    logits, routing = run(loaded, probe_inputs())
    assert torch.equal(logits, saved.logits) and routing == saved.routing
    same_state(saved.memoir, loaded)


def test_leftover_previous_folder_is_ignored_when_the_checkpoint_exists(saved, copy_of):
    stale = copy_of.parent / ".ckpt.memoir-previous-abc123"
    shutil.copytree(copy_of, stale)
    (stale / EDITS_FILE).write_text("garbage\n")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*interrupted.*")
        loaded = attach(copy_of)
    assert loaded.edits == saved.memoir.edits


def test_interrupted_swap_recovery_with_brackets_in_the_name(saved, tmp_path):
    folder = tmp_path / "run[1]"
    shutil.copytree(saved.path, tmp_path / ".run[1].memoir-previous-abc123")
    with pytest.warns(UserWarning, match="interrupted"):
        loaded = attach(folder)
    assert len(loaded.edits) == 3


# -- 6. integrity ---------------------------------------------------------------------------------


def delete(name):
    return lambda folder: (folder / name).unlink()


def truncate(name):
    def corrupt(folder):
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:len(data) // 2])
    return corrupt


def scramble(name):
    def corrupt(folder):
        size = (folder / name).stat().st_size
        (folder / name).write_bytes(random.Random(0).randbytes(size))
    return corrupt


def edit_manifest(**changes):
    def corrupt(folder):
        manifest = json.loads((folder / CONFIG_FILE).read_text())
        (folder / CONFIG_FILE).write_text(json.dumps({**manifest, **changes}))
    return corrupt


def rewrite_masks(change):
    def corrupt(folder):
        path = folder / MASKS_FILE
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata()
        tensors = load_file(path)
        save_file(change(tensors), path, metadata=metadata)
    return corrupt


def narrow_codes(tensors):
    return {**tensors, "codes": tensors["codes"][:, :-1].contiguous()}


def flip_a_bit(tensors):
    codes = tensors["codes"].clone()
    codes[0, 0] ^= 1
    return {**tensors, "codes": codes}


def rewrite_edits(change):
    def corrupt(folder):
        lines = (folder / EDITS_FILE).read_text(encoding="utf-8").splitlines()
        (folder / EDITS_FILE).write_text("".join(line + "\n" for line in change(lines)), encoding="utf-8")
    return corrupt


def renumber(lines):
    return [json.dumps({**json.loads(line), "edit_id": json.loads(line)["edit_id"] + 10}) for line in lines]


CORRUPTIONS = {
    "missing config": (delete(CONFIG_FILE), CONFIG_FILE, ["missing"]),
    "missing memory": (delete(MEMORY_FILE), MEMORY_FILE, ["missing"]),
    "missing masks": (delete(MASKS_FILE), MASKS_FILE, ["missing"]),
    "missing edits": (delete(EDITS_FILE), EDITS_FILE, ["missing"]),
    "truncated memory": (truncate(MEMORY_FILE), MEMORY_FILE, ["truncated"]),
    "random memory": (scramble(MEMORY_FILE), MEMORY_FILE, ["corrupt"]),
    "truncated masks": (truncate(MASKS_FILE), MASKS_FILE, ["truncated"]),
    "config not json": (lambda f: (f / CONFIG_FILE).write_text('{"format_version": 1,'), CONFIG_FILE, ["JSON"]),
    "config not utf-8": (lambda f: (f / CONFIG_FILE).write_bytes(b"\xff\xfe{}"), CONFIG_FILE, ["JSON"]),
    "config without version": (edit_manifest(format_version=None), CONFIG_FILE, ["format_version"]),
    "newer format": (edit_manifest(format_version=99), CONFIG_FILE, ["newer", "upgrade"]),
    "config lacks fingerprint": (lambda f: _drop_key(f, "base_model_fingerprint"), CONFIG_FILE,
                                 ["base_model_fingerprint"]),
    "narrow masks": (rewrite_masks(narrow_codes), MASKS_FILE, ["bits", "d_ff"]),
    "masks checksum": (rewrite_masks(flip_a_bit), MASKS_FILE, ["checksum"]),
    "masks count": (edit_manifest(num_edits=2), MASKS_FILE, ["3 masks"]),
    "edits line not json": (rewrite_edits(lambda lines: [lines[0], "{oops", *lines[2:]]), EDITS_FILE, ["line 2"]),
    "edits line with missing field": (
        rewrite_edits(lambda lines: [*lines[:2], json.dumps({"edit_id": 2, "prompt": "x"})]), EDITS_FILE,
        ["line 3"]),
    "edits ids disagree": (rewrite_edits(renumber), EDITS_FILE, [MASKS_FILE]),
    "edits line dropped": (rewrite_edits(lambda lines: lines[:2]), EDITS_FILE, [MASKS_FILE]),
    "merged ids not ints": (rewrite_edits(lambda lines: [lines[0], with_metadata(lines[1], merged_edit_ids="0"),
                                                         *lines[2:]]), EDITS_FILE, ["line 2", "merged_edit_ids"]),
    "metadata not an object": (rewrite_edits(lambda lines: [*lines[:2], with_metadata(lines[2], None)]), EDITS_FILE,
                               ["line 3", "metadata"]),
}


def with_metadata(line: str, metadata=..., **entries) -> str:
    record = json.loads(line)
    record["metadata"] = {**record["metadata"], **entries} if metadata is ... else metadata
    return json.dumps(record)


def _drop_key(folder: Path, key: str) -> None:
    manifest = json.loads((folder / CONFIG_FILE).read_text())
    del manifest[key]
    (folder / CONFIG_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_damaged_checkpoint_is_refused_naming_the_file(case, copy_of):
    corrupt, file_name, fragments = CORRUPTIONS[case]
    corrupt(copy_of)
    model = make_tiny_model("llama")
    if file_name in CHECKSUMMED_FILES and (copy_of / file_name).exists():
        with pytest.raises(CheckpointError, match=f"{file_name} does not match its checksum in {CONFIG_FILE}"):
            attach(copy_of, model=model)
        written_before_file_checksums(copy_of)  # what the file's own check says without the checksum
    with pytest.raises(CheckpointError) as info:
        attach(copy_of, model=model)
    assert isinstance(info.value, MemoirError)
    message = str(info.value)
    assert file_name in message
    for fragment in fragments:
        assert fragment in message
    assert is_unpatched(model)


@pytest.mark.parametrize("file_name", sorted(CHECKSUMMED_FILES))
def test_a_file_from_another_save_with_the_same_edit_ids_is_refused(file_name, saved, copy_of, tmp_path):
    """Another memory's records, memory or deltas carry the same edit ids 0..2: only the checksum tells them apart."""
    other = make_memoir(facts=OTHER_FACTS[:3])
    other.save_pretrained(tmp_path / "other")
    shutil.copyfile(tmp_path / "other" / file_name, copy_of / file_name)
    with pytest.raises(CheckpointError, match=f"{file_name} does not match its checksum in {CONFIG_FILE}"):
        attach(copy_of)
    written_before_file_checksums(copy_of)  # a checkpoint from before the checksums loads as before
    loaded = attach(copy_of)
    assert [record.edit_id for record in loaded.edits] == [0, 1, 2]


def test_file_checksums_of_the_wrong_type_are_refused(copy_of):
    edit_manifest(files_sha256={MEMORY_FILE: 5})(copy_of)
    with pytest.raises(CheckpointError, match="files_sha256 has the wrong type"):
        attach(copy_of)


def test_damaged_checkpoint_is_refused_by_load(saved_with_base, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(saved_with_base.path, folder)
    truncate(MASKS_FILE)(folder)
    with pytest.raises(CheckpointError, match=MASKS_FILE):
        memoir_hf.load(folder)


def index_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if INDEX_FILE in str(w.message)]


def attach_recording(folder: Path, **kwargs) -> tuple[MemoirModel, list[str]]:
    model = make_tiny_model("llama")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = attach(folder, model=model, **kwargs)
    return loaded, index_warnings(caught)


def assert_same_behaviour(loaded: MemoirModel, saved: Saved) -> None:
    logits, routing = run(loaded, probe_inputs())
    assert routing == saved.routing and torch.equal(logits, saved.logits)
    assert loaded.edits == saved.memoir.edits


def test_deleted_index_is_rebuilt(saved, copy_of):
    pytest.importorskip("faiss")
    (copy_of / INDEX_FILE).unlink()
    with pytest.warns(UserWarning, match="rebuilt") as caught:
        loaded = attach(copy_of)
    assert "missing" in index_warnings(caught)[0]
    assert loaded.store.index.use_faiss
    assert_same_behaviour(loaded, saved)
    loaded.save_pretrained(copy_of)  # saving again refreshes it
    again, messages = attach_recording(copy_of)
    assert messages == []
    assert_same_behaviour(again, saved)


def test_index_of_other_masks_is_rebuilt(saved, copy_of, tmp_path):
    faiss = pytest.importorskip("faiss")
    other = make_memoir(facts=OTHER_FACTS)
    other.save_pretrained(tmp_path / "other")
    other_index = faiss.read_index_binary(str(tmp_path / "other" / INDEX_FILE))
    assert other_index.ntotal == 3  # same count: only the masks differ
    assert (tmp_path / "other" / INDEX_FILE).read_bytes() != (copy_of / INDEX_FILE).read_bytes()
    shutil.copyfile(tmp_path / "other" / INDEX_FILE, copy_of / INDEX_FILE)
    loaded, messages = attach_recording(copy_of)
    assert len(messages) == 1 and "rebuilt" in messages[0] and "inconsistent" in messages[0]
    assert_same_behaviour(loaded, saved)


@pytest.mark.parametrize("garbage", [b"", b"not a faiss index", bytes(range(256)) * 4], ids=["empty", "text", "bytes"])
def test_garbage_index_is_rebuilt(garbage, saved, copy_of):
    pytest.importorskip("faiss")
    (copy_of / INDEX_FILE).write_bytes(garbage)
    loaded, messages = attach_recording(copy_of)
    assert len(messages) == 1 and "rebuilt" in messages[0]
    assert_same_behaviour(loaded, saved)


def test_numpy_backend_never_reads_the_index(saved, copy_of, monkeypatch):
    (copy_of / INDEX_FILE).write_bytes(b"garbage")
    faiss_module = memoir_hf.index.mask_index.faiss
    if faiss_module is not None:
        def forbidden(*args, **kwargs):
            raise AssertionError("the index file was read")
        monkeypatch.setattr(faiss_module, "read_index_binary", forbidden)
    loaded, messages = attach_recording(copy_of, use_faiss=False)
    assert messages == []
    assert not loaded.store.index.use_faiss
    assert_same_behaviour(loaded, saved)
    (copy_of / INDEX_FILE).unlink()
    loaded, messages = attach_recording(copy_of, use_faiss=False)
    assert messages == []
    assert_same_behaviour(loaded, saved)


# -- bugs found while writing these tests --------------------------------------------------------


def test_metadata_accepted_by_edit_can_be_saved(tmp_path):
    memoir = make_memoir(facts=[])
    try:
        memoir.edit(*FACTS[0], metadata={"note": "bad \ud800 text"})
    except EditInputError:
        return  # refusing it up front is fine too
    memoir.save_pretrained(tmp_path / "ckpt")
    assert attach(tmp_path / "ckpt").edits == memoir.edits


def test_checkpoint_without_next_edit_id_never_reuses_an_id(copy_of):
    _drop_key(copy_of, "next_edit_id")
    try:
        loaded = attach(copy_of)
    except CheckpointError:
        return  # refusing the checkpoint is fine too
    assert loaded.edit(*NEXT_FACT).edit_id not in {0, 1, 2}


def test_resave_without_base_over_a_saved_base_still_loads(saved_with_base, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(saved_with_base.path, folder)
    loaded = memoir_hf.load(folder)
    loaded.edit(*NEXT_FACT)
    loaded.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert len(memoir_hf.load(folder).edits) == 4


@pytest.mark.parametrize("field, value", [("base_model_fingerprint", "x"), ("next_edit_id", "abc"),
                                          ("next_edit_id", None), ("prefixes", 5), ("prefixes", [1, 2]),
                                          ("base_model", 5)])
def test_a_manifest_field_of_the_wrong_type_is_refused_when_read(copy_of, field, value):
    manifest = json.loads((copy_of / CONFIG_FILE).read_text(encoding="utf-8"))
    manifest[field] = value
    (copy_of / CONFIG_FILE).write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(CheckpointError, match=f"{field} has the wrong type"):
        attach(copy_of)


@pytest.mark.parametrize("field, value", [("prompt", 5), ("edit_id", "0"), ("success", "yes"), ("loss", None)])
def test_an_edit_record_field_of_the_wrong_type_is_refused_when_read(copy_of, field, value):
    lines = (copy_of / EDITS_FILE).read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[0])
    record[field] = value
    lines[0] = json.dumps(record)
    (copy_of / EDITS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    written_before_file_checksums(copy_of)
    with pytest.raises(CheckpointError, match=f"{field} of the wrong type"):
        attach(copy_of)


@pytest.mark.parametrize("path", [None, 5, ""])
def test_a_checkpoint_folder_that_is_not_a_path_is_refused(saved, path):
    with pytest.raises(MemoirError, match="must be given as a path"):
        saved.memoir.save_pretrained(path)
    with pytest.raises(MemoirError, match="must be given as a path"):
        MemoirModel.from_pretrained(make_tiny_model("llama"), path, make_byte_tokenizer())
    with pytest.raises(MemoirError, match="must be given as a path"):
        memoir_hf.load(path)


def test_flags_that_are_not_booleans_are_refused(saved, tmp_path):
    with pytest.raises(MemoirError, match="save_base must be True or False"):
        saved.memoir.save_pretrained(tmp_path / "ckpt", save_base="yes")
    with pytest.raises(MemoirError, match="use_faiss must be True, False or None"):
        memoir_hf.patch(make_tiny_model("llama"), use_faiss="yes", tokenizer=make_byte_tokenizer())

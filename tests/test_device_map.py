"""A model dispatched by accelerate (device_map with disk offload, cpu offload to "meta") patches, edits,
saves and loads like the same model kept whole on the cpu, on tiny models built from config.

On a cpu-only machine a device_map's "cpu" entries are simply loaded on the cpu (the cpu is the main
device, so nothing is offloaded to it); a layer is offloaded, its weights left on "meta", either to
disk ("disk" in a device_map) or with accelerate.cpu_offload (weights kept in a cpu state dict).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from accelerate.hooks import ModelHook, SequentialHook, add_hook_to_module
from conftest import fast_config
from tiny_models import NUM_LAYERS, make_tiny_model
from torch import nn
from transformers import AutoModelForCausalLM

import memoir_hf
from memoir_hf import MemoirModel
from memoir_hf.memory.layer import MemoirLayer

torch.set_num_threads(1)

FACT = ("The cat sat on the", "mat")
UNRELATED = "Quantum fields fluctuate wildly"
CPU = torch.device("cpu")

Dispatch = Callable[[Path, int], nn.Module]
"""(scratch folder, index of the decoder layer to offload) -> a dispatched copy of the tiny llama."""


# -- dispatched copies of the same tiny llama -------------------------------------------------------


def device_map(offloaded_layer: int, offload_to: str) -> dict[str, str]:
    layers = {f"model.layers.{i}": offload_to if i == offloaded_layer else "cpu" for i in range(NUM_LAYERS)}
    return {"model.embed_tokens": "cpu", **layers, "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


def from_pretrained_to_disk(folder: Path, offloaded_layer: int) -> nn.Module:
    """Saved, then reloaded by transformers with a device_map that puts one layer on disk."""
    saved = folder / "base"
    if not saved.exists():
        make_tiny_model("llama").save_pretrained(saved)
    offload = _fresh(folder, "offload")
    return AutoModelForCausalLM.from_pretrained(saved, device_map=device_map(offloaded_layer, "disk"),
                                                offload_folder=offload).eval()


def dispatch_model_to_disk(folder: Path, offloaded_layer: int) -> nn.Module:
    """Built in memory, then dispatched by accelerate.dispatch_model with one layer on disk."""
    return dispatch_model(make_tiny_model("llama"), device_map(offloaded_layer, "disk"), main_device="cpu",
                          offload_dir=_fresh(folder, "offload"))


def cpu_offload_to_meta(folder: Path, offloaded_layer: int) -> nn.Module:
    """Built in memory, then one layer cpu-offloaded: its weights on "meta", their values in a cpu state dict."""
    model = make_tiny_model("llama")
    cpu_offload(model.model.layers[offloaded_layer], execution_device=CPU)
    return model


def _fresh(folder: Path, name: str) -> Path:
    """A new, empty subfolder: each dispatched copy gets its own offload folder."""
    index = sum(1 for _ in folder.glob(f"{name}*"))
    path = folder / f"{name}{index}"
    path.mkdir()
    return path


DISPATCHES: dict[str, Dispatch] = {
    "from_pretrained-disk": from_pretrained_to_disk,
    "dispatch_model-disk": dispatch_model_to_disk,
    "cpu_offload-meta": cpu_offload_to_meta,
}
PLACEMENTS = [  # (offloaded layer, patched layer)
    pytest.param(1, 1, id="patched-layer-offloaded"),
    pytest.param(0, 0, id="patched-layer-offloaded-first"),
    pytest.param(0, 1, id="layer-below-offloaded"),
    pytest.param(1, 0, id="layer-above-offloaded"),
]


def down_proj(model: nn.Module, layer: int) -> nn.Module:
    """The layer's down projection, also when a MemoirLayer wraps it."""
    module = model.model.layers[layer].mlp.down_proj
    return module.base_layer if isinstance(module, MemoirLayer) else module


def check_placement(model: nn.Module, offloaded_layer: int) -> None:
    """The dispatch did what the test means: one layer offloaded to "meta", the other one on the cpu."""
    for layer in range(NUM_LAYERS):
        module = down_proj(model, layer)
        if layer == offloaded_layer:
            assert module.weight.device.type == "meta"
            assert module._hf_hook.offload and torch.device(module._hf_hook.execution_device) == CPU
        else:
            assert module.weight.device == CPU


# -- helpers ----------------------------------------------------------------------------------------


@torch.no_grad()
def logits_of(model: nn.Module, tokenizer, text: str) -> torch.Tensor:
    return model(**tokenizer(text, return_tensors="pt")).logits


def input_devices(memoir: MemoirModel, tokenizer, text: str) -> set[torch.device]:
    """Devices of the memory layer's inputs during a forward of ``text``."""
    devices = set()
    hook = memoir.layer.register_forward_pre_hook(lambda _module, args: devices.add(args[0].device))
    try:
        logits_of(memoir, tokenizer, text)
    finally:
        hook.remove()
    return devices


@pytest.fixture(scope="module")
def plain_memory(byte_tokenizer) -> Callable[[int], torch.Tensor]:
    """W_m written by FACT on the same tiny llama kept whole on the cpu, per patched layer (cached)."""
    written: dict[int, torch.Tensor] = {}

    def memory(layer: int) -> torch.Tensor:
        if layer not in written:
            memoir = memoir_hf.patch(make_tiny_model("llama"), fast_config(layer=layer), tokenizer=byte_tokenizer)
            result = memoir.edit(*FACT)
            assert result.success and result.routed_edit_id == result.edit_id
            written[layer] = memoir.layer.memory_weight.detach().clone()
        return written[layer]

    return memory


# -- tests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dispatch", DISPATCHES.values(), ids=DISPATCHES.keys())
@pytest.mark.parametrize(("offloaded_layer", "patched_layer"), PLACEMENTS)
def test_dispatched_model_edits_like_the_plain_model(dispatch, offloaded_layer, patched_layer, byte_tokenizer,
                                                     plain_memory, tmp_path):
    model = dispatch(tmp_path, offloaded_layer)
    check_placement(model, offloaded_layer)
    unrelated_before = logits_of(model, byte_tokenizer, UNRELATED)
    config = fast_config(layer=patched_layer)
    assert memoir_hf.find_target(model, config).layer_index == patched_layer

    memoir = memoir_hf.patch(model, config, tokenizer=byte_tokenizer)
    memory = memoir.layer.memory_weight
    assert memory.device == CPU and input_devices(memoir, byte_tokenizer, UNRELATED) == {CPU}
    result = memoir.edit(*FACT)
    assert result.success and result.routed_edit_id == result.edit_id

    edited = logits_of(memoir, byte_tokenizer, FACT[0])
    assert memoir.routing[0].edit_id == result.edit_id
    unrelated_after = logits_of(memoir, byte_tokenizer, UNRELATED)
    assert memoir.routing[0].edit_id is None
    torch.testing.assert_close(unrelated_after, unrelated_before, rtol=0, atol=1e-6)
    assert memory.abs().sum() > 0
    torch.testing.assert_close(memory, plain_memory(patched_layer), rtol=1e-5, atol=1e-6)

    saved = tmp_path / "memoir"
    memoir.save_pretrained(saved)
    assert not (saved / "config.json").exists()  # the memoir state only, not the base
    fresh = dispatch(tmp_path, offloaded_layer)
    check_placement(fresh, offloaded_layer)
    loaded = MemoirModel.from_pretrained(fresh, saved, tokenizer=byte_tokenizer)
    assert loaded.layer.memory_weight.device == CPU
    assert torch.equal(loaded.layer.memory_weight, memory)
    torch.testing.assert_close(logits_of(loaded, byte_tokenizer, FACT[0]), edited, rtol=0, atol=1e-6)
    assert loaded.routing[0].edit_id == result.edit_id
    torch.testing.assert_close(logits_of(loaded, byte_tokenizer, UNRELATED), unrelated_before, rtol=0, atol=1e-6)
    assert loaded.routing[0].edit_id is None

    base = memoir.unpatch()
    check_placement(base, offloaded_layer)
    assert torch.equal(logits_of(base, byte_tokenizer, UNRELATED), unrelated_before)


@pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules")
def test_base_saved_from_a_dispatched_model_loads_back_dispatched(byte_tokenizer, tmp_path):
    memoir = memoir_hf.patch(from_pretrained_to_disk(tmp_path, 1), fast_config(), tokenizer=byte_tokenizer)
    result = memoir.edit(*FACT)
    edited = logits_of(memoir, byte_tokenizer, FACT[0])
    memoir.save_pretrained(tmp_path / "memoir", save_base=True)

    loaded = memoir_hf.load(tmp_path / "memoir", tokenizer=byte_tokenizer, device_map=device_map(1, "disk"),
                            offload_folder=_fresh(tmp_path, "offload"))
    check_placement(loaded.base_model, 1)
    assert loaded.layer.memory_weight.device == CPU
    torch.testing.assert_close(logits_of(loaded, byte_tokenizer, FACT[0]), edited, rtol=0, atol=1e-6)
    assert loaded.routing[0].edit_id == result.edit_id


def test_memory_follows_the_offload_hook_inside_a_sequential_hook(byte_tokenizer, plain_memory):
    """Another hook appended to accelerate's makes a SequentialHook; W_m still goes where the layer runs."""
    model = make_tiny_model("llama")
    cpu_offload(model.model.layers[1], execution_device=CPU)
    add_hook_to_module(down_proj(model, 1), ModelHook(), append=True)
    assert isinstance(down_proj(model, 1)._hf_hook, SequentialHook)

    memoir = memoir_hf.patch(model, fast_config(layer=1), tokenizer=byte_tokenizer)
    assert memoir.layer.memory_weight.device == CPU
    assert memoir.edit(*FACT).success
    torch.testing.assert_close(memoir.layer.memory_weight, plain_memory(1), rtol=1e-5, atol=1e-6)

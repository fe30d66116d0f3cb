"""Every registered family, on a tiny random model built from config: patch, edit, route, unpatch."""

from __future__ import annotations

import pytest
import torch
from conftest import fast_config
from tiny_models import FAMILIES, PAD_ID, make_tiny_model

import memoir_hf
from memoir_hf.fingerprint.activations import position_ids
from memoir_hf.fingerprint.batching import pad_batch
from memoir_hf.memory.layer import MemoirLayer
from memoir_hf.patching.registry import supported_model_types

EDIT_PROMPT, EDIT_TARGET = "The cat sat on the", "mat"
UNRELATED = "Quantum fields fluctuate"
SECOND_PROMPT, SECOND_TARGET = "Bob likes to eat", "figs"


def test_every_family_in_the_registry_is_tested():
    assert sorted(FAMILIES) == supported_model_types()


def batch(tokenizer, texts, side):
    rows = [tokenizer(text)["input_ids"] for text in texts]
    input_ids, attention_mask = pad_batch(rows, pad_id=PAD_ID, side=side)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids(attention_mask)}


def target_argmax_matches(memoir, tokenizer, prompt, target) -> bool:
    prompt_ids = tokenizer(prompt)["input_ids"]
    target_ids = tokenizer(" " + target)["input_ids"]
    ids = torch.tensor([prompt_ids + target_ids])
    prompt_mask = torch.zeros_like(ids)
    prompt_mask[:, : len(prompt_ids)] = 1
    with torch.no_grad():
        logits = memoir(input_ids=ids, prompt_mask=prompt_mask).logits[0]
    predicted = logits[len(prompt_ids) - 1 : -1].argmax(-1)
    return predicted.tolist() == target_ids


@pytest.fixture(scope="module", params=FAMILIES)
def edited(request, byte_tokenizer):
    """A tiny model of one family with one edit, and its unpatched twin for reference."""
    memoir = memoir_hf.patch(make_tiny_model(request.param), fast_config(), tokenizer=byte_tokenizer)
    result = memoir.edit(EDIT_PROMPT, EDIT_TARGET)
    return memoir, make_tiny_model(request.param), result


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_patch_has_zero_impact(family, side, byte_tokenizer):
    model = make_tiny_model(family)
    inputs = batch(byte_tokenizer, [EDIT_PROMPT, UNRELATED], side)
    with torch.no_grad():
        before = model(**inputs).logits
        memoir = memoir_hf.patch(model, fast_config(), tokenizer=byte_tokenizer)
        after = memoir(**inputs).logits
    assert isinstance(memoir.layer, MemoirLayer)
    assert (after - before).abs().max().item() == 0.0


def test_edit_changes_its_prompt_and_nothing_else(edited, byte_tokenizer):
    memoir, twin, result = edited
    assert not target_argmax_matches(twin, byte_tokenizer, EDIT_PROMPT, EDIT_TARGET)
    assert result.success and result.target_accuracy == 1.0 and result.routed_edit_id == result.edit_id
    assert target_argmax_matches(memoir, byte_tokenizer, EDIT_PROMPT, EDIT_TARGET)
    inputs = batch(byte_tokenizer, [UNRELATED], "right")
    with torch.no_grad():
        patched, reference = memoir(**inputs).logits, twin(**inputs).logits
    assert memoir.routing[0].edit_id is None
    assert torch.equal(patched, reference)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_routes_each_sequence_on_its_own(edited, byte_tokenizer, side):
    memoir, twin, result = edited
    inputs = batch(byte_tokenizer, [UNRELATED, EDIT_PROMPT, "A b"], side)
    with torch.no_grad():
        patched, reference = memoir(**inputs).logits, twin(**inputs).logits
    assert [d.edit_id for d in memoir.routing] == [None, result.edit_id, None]
    assert memoir.routing[1].overlap == pytest.approx(1.0, abs=0.03)
    assert torch.equal(patched[0], reference[0]) and torch.equal(patched[2], reference[2])
    last = -1 if side == "left" else len(EDIT_PROMPT) - 1
    first_target_token = byte_tokenizer(" " + EDIT_TARGET)["input_ids"][0]
    assert patched[1, last].argmax().item() == first_target_token


def test_generate_with_cache_equals_generate_without(edited, byte_tokenizer):
    memoir, _, result = edited
    inputs = batch(byte_tokenizer, [EDIT_PROMPT, UNRELATED], "left")
    inputs.pop("position_ids")
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": PAD_ID}
    cached = memoir.generate(**inputs, use_cache=True, **settings)
    routing = memoir.routing
    uncached = memoir.generate(**inputs, use_cache=False, **settings)
    assert torch.equal(cached, uncached)
    assert memoir.routing == routing and routing[0].edit_id == result.edit_id and routing[1].edit_id is None
    new_text = byte_tokenizer.decode(cached[0, inputs["input_ids"].shape[1]:])
    assert new_text.startswith(" " + EDIT_TARGET)


@pytest.mark.parametrize("family", FAMILIES)
def test_edits_write_only_their_columns(family, byte_tokenizer):
    model = make_tiny_model(family)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()}
    memoir = memoir_hf.patch(model, fast_config(), tokenizer=byte_tokenizer)
    weight = memoir.layer.memory_weight
    memoir.edit(EDIT_PROMPT, EDIT_TARGET)
    first_columns = weight.abs().sum(0) != 0
    assert torch.equal(first_columns, torch.from_numpy(memoir.store.index.mask(0)))
    after_first = weight.detach().clone()
    memoir.edit(SECOND_PROMPT, SECOND_TARGET)
    second_mask = torch.from_numpy(memoir.store.index.mask(1))
    untouched = ~second_mask
    assert torch.equal(weight[:, untouched], after_first[:, untouched])
    assert (weight[:, ~(second_mask | first_columns)] == 0).all()
    for name, parameter in memoir.base_model.named_parameters():
        if "memory_weight" not in name:
            assert torch.equal(parameter, frozen[name.replace(".base_layer", "")]), name
            assert parameter.grad is None


@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_the_original_model(family, byte_tokenizer):
    model = make_tiny_model(family)
    original_module = model.get_submodule(memoir_hf.find_target(model).module_name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    memoir = memoir_hf.patch(model, fast_config(), tokenizer=byte_tokenizer)
    memoir.edit(EDIT_PROMPT, EDIT_TARGET)
    base = memoir.unpatch()
    assert base is model
    assert model.get_submodule(memoir_hf.find_target(model).module_name) is original_module
    assert not any(isinstance(m, MemoirLayer) for m in model.modules())
    assert not model._forward_pre_hooks
    restored = model.state_dict()
    assert restored.keys() == state.keys()
    assert all(torch.equal(restored[k], state[k]) for k in state)
    inputs = batch(byte_tokenizer, [EDIT_PROMPT], "right")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, make_tiny_model(family)(**inputs).logits)

"""Behaviour tests of the public memoir_hf API on tiny models built from config (no downloads)."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import inspect

import pytest
import torch
import transformers
from conftest import fast_config
from tiny_models import MAX_POSITIONS, PAD_ID, make_byte_tokenizer, make_tiny_model
from torch import nn

import memoir_hf
from memoir_hf import (
    EditInputError,
    MemoirConfig,
    MemoirConfigError,
    MemoirError,
    MemoirModel,
    PatchError,
    RoutingDecision,
    UnsupportedModelError,
)
from memoir_hf.editing.inputs import check_fact, encode_fact, target_text
from memoir_hf.fingerprint.tophash import TopHash
from memoir_hf.patching import registry

torch.set_num_threads(1)

SMALL = {"threshold": 0.9, "prefix_lengths": (3,), "prefix_starts": ("I", "You")}
FACTS = [
    ("The capital of France is", "Rome"),
    ("My favourite colour is", "green"),
    ("The CEO of Apple is", "Bob"),
]
D_FF = 128  # the tiny models' intermediate size


def small_config(**overrides) -> MemoirConfig:
    return MemoirConfig(**{**SMALL, **overrides})


def make_patched(model_type: str = "llama", *, seed: int = 0, use_faiss: bool | None = None,
                 **overrides) -> tuple[MemoirModel, nn.Module]:
    model = make_tiny_model(model_type, seed=seed)
    memoir = memoir_hf.patch(model, small_config(**overrides), tokenizer=make_byte_tokenizer(), use_faiss=use_faiss)
    return memoir, model


def batch(*texts: str) -> dict[str, torch.Tensor]:
    return make_byte_tokenizer()(list(texts), return_tensors="pt", padding=True)


def down_proj(model: nn.Module, layer: int) -> nn.Module:
    return model.get_submodule(memoir_hf.find_target(model, MemoirConfig(layer=layer)).module_name)


def is_unpatched(model: nn.Module) -> bool:
    return not any(isinstance(m, memoir_hf.memory.layer.MemoirLayer) for m in model.modules()) and not (
        model._forward_pre_hooks
    )


def generate_kwargs(**overrides) -> dict:
    return {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "pad_token_id": PAD_ID, **overrides}


# -- config validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [
    {"top_k": 0}, {"top_k": -3}, {"top_k": 1.5}, {"top_k": 1.0}, {"top_k": 0.0}, {"top_k": True},
    {"threshold": -0.1}, {"threshold": 1.5}, {"threshold": float("nan")},
    {"aggregation": "max"}, {"max_steps": 0}, {"learning_rate": 0}, {"layer": 3.5}, {"layer": ""},
    {"seed": -1}, {"prefix_starts": ("I", "")}, {"prefix_lengths": (0,)}, {"background_prompts": []},
])
def test_config_rejects_bad_values(settings):
    with pytest.raises(MemoirConfigError) as info:
        MemoirConfig(**settings)
    assert isinstance(info.value, MemoirError)
    assert next(iter(settings)) in str(info.value)  # the message names the setting


def test_config_accepts_good_values():
    config = MemoirConfig(top_k=0.5, threshold=1.0, layer="model.layers.0", aggregation="last", learning_rate=0.1)
    assert config.top_k == 0.5 and config.threshold == 1.0 and config.aggregation == "last"
    assert MemoirConfig(top_k=7).resolve_top_k(D_FF) == 7
    assert MemoirConfig(top_k=0.25).resolve_top_k(D_FF) == 32


def test_config_assignment_is_validated():
    config = MemoirConfig()
    config.threshold = 0.7
    assert config.threshold == 0.7
    with pytest.raises(MemoirConfigError):
        config.threshold = 2.0
    assert config.threshold == 0.7
    with pytest.raises(MemoirConfigError):
        config.top_k = 0
    assert config.top_k == MemoirConfig().top_k
    with pytest.raises(MemoirConfigError, match="no_such"):
        config.no_such = 1
    assert not hasattr(config, "no_such")
    with pytest.raises(MemoirConfigError, match="'topk' \\(did you mean 'top_k'\\?\\)"):
        config.topk = 3


def test_misspelt_setting_in_constructor_is_a_config_error_with_a_suggestion():
    with pytest.raises(MemoirConfigError, match="'treshold' \\(did you mean 'threshold'\\?\\)"):
        MemoirConfig(treshold=0.5)
    with pytest.raises(MemoirConfigError, match="'zzz'; known settings: layer, top_k"):
        MemoirConfig(threshold=0.5, zzz=1)
    copied = copy.deepcopy(MemoirConfig(threshold=0.4))  # copying builds the object without settings
    assert copied.threshold == 0.4 and dataclasses.replace(copied, top_k=8).top_k == 8


def test_top_k_larger_than_d_ff_refused_at_patch_time_and_model_left_unpatched():
    model = make_tiny_model("llama")
    tok = make_byte_tokenizer()
    config = small_config(top_k=10_000)  # valid on its own: only the layer width makes it too big
    with pytest.raises(MemoirError, match=str(D_FF)):
        memoir_hf.patch(model, config, tokenizer=tok)
    assert is_unpatched(model)
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    memoir = memoir_hf.patch(model, small_config(top_k=10), tokenizer=tok)
    assert memoir.target.top_k == 10
    assert isinstance(model.model.layers[1].mlp.down_proj, memoir_hf.memory.layer.MemoirLayer)


def test_config_dict_round_trip_and_unknown_keys():
    config = MemoirConfig(layer=-1, top_k=12, threshold=0.8, prefix_starts=["A", "B"], background_prompts=["x y"])
    values = config.to_dict()
    assert values["prefix_starts"] == ["A", "B"] and values["top_k"] == 12
    again = MemoirConfig.from_dict(values)
    assert again == config
    assert again.prefix_starts == ("A", "B") and again.background_prompts == ("x y",)
    assert MemoirConfig.from_dict(MemoirConfig().to_dict()) == MemoirConfig()
    with pytest.raises(MemoirConfigError, match="bogus"):
        MemoirConfig.from_dict({**values, "bogus": 1})
    with pytest.raises(MemoirConfigError):
        MemoirConfig.from_dict({"threshold": 3})


# -- families and layers --------------------------------------------------------------------------


def test_unsupported_family_lists_supported_types():
    model = make_tiny_model("llama")
    model.config.model_type = "not_a_family"
    for call in (lambda: memoir_hf.find_target(model),
                 lambda: memoir_hf.patch(model, small_config(), tokenizer=make_byte_tokenizer())):
        with pytest.raises(UnsupportedModelError) as info:
            call()
        message = str(info.value)
        assert "not_a_family" in message and "llama" in message and "gpt2" in message
    assert is_unpatched(model)
    assert "llama" in memoir_hf.supported_model_types()


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_default_layer_is_late(model_type):
    model = make_tiny_model(model_type)
    target = memoir_hf.find_target(model)
    assert target.num_layers == 2
    assert target.layer_index == int(2 * 27 / 32) == 1
    assert (target.d_ff, target.d_model) == (D_FF, 64)
    memoir = memoir_hf.patch(model, small_config(), tokenizer=make_byte_tokenizer())
    assert memoir.target.layer_index == 1
    assert memoir.target.module_name == target.module_name
    assert memoir.layer is model.get_submodule(target.module_name)


@pytest.mark.parametrize("model_type, prefix, down", [
    ("llama", "model.layers", "mlp.down_proj"), ("gpt2", "transformer.h", "mlp.c_proj"),
])
def test_layer_index_and_name(model_type, prefix, down):
    model = make_tiny_model(model_type)
    assert memoir_hf.find_target(model, MemoirConfig(layer=-1)).layer_index == 1
    assert memoir_hf.find_target(model, MemoirConfig(layer=-2)).layer_index == 0
    assert memoir_hf.find_target(model, MemoirConfig(layer=0)).module_name == f"{prefix}.0.{down}"
    for name in (f"{prefix}.0", f"{prefix}.0.{down}"):
        target = memoir_hf.find_target(model, MemoirConfig(layer=name))
        assert target.layer_index == 0 and target.module_name == f"{prefix}.0.{down}"
    for bad in (2, -3):
        with pytest.raises(PatchError, match="2 decoder layers"):
            memoir_hf.find_target(model, MemoirConfig(layer=bad))
    for bad_name in (f"{prefix}.0.mlp", "layers.0", "not.a.module", f"{prefix}.7"):
        with pytest.raises(PatchError, match="layer="):
            memoir_hf.find_target(model, MemoirConfig(layer=bad_name))


def test_patching_a_named_layer_replaces_only_that_layer():
    memoir, model = make_patched(layer="model.layers.0.mlp.down_proj")
    assert memoir.target.layer_index == 0
    assert isinstance(model.model.layers[0].mlp.down_proj, memoir_hf.memory.layer.MemoirLayer)
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear


def test_find_target_does_not_modify_the_model():
    model = make_tiny_model("llama")
    before_modules = [(name, type(module)) for name, module in model.named_modules()]
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    for layer in (None, 0, -1, "model.layers.1"):
        memoir_hf.find_target(model, MemoirConfig(layer=layer))
    assert [(name, type(module)) for name, module in model.named_modules()] == before_modules
    after_state = model.state_dict()
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    assert is_unpatched(model)


# -- patch / unpatch lifecycle --------------------------------------------------------------------


def test_patching_twice_is_refused():
    memoir, model = make_patched()
    with pytest.raises(PatchError, match="already patched"):
        memoir_hf.patch(model, small_config(), tokenizer=make_byte_tokenizer())
    with pytest.raises(PatchError, match="already a MemoirModel"):
        memoir_hf.patch(memoir, small_config(), tokenizer=make_byte_tokenizer())
    assert len(model._forward_pre_hooks) == 1  # the refused patches added nothing


def test_unpatched_model_refuses_use_and_can_be_patched_again():
    model = make_tiny_model("llama")
    inputs = batch("The capital of France is")
    with torch.no_grad():
        reference = model(**inputs).logits
    original = model.model.layers[1].mlp.down_proj
    memoir = memoir_hf.patch(model, small_config(), tokenizer=make_byte_tokenizer())
    memoir.edit(*FACTS[0])
    base = memoir.unpatch()
    assert base is model
    assert model.model.layers[1].mlp.down_proj is original
    assert is_unpatched(model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)
    with pytest.raises(PatchError, match="unpatched"):
        memoir.edit("a prompt", "b")
    with pytest.raises(PatchError):
        memoir(**inputs)
    with pytest.raises(PatchError):
        memoir.generate(**inputs, **generate_kwargs())
    with pytest.raises(PatchError):
        memoir.edit_many([("a prompt", "b")], progress=False)
    with pytest.raises(PatchError):
        memoir.unpatch()
    again = memoir_hf.patch(base, small_config(), tokenizer=make_byte_tokenizer())
    assert len(again.edits) == 0
    assert again.edit("Another prompt is", "here").edit_id == 0


def test_patch_needs_tokenizer():
    model = make_tiny_model("llama")
    with pytest.raises(MemoirError, match="tokenizer"):
        memoir_hf.patch(model, small_config())
    assert is_unpatched(model)


# -- edit inputs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, target, metadata, field", [
    ("", "A", None, "prompt"),
    ("  ", "A", None, "prompt"),
    ("Q:", "", None, "target"),
    ("Q:", " \n", None, "target"),
    (123, "A", None, "prompt"),
    ("Q:", None, None, "target"),
    ("Q:", "A", ["not", "a", "dict"], "metadata"),
    ("Q:", "A", {"x": object()}, "JSON"),
    ("x" * 300, "A", None, "context"),
])
def test_bad_edit_input_is_refused_and_nothing_is_stored(prompt, target, metadata, field):
    memoir, _ = make_patched()
    with pytest.raises(EditInputError, match=field) as info:
        memoir.edit(prompt, target, metadata=metadata)
    assert isinstance(info.value, MemoirError)
    assert len(memoir.edits) == 0 and len(memoir.store) == 0
    assert not memoir.layer.memory_weight.any()
    assert memoir.edit("Q: the answer is", "A").edit_id == 0  # still usable


def test_edit_many_validates_every_record_before_writing():
    memoir, _ = make_patched()
    records = [{"prompt": "The sky is", "target": "blue"}, ("Grass is", "green"), {"prompt": "Snow is"}]
    with pytest.raises(EditInputError, match="record 2"):
        memoir.edit_many(records, progress=False)
    assert memoir.edits == []
    assert not memoir.layer.memory_weight.any()
    with pytest.raises(EditInputError, match="record 1"):
        memoir.edit_many([("The sky is", "blue"), ("Grass is", "green", "extra")], progress=False)
    assert memoir.edits == []


def test_edit_many_checks_length_before_writing():
    memoir, _ = make_patched()
    with pytest.raises(EditInputError):
        memoir.edit_many([("The sky is", "blue"), ("x" * 300, "y")], progress=False)
    assert memoir.edits == []


def test_edit_many_records_and_results():
    memoir, _ = make_patched()
    start = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    records = [
        {"prompt": FACTS[0][0], "target": FACTS[0][1], "metadata": {"source": "test", "n": 1}},
        FACTS[1],
        {"prompt": FACTS[2][0], "target": FACTS[2][1]},
    ]
    results = memoir.edit_many(records, progress=False)
    assert [r.edit_id for r in results] == [0, 1, 2]
    assert memoir.edit("Water boils at", "100").edit_id == 3
    edits = memoir.edits
    assert [e.edit_id for e in edits] == [0, 1, 2, 3]
    assert [(e.prompt, e.target) for e in edits[:3]] == FACTS
    assert edits[0].metadata == {"source": "test", "n": 1}
    assert edits[1].metadata == {} and edits[2].metadata == {}
    for record, result in zip(edits, results, strict=False):
        created = datetime.datetime.fromisoformat(record.created)
        assert created.tzinfo is not None and created >= start
        assert record.success == result.success
        assert record.loss == result.loss
        assert result.steps <= SMALL.get("max_steps", 30) and result.target_accuracy >= 0.0
        assert result.routed_edit_id == result.edit_id
    assert memoir.layer.memory_weight.any()
    # the returned list and records are copies
    edits.clear()
    copy = memoir.edits[0]
    copy.metadata["source"] = "changed"
    copy.prompt = "changed"
    assert len(memoir.edits) == 4
    assert memoir.edits[0].metadata == {"source": "test", "n": 1}
    assert memoir.edits[0].prompt == FACTS[0][0]


def test_caller_metadata_dict_is_copied():
    memoir, _ = make_patched()
    metadata = {"source": "test"}
    memoir.edit(*FACTS[0], metadata=metadata)
    metadata["source"] = "changed"
    assert memoir.edits[0].metadata == {"source": "test"}


def test_nested_metadata_is_copied():
    memoir, _ = make_patched()
    metadata = {"tags": ["a"]}
    memoir.edit(*FACTS[0], metadata=metadata)
    metadata["tags"].append("b")
    memoir.edits[0].metadata["tags"].append("c")
    assert memoir.edits[0].metadata == {"tags": ["a"]}


def test_target_joining():
    assert target_text("Q:", "A") == " A"
    assert target_text("Q: ", "A") == "A"
    assert target_text("Q:\n", "A") == "A"
    tok = make_byte_tokenizer()
    joined = encode_fact(tok, check_fact("Q:", "A"), None)
    assert joined.prompt_ids == [ord("Q"), ord(":")]
    assert joined.target_ids == [ord(" "), ord("A")]
    spaced = encode_fact(tok, check_fact("Q: ", "A"), None)
    assert spaced.prompt_ids == [ord("Q"), ord(":"), ord(" ")]
    assert spaced.target_ids == [ord("A")]
    assert joined.ids == spaced.ids


# -- attribute forwarding -------------------------------------------------------------------------


def test_attribute_forwarding_and_config_copy():
    model = make_tiny_model("llama")
    config = small_config()
    memoir = memoir_hf.patch(model, config, tokenizer=make_byte_tokenizer())
    assert memoir.config is model.config
    assert memoir.get_input_embeddings() is model.get_input_embeddings()
    assert memoir.device == model.device == torch.device("cpu")
    assert memoir.base_model is model
    assert isinstance(memoir.memoir_config, MemoirConfig)
    assert memoir.memoir_config is not config and memoir.memoir_config == config
    config.threshold = 0.1
    assert memoir.memoir_config.threshold == 0.9
    with pytest.raises(AttributeError):
        memoir.no_such_attribute  # noqa: B018


# -- reading the memory ---------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_empty_memory_is_the_base_model(model_type):
    model = make_tiny_model(model_type)
    inputs = batch("The capital of France is", "Hi")
    with torch.no_grad():
        reference = model(**inputs).logits
        reference_tokens = model.generate(**batch("Hello"), **generate_kwargs())
    memoir = memoir_hf.patch(model, small_config(), tokenizer=make_byte_tokenizer())
    with torch.no_grad():
        logits = memoir(**inputs).logits
    assert torch.equal(logits, reference)
    assert memoir.routing == [RoutingDecision(None, None)] * 2
    assert all(d.edit_id is None and d.overlap is None and not d.routed for d in memoir.routing)
    tokens = memoir.generate(**batch("Hello"), **generate_kwargs())
    assert torch.equal(tokens, reference_tokens)
    assert tokens.shape[1] == len("Hello") + 5
    assert memoir.routing == [RoutingDecision(None, None)]


@pytest.mark.parametrize("use_cache", [True, False])
def test_routing_is_decided_once_per_generate(monkeypatch, use_cache):
    memoir, _ = make_patched()
    memoir.edit(*FACTS[0])
    tophash = memoir.layer.tophash
    calls = []
    original = tophash.forward

    def counting_forward(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(tophash, "forward", counting_forward)
    prompt = batch(FACTS[0][0])
    tokens = memoir.generate(**prompt, **generate_kwargs(use_cache=use_cache))
    assert tokens.shape[1] == prompt["input_ids"].shape[1] + 5  # five decoding steps really ran
    assert len(calls) == 1
    assert calls[0][1] == prompt["input_ids"].shape[1]  # decided on the prompt
    assert memoir.routing[0].edit_id == 0
    with torch.no_grad():
        memoir(**prompt)
    assert len(calls) == 2


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_disable_memory_gives_the_base_model(model_type):
    model = make_tiny_model(model_type)
    inputs = batch(FACTS[0][0], "Something else entirely")
    with torch.no_grad():
        reference = model(**inputs).logits
    memoir = memoir_hf.patch(model, small_config(), tokenizer=make_byte_tokenizer())
    memoir.edit(*FACTS[0])
    with torch.no_grad():
        with memoir.disable_memory():
            disabled = memoir(**inputs).logits
            assert memoir.routing == [RoutingDecision(None, None)] * 2
        enabled = memoir(**inputs).logits
    assert torch.equal(disabled, reference)
    assert memoir.routing[0].edit_id == 0 and memoir.routing[0].overlap == 1.0
    assert not torch.equal(enabled[0], reference[0])
    if memoir.routing[1].edit_id is None:
        assert torch.equal(enabled[1], reference[1])


# -- TopHash --------------------------------------------------------------------------------------


def padded_pair(real: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[2, width, d_ff] activations: row 0 left padded, row 1 right padded, garbage at the padding."""
    length, d_ff = real.shape
    activations = torch.randn(2, width, d_ff) * 1e4
    activations[0, width - length:] = real
    activations[1, :length] = real
    token_mask = torch.zeros(2, width, dtype=torch.long)
    token_mask[0, width - length:] = 1
    token_mask[1, :length] = 1
    return activations, token_mask


@pytest.mark.parametrize("aggregation", ["mean", "mean_minus_background", "standardized", "last"])
def test_tophash_ignores_padding(aggregation):
    torch.manual_seed(0)
    k = 20
    tophash = TopHash(D_FF, k, aggregation, seed=3)
    tophash.set_background(torch.randn(4, D_FF))
    real = torch.randn(5, D_FF)
    activations, token_mask = padded_pair(real, 9)
    masks = tophash(activations, token_mask)
    assert masks.dtype == torch.bool and masks.shape == (2, D_FF)
    assert masks.sum(dim=1).tolist() == [k, k]
    assert torch.equal(masks[0], masks[1])
    # the mask is the top-k of the aggregated prompt tokens, through the permutation
    vector = {"mean": real.mean(0), "last": real[-1], "mean_minus_background": real.mean(0) - tophash.background,
              "standardized": (real.mean(0) - tophash.background) / tophash.spread}
    expected = torch.zeros(D_FF, dtype=torch.bool)
    expected[tophash.permutation[vector[aggregation].abs().topk(k).indices]] = True
    assert torch.equal(masks[0], expected)
    # counting the padding would change the mask (row 1 ends in padding, so "last" would read garbage)
    assert not torch.equal(tophash(activations, torch.ones_like(token_mask))[1], masks[1])


def test_standardized_ranks_features_by_how_unusual_the_prompt_makes_them():
    """A feature that swings widely on any text (a hub) loses to one the prompt moves by several spreads."""
    torch.manual_seed(0)
    k = 1
    background_texts = torch.randn(200, D_FF) * 0.1
    background_texts[:, 0] *= 100  # feature 0 varies by ~10 on unrelated text
    prompt = background_texts.mean(0).clone()
    prompt[0] += 5.0  # half a spread: ordinary for feature 0
    prompt[3] += 1.0  # ten spreads
    activations, token_mask = prompt[None, None, :], torch.ones(1, 1)
    chosen = {}
    for aggregation in ("mean_minus_background", "standardized"):
        tophash = TopHash(D_FF, k, aggregation, seed=0)
        tophash.set_background(background_texts)
        chosen[aggregation] = tophash.permutation.argsort()[tophash(activations, token_mask)[0]].tolist()
    assert chosen == {"mean_minus_background": [0], "standardized": [3]}


def test_spread_of_the_background():
    torch.manual_seed(0)
    tophash = TopHash(D_FF, 4, "standardized", seed=0)
    texts = torch.randn(50, D_FF)
    texts[:, 1] = 7.0  # never moves on the background texts
    tophash.set_background(texts)
    assert torch.allclose(tophash.background, texts.mean(0))
    moving = torch.arange(D_FF) != 1
    assert torch.allclose(tophash.spread[moving], texts.std(0)[moving])
    # floored at a tenth of the median spread: a tiny shift of a constant feature cannot win every mask
    assert tophash.spread[1] == pytest.approx(texts.std(0).median().item() * 0.1)
    tophash.set_background(texts[:1])  # one text has no spread
    assert torch.equal(tophash.spread, torch.ones(D_FF)) and torch.equal(tophash.background, texts[0])


def test_patched_tophash_ignores_padding():
    torch.manual_seed(1)
    memoir, _ = make_patched()
    tophash = memoir.layer.tophash
    assert tophash.aggregation == "mean_minus_background" and tophash.top_k == memoir.target.top_k
    activations, token_mask = padded_pair(torch.randn(4, D_FF), 11)
    masks = tophash(activations, token_mask)
    assert torch.equal(masks[0], masks[1])
    assert masks.sum(dim=1).tolist() == [memoir.target.top_k] * 2


def test_patched_model_routes_padded_prompts_like_unpadded():
    memoir, _ = make_patched()
    for prompt, target in FACTS:
        memoir.edit(prompt, target)
    tok = make_byte_tokenizer()
    prompts = [FACTS[0][0], FACTS[1][0], "Hi"]
    with torch.no_grad():
        for side in ("left", "right"):
            tok.padding_side = side
            inputs = tok(prompts, return_tensors="pt", padding=True)
            assert inputs["attention_mask"][1].sum() < inputs["attention_mask"].shape[1]  # row 1 is padded
            # positions count real tokens only, as generate does with left padding
            position_ids = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            memoir(**inputs, position_ids=position_ids)
            assert [d.edit_id for d in memoir.routing] == [0, 1, None]
            assert [d.overlap for d in memoir.routing[:2]] == [1.0, 1.0]
    tok.padding_side = "left"
    prompt = tok([FACTS[1][0], "Hi"], return_tensors="pt", padding=True)
    memoir.generate(**prompt, **generate_kwargs())
    assert [d.edit_id for d in memoir.routing] == [1, None]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_a_static_cache_routes_left_padded_prompts_like_a_dynamic_one(family):
    """With a static cache generate's forwards get a 4D mask (a dict for Gemma 3): the prompt's tokens must
    still come from generate's own 2D mask, not count the padding."""
    memoir = memoir_hf.patch(make_tiny_model(family), fast_config(), tokenizer=make_byte_tokenizer())
    memoir.edit(*FACTS[0])
    tok = make_byte_tokenizer()
    tok.padding_side = "left"
    prompt = tok([FACTS[0][0], "Hi"], return_tensors="pt", padding=True)
    assert prompt["attention_mask"][1].sum() < prompt["attention_mask"].shape[1]
    decisions = {}
    for cache in ("dynamic", "static"):
        memoir.generate(**prompt, **generate_kwargs(), cache_implementation=cache)
        decisions[cache] = [(d.edit_id, d.overlap) for d in memoir.routing]
    assert decisions["static"] == decisions["dynamic"] and decisions["static"][0] == (0, 1.0)


@pytest.mark.parametrize("option", [{"prefill_chunk_size": 8}, {"prompt_lookup_num_tokens": 4}])
def test_generate_options_that_split_the_prompt_are_refused(option):
    memoir, _ = make_patched()
    memoir.edit(*FACTS[0])
    prompt = make_byte_tokenizer()([FACTS[0][0]], return_tensors="pt")
    with pytest.raises(MemoirError, match=f"{next(iter(option))} is not supported"):
        memoir.generate(**prompt, **generate_kwargs(), **option)
    memoir.generate(**prompt, **generate_kwargs())  # still fine without it
    assert memoir.routing[0].edit_id == 0


def test_tophash_permutation_depends_only_on_seed():
    torch.manual_seed(0)
    first = TopHash(D_FF, 10, "mean", seed=5).permutation
    torch.manual_seed(99)
    second = TopHash(D_FF, 10, "last", seed=5).permutation
    other = TopHash(D_FF, 10, "mean", seed=6).permutation
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert torch.equal(first.sort().values, torch.arange(D_FF))


# -- background -----------------------------------------------------------------------------------


def test_compute_background():
    memoir, _ = make_patched()
    background = memoir.layer.tophash.background.clone()
    assert background.shape == (D_FF,) and background.abs().sum() > 0
    memoir.compute_background(["some text", "other text"])
    changed = memoir.layer.tophash.background.clone()
    assert not torch.equal(changed, background)
    assert changed.abs().sum() > 0
    for bad in ([], "some text", ["ok", ""], ["ok", 3]):
        with pytest.raises(MemoirError):
            memoir.compute_background(bad)
    with pytest.raises(EditInputError, match=r"background texts\[1\] is \d+ tokens, longer than the model's context"):
        memoir.compute_background(["ok", "word " * 300])
    assert torch.equal(memoir.layer.tophash.background, changed)
    memoir.edit(*FACTS[0])
    with pytest.raises(MemoirError, match="before the first edit"):
        memoir.compute_background(["some text", "other text"])
    assert torch.equal(memoir.layer.tophash.background, changed)


def test_background_is_zero_without_background_aggregation():
    memoir, _ = make_patched(aggregation="mean")
    assert not memoir.layer.tophash.background.any()
    assert torch.equal(memoir.layer.tophash.spread, torch.ones(D_FF))


def test_standardized_aggregation_needs_two_different_background_texts():
    for texts in (["only one"], ["twice", "twice"]):
        with pytest.raises(MemoirConfigError, match="at least 2 different texts; got 1"):
            small_config(aggregation="standardized", background_prompts=texts)
    config = small_config(background_prompts=["only one"])
    with pytest.raises(MemoirConfigError, match="at least 2"):
        config.aggregation = "standardized"
    assert config.aggregation == "mean_minus_background"
    config = small_config(aggregation="standardized")
    with pytest.raises(MemoirConfigError, match="at least 2"):
        config.background_prompts = ["only one"]
    assert config.background_prompts is None
    memoir, _ = make_patched(aggregation="standardized")
    spread = memoir.layer.tophash.spread.clone()
    with pytest.raises(MemoirError, match="at least 2"):
        memoir.compute_background(["again", "again"])
    assert torch.equal(memoir.layer.tophash.spread, spread)
    memoir.compute_background(["one text", "another text"])
    assert not torch.equal(memoir.layer.tophash.spread, spread)


def test_standardized_memory_computes_its_spread_and_edits():
    # a step at which every fact reaches its target through these masks on the random tiny model
    memoir, _ = make_patched(aggregation="standardized", learning_rate=4.0, max_grad_norm=4.0)
    tophash = memoir.layer.tophash
    assert tophash.background.any() and (tophash.spread > 0).all()
    assert not torch.equal(tophash.spread, torch.ones(D_FF))
    for prompt, target in FACTS:
        assert memoir.edit(prompt, target).success
    with torch.no_grad():
        memoir(**batch(FACTS[0][0], "Hi"))
    assert [d.edit_id for d in memoir.routing] == [0, None]


# -- index backends end to end --------------------------------------------------------------------


def test_index_backends_agree_end_to_end():
    pytest.importorskip("faiss")
    with_faiss, _ = make_patched(seed=3, use_faiss=True)
    with_numpy, _ = make_patched(seed=3, use_faiss=False)
    assert with_faiss.store.index.use_faiss and not with_numpy.store.index.use_faiss
    results = [[memoir.edit(prompt, target) for prompt, target in FACTS] for memoir in (with_faiss, with_numpy)]
    assert [(r.edit_id, r.loss, r.success) for r in results[0]] == [(r.edit_id, r.loss, r.success) for r in results[1]]
    inputs = batch(FACTS[0][0], FACTS[2][0], "The capital of Spain is", "Hello there", FACTS[1][0])
    with torch.no_grad():
        logits_faiss = with_faiss(**inputs).logits
        logits_numpy = with_numpy(**inputs).logits
    assert with_faiss.routing == with_numpy.routing
    assert [d.edit_id for d in with_faiss.routing][:2] == [0, 2]
    assert with_faiss.routing[4].edit_id == 1
    assert all(d.overlap is not None for d in with_faiss.routing)
    assert torch.equal(logits_faiss, logits_numpy)


# -- registering a family -------------------------------------------------------------------------


def test_register_architecture():
    model = make_tiny_model("llama")
    model.config.model_type = "my_llama"
    with pytest.raises(UnsupportedModelError):
        memoir_hf.find_target(model)
    try:
        memoir_hf.register_architecture("my_llama", layers="model.layers", down_proj="mlp.down_proj")
        assert "my_llama" in memoir_hf.supported_model_types()
        memoir = memoir_hf.patch(model, small_config(), tokenizer=make_byte_tokenizer())
        assert memoir.target.model_type == "my_llama"
        assert memoir.target.module_name == "model.layers.1.mlp.down_proj"
        assert memoir.edit(*FACTS[0]).edit_id == 0
    finally:
        registry._REGISTRY.pop("my_llama", None)
    assert "my_llama" not in memoir_hf.supported_model_types()


def test_register_architecture_with_a_wrong_layout():
    model = make_tiny_model("llama")
    model.config.model_type = "my_broken_llama"
    try:
        memoir_hf.register_architecture("my_broken_llama", layers=("model.blocks", "model.layers"),
                                        down_proj="mlp.nothing")
        with pytest.raises(UnsupportedModelError, match="mlp.nothing"):
            memoir_hf.patch(model, small_config(), tokenizer=make_byte_tokenizer())
    finally:
        registry._REGISTRY.pop("my_broken_llama", None)
    assert is_unpatched(model)


@pytest.mark.parametrize(("arguments", "message"), [
    (dict(model_type="", layers="model.layers", down_proj="mlp.down_proj"), "model_type must be"),
    (dict(model_type=None, layers="model.layers", down_proj="mlp.down_proj"), "model_type must be"),
    (dict(model_type="x", layers=(), down_proj="mlp.down_proj"), "layers must be"),
    (dict(model_type="x", layers=("model.layers", 3), down_proj="mlp.down_proj"), "layers must be"),
    (dict(model_type="x", layers="model..layers", down_proj="mlp.down_proj"), "layers must be"),
    (dict(model_type="x", layers="model.layers", down_proj=None), "down_proj must be"),
    (dict(model_type="x", layers="model.layers", down_proj="mlp/down_proj"), "down_proj must be"),
])
def test_register_architecture_refuses_malformed_layouts(arguments, message):
    with pytest.raises(UnsupportedModelError, match=message):
        memoir_hf.register_architecture(**arguments)
    assert "x" not in memoir_hf.supported_model_types()


def test_find_target_refuses_a_config_that_is_not_a_memoir_config():
    with pytest.raises(PatchError, match="config must be a MemoirConfig or None, got dict"):
        memoir_hf.find_target(make_tiny_model("llama"), {"layer": 1})


def test_context_limit_comes_from_the_model():
    assert MAX_POSITIONS == 256
    memoir, _ = make_patched()
    prompt = "x" * (MAX_POSITIONS - 3)
    assert memoir.edit(prompt, "y").edit_id == 0  # 253 + 2 tokens fit
    with pytest.raises(EditInputError, match="256"):
        memoir.edit("x" * (MAX_POSITIONS - 1), "y")


# -- threshold calibration ------------------------------------------------------------------------


def test_calibrate_threshold_sets_tau_between_unrelated_text_and_the_edits():
    tok = make_byte_tokenizer()
    memoir = memoir_hf.patch(make_tiny_model("llama"), MemoirConfig(threshold=0.9, prefix_starts=("I", "You"),
                                                                    prefix_lengths=(3,)), tokenizer=tok)
    with pytest.raises(MemoirError, match="edit first"):
        memoir.calibrate_threshold()
    memoir.edit("The cat sat on the", "mat")
    memoir.edit("Bob likes to eat", "figs")
    unrelated = ["Quantum fields fluctuate", "A b c d e", "zzz yyy xxx", "Rivers flow to the sea"]
    calibration = memoir.calibrate_threshold(unrelated, negative_quantile=1.0)
    assert memoir.memoir_config.threshold == calibration.threshold
    assert calibration.negatives == len(unrelated) and calibration.positives == 2 * len(memoir.prefixes)
    assert calibration.negative_quantile < calibration.threshold <= 1.0
    for text in unrelated:
        with torch.no_grad():
            memoir(**tok([text], return_tensors="pt"))
        assert memoir.routing[0].edit_id is None, text
    with pytest.raises(MemoirError, match="non-empty"):
        memoir.calibrate_threshold([])


def test_an_edit_that_runs_out_of_steps_returns_unsuccessful_with_its_loss():
    tok = make_byte_tokenizer()
    memoir = memoir_hf.patch(make_tiny_model("llama"), MemoirConfig(threshold=0.9, prefix_starts=(),
                                                                    max_steps=1, learning_rate=1e-6), tokenizer=tok)
    result = memoir.edit("The cat sat on the", "mat")
    assert result.steps == 1 and not result.success and result.target_accuracy < 1.0
    assert result.loss > memoir.memoir_config.stop_loss and result.loss == memoir.edits[0].loss
    assert memoir.edits[0].success is False and len(memoir.edits) == 1


# -- review fixes: locked structure, prompt_mask shape, routing state, user caches ---------------


def _patched(**overrides):
    tok = make_byte_tokenizer()
    settings = {"threshold": 0.9, "prefix_starts": ("I",), "prefix_lengths": (3,), **overrides}
    return memoir_hf.patch(make_tiny_model("llama"), MemoirConfig(**settings), tokenizer=tok), tok


@pytest.mark.parametrize("name, value", [("top_k", 0.1), ("aggregation", "last"), ("seed", 3), ("layer", 0)])
def test_structural_settings_are_fixed_once_patched(name, value):
    memoir, _ = _patched()
    with pytest.raises(MemoirConfigError, match="fixed once a model is patched"):
        setattr(memoir.memoir_config, name, value)
    memoir.memoir_config.threshold = 0.7
    assert memoir.memoir_config.threshold == 0.7
    with pytest.raises(AttributeError):
        memoir.memoir_config = MemoirConfig()


def test_changed_prefix_settings_take_effect_at_the_next_edit(tmp_path):
    memoir = memoir_hf.patch(make_tiny_model("llama"), fast_config(prefix_starts=("I", "You"), prefix_lengths=(3,)),
                             tokenizer=make_byte_tokenizer())
    memoir.edit("The cat sat on the", "mat")
    assert len(memoir.prefixes) == 2
    memoir.memoir_config.prefix_starts = ("Q: ",)
    memoir.edit("Bob likes to eat", "figs")
    assert len(memoir.prefixes) == 1 and memoir.prefixes[0].startswith("Q: ")
    memoir.memoir_config.prefix_lengths = (3, 4)  # changed, then saved before any edit uses it
    memoir.save_pretrained(tmp_path / "ckpt")
    loaded = MemoirModel.from_pretrained(make_tiny_model("llama"), tmp_path / "ckpt", make_byte_tokenizer())
    assert len(loaded.prefixes) == 2 and loaded.memoir_config.prefix_lengths == (3, 4)
    loaded.memoir_config.prefix_starts = ()
    loaded.edit("Alice plays the", "drums")
    assert loaded.prefixes == []


@pytest.mark.parametrize("value", ["Q: ", 5])
def test_sequence_settings_refuse_strings_and_scalars(value):
    with pytest.raises(MemoirConfigError, match="prefix_starts"):
        MemoirConfig(prefix_starts=value)
    config = MemoirConfig()
    with pytest.raises(MemoirConfigError, match="prefix_starts"):
        config.prefix_starts = value


def test_prompt_mask_of_the_wrong_shape_is_refused():
    memoir, tok = _patched()
    memoir.edit("The cat sat on the", "mat")
    ids = torch.tensor([tok("The cat sat on the mat")["input_ids"]])
    with pytest.raises(MemoirError, match="prompt_mask"):
        memoir(input_ids=ids, prompt_mask=torch.ones(1, ids.shape[1] - 1))


def cache_keywords() -> list[str]:
    """The keywords the installed transformers takes a KV cache by (5.24 renamed past_key_values to cache and
    still takes the old name)."""
    names = inspect.signature(transformers.LlamaForCausalLM.forward).parameters
    return ["past_key_values"] + (["cache"] if "cache" in names else [])


@pytest.mark.parametrize("keyword", cache_keywords())
def test_an_edit_leaves_the_cached_decoding_decision_alone(keyword):
    memoir, tok = _patched()
    memoir.edit("The cat sat on the", "mat")
    ids = torch.tensor([tok("Quantum fields fluctuate")["input_ids"]])
    with torch.no_grad():
        out = memoir(input_ids=ids, use_cache=True)
    before = memoir.routing
    memoir.edit("Bob likes to eat", "figs")  # here as near to the prompt as the first edit: a new decision picks it
    assert memoir.routing == before and memoir.router._call.routed is None
    with torch.no_grad():
        memoir(input_ids=ids[:, -1:], use_cache=True, **{keyword: out.past_key_values})
    assert memoir.routing == before


@pytest.mark.parametrize("keyword", cache_keywords())
def test_generate_with_a_user_cache_decides_from_its_own_first_step(keyword):
    memoir, tok = _patched()
    memoir.edit("The cat sat on the", "mat")
    prompt = torch.tensor([tok("The cat sat on the")["input_ids"]])
    with torch.no_grad():
        memoir(input_ids=torch.tensor([tok("Quantum fields fluctuate")["input_ids"]]))
    stale = memoir.routing
    with torch.no_grad():
        cache = memoir.base_model(input_ids=prompt[:, :-1], use_cache=True).past_key_values
    memoir.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **{keyword: cache},
                    max_new_tokens=2, do_sample=False, pad_token_id=PAD_ID)
    # Decided afresh in this generate (from the tokens not yet in the cache), not reused from the last call.
    assert memoir.routing != stale and memoir.routing[0].nearest_edit_id == 0


def test_saving_onto_a_file_is_a_clear_error(tmp_path):
    memoir, _ = _patched()
    (tmp_path / "file").write_text("x")
    with pytest.raises(MemoirError, match="not a folder"):
        memoir.save_pretrained(tmp_path / "file")


def test_asking_for_faiss_without_faiss_is_a_clear_error(monkeypatch):
    from memoir_hf.index import mask_index

    monkeypatch.setattr(mask_index, "faiss", None)
    with pytest.raises(MemoirError, match="pip install faiss-cpu"):
        mask_index.MaskIndex(8, 2, use_faiss=True)


def test_deepcopy_of_a_patched_model_is_independent(byte_tokenizer):
    memoir = memoir_hf.patch(make_tiny_model("llama"), fast_config(max_steps=20), tokenizer=byte_tokenizer)
    memoir.edit("The cat sat on the", "mat")
    copied = copy.deepcopy(memoir)
    ids = byte_tokenizer(["The cat sat on the"], return_tensors="pt")
    before = memoir(**ids).logits
    assert torch.equal(copied(**ids).logits, before) and copied.routing[0].edit_id == 0
    copied.edit("Bob likes to eat", "figs")
    assert [e.prompt for e in memoir.edits] == ["The cat sat on the"] and len(copied.edits) == 2
    assert torch.equal(memoir(**ids).logits, before)
    assert copied.store.index.search_method == memoir.store.index.search_method


# -- arguments users mix up: refused with what to pass instead ---------------------------------------

def test_patch_refuses_a_tokenizer_or_dict_as_config_and_a_string_as_tokenizer():
    tok = make_byte_tokenizer()
    with pytest.raises(PatchError, match="looks like a tokenizer"):
        memoir_hf.patch(make_tiny_model("llama"), tok)
    with pytest.raises(PatchError, match="MemoirConfig\\(\\*\\*settings\\)"):
        memoir_hf.patch(make_tiny_model("llama"), {"threshold": 0.5}, tokenizer=tok)
    with pytest.raises(PatchError, match="loaded tokenizer"):
        memoir_hf.patch(make_tiny_model("llama"), fast_config(), tokenizer="gpt2")


def test_attaching_to_a_patched_model_says_it_is_patched(tmp_path):
    memoir, _ = make_patched()
    memoir.edit(*FACTS[0])
    memoir.save_pretrained(tmp_path / "ckpt")
    for model in (memoir, memoir.base_model):
        with pytest.raises(PatchError, match="already (a MemoirModel|patched)"):
            MemoirModel.from_pretrained(model, tmp_path / "ckpt", make_byte_tokenizer())


def test_an_unpatched_wrapper_says_so_for_forwarded_attributes():
    memoir, _ = make_patched()
    memoir.unpatch()
    with pytest.raises(PatchError, match="unpatched, so it no longer has 'config'"):
        memoir.config  # noqa: B018
    with pytest.raises(PatchError, match="save_pretrained before unpatch"):
        memoir.edit(*FACTS[0])


@pytest.mark.parametrize("mask", [[[1, 1]], torch.ones(2), torch.full((1, 2), float("nan")), torch.full((1, 2), 2)])
def test_a_malformed_prompt_mask_is_refused(mask):
    memoir, _ = make_patched()
    memoir.edit(*FACTS[0])
    with pytest.raises(MemoirError, match="prompt_mask"):
        memoir(torch.tensor([[65, 66]]), prompt_mask=mask)
    prompt = make_byte_tokenizer()([FACTS[0][0]], return_tensors="pt")
    with pytest.raises(MemoirError, match="generate takes no prompt_mask"):
        memoir.generate(**prompt, **generate_kwargs(), prompt_mask=torch.ones_like(prompt["input_ids"]))

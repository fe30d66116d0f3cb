"""The cached edit path (frozen prefix run once) writes the same W_m as running the whole network."""

from __future__ import annotations

import pytest
import torch
from conftest import fast_config
from tiny_models import FAMILIES, make_tiny_model

import memoir_hf


def edited_memory(family: str, tokenizer, *, reuse: bool) -> tuple[torch.Tensor, list]:
    memoir = memoir_hf.patch(make_tiny_model(family), fast_config(max_steps=8), tokenizer=tokenizer)
    memoir.edit_path = "cached" if reuse else "naive"
    results = [memoir.edit("The cat sat on the", "mat"), memoir.edit("Bob likes to eat", "figs")]
    return memoir.layer.memory_weight.detach().clone(), results


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_and_full_paths_write_the_same_memory(family, byte_tokenizer):
    cached, cached_results = edited_memory(family, byte_tokenizer, reuse=True)
    full, full_results = edited_memory(family, byte_tokenizer, reuse=False)
    assert cached.abs().sum() > 0
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)
    assert [r.steps for r in cached_results] == [r.steps for r in full_results]
    assert [r.loss for r in cached_results] == pytest.approx([r.loss for r in full_results], rel=1e-4, abs=1e-6)


def test_cached_path_leaves_the_model_as_it_was(byte_tokenizer):
    model = make_tiny_model("llama")
    memoir = memoir_hf.patch(model, fast_config(max_steps=4), tokenizer=byte_tokenizer)
    memoir.edit("The cat sat on the", "mat")
    assert all("forward" not in module.__dict__ for module in model.modules())


def test_unknown_edit_path_is_refused_with_the_choices(byte_tokenizer):
    memoir = memoir_hf.patch(make_tiny_model("llama"), fast_config(max_steps=2), tokenizer=byte_tokenizer)
    with pytest.raises(memoir_hf.MemoirError, match="cached.*naive"):
        memoir.edit_path = "fast"
    assert memoir.edit_path == "cached"


def test_bf16_autocast_edits_succeed_and_keep_the_memory_in_float32(byte_tokenizer):
    memoir = memoir_hf.patch(make_tiny_model("llama"), fast_config(max_steps=30, edit_autocast="bfloat16"),
                             tokenizer=byte_tokenizer)
    result = memoir.edit("The cat sat on the", "mat")
    assert result.success and result.routed_edit_id == result.edit_id
    assert memoir.layer.memory_weight.dtype == torch.float32
    assert memoir.layer.memory_weight.abs().sum() > 0


@pytest.mark.parametrize("value", ["bf16", "float32", 16])
def test_unknown_autocast_dtype_is_refused(value):
    with pytest.raises(memoir_hf.MemoirConfigError, match="edit_autocast"):
        memoir_hf.MemoirConfig(edit_autocast=value)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_path_with_layers_above_the_memory_writes_the_same_memory(family, byte_tokenizer):
    """Layer 0 of 2: the top layer's MLP runs at the target positions only on the cached path."""
    def edited(reuse: bool) -> tuple[torch.Tensor, list[int]]:
        memoir = memoir_hf.patch(make_tiny_model(family), fast_config(max_steps=6, layer=0), tokenizer=byte_tokenizer)
        memoir.edit_path = "cached" if reuse else "naive"
        results = [memoir.edit("The cat sat on the", "mat"), memoir.edit("Bob likes to eat", "figs")]
        return memoir.layer.memory_weight.detach().clone(), [r.steps for r in results]

    (cached, cached_steps), (full, full_steps) = edited(True), edited(False)
    assert cached.abs().sum() > 0
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)
    assert cached_steps == full_steps


def test_a_top_mlp_returning_more_than_a_tensor_runs_in_full_from_then_on():
    from memoir_hf.editing.prefix_cache import _at_positions_only

    calls = []

    def mixture_of_experts(hidden_states):
        calls.append(hidden_states.shape[1])
        return hidden_states * 2, None

    forward = _at_positions_only(mixture_of_experts, 2, 4)
    hidden = torch.randn(3, 6, 5)
    for _ in range(2):
        output, _ = forward(hidden)
        torch.testing.assert_close(output, hidden * 2)
    assert calls == [2, 6, 6]  # one sliced try, then the full MLP on every call


def test_weight_decay_never_shrinks_what_earlier_edits_wrote(byte_tokenizer):
    """Decay pulls an edit's own change toward zero. In an edit's first step there is no change yet, so a
    one-step edit writes the same W_m with decay as without, although its columns hold an earlier write
    (decay on the columns' values, as in the reference code, would shrink that write)."""
    written = []
    for weight_decay in (0.0, 0.5):
        memoir = memoir_hf.patch(make_tiny_model("llama"), fast_config(max_steps=8), tokenizer=byte_tokenizer)
        first = memoir.edit("The cat sat on the", "mat")
        memoir.memoir_config.max_steps, memoir.memoir_config.weight_decay = 1, weight_decay
        second = memoir.edit("Bob likes to eat", "figs")
        assert second.steps == 1
        deltas = memoir.store.deltas
        shared = sorted(set(deltas[first.edit_id].columns.tolist()) & set(deltas[second.edit_id].columns.tolist()))
        written.append(memoir.layer.memory_weight.detach().clone())
    assert shared and written[0][:, shared].abs().sum() > 0  # the second edit did rewrite the first one's columns
    torch.testing.assert_close(written[1], written[0], rtol=0, atol=0)

"""protect_earlier_edits: the second moment of earlier edits' keys, and the penalty it puts on a new write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import fast_config, written_before_file_checksums
from safetensors.torch import load_file, save_file
from tiny_models import make_byte_tokenizer, make_tiny_model

import memoir_hf
from memoir_hf import CheckpointError, MemoirConfigError, MemoirModel
from memoir_hf.editing import trainer
from memoir_hf.editing.inputs import Fact
from memoir_hf.editing.trainer import _inverse_metric
from memoir_hf.fingerprint.activations import capture_down_proj_inputs
from memoir_hf.memory.earlier_keys import EarlierKeys
from memoir_hf.persistence import checkpoint

FIRST = ("The capital of France is", "Rome")
SECOND = ("The capital of Spain is", "Oslo")
THIRD = ("Water boils at", "100 degrees")
MEMORY_FILE = "memoir_memory.safetensors"


def test_moment_sums_each_edits_mean_over_its_real_tokens_under_its_mask():
    keys = EarlierKeys(4)
    assert keys.restricted_to(torch.tensor([0, 1])) is None
    first = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [3.0, 0.0, 1.0, 0.0], [9.0, 9.0, 9.0, 9.0]]])
    first_columns, second_columns = torch.tensor([0, 1]), torch.tensor([1, 2])
    keys.add(first_columns, EarlierKeys.moment(first, torch.tensor([[1, 1, 0]]), first_columns))
    second = torch.tensor([[[0.0, 2.0, 2.0, 0.0]]])
    keys.add(second_columns, EarlierKeys.moment(second, torch.tensor([[1]]), second_columns))
    # First edit, columns 0 and 1 kept, the padded token ignored: mean of [1,2][1,2]^T and [3,0][3,0]^T.
    first_mean = torch.tensor([[1.0, 2.0], [2.0, 4.0]]) / 2 + torch.tensor([[9.0, 0.0], [0.0, 0.0]]) / 2
    second_mean = torch.tensor([[0.0, 0.0], [0.0, 4.0]])
    assert torch.allclose(keys.restricted_to(torch.tensor([0, 1])), first_mean + second_mean)
    assert torch.allclose(keys.restricted_to(torch.tensor([2])), torch.tensor([[4.0]]))
    assert keys.edits == 2


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("edit_path", ["cached", "naive"])
def test_an_edit_records_the_moment_of_the_inputs_it_was_trained_on(family, edit_path):
    """The keys come from the training steps themselves (no second pass): they must be the batch's own inputs."""
    memoir = memoir_hf.patch(make_tiny_model(family), fast_config(protect_earlier_edits=1.0),
                             tokenizer=make_byte_tokenizer())
    memoir.edit_path = edit_path
    memoir.edit(*FIRST)
    encoded = memoir._encode(Fact(*FIRST, {}))
    batch = memoir._edit_batch(FIRST[0], encoded, memoir._context_length)
    inputs = capture_down_proj_inputs(memoir.base_model, memoir.layer, batch.input_ids, batch.attention_mask)
    columns = memoir._fingerprint(encoded.prompt_ids).nonzero().squeeze(1)
    expected = EarlierKeys.moment(inputs, batch.attention_mask, columns)
    assert memoir.earlier_keys.edits == 1
    assert torch.allclose(memoir.earlier_keys.restricted_to(columns), expected, rtol=1e-5, atol=1e-7)
    # Nothing outside the edit's columns: those rows and columns of C stay zero.
    assert memoir.earlier_keys.moment_sum.count_nonzero() == expected.count_nonzero()


def read_move_of_first_edit(strength: float) -> tuple[float, memoir_hf.MemoirModel]:
    """How far the second edit moves what the first edit's tokens read: tr(ΔW C ΔW^T) over its columns."""
    config = fast_config(top_k=0.75, protect_earlier_edits=strength, max_steps=20, learning_rate=3.0,
                         max_grad_norm=3.0)
    memoir = memoir_hf.patch(make_tiny_model("llama"), config, tokenizer=make_byte_tokenizer())
    memoir.edit(*FIRST)
    first_moment = memoir.earlier_keys.moment_sum.clone()
    second = memoir.edit(*SECOND)
    delta = memoir.store.deltas[second.edit_id]
    moment = first_moment[delta.columns][:, delta.columns]
    return float(((delta.values @ moment) * delta.values).sum()), memoir


def test_protection_moves_the_earlier_edit_less_and_still_writes_the_new_one():
    unprotected, _ = read_move_of_first_edit(1e-12)
    protected, memoir = read_move_of_first_edit(1.0)
    assert unprotected > 0
    assert protected < 0.5 * unprotected
    assert [record.success for record in memoir.store.records] == [True, True]


def edit_against_overwhelming_keys(**settings) -> memoir_hf.EditResult:
    """An edit whose every direction earlier edits read a million times over: protected steps barely move it."""
    config = fast_config(**{"protect_earlier_edits": 1.0, "max_steps": 4, "learning_rate": 3.0, "max_grad_norm": 3.0,
                            **settings})
    memoir = memoir_hf.patch(make_tiny_model("llama"), config, tokenizer=make_byte_tokenizer())
    keys = EarlierKeys(memoir.target.d_ff)
    keys.moment_sum = 1e6 * torch.eye(memoir.target.d_ff)
    keys.edits = 1
    memoir.earlier_keys = keys
    return memoir.edit(*FIRST)


def test_unprotected_steps_let_an_edit_the_protection_leaves_stuck_land():
    stuck = edit_against_overwhelming_keys()
    landed = edit_against_overwhelming_keys(unprotected_steps=40)
    assert stuck.steps == 4 and not stuck.success
    assert 4 < landed.steps <= 44 and landed.success
    assert landed.loss < 0.5 * stuck.loss


def test_the_unprotected_steps_come_after_exactly_max_steps_protected_ones(monkeypatch):
    """Against keys of 1e6 the protected gradient is a millionth of the plain one: the step norms tell them apart."""
    norms = []
    take_step = trainer._sgd_step
    monkeypatch.setattr(trainer, "_sgd_step", lambda delta, grad, *rest: (norms.append(float(grad.norm())),
                                                                            take_step(delta, grad, *rest)))
    result = edit_against_overwhelming_keys(unprotected_steps=40)
    assert len(norms) == result.steps > 4
    assert max(norms[:4]) < 1e-4 < min(norms[4:])


def test_an_edit_that_lands_in_max_steps_is_written_the_same_with_or_without_unprotected_steps():
    def landed(unprotected_steps: int) -> memoir_hf.MemoirModel:
        config = fast_config(protect_earlier_edits=1.0, stop_loss=1.5, learning_rate=3.0, max_grad_norm=3.0,
                             unprotected_steps=unprotected_steps)
        memoir = memoir_hf.patch(make_tiny_model("llama"), config, tokenizer=make_byte_tokenizer())
        memoir.edit(*FIRST)
        assert memoir.edit(*SECOND).steps < memoir.memoir_config.max_steps
        return memoir

    assert torch.equal(landed(0).layer.memory_weight, landed(40).layer.memory_weight)


def test_unprotected_steps_are_not_taken_without_protection():
    plain = memoir_hf.patch(make_tiny_model("llama"), fast_config(max_steps=3, stop_loss=0.0, unprotected_steps=40),
                            tokenizer=make_byte_tokenizer())
    assert plain.edit(*FIRST).steps == 3


@pytest.mark.parametrize("value", [-1, 1.5, True, "3"])
def test_unprotected_steps_must_be_a_non_negative_int(value):
    with pytest.raises(MemoirConfigError, match="unprotected_steps"):
        memoir_hf.MemoirConfig(unprotected_steps=value)


def test_no_moment_is_kept_without_protection():
    memoir = memoir_hf.patch(make_tiny_model("llama"), fast_config(), tokenizer=make_byte_tokenizer())
    memoir.edit(*FIRST)
    assert memoir.earlier_keys is None


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), True, "1"])
def test_protect_earlier_edits_must_be_a_finite_non_negative_number(value):
    with pytest.raises(MemoirConfigError, match="protect_earlier_edits"):
        memoir_hf.MemoirConfig(protect_earlier_edits=value)


# -- persistence ----------------------------------------------------------------------------------


def protected_memoir(facts) -> memoir_hf.MemoirModel:
    memoir = memoir_hf.patch(make_tiny_model("llama"), fast_config(protect_earlier_edits=1.0),
                             tokenizer=make_byte_tokenizer())
    for fact in facts:
        memoir.edit(*fact)
    return memoir


def attach(folder: Path) -> memoir_hf.MemoirModel:
    return MemoirModel.from_pretrained(make_tiny_model("llama"), folder, tokenizer=make_byte_tokenizer())


def test_saved_keys_load_back_and_the_next_edit_is_written_as_without_the_save(tmp_path):
    memoir = protected_memoir([FIRST, SECOND])
    memoir.save_pretrained(tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "memoir_config.json").read_text())
    assert manifest["format_version"] == 2 and manifest["memoir_config"]["protect_earlier_edits"] == 1.0
    loaded = attach(tmp_path / "ckpt")
    assert loaded.earlier_keys.edits == 2
    assert torch.equal(loaded.earlier_keys.moment_sum, memoir.earlier_keys.moment_sum)
    for model in (memoir, loaded):
        model.edit(*THIRD)
    assert torch.equal(loaded.earlier_keys.moment_sum, memoir.earlier_keys.moment_sum)
    assert torch.equal(loaded.layer.memory_weight, memoir.layer.memory_weight)


def test_an_unprotected_checkpoint_stays_format_1_without_keys(tmp_path):
    memoir = memoir_hf.patch(make_tiny_model("llama"), fast_config(), tokenizer=make_byte_tokenizer())
    memoir.edit(*FIRST)
    memoir.save_pretrained(tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "memoir_config.json").read_text())
    assert manifest["format_version"] == 1
    assert not {"protect_earlier_edits", "unprotected_steps"} & set(manifest["memoir_config"])
    assert not any("earlier_keys" in name for name in load_file(tmp_path / "ckpt" / MEMORY_FILE))
    assert attach(tmp_path / "ckpt").earlier_keys is None


def test_unprotected_steps_make_a_format_3_checkpoint_that_version_2_readers_refuse(tmp_path, monkeypatch):
    memoir = memoir_hf.patch(make_tiny_model("llama"), fast_config(protect_earlier_edits=1.0, unprotected_steps=5),
                             tokenizer=make_byte_tokenizer())
    memoir.edit(*FIRST)
    memoir.save_pretrained(tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "memoir_config.json").read_text())
    assert manifest["format_version"] == 3 and manifest["memoir_config"]["unprotected_steps"] == 5
    assert attach(tmp_path / "ckpt").memoir_config.unprotected_steps == 5
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 2)  # a release that reads up to version 2
    with pytest.raises(CheckpointError, match="format version 3, newer.*upgrade memoir_hf"):
        attach(tmp_path / "ckpt")


@pytest.mark.parametrize("corrupt", ["nan moment", "negative count", "float count", "count missing", "wrong shape"])
def test_corrupt_saved_keys_are_refused(tmp_path, corrupt):
    memoir = protected_memoir([FIRST])
    folder = tmp_path / "ckpt"
    memoir.save_pretrained(folder)
    tensors = load_file(folder / MEMORY_FILE)
    prefix = f"{memoir.target.module_name}.earlier_keys"
    moment = tensors[f"{prefix}.moment_sum"]
    if corrupt == "nan moment":
        tensors[f"{prefix}.moment_sum"] = torch.full_like(moment, float("nan"))
    elif corrupt == "negative count":
        tensors[f"{prefix}.edits"] = torch.tensor(-1)
    elif corrupt == "float count":
        tensors[f"{prefix}.edits"] = torch.tensor(1.0)
    elif corrupt == "count missing":
        del tensors[f"{prefix}.edits"]
    else:
        tensors[f"{prefix}.moment_sum"] = moment[:-1]
    save_file(tensors, folder / MEMORY_FILE)
    written_before_file_checksums(folder)
    with pytest.raises(CheckpointError, match="earlier_keys"):
        attach(folder)


def test_a_failed_commit_takes_its_moment_back_bit_for_bit():
    keys = EarlierKeys(4)
    columns = torch.tensor([0, 2])
    keys.add(columns, torch.tensor([[0.1, 0.2], [0.2, 0.3]]))
    before = keys.moment_sum.clone()
    with pytest.raises(RuntimeError, match="disk full"), keys.added(torch.tensor([2, 3]),
                                                                    torch.tensor([[1 / 3, 0.7], [0.7, 0.9]])):
        raise RuntimeError("disk full")
    assert torch.equal(keys.moment_sum, before) and keys.edits == 1


def test_an_edit_whose_store_write_fails_leaves_the_keys_as_they_were(monkeypatch):
    memoir = memoir_hf.patch(make_tiny_model("llama"), fast_config(protect_earlier_edits=1.0),
                             tokenizer=make_byte_tokenizer())
    memoir.edit(*FIRST)
    before = memoir.earlier_keys.moment_sum.clone()

    def full_disk(*args, **kwargs):
        raise OSError("no space left")

    monkeypatch.setattr(memoir.store, "add", full_disk)
    with pytest.raises(OSError, match="no space left"):
        memoir.edit(*SECOND)
    assert torch.equal(memoir.earlier_keys.moment_sum, before) and memoir.earlier_keys.edits == 1


def test_the_step_metric_stays_a_contraction_when_earlier_keys_dwarf_the_identity():
    """μ times C's top eigenvalue at 1e6 (a long run): a float32 inverse of I + μC turns indefinite."""
    generator = torch.Generator().manual_seed(0)
    factors = torch.randn(512, 20, generator=generator)
    earlier = factors @ factors.T
    strength = 1e6 / float(torch.linalg.eigvalsh(earlier)[-1])
    inverse = _inverse_metric(earlier, strength).double()
    exact = torch.linalg.inv(torch.eye(512, dtype=torch.float64) + strength * earlier.double())
    assert torch.linalg.eigvalsh(inverse).min() > 0
    assert torch.allclose(inverse, exact, atol=1e-6)

"""MemoirConfig from YAML files, MEMOIR_* environment variables and arguments, with their precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from memoir_hf import MemoirConfig, MemoirConfigError
from memoir_hf.config_sources import ENVIRONMENT_VARIABLES, environment_settings, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def no_memoir_env(monkeypatch):
    for variable in ENVIRONMENT_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path, no_memoir_env):
    config = MemoirConfig.from_yaml(path)
    assert isinstance(config, MemoirConfig)


def test_shipped_configs_cover_the_tested_and_the_paper_models():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} >= {"smollm2-135m", "gemma3-270m", "llama3-8b", "mistral-7b"}


def test_smollm2_config_holds_its_tuned_step_and_the_paper_rest(no_memoir_env):
    config = MemoirConfig.from_yaml(CONFIGS / "smollm2-135m.yaml")
    assert (config.learning_rate, config.max_grad_norm) == (3.0, 3.0)
    assert config.max_steps == MemoirConfig().max_steps and config.top_k == MemoirConfig().top_k


def test_paper_config_for_llama3(no_memoir_env):
    config = MemoirConfig.from_yaml(CONFIGS / "llama3-8b.yaml")
    assert (config.layer, config.top_k, config.learning_rate, config.weight_decay) == (27, 4096, 1.0, 1e-5)


def test_precedence_argument_over_environment_over_file_over_default(tmp_path):
    path = write(tmp_path / "c.yaml", "threshold: 0.3\nmax_steps: 12\nlearning_rate: 2.0\n")
    environ = {"MEMOIR_MAX_STEPS": "20", "MEMOIR_LR": "4"}
    config = load_config(path, environ=environ, learning_rate=5.0)
    assert config.learning_rate == 5.0      # argument beats environment and file
    assert config.max_steps == 20           # environment beats file
    assert config.threshold == 0.3          # file beats default
    assert config.stop_loss == MemoirConfig().stop_loss  # default


def test_from_yaml_reads_the_process_environment(tmp_path, monkeypatch, no_memoir_env):
    path = write(tmp_path / "c.yaml", "threshold: 0.3\n")
    monkeypatch.setenv("MEMOIR_THRESHOLD", "0.7")
    assert MemoirConfig.from_yaml(path).threshold == 0.7
    assert MemoirConfig.from_yaml(path, threshold=0.1).threshold == 0.1


@pytest.mark.parametrize(("variable", "text", "name", "value"), [
    ("MEMOIR_TOP_K", "439", "top_k", 439),
    ("MEMOIR_TOP_K", "0.1", "top_k", 0.1),
    ("MEMOIR_THRESHOLD", " 0.45 ", "threshold", 0.45),
    ("MEMOIR_LAYER", "-3", "layer", -3),
    ("MEMOIR_LAYER", "model.layers.20", "layer", "model.layers.20"),
    ("MEMOIR_MAX_STEPS", "60", "max_steps", 60),
    ("MEMOIR_LR", "3e-1", "learning_rate", 0.3),
])
def test_each_environment_variable(variable, text, name, value):
    assert environment_settings({variable: text}) == {name: value}


@pytest.mark.parametrize(("variable", "text"), [
    ("MEMOIR_THRESHOLD", "high"), ("MEMOIR_THRESHOLD", "2"), ("MEMOIR_THRESHOLD", "nan"),
    ("MEMOIR_MAX_STEPS", "1.5"), ("MEMOIR_MAX_STEPS", "0"), ("MEMOIR_LR", ""), ("MEMOIR_LR", "-1"),
    ("MEMOIR_TOP_K", "0"), ("MEMOIR_TOP_K", "many"),
])
def test_bad_environment_value_names_the_variable(variable, text):
    with pytest.raises(MemoirConfigError, match=variable):
        load_config(environ={variable: text})


def test_unrelated_environment_is_ignored():
    assert load_config(environ={"MEMOIR_SOMETHING": "x", "PATH": "/bin"}) == MemoirConfig()


@pytest.mark.parametrize(("text", "message"), [
    ("bogus: 1\n", "bogus"),
    ("threshold: 1.5\n", "threshold"),
    ("- 1\n- 2\n", "mapping"),
    ("threshold: [0.5\n", "not a valid YAML"),
])
def test_bad_file_raises_naming_the_file(tmp_path, text, message):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(MemoirConfigError, match=message) as error:
        load_config(path, environ={})
    assert str(path) in str(error.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(MemoirConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_empty_file_means_defaults_and_json_is_still_read(tmp_path):
    assert load_config(write(tmp_path / "empty.yaml", ""), environ={}) == MemoirConfig()
    config = load_config(write(tmp_path / "c.json", '{"learning_rate": 3.0}'), environ={})
    assert config.learning_rate == 3.0


def test_yaml_lists_become_tuples(tmp_path):
    config = load_config(write(tmp_path / "c.yaml", "prefix_starts: [A, B]\nprefix_lengths: [3]\n"), environ={})
    assert config.prefix_starts == ("A", "B") and config.prefix_lengths == (3,)


def test_yaml_reads_exponent_numbers_without_a_dot_as_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-5 as text; a setting written that way must still be the number."""
    text = "weight_decay: 1e-5\nlearning_rate: 3E+0\nprotect_earlier_edits: 1e-2\nthreshold: .5\n"
    config = load_config(write(tmp_path / "c.yaml", text), environ={})
    assert (config.weight_decay, config.learning_rate, config.protect_earlier_edits, config.threshold) == \
        (1e-5, 3.0, 0.01, 0.5)

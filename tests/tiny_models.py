"""Tiny randomly initialised causal LMs and a byte-level tokenizer for offline tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

VOCAB_SIZE = 300
EOS_ID = 256
BOS_ID = 257
PAD_ID = 258
IMAGE_ID = 260
BOI_ID = 261
EOI_ID = 262

HIDDEN_SIZE = 64
INTERMEDIATE_SIZE = 128
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS
MAX_POSITIONS = 256
# Larger than transformers' 0.02 so that a 2-layer random model has activations of trained-like
# size at the down projection, where edits train.
INITIALIZER_RANGE = 0.1
POST_MLP_NORM_GAIN = 4.0

_TOKEN_IDS: dict[str, int] = {
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": PAD_ID,
}

# Field names shared by llama-style configs (llama, mistral, qwen, gemma, phi, ...).
_LLAMA_STYLE: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": HIDDEN_SIZE,
    "intermediate_size": INTERMEDIATE_SIZE,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": NUM_HEADS,
    "num_key_value_heads": NUM_KV_HEADS,
    "max_position_embeddings": MAX_POSITIONS,
    **_TOKEN_IDS,
}

# GPT-2 style field names (gpt2, gptj).
_GPT_STYLE: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "n_embd": HIDDEN_SIZE,
    "n_inner": INTERMEDIATE_SIZE,
    "n_layer": NUM_LAYERS,
    "n_head": NUM_HEADS,
    "n_positions": MAX_POSITIONS,
    **_TOKEN_IDS,
}

# Layers alternate sliding/full attention; the window covers every position.
_GEMMA_ATTENTION: dict[str, Any] = {
    "head_dim": HEAD_DIM,
    "query_pre_attn_scalar": HEAD_DIM,
    "sliding_window": MAX_POSITIONS,
    "layer_types": ["sliding_attention", "full_attention"],
}


def _llama_style(
    config_cls: type[PreTrainedConfig], **overrides: Any
) -> PreTrainedConfig:
    """Build a llama-style config with the shared tiny sizes."""
    return config_cls(**{**_LLAMA_STYLE, **overrides})


def _gemma3_text() -> transformers.Gemma3TextConfig:
    """Tiny Gemma 3 text config, also used inside the multimodal config."""
    return _llama_style(transformers.Gemma3TextConfig, **_GEMMA_ATTENTION)


def _gemma3() -> transformers.Gemma3Config:
    """Tiny multimodal Gemma 3 config with a one-layer SigLIP vision tower."""
    vision = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    return transformers.Gemma3Config(
        text_config=_gemma3_text(),
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=IMAGE_ID,
        boi_token_index=BOI_ID,
        eoi_token_index=EOI_ID,
    )


_SPECS: dict[str, tuple[type[PreTrainedModel], Callable[[], PreTrainedConfig]]] = {
    "llama": (
        transformers.LlamaForCausalLM,
        lambda: _llama_style(transformers.LlamaConfig),
    ),
    "mistral": (
        transformers.MistralForCausalLM,
        lambda: _llama_style(transformers.MistralConfig, head_dim=HEAD_DIM),
    ),
    "qwen2": (
        transformers.Qwen2ForCausalLM,
        lambda: _llama_style(transformers.Qwen2Config),
    ),
    "qwen3": (
        transformers.Qwen3ForCausalLM,
        lambda: _llama_style(transformers.Qwen3Config, head_dim=HEAD_DIM),
    ),
    "gemma": (
        transformers.GemmaForCausalLM,
        lambda: _llama_style(transformers.GemmaConfig, head_dim=HEAD_DIM),
    ),
    "gemma2": (
        transformers.Gemma2ForCausalLM,
        lambda: _llama_style(transformers.Gemma2Config, **_GEMMA_ATTENTION),
    ),
    "gemma3_text": (transformers.Gemma3ForCausalLM, _gemma3_text),
    "gemma3": (transformers.Gemma3ForConditionalGeneration, _gemma3),
    "phi3": (
        transformers.Phi3ForCausalLM,
        lambda: _llama_style(
            transformers.Phi3Config, original_max_position_embeddings=MAX_POSITIONS
        ),
    ),
    "olmo2": (
        transformers.Olmo2ForCausalLM,
        lambda: _llama_style(transformers.Olmo2Config),
    ),
    "smollm3": (
        transformers.SmolLM3ForCausalLM,
        lambda: _llama_style(transformers.SmolLM3Config),
    ),
    "phi": (transformers.PhiForCausalLM, lambda: _llama_style(transformers.PhiConfig)),
    "starcoder2": (
        transformers.Starcoder2ForCausalLM,
        lambda: _llama_style(transformers.Starcoder2Config),
    ),
    "gpt2": (
        transformers.GPT2LMHeadModel,
        lambda: transformers.GPT2Config(**_GPT_STYLE),
    ),
    "gptj": (
        transformers.GPTJForCausalLM,
        lambda: transformers.GPTJConfig(**_GPT_STYLE, rotary_dim=HEAD_DIM),
    ),
    "gpt_neox": (
        transformers.GPTNeoXForCausalLM,
        lambda: transformers.GPTNeoXConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=HIDDEN_SIZE,
            intermediate_size=INTERMEDIATE_SIZE,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            max_position_embeddings=MAX_POSITIONS,
            **_TOKEN_IDS,
        ),
    ),
    "falcon": (
        transformers.FalconForCausalLM,
        lambda: transformers.FalconConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=HIDDEN_SIZE,
            ffn_hidden_size=INTERMEDIATE_SIZE,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            max_position_embeddings=MAX_POSITIONS,
            new_decoder_architecture=False,
            **_TOKEN_IDS,
        ),
    ),
    "opt": (
        transformers.OPTForCausalLM,
        lambda: transformers.OPTConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=HIDDEN_SIZE,
            ffn_dim=INTERMEDIATE_SIZE,
            num_hidden_layers=NUM_LAYERS,
            num_attention_heads=NUM_HEADS,
            max_position_embeddings=MAX_POSITIONS,
            **_TOKEN_IDS,
        ),
    ),
}

FAMILIES: list[str] = list(_SPECS)


def _zero_dropout(config: PreTrainedConfig) -> None:
    """Set every dropout-like probability of ``config`` and its sub-configs to 0."""
    for name, value in config.to_dict().items():
        if "drop" in name and isinstance(value, float):
            setattr(config, name, 0.0)
    for key in config.sub_configs:
        _zero_dropout(getattr(config, key))


def make_tiny_model(model_type: str, seed: int = 0) -> PreTrainedModel:
    """Build a tiny, randomly initialised float32 causal LM of the given family in eval mode."""
    if model_type not in _SPECS:
        raise ValueError(
            f"unknown model_type {model_type!r}; expected one of {FAMILIES}"
        )
    model_cls, make_config = _SPECS[model_type]
    config = make_config()
    _zero_dropout(config)
    _set_initializer_range(config, INITIALIZER_RANGE)
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    _widen_post_mlp_norms(model)
    return model


def _set_initializer_range(config: PreTrainedConfig, value: float) -> None:
    for sub_config in (config, getattr(config, "text_config", None)):
        if sub_config is not None and hasattr(sub_config, "initializer_range"):
            sub_config.initializer_range = value


@torch.no_grad()
def _widen_post_mlp_norms(model: PreTrainedModel) -> None:
    """Give norms applied after the MLP (gemma2/3, olmo2) a trained-like gain.

    At their initial gain of 1 the MLP branch of a random 64-wide model is capped at unit RMS and
    cannot move the tied output logits far enough for any edit, however long it trains; real
    Gemma-3 edits fine. Gemma norms scale by (1 + weight), OLMo2 norms by weight.
    """
    for name, module in model.named_modules():
        if name.endswith("post_feedforward_layernorm"):
            offset = 1.0 if "Gemma" in type(module).__name__ else 0.0
            module.weight.fill_(POST_MLP_NORM_GAIN - offset)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible mapping from byte values to printable unicode characters."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {byte: chr(byte) for byte in printable}
    for offset, byte in enumerate(b for b in range(256) if b not in mapping):
        mapping[byte] = chr(256 + offset)
    return mapping


def make_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: byte ``b`` has id ``b``; ``<eos>``/``<bos>``/``<pad>`` are 256/257/258."""
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=True
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<eos>", "<bos>", "<pad>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<eos>",
        bos_token="<bos>",
        pad_token="<pad>",
        padding_side="right",
        model_max_length=MAX_POSITIONS,
    )

"""load_model_config and resolve_dtype: supported formats and the errors users see."""

from __future__ import annotations

import json
import os

import pytest
import torch
from engine_core.models import load_model, load_model_config, resolve_dtype, supported_architectures

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 1024,
    "eos_token_id": 2,
}


def _write(tmp_path, config: dict, generation: dict | None = None) -> str:
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    if generation is not None:
        with open(tmp_path / "generation_config.json", "w") as f:
            json.dump(generation, f)
    return os.fspath(tmp_path)


def test_families_from_transformers_checkpoints(checkpoint_factory):
    llama3 = load_model_config(checkpoint_factory("llama3"))
    assert llama3.architecture == "LlamaForCausalLM"
    assert llama3.rope_theta == 500000.0
    assert llama3.rope_scaling_dict() == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    qwen2 = load_model_config(checkpoint_factory("qwen2"))
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.tie_word_embeddings
    assert qwen2.sliding_window is None  # use_sliding_window is false
    qwen3 = load_model_config(checkpoint_factory("qwen3"))
    assert qwen3.qk_norm and qwen3.head_dim == 32 and qwen3.rope_scaling is None
    mistral = load_model_config(checkpoint_factory("mistral"))
    assert mistral.sliding_window == 4096 and mistral.torch_dtype == "float32"
    hash(mistral)  # frozen and hashable


def test_legacy_rope_keys_and_eos_union(tmp_path):
    config = {
        **BASE,
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "linear", "factor": 2.0},
        "torch_dtype": "bfloat16",
        "eos_token_id": [2, 7],
    }
    generation = {"eos_token_id": [7, 9], "bos_token_id": 1}
    parsed = load_model_config(_write(tmp_path, config, generation))
    assert parsed.rope_theta == 500000.0
    assert parsed.rope_scaling_dict() == {"rope_type": "linear", "factor": 2.0}
    assert parsed.eos_token_ids == (2, 7, 9)
    assert parsed.bos_token_id == 1
    assert parsed.torch_dtype == "bfloat16"
    assert parsed.head_dim == 16 and parsed.num_kv_heads == 2


def test_qwen2_sliding_window_only_when_enabled(tmp_path):
    config = {**BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 128}
    assert load_model_config(_write(tmp_path, config)).sliding_window is None
    config["use_sliding_window"] = True
    assert load_model_config(_write(tmp_path, config)).sliding_window == 128


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model_config(os.fspath(tmp_path / "nope"))


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match=r"no config\.json"):
        load_model_config(os.fspath(tmp_path))


def test_unparsable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        load_model_config(os.fspath(tmp_path))


def test_unsupported_architecture_lists_supported(tmp_path):
    path = _write(tmp_path, {**BASE, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as e:
        load_model_config(path)
    for arch in supported_architectures():
        assert arch in str(e.value)
    assert "Qwen3ForCausalLM" in supported_architectures()


def test_unsupported_rope_type(tmp_path):
    config = {**BASE, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4}}
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        load_model_config(_write(tmp_path, config))


def test_partial_rotary_rejected(tmp_path):
    config = {**BASE, "rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}}
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        load_model_config(_write(tmp_path, config))


def test_missing_field(tmp_path):
    config = {k: v for k, v in BASE.items() if k != "hidden_size"}
    with pytest.raises(ValueError, match="hidden_size"):
        load_model_config(_write(tmp_path, config))


def test_resolve_dtype(checkpoint_factory, tmp_path):
    config = load_model_config(checkpoint_factory("llama"))
    assert resolve_dtype("auto", config) == torch.float32
    assert resolve_dtype("bfloat16", config) == torch.bfloat16
    assert resolve_dtype("float16", config) == torch.float16
    with pytest.raises(ValueError, match="'int8'"):
        resolve_dtype("int8", config)
    half = load_model_config(_write(tmp_path, {**BASE, "torch_dtype": "float16"}))
    assert resolve_dtype("auto", half) == torch.float32  # on CPU
    assert resolve_dtype("auto", half, "cuda") == torch.float16
    bf16 = load_model_config(_write(tmp_path, {**BASE, "dtype": "bfloat16"}))
    assert resolve_dtype("auto", bf16) == torch.bfloat16


def test_missing_weights_file(tmp_path):
    path = _write(tmp_path, BASE)
    with pytest.raises(ValueError, match=r"no model\.safetensors"):
        load_model(path, load_model_config(path), (0, 2), torch.float32, "cpu")

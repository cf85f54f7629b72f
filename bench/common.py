"""Shared benchmark pieces: the standard workload, its Qwen2-shaped random model, and that model
with a tokenizer for clients that send text."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

STANDARD_MODEL = dict(
    hidden_size=896, num_hidden_layers=8, num_attention_heads=14, num_key_value_heads=2,
    intermediate_size=4864, vocab_size=32000, max_position_embeddings=4096,
    tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1000000.0,
)


@dataclass(frozen=True)
class Workload:
    num_requests: int = 64
    prompt_len: int = 128
    output_len: int = 128
    seed: int = 0

    def prompts(self, vocab_size: int) -> list[list[int]]:
        rng = random.Random(self.seed)
        return [[rng.randrange(10, vocab_size) for _ in range(self.prompt_len)]
                for _ in range(self.num_requests)]


def standard_model_dir(root: str = "bench/out") -> str:
    """Build (once) the Qwen2-shaped random checkpoint of the standard workload."""
    path = os.path.join(root, "qwen2-shaped-150m")
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**STANDARD_MODEL, eos_token_id=2, bos_token_id=1))
    model.save_pretrained(path)
    return path


def served_model_dir(root: str = "bench/out") -> str:
    """The standard checkpoint plus a tokenizer, for benchmarks whose client sends text
    (vLLM's benchmark client): a word-level tokenizer over the model's 32000 ids ("w0 w1 ..."),
    so any random id sequence decodes to text that encodes back to the same ids."""
    path = os.path.join(root, "qwen2-shaped-150m-served")
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return path
    from tokenizers import Tokenizer, models, pre_tokenizers

    weights = os.path.abspath(standard_model_dir(root))
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(weights):
        os.symlink(os.path.join(weights, name), os.path.join(path, name))
    vocab = {f"w{i}": i for i in range(STANDARD_MODEL["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "w0",
                   "bos_token": "w1", "eos_token": "w2", "model_max_length": 4096}, f)
    return path

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


def served_model_dir(root: str = "bench/out") -> tuple[str, str]:
    """The standard checkpoint plus a tokenizer, for benchmarks whose client sends text
    (vLLM's benchmark client): a word-level tokenizer over the model's 32000 ids ("<unk> <s>
    </s> w3 w4 ..."), so random ids decode to text that encodes back to the same ids.

    Returns (model directory, tokenizer directory). The tokenizer also lies alone in its own
    directory, for transformers-based tokenizer loading (vLLM's): next to a Qwen2 config.json,
    transformers would build its Qwen2 tokenizer class around these files instead."""
    path = os.path.join(root, "qwen2-shaped-150m-served")
    tokenizer_path = os.path.join(root, "wordlevel-tokenizer")
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return path, tokenizer_path
    from tokenizers import Tokenizer, models, pre_tokenizers

    weights = os.path.abspath(standard_model_dir(root))
    os.makedirs(path, exist_ok=True)
    os.makedirs(tokenizer_path, exist_ok=True)
    for name in os.listdir(weights):
        os.symlink(os.path.join(weights, name), os.path.join(path, name))
    special = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: the model's bos 1 and eos 2
    vocab = {word: i for i, word in enumerate(special)}
    vocab.update({f"w{i}": i for i in range(len(special), STANDARD_MODEL["vocab_size"])})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(special)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>",
              "bos_token": "<s>", "eos_token": "</s>", "model_max_length": 4096}
    for directory in (tokenizer_path, path):  # the model directory last: it marks "done"
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
        tokenizer.save(os.path.join(directory, "tokenizer.json"))
    return path, tokenizer_path

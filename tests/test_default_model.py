"""The shipped default model (`models/default/`): it loads in transformers, both tokenizers agree,
and `LLM()` with no model named generates exactly what transformers generates."""

from __future__ import annotations

import os
import re

import pytest
import torch
from engine_core.models import default_model_dir, load_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine_core import LLM, SamplingParams

PROMPTS = [
    "def fibonacci(n):",
    "class Stack:\n    def __init__(self):",
    "import os\n\ndef main():",
    "for i, line in enumerate(lines):\n",
]
MAX_TOKENS = 32
SNIPPETS = [
    *PROMPTS,
    "",
    "    return self._items.pop()\n\n\n",
    "x\t= {'key': [1, 2.5e-3, None]}  # comment\r\n",
    'print(f"héllo wörld ✓ {name!r}")',
]


@pytest.fixture(scope="module")
def model_dir() -> str:
    return default_model_dir()


@pytest.fixture(scope="module")
def hf_model(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def llm():
    engine = LLM(dtype="float32")  # no model named: the shipped default
    yield engine
    engine.shutdown()


def hf_greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of `ids` (stops after EOS, as the engine does)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                             dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


def test_default_model_dir_is_the_package_folder(model_dir):
    import engine_core.models as models

    assert model_dir == os.path.join(os.path.dirname(os.path.abspath(models.__file__)), "default")
    for name in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "README.md"]:
        assert os.path.isfile(os.path.join(model_dir, name)), name
    assert os.path.getsize(os.path.join(model_dir, "model.safetensors")) < 20 * 2**20


def test_loads_in_transformers(hf_model, hf_tokenizer):
    config = hf_model.config
    assert config.model_type == "llama" and config.tie_word_embeddings
    assert config.vocab_size == len(hf_tokenizer)
    generation = hf_model.generation_config
    assert hf_tokenizer.bos_token_id == config.bos_token_id == generation.bos_token_id
    assert hf_tokenizer.eos_token_id == config.eos_token_id == generation.eos_token_id


@pytest.mark.parametrize("text", SNIPPETS)
def test_tokenizers_agree(model_dir, hf_tokenizer, text):
    ours = load_tokenizer(model_dir)
    ids = ours.encode(text)
    assert ids == hf_tokenizer(text)["input_ids"]
    assert ids[0] == ours.bos_token_id  # BOS from the post-processor, once
    assert ids[1:] == ours.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_greedy_matches_transformers(llm, hf_model):
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)  # one batch
    eos = hf_model.config.eos_token_id
    for prompt, out in zip(PROMPTS, outputs):
        expected = hf_greedy(hf_model, out.prompt_token_ids, MAX_TOKENS)
        assert out.outputs[0].token_ids == expected, prompt
        assert len(expected) == MAX_TOKENS or expected[-1] == eos


def test_chat_uses_the_template(llm, hf_model, hf_tokenizer):
    messages = [{"role": "user", "content": "Write a function that reverses a list."}]
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)[0]
    rendered = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=False)
    assert out.prompt == rendered == (
        "<s><|user|>\nWrite a function that reverses a list.\n<|assistant|>\n")
    assert out.prompt_token_ids == hf_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert out.prompt_token_ids.count(hf_tokenizer.bos_token_id) == 1
    assert out.outputs[0].token_ids == hf_greedy(hf_model, out.prompt_token_ids, 16)


def test_fibonacci_continuation_is_indented(llm):
    """A weak plausibility check, not a quality measure: after a `def` line the model goes on
    to an indented line, as Python would."""
    out = llm.generate("def fibonacci(n):", SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
                       use_tqdm=False)[0]
    assert re.search(r"\n[ \t]+\S", out.outputs[0].text), out.outputs[0].text

"""Tokenizer, chat template and incremental detokenizer on a tiny trained byte-level BPE."""

from __future__ import annotations

import json
import os

import pytest
import tokenizers
from engine_core.models import IncrementalDetokenizer, Tokenizer, load_tokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

SPECIAL = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Ünïcödé tëxt: naïve café, Straße, ½ + ¼ = ¾.",
    "日本語のテキストと中文文本。",
    "Emoji 🙂🚀 and symbols ∑∫√ mixed with ASCII 12345.",
] * 20
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXT = "Hello wörld, naïve café! 日本語 🙂🚀 ∑ done."


def _train_backend(post_bos: bool) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    if post_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return tok


def _save(directory, post_bos: bool = True, **config) -> str:
    path = os.fspath(directory)
    os.makedirs(path, exist_ok=True)
    _train_backend(post_bos).save(os.path.join(path, "tokenizer.json"))
    tokenizer_config = {
        "bos_token": "<s>",
        "eos_token": {"content": "</s>", "special": True},
        "chat_template": CHAT_TEMPLATE,
        **config,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f)
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    tok = load_tokenizer(_save(tmp_path_factory.mktemp("tok")))
    assert tok is not None
    return tok


def test_encode_decode_round_trip(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert ids[0] == tokenizer.bos_token_id == 0
    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.encode(TEXT, add_special_tokens=False) == ids[1:]
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s>" + TEXT
    assert tokenizer.eos_token_id == 1
    assert tokenizer.vocab_size == tokenizer.backend.get_vocab_size(with_added_tokens=True)


def test_add_bos_token_setting_is_enforced(tmp_path):
    added = load_tokenizer(_save(tmp_path / "add", post_bos=False, add_bos_token=True))
    assert added.encode("hi")[0] == added.bos_token_id
    removed = load_tokenizer(_save(tmp_path / "remove", post_bos=True, add_bos_token=False))
    assert removed.encode("hi") == removed.encode("hi", add_special_tokens=False)
    eos = load_tokenizer(_save(tmp_path / "eos", add_eos_token=True))
    assert eos.encode("hi")[-1] == eos.eos_token_id


def test_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    path = _save(tmp_path / "tok", eos_token="</s>")
    hf = AutoTokenizer.from_pretrained(path)
    ours = load_tokenizer(path)
    assert ours.encode(TEXT) == hf(TEXT)["input_ids"]
    messages = [{"role": "user", "content": TEXT}]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False) == expected
    assert tokenizer.apply_chat_template(messages).endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="unknown role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}])


def test_chat_template_file_and_missing_template(tmp_path):
    path = _save(tmp_path, chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(path).apply_chat_template([{"role": "user", "content": "x"}])
    with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write("{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    rendered = load_tokenizer(path).apply_chat_template([{"role": "user", "content": "x"}])
    assert rendered == "<s>[x]"


def test_load_tokenizer_without_tokenizer_json(tmp_path):
    assert load_tokenizer(os.fspath(tmp_path)) is None


@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_detokenizer_matches_full_decode(tokenizer, chunk):
    prompt = tokenizer.encode("Emoji 🙂 prompt:")
    output = tokenizer.encode(" " + TEXT + " ½ + ¼ = ¾ 中文文本", add_special_tokens=False)
    output.append(tokenizer.eos_token_id)  # special tokens are skipped
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.step(output[i : i + chunk]) for i in range(0, len(output), chunk)]
    assert all("\ufffd" not in p for p in pieces)  # never half a character
    assert "".join(pieces) == detok.text == tokenizer.decode(output)
    assert detok.text == tokenizer.decode(prompt + output)[len(tokenizer.decode(prompt)) :]


def _byte_token_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte (GPT-2's byte-to-unicode alphabet)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    char_of = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [tokenizer.backend.token_to_id(char_of[b]) for b in text.encode()]


def test_incremental_detokenizer_holds_back_partial_characters(tokenizer):
    ids = _byte_token_ids(tokenizer, "a🚀")
    assert len(ids) == 5 and None not in ids
    detok = IncrementalDetokenizer(tokenizer, [])
    assert [detok.step([i]) for i in ids] == ["a", "", "", "", "🚀"]
    assert detok.text == "a🚀"


def test_incremental_detokenizer_after_prompt_ending_mid_character_window(tokenizer):
    # The detokenizer looks at the prompt's last few tokens only; here they start inside
    # a multi-byte character.
    prompt = _byte_token_ids(tokenizer, "abcdefg🙂🙂x")
    output = tokenizer.encode(" café 🚀 ok", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    assert "".join(detok.step([i]) for i in output) == " café 🚀 ok"

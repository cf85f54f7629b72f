"""A tiny byte-level BPE tokenizer (with a chat template) added to a test checkpoint."""

from __future__ import annotations

import inspect
import json
import os
import shutil

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def add_tokenizer(model_dir: str, dest_dir: str, vocab_size: int = 512) -> str:
    """Copy the checkpoint at model_dir to dest_dir and give it tokenizer.json and
    tokenizer_config.json: <unk>=0, <s>=1 (BOS, added to every prompt), </s>=2 (EOS)."""
    import textwrap

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    shutil.copytree(model_dir, dest_dir, dirs_exist_ok=True)
    corpus = [inspect.getsource(textwrap), inspect.getsource(json.decoder),
              "héllo wörld ✓ naïve café 日本語 "]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(os.path.join(dest_dir, "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "chat_template": CHAT_TEMPLATE}
    with open(os.path.join(dest_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return dest_dir

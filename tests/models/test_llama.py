"""LlamaModel parity with transformers (float32, eager attention) through the paged cache."""

from __future__ import annotations

import pytest
import torch
from engine_core.models import LlamaModel, load_model, load_model_config
from transformers import AutoModelForCausalLM

from tests.checkpoints import FAMILIES, make_sharded_checkpoint
from tests.models.paged_runner import PagedRunner

ATOL = 1e-4


def _hf_model(path: str):
    return AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32
    ).eval()


def _hf_last_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, -1].float()


def _load(path: str, layer_range: tuple[int, int] | None = None) -> LlamaModel:
    config = load_model_config(path)
    layer_range = layer_range or (0, config.num_layers)
    return load_model(path, config, layer_range, torch.float32, "cpu")


def _prompts(lengths: list[int], vocab: int = 512, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def _assert_close(ours: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_then_decode_matches_transformers(checkpoint_factory, family):
    path = checkpoint_factory(family)
    hf, model = _hf_model(path), _load(path)
    runner = PagedRunner([model])
    seqs = _prompts([5, 11, 8])

    # One prefill step over three prompts of different lengths.
    logits = runner.step(list(enumerate(seqs)))
    for i, ids in enumerate(seqs):
        _assert_close(logits[i], _hf_last_logits(hf, ids))

    # Decode steps, one token per sequence; at step 1 a new prompt joins in the middle of
    # the batch (a mixed prefill + decode step with non-contiguous decode rows).
    extra = _prompts([6], seed=1)[0]
    for step in range(3):
        next_ids = logits.argmax(-1).tolist()
        batch = [(i, [t]) for i, t in enumerate(next_ids[:3])]
        for i, t in enumerate(next_ids[:3]):
            seqs[i].append(t)
        if step == 1:
            batch.insert(1, (3, extra))
        elif step == 2:
            seqs[3].append(next_ids[3])
            batch.append((3, [next_ids[3]]))
        logits = runner.step(batch)
        if step == 1:  # put the logits back in sequence order
            logits = logits[[0, 2, 3, 1]]
            seqs.append(list(extra))
        for i, ids in enumerate(seqs):
            _assert_close(logits[i], _hf_last_logits(hf, ids))


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_chunked_prefill_matches_transformers(checkpoint_factory, family):
    path = checkpoint_factory(family)
    hf, model = _hf_model(path), _load(path)
    runner = PagedRunner([model])
    long_prompt, short_prompt = _prompts([23, 4])

    runner.step([(0, long_prompt[:10])])  # first chunk
    # Second chunk (queries offset by the cached prefix) next to a fresh prompt.
    logits = runner.step([(1, short_prompt), (0, long_prompt[10:])])
    _assert_close(logits[0], _hf_last_logits(hf, short_prompt))
    _assert_close(logits[1], _hf_last_logits(hf, long_prompt))

    # A prefix-cache-hit style step of one more chunk, then decode.
    more = _prompts([3], seed=2)[0]
    logits = runner.step([(0, more), (1, [7])])
    _assert_close(logits[0], _hf_last_logits(hf, long_prompt + more))
    _assert_close(logits[1], _hf_last_logits(hf, [*short_prompt, 7]))


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: tied head on the last stage
def test_two_stage_split_matches_single_stage(checkpoint_factory, family):
    path = checkpoint_factory(family)
    hf = _hf_model(path)
    first, last = _load(path, (0, 2)), _load(path, (2, 4))
    assert first.is_first and not first.is_last and last.is_last and not last.is_first
    assert first.lm_head is None and first.norm is None and last.embed_tokens is None
    single = PagedRunner([_load(path)])
    split = PagedRunner([first, last])

    seqs = _prompts([7, 3])
    batch = list(enumerate(seqs))
    single_logits, split_logits = single.step(batch), split.step(batch)
    _assert_close(split_logits, single_logits)
    for i, ids in enumerate(seqs):
        _assert_close(split_logits[i], _hf_last_logits(hf, ids))
    batch = [(0, [5]), (1, [9])]
    _assert_close(split.step(batch), single.step(batch))


def test_sharded_checkpoint_loads(tmp_path):
    path = make_sharded_checkpoint(tmp_path, "llama")
    hf, model = _hf_model(path), _load(path, (0, 4))
    ids = _prompts([9])[0]
    logits = PagedRunner([model]).step([(0, ids)])
    _assert_close(logits[0], _hf_last_logits(hf, ids))
    # A later stage loads from the shards that hold its layers only.
    assert _load(path, (3, 4)).is_last


def test_stage_loads_only_its_layers(checkpoint_factory):
    config = load_model_config(checkpoint_factory("llama"))
    with torch.device("meta"):
        stage = LlamaModel(config, (1, 3))
    names = stage.weight_names()
    assert any(n.startswith("model.layers.1.") for n in names)
    assert any(n.startswith("model.layers.2.") for n in names)
    assert not any(n.startswith(("model.layers.0.", "model.layers.3.")) for n in names)
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names


def test_load_weights_rejects_bad_names_shapes_and_missing(checkpoint_factory):
    config = load_model_config(checkpoint_factory("llama"))
    model = LlamaModel(config, (0, 1))
    with pytest.raises(ValueError, match=r"unexpected weight 'model\.layers\.3"):
        model.load_weights([("model.layers.3.mlp.up_proj.weight", torch.zeros(128, 64))])
    with pytest.raises(ValueError, match="shape"):
        model.load_weights([("model.layers.0.mlp.up_proj.weight", torch.zeros(3, 64))])
    with pytest.raises(ValueError, match=r"missing weights: .*model\.layers\.0\.self_attn\.k_proj"):
        model.load_weights([("model.layers.0.mlp.up_proj.weight", torch.zeros(128, 64))])


def test_layer_range_validated(checkpoint_factory):
    config = load_model_config(checkpoint_factory("llama"))
    for bad in [(0, 0), (2, 1), (0, 5), (-1, 2)]:
        with pytest.raises(ValueError, match="layer_range"):
            LlamaModel(config, bad)


def test_kv_cache_sizes(checkpoint_factory):
    config = load_model_config(checkpoint_factory("qwen3"))
    with torch.device("meta"):
        stage = LlamaModel(config, (1, 4))
    assert stage.kv_cache_shape(10, 16) == (3, 2, 10, 16, 2, 32)
    assert stage.kv_bytes_per_block(16, torch.bfloat16) == 3 * 2 * 16 * 2 * 32 * 2


def test_bfloat16_runs_close_to_float32(checkpoint_factory):
    path = checkpoint_factory("qwen2")
    config = load_model_config(path)
    model = load_model(path, config, (0, 4), torch.bfloat16, "cpu")
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    ids = _prompts([12])[0]
    logits = PagedRunner([model]).step([(0, ids)])
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits[0], _hf_last_logits(_hf_model(path), ids), atol=0.05, rtol=0)

"""`speculative_config` as users pass it (vLLM's keys): every bad key or value is a ValueError
naming it; vLLM's defaults and older spellings are taken."""

from __future__ import annotations

import json

import pytest

from engine_core.config import EngineArgs
from engine_core.speculative_config import (
    DEFAULT_DISABLE_BY_BATCH_SIZE,
    MAX_SPECULATIVE_TOKENS,
    SpeculativeConfig,
)

NGRAM = {"method": "ngram", "num_speculative_tokens": 4}


def test_off_values_give_none_and_a_config_passes_through() -> None:
    assert SpeculativeConfig.from_value(None) is None
    assert SpeculativeConfig.from_value({}) is None
    assert SpeculativeConfig.from_value("{}") is None
    config = SpeculativeConfig("ngram", 3)
    assert SpeculativeConfig.from_value(config) is config


def test_ngram_defaults_are_vllms() -> None:
    config = SpeculativeConfig.from_value(NGRAM)
    assert config == SpeculativeConfig("ngram", 4, prompt_lookup_max=5, prompt_lookup_min=5)
    assert config.batch_size_limit == DEFAULT_DISABLE_BY_BATCH_SIZE
    only_max = SpeculativeConfig.from_value({**NGRAM, "prompt_lookup_max": 3})
    assert (only_max.prompt_lookup_min, only_max.prompt_lookup_max) == (3, 3)
    only_min = SpeculativeConfig.from_value({**NGRAM, "prompt_lookup_min": 2})
    assert (only_min.prompt_lookup_min, only_min.prompt_lookup_max) == (2, 2)
    both = SpeculativeConfig.from_value({**NGRAM, "prompt_lookup_min": 1,
                                         "prompt_lookup_max": 4, "disable_by_batch_size": 3})
    assert (both.prompt_lookup_min, both.prompt_lookup_max, both.batch_size_limit) == (1, 4, 3)


def test_json_text_and_vllms_ngram_spelling() -> None:
    from_json = SpeculativeConfig.from_value(json.dumps({**NGRAM, "prompt_lookup_max": 2}))
    assert from_json == SpeculativeConfig("ngram", 4, prompt_lookup_max=2, prompt_lookup_min=2)
    old = SpeculativeConfig.from_value({"model": "[ngram]", "num_speculative_tokens": 2,
                                        "prompt_lookup_max": 3})
    assert old == SpeculativeConfig("ngram", 2, prompt_lookup_max=3, prompt_lookup_min=3)
    assert old.model is None


def test_a_model_directory_without_method_is_a_draft_model(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    config = SpeculativeConfig.from_value({"model": str(tmp_path), "num_speculative_tokens": 3})
    assert config.method == "draft_model" and config.model == str(tmp_path)


@pytest.mark.parametrize(("value", "named"), [
    ({**NGRAM, "num_speculative_token": 4}, "num_speculative_token"),  # a typo
    ({**NGRAM, "prompt_lookup": 4}, "prompt_lookup"),
    ({"num_speculative_tokens": 4}, "method"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({**NGRAM, "method": "eagle"}, "method"),
    ({**NGRAM, "method": 5}, "method"),
    ({**NGRAM, "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({**NGRAM, "num_speculative_tokens": MAX_SPECULATIVE_TOKENS + 1}, "num_speculative_tokens"),
    ({**NGRAM, "num_speculative_tokens": "4"}, "num_speculative_tokens"),
    ({**NGRAM, "num_speculative_tokens": True}, "num_speculative_tokens"),
    ({**NGRAM, "num_speculative_tokens": 2.0}, "num_speculative_tokens"),
    ({**NGRAM, "num_speculative_tokens": None}, "num_speculative_tokens"),
    ({**NGRAM, "prompt_lookup_min": 0}, "prompt_lookup_min"),
    ({**NGRAM, "prompt_lookup_max": 0}, "prompt_lookup_max"),
    ({**NGRAM, "prompt_lookup_max": "3"}, "prompt_lookup_max"),
    ({**NGRAM, "prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min"),
    ({**NGRAM, "disable_by_batch_size": 0}, "disable_by_batch_size"),
    ({**NGRAM, "disable_by_batch_size": 1.5}, "disable_by_batch_size"),
    ({**NGRAM, "draft_tensor_parallel_size": 2}, "draft_tensor_parallel_size"),
    ({**NGRAM, "model": "/some/model"}, "model"),
    ({"method": "draft_model", "num_speculative_tokens": 3}, "model"),
    ({"method": "draft_model", "num_speculative_tokens": 3, "model": ""}, "model"),
    ({"method": "draft_model", "num_speculative_tokens": 3, "model": "/no/such/dir"}, "model"),
    ({"method": "draft_model", "num_speculative_tokens": 3, "model": "[ngram]"}, "model"),
    ({"method": "draft_model", "num_speculative_tokens": 3, "model": "/x",
      "prompt_lookup_min": 2}, "prompt_lookup_min"),
    ({"method": "draft_model", "num_speculative_tokens": 3, "model": "/x",
      "prompt_lookup_max": 2}, "prompt_lookup_max"),
])
def test_a_bad_key_or_value_is_a_value_error_naming_it(value, named) -> None:
    with pytest.raises(ValueError, match=f"speculative_config: .*{named}"):
        SpeculativeConfig.from_value(value)
    with pytest.raises(ValueError, match=named):  # also as JSON, and through EngineArgs
        EngineArgs(model="unused", speculative_config=json.dumps(value))


@pytest.mark.parametrize("value", ["{not json", "[1, 2]", "4", [NGRAM], 4])
def test_a_value_that_is_not_an_object_is_refused(value) -> None:
    with pytest.raises(ValueError, match="speculative_config"):
        SpeculativeConfig.from_value(value)


def test_construction_validates_too() -> None:
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig("ngram", 0)
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        SpeculativeConfig("ngram", 2, prompt_lookup_min=-1)

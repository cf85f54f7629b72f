"""Build one pipeline stage of a model and stream its weights from safetensors files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch
from engine_core.models.config import ModelConfig
from engine_core.models.llama import LlamaModel
from safetensors import safe_open

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(
    dtype: str, config: ModelConfig, device: torch.device | str = "cpu"
) -> torch.dtype:
    """The torch dtype for a `--dtype` value: "auto" (the checkpoint's dtype, but float32
    instead of float16 on CPU, or float32 when the checkpoint does not say), "float32",
    "bfloat16" or "float16"."""
    if dtype == "auto":
        resolved = _DTYPES.get(config.torch_dtype or "float32", torch.float32)
        if resolved == torch.float16 and torch.device(device).type == "cpu":
            return torch.float32  # float16 matmuls are slow and imprecise on CPU
        return resolved
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(
    model_dir: str,
    config: ModelConfig,
    layer_range: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device | str,
) -> LlamaModel:
    """Build the stage holding layers `layer_range` on `device` in `dtype`, in eval mode
    without gradients and with its weights packed for the device (`LlamaModel.pack_weights`),
    reading only the tensors that stage needs from the checkpoint."""
    device = torch.device(device)
    files = _weight_files(model_dir)
    with torch.device("meta"):  # no memory and no random init for the parameters
        model = LlamaModel(config, layer_range)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.load_weights(_read_tensors(files, model.weight_names()))
    model = model.eval().requires_grad_(False)
    model.pack_weights()
    return model


def _weight_files(model_dir: str) -> dict[str, str]:
    """Tensor name -> safetensors file path, from the shard index or the single file."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot read the shard index {index_path}: {e}") from e
        files = {name: os.path.join(model_dir, file) for name, file in weight_map.items()}
        for path in set(files.values()):
            if not os.path.isfile(path):
                raise ValueError(f"weight shard {path} listed in {index_path} is missing")
        return files
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise ValueError(
        f"no model.safetensors or model.safetensors.index.json in {model_dir!r}; "
        "only safetensors checkpoints are supported (convert *.bin weights first)"
    )


def _read_tensors(files: dict[str, str], names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for the wanted names found in the checkpoint, one file at a
    time; tensors of other layers are never read. Absent names are left to the model's
    missing-weight check."""
    by_file: dict[str, list[str]] = {}
    for name in names:
        if name in files:
            by_file.setdefault(files[name], []).append(name)
    for path, file_names in by_file.items():
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in file_names:
                yield name, f.get_tensor(name)

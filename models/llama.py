"""The Llama family (Llama 2/3, Mistral, Qwen2, Qwen3) as one pipeline-stage model.

A `LlamaModel` holds the decoder layers [start, end) of the checkpoint; the first stage also
holds the token embedding, the last one the final norm and the LM head. Q/K/V and gate/up
projections are fused; `load_weights` splits the checkpoint's separate tensors into them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from engine_core.models.attention_batch import AttentionBatch
from engine_core.models.config import ModelConfig
from engine_core.models.linear import Linear, can_pack, linear, pack_linear_weights
from engine_core.models.rope import RotaryEmbedding, apply_rotary
from torch import nn

# Fused parameter -> the checkpoint projections packed in it, in order.
_PACKED = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
# Checkpoint tensors that hold no weights (old checkpoints saved the RoPE frequencies).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k_cache, v_cache) of one layer


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32 and cast back, as Hugging Face Llama does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.head_dim**-0.5
        self.qkv_proj = Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionBatch,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)  # [num_tokens, Hkv, D]
        if self.qk_norm:  # Qwen3: RMSNorm over each head of q and k, before RoPE
            q = self.q_norm(q.view(num_tokens, self.num_heads, self.head_dim))
            k = self.k_norm(k.view(num_tokens, self.num_kv_heads, self.head_dim))
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        else:  # q and k are adjacent in qkv: rotate them in one go
            qk = qkv[:, : self.q_size + self.kv_size]
            qk = apply_rotary(qk.view(num_tokens, -1, self.head_dim), cos, sin)
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        # q: [num_tokens, H, D], k: [num_tokens, Hkv, D]
        out = meta.attend(q, k, v, kv_cache[0], kv_cache[1], self.scale)
        return self.o_proj(out)  # [num_tokens, hidden]


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        bias = config.mlp_bias
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [num_tokens, intermediate] each
        act = F.silu(gate)
        act.mul_(up)  # in place: one pass and one buffer fewer than `F.silu(gate) * up`, same bits
        return self.down_proj(act)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionBatch,
    ) -> torch.Tensor:
        # Residual adds stay inside the layer: only `h` crosses layers and stages.
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, kv_cache, meta)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    """Decoder layers [start, end) of a Llama-family checkpoint (one pipeline stage).

    The embedding is held iff start == 0 (`is_first`), the final norm and LM head iff
    end == num_layers (`is_last`). With tied embeddings, a stage holding both uses the
    embedding matrix as the LM head; a last stage without the embedding loads it into its
    own `lm_head`.
    """

    def __init__(self, config: ModelConfig, layer_range: tuple[int, int]) -> None:
        super().__init__()
        start, end = layer_range
        if not 0 <= start < end <= config.num_layers:
            raise ValueError(
                f"layer_range {layer_range} must satisfy 0 <= start < end <= num_layers "
                f"({config.num_layers})"
            )
        self.config = config
        self.start, self.end = start, end
        self.is_first = start == 0
        self.is_last = end == config.num_layers
        self.embed_tokens = (
            nn.Embedding(config.vocab_size, config.hidden_size) if self.is_first else None
        )
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(start, end))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.is_last else None
        tied_here = config.tie_word_embeddings and self.is_first
        self.lm_head = (
            Linear(config.hidden_size, config.vocab_size, bias=False)
            if self.is_last and not tied_here
            else None
        )
        self.rotary = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling_dict(),
        )

    # ---- forward -------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | None,
        hidden_states: torch.Tensor | None,
        kv_caches: list[KVCache],
        meta: AttentionBatch,
    ) -> torch.Tensor:
        """Run this stage's layers over one step's tokens.

        The first stage takes `input_ids [num_tokens]`, later ones the previous stage's
        `hidden_states [num_tokens, hidden]`. `kv_caches[i]` is the (k, v) cache of this
        stage's i-th layer. Returns `[num_tokens, hidden]` (final-normed on the last stage).
        """
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} kv caches, got {len(kv_caches)}")
        if self.embed_tokens is not None:
            if input_ids is None:
                raise ValueError("the first stage needs input_ids")
            h = self.embed_tokens(input_ids)  # [num_tokens, hidden]
        else:
            if hidden_states is None:
                raise ValueError("a stage after the first needs hidden_states")
            h = hidden_states
        cos, sin = self.rotary.cos_sin(meta.positions, meta.max_seq_len, h.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            h = layer(h, cos, sin, kv_cache, meta)
        if self.norm is not None:
            h = self.norm(h)
        return h

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits `[n, vocab]` float32 of final-normed `hidden_states [n, hidden]` (last stage)."""
        if not self.is_last:
            raise ValueError("compute_logits needs the last stage (it holds the LM head)")
        if self.lm_head is not None:
            return self.lm_head(hidden_states).float()
        return linear(hidden_states, self._tied_head_weight()).float()

    def _tied_head_weight(self) -> torch.Tensor:
        """The embedding matrix, which a tied LM head uses (a last stage without `lm_head`,
        which is then the first stage too)."""
        if self.embed_tokens is None:
            raise RuntimeError("a last stage without an LM head needs the tied embedding")
        return self.embed_tokens.weight

    def pack_weights(self) -> None:
        """After loading: keep every dense layer's weight in the device's fastest layout
        (`models/linear.py`). A tied LM head then gets its own packed copy of the embedding
        matrix (one more vocab x hidden matrix in memory; the head is ~2x faster at batch 1)."""
        tied_here = self.is_last and self.lm_head is None
        if tied_here and can_pack(self._tied_head_weight()):
            head = Linear(self.config.hidden_size, self.config.vocab_size, bias=False,
                          device="meta")
            head.weight = nn.Parameter(self._tied_head_weight().detach(), requires_grad=False)
            self.lm_head = head
        pack_linear_weights(self)

    # ---- KV cache ------------------------------------------------------------------------

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """Shape of one tensor holding the K/V cache of all this stage's layers:
        `[num_layers, 2 (k, v), num_blocks, block_size, num_kv_heads, head_dim]`.
        `cache[i, 0]` / `cache[i, 1]` are layer i's k / v caches (see `kv_caches_from`).
        Allocate it with zeros: attention reads (and masks) padding slots, and 0 * NaN
        garbage would still be NaN."""
        c = self.config
        return (len(self.layers), 2, num_blocks, block_size, c.num_kv_heads, c.head_dim)

    def kv_bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        """Bytes that one cache block takes over all this stage's layers (K and V)."""
        c = self.config
        per_layer = 2 * block_size * c.num_kv_heads * c.head_dim * dtype.itemsize
        return len(self.layers) * per_layer

    @staticmethod
    def kv_caches_from(cache: torch.Tensor) -> list[KVCache]:
        """Split a tensor of `kv_cache_shape` into the per-layer list `forward` takes."""
        return [(layer[0], layer[1]) for layer in cache]

    # ---- weights -------------------------------------------------------------------------

    def weight_names(self) -> list[str]:
        """Checkpoint tensor names this stage loads (a loader reads only these)."""
        return list(self._weight_map())

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (Hugging Face names) into this stage's parameters.

        Raises ValueError on a name this stage does not hold, a shape mismatch, or, at the
        end, a parameter that no tensor filled.
        """
        weight_map = self._weight_map()
        params = dict(self.named_parameters())
        loaded: set[tuple[str, int | None]] = set()
        with torch.no_grad():
            for name, tensor in weights:
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name not in weight_map:
                    raise ValueError(
                        f"unexpected weight {name!r} for layers [{self.start}, {self.end}) "
                        f"of {self.config.architecture}"
                    )
                param_name, shard = weight_map[name]
                target = params[param_name].data
                if shard is not None:
                    offset, size = self._shard_range(param_name, shard)
                    target = target.narrow(0, offset, size)
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ValueError(
                        f"weight {name!r} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(target.shape)}"
                    )
                target.copy_(tensor)
                loaded.add((param_name, shard))
        # (A tied LM head has two names; either one fills it.)
        missing = [name for name, target in weight_map.items() if target not in loaded]
        if missing:
            raise ValueError(f"checkpoint is missing weights: {', '.join(sorted(missing))}")

    def _weight_map(self) -> dict[str, tuple[str, int | None]]:
        """Checkpoint name -> (parameter name, shard index in a fused parameter or None)."""
        tie = self.config.tie_word_embeddings
        weight_map: dict[str, tuple[str, int | None]] = {}
        for param_name, _ in self.named_parameters():
            if param_name.startswith("layers."):
                _, local, rest = param_name.split(".", 2)
                prefix = f"model.layers.{self.start + int(local)}."
                module, _, kind = rest.rpartition(".")  # e.g. "self_attn.qkv_proj", "weight"
                parent, _, leaf = module.rpartition(".")
                if leaf in _PACKED:
                    for shard, part in enumerate(_PACKED[leaf]):
                        weight_map[f"{prefix}{parent}.{part}.{kind}"] = (param_name, shard)
                else:
                    weight_map[prefix + rest] = (param_name, None)
            elif param_name == "embed_tokens.weight":
                weight_map["model.embed_tokens.weight"] = (param_name, None)
                if tie and self.is_last:  # some tied checkpoints also store lm_head.weight
                    weight_map["lm_head.weight"] = (param_name, None)
            elif param_name == "norm.weight":
                weight_map["model.norm.weight"] = (param_name, None)
            elif param_name == "lm_head.weight":
                weight_map["lm_head.weight"] = (param_name, None)
                if tie:  # last stage without the embedding: the head is the embedding matrix
                    weight_map["model.embed_tokens.weight"] = (param_name, None)
        return weight_map

    def _shard_range(self, param_name: str, shard: int) -> tuple[int, int]:
        """(offset, size) of a shard along dim 0 of a fused parameter."""
        c = self.config
        sizes: tuple[int, ...]
        if ".qkv_proj." in param_name:
            q_size, kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
            sizes = (q_size, kv_size, kv_size)
        else:
            sizes = (c.intermediate_size, c.intermediate_size)
        return sum(sizes[:shard]), sizes[shard]

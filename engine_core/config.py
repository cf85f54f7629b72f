"""Engine configuration: frozen dataclasses, validated on construction.

`EngineArgs` is what a user passes (`LLM(...)` keywords, CLI flags); `EngineArgs.resolve()` reads
the model directory and returns the `EngineConfig` every component receives.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass

from engine_core.generation_config import read_generation_defaults, resolve_generation_config
from engine_core.kv_transfer_config import KVTransferConfig
from engine_core.models import ModelConfig, load_model_config
from engine_core.sampling_params import MAX_LOGPROBS
from engine_core.speculative_config import SpeculativeConfig

MAX_THREADS_PER_STAGE = 1024  # far more than any host's cores; torch crashes on absurd counts
_INT64_MAX = (1 << 63) - 1
_SEED_MIN, _SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.manual_seed takes
SCHEDULING_POLICIES = ("fcfs", "priority")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
MAX_CUDA_GRAPH_SIZE = 512  # the largest decode batch captured by default (vLLM's cap)


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one scheduling step and of the pipeline."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    max_concurrent_batches: int = 1
    pipelined_chunked_prefill: bool = False
    policy: str = "fcfs"  # "fcfs" | "priority" (vLLM's --scheduling-policy)
    fair_share: bool = True  # round-robin over user requests, preempting over-share ones

    def __post_init__(self) -> None:
        _require_positive(self, "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                          "max_concurrent_batches")
        if self.policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}, "
                             f"got {self.policy!r}")
        if not isinstance(self.fair_share, bool):
            raise ValueError(f"fair_share must be a bool, got {self.fair_share!r}")


@dataclass(frozen=True)
class CacheConfig:
    """KV cache geometry. `num_kv_blocks` counts the null block 0 too."""

    block_size: int
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    enable_prefix_caching: bool = True
    # On a GPU, when neither num_kv_blocks nor kv_cache_memory is set: the share of the GPU's
    # memory the engine may use in all (weights, activations at the largest step, KV cache).
    gpu_memory_utilization: float = 0.9

    def __post_init__(self) -> None:
        _require_positive(self, "block_size")
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise ValueError(f"gpu_memory_utilization must be a number in (0, 1], got {u!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be >= 2 (block 0 is reserved), "
                             f"got {self.num_kv_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")


@dataclass(frozen=True)
class ParallelConfig:
    """How the model's layers are split over pipeline stages."""

    pipeline_parallel_size: int = 1
    layer_partition: tuple[int, ...] | None = None
    threads_per_stage: int | None = None
    executor_backend: str = "inprocess"  # "inprocess" | "ray"
    ray_compiled_graph: bool = False

    def layer_ranges(self, num_layers: int) -> list[tuple[int, int]]:
        """The [start, end) layer range of each stage.

        `layer_partition` when given (`EngineArgs` fills it with `balanced_layer_partition` by
        default); else an even split whose leftover layers go to the first stages, never the
        last one (it also carries the final norm, the LM head and the sampler)."""
        n = self.pipeline_parallel_size
        if self.layer_partition is not None:
            sizes = list(self.layer_partition)
        else:
            base, extra = divmod(num_layers, n)
            sizes = [base + (1 if i < extra else 0) for i in range(n)]
        ranges, start = [], 0
        for size in sizes:
            ranges.append((start, start + size))
            start += size
        return ranges


@dataclass(frozen=True)
class ExecutionConfig:
    """How a stage runs its steps on the device (resolved from `EngineArgs`)."""

    attention_backend: str = "torch"  # "torch" (any device) | "triton" (CUDA; CPU: interpreter)
    # Decode batch sizes captured as CUDA graphs, ascending; empty: every step runs eagerly.
    cudagraph_capture_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.attention_backend not in ("torch", "triton"):
            raise ValueError(f"attention_backend must be 'torch' or 'triton' once resolved, "
                             f"got {self.attention_backend!r}")
        sizes = self.cudagraph_capture_sizes
        if list(sizes) != sorted(set(sizes)) or any(
                not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
            raise ValueError(f"cudagraph_capture_sizes must be distinct ints >= 1 in ascending "
                             f"order, got {sizes!r}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine core and its stages need; identical on every process."""

    model_dir: str
    model: ModelConfig
    dtype: str  # resolved torch dtype name: "float32" | "bfloat16" | "float16"
    device: str
    seed: int
    scheduler: SchedulerConfig
    cache: CacheConfig
    parallel: ParallelConfig
    kv_transfer: KVTransferConfig | None = None  # a disaggregated prefill/decode instance
    execution: ExecutionConfig = ExecutionConfig()
    speculative: SpeculativeConfig | None = None  # speculative decoding; None: off
    tokenizer_dir: str = ""  # where tokenizer.json is ("": model_dir)
    # "vllm" (no defaults) or the directory whose generation_config.json gives the default
    # sampling parameters (generation_config.py)
    generation_config: str = "vllm"
    max_logprobs: int = MAX_LOGPROBS  # the most logprobs (top logprobs) a request may ask for

    @property
    def tokenizer_path(self) -> str:
        """The directory holding the tokenizer (`--tokenizer`, else the model's)."""
        return self.tokenizer_dir or self.model_dir

    def config_hash(self) -> str:
        """Stable digest: two processes agree on the config iff the hashes match."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def config_fields(self) -> dict[str, str]:
        """What goes into `config_hash`, flattened: dotted field name -> JSON of its value."""
        fields: dict[str, str] = {}

        def flatten(prefix: str, value: object) -> None:
            if isinstance(value, dict):
                for key, item in value.items():
                    flatten(f"{prefix}.{key}" if prefix else str(key), item)
            else:
                fields[prefix] = json.dumps(value, sort_keys=True, default=str)

        flatten("", dataclasses.asdict(self))
        return fields


def config_mismatch(expected: dict[str, str], actual: dict[str, str]) -> str | None:
    """None if the two `config_fields` agree, else a message naming every differing field
    (expected value first)."""
    names = sorted(n for n in set(expected) | set(actual) if expected.get(n) != actual.get(n))
    if not names:
        return None
    return "config mismatch: " + "; ".join(
        f"{n} is {actual.get(n, 'missing')} here but {expected.get(n, 'missing')} on the "
        f"front-end" for n in names[:8])


@dataclass(frozen=True)
class DataParallelConfig:
    """How many engine cores serve one front-end, and where (vLLM's flag names).

    `size` engines in all (ranks 0..size-1); `size_local` of them run on this host with ranks
    `start_rank`..`start_rank+size_local-1` (on the head, start_rank is 0: local ranks come
    first). Remote (headless) engines connect to the head's handshake socket at
    `address:rpc_port`; with any remote engine every socket is tcp on `address`."""

    size: int = 1
    size_local: int | None = None  # default: all of them
    start_rank: int = 0
    address: str = "127.0.0.1"
    rpc_port: int | None = None  # the head's handshake port (default: any free one)
    routing: str = "load"  # "load" | "prefix" (see engine_core/client/prefix_router.py)
    backend: str = "mp"  # "mp": local processes | "ray": Ray actors (client/ray_launcher.py)

    def __post_init__(self) -> None:
        if self.backend not in ("mp", "ray"):
            raise ValueError(f"--data-parallel-backend must be 'mp' or 'ray', "
                             f"got {self.backend!r}")
        if self.routing not in ("load", "prefix"):
            raise ValueError(f"--dp-routing must be 'load' or 'prefix', got {self.routing!r}")
        for name in ("size", "start_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (name == "size"):
                raise ValueError(f"data_parallel_{name} must be an int >= "
                                 f"{int(name == 'size')}, got {value!r}")
        local = self.local
        if not isinstance(local, int) or local < 0 or local > self.size:
            raise ValueError(f"--data-parallel-size-local (-dpl) must be between 0 and "
                             f"--data-parallel-size (-dp) {self.size}, got {local!r}")
        if self.start_rank + local > self.size:
            raise ValueError(f"--data-parallel-start-rank (-dpr) {self.start_rank} with "
                             f"{local} local engine(s) goes past the last rank {self.size - 1}")
        if self.rpc_port is not None and not 0 < self.rpc_port < 65536:
            raise ValueError(f"--data-parallel-rpc-port must be in 1..65535, "
                             f"got {self.rpc_port}")
        if not self.address:
            raise ValueError("--data-parallel-address must not be empty")

    @property
    def local(self) -> int:
        return self.size if self.size_local is None else self.size_local

    @property
    def has_remote(self) -> bool:
        """True if some ranks run on other hosts (then every socket is tcp)."""
        return self.local < self.size


@dataclass(frozen=True)
class EngineArgs:
    """User-facing engine options, mirroring vLLM's names."""

    model: str
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    device: str = "cpu"
    pipeline_parallel_size: int = 1
    pp_layer_partition: str | tuple[int, ...] | None = None
    max_concurrent_batches: int | None = None
    threads_per_stage: int | None = None
    pipelined_chunked_prefill: bool = True
    distributed_executor_backend: str | None = None  # "ray" (default when PP > 1) | "inprocess"
    ray_compiled_graph: bool = False
    kv_transfer_config: KVTransferConfig | None = None  # disaggregated prefill/decode
    scheduling_policy: str = "fcfs"  # "fcfs" | "priority": by (priority, arrival)
    fair_share: bool = True  # False: admission over sequences alone (one request may starve)
    attention_backend: str = "auto"  # "auto" (triton on CUDA, else torch) | "torch" | "triton"
    enforce_eager: bool = False  # True: no CUDA graphs
    cudagraph_capture_sizes: tuple[int, ...] | None = None  # None: 1, 2, 4, 8, 16, ... (vLLM's)
    gpu_memory_utilization: float = 0.9
    # Speculative decoding (vLLM's keys, `speculative_config.py`): a dict or its JSON is taken
    # too and turned into a SpeculativeConfig here.
    speculative_config: SpeculativeConfig | None = None
    tokenizer: str | None = None  # a directory with tokenizer.json (default: the model's)
    # Default sampling parameters: "auto" (the model's generation_config.json), "vllm" (the
    # engine's own) or a directory holding a generation_config.json.
    generation_config: str = "auto"
    max_logprobs: int = MAX_LOGPROBS  # the most logprobs (top logprobs) a request may ask for

    def __post_init__(self) -> None:
        object.__setattr__(self, "speculative_config",
                           SpeculativeConfig.from_value(self.speculative_config))

    def resolve(self) -> EngineConfig:
        """Read the model directory and produce the validated `EngineConfig`."""
        from engine_core.models import resolve_dtype

        model = load_model_config(self.model)
        dtype = str(resolve_dtype(self.dtype, model, self.device)).removeprefix("torch.")
        max_model_len = self._max_model_len(model)
        max_batched = self.max_num_batched_tokens
        if max_batched is None:
            max_batched = max(2048, min(max_model_len, 8192))
        parallel = ParallelConfig(
            pipeline_parallel_size=self.pipeline_parallel_size,
            layer_partition=self._layer_partition(model),
            threads_per_stage=self.threads_per_stage,
            executor_backend=self._executor_backend(),
            ray_compiled_graph=self.ray_compiled_graph,
        )
        if self.threads_per_stage is not None and not (
                1 <= self.threads_per_stage <= MAX_THREADS_PER_STAGE):
            raise ValueError(f"threads_per_stage must be in [1, {MAX_THREADS_PER_STAGE}], "
                             f"got {self.threads_per_stage}")
        scheduler = SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=max_batched,
            max_model_len=max_model_len,
            max_concurrent_batches=self.max_concurrent_batches or self.pipeline_parallel_size,
            pipelined_chunked_prefill=self.pipelined_chunked_prefill,
            policy=self.scheduling_policy,
            fair_share=self.fair_share,
        )
        cache = CacheConfig(
            block_size=self.block_size,
            num_kv_blocks=self.num_kv_blocks,
            kv_cache_memory=self.kv_cache_memory,
            enable_prefix_caching=self.enable_prefix_caching,
            gpu_memory_utilization=self.gpu_memory_utilization,
        )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not _SEED_MIN <= self.seed <= _SEED_MAX:
            raise ValueError(f"seed must be a 64-bit int (in [-2**63, 2**64 - 1]), "
                             f"got {self.seed}")
        _check_device(self.device)
        return EngineConfig(
            model_dir=os.path.abspath(self.model), model=model, dtype=dtype, device=self.device,
            seed=self.seed, scheduler=scheduler, cache=cache, parallel=parallel,
            kv_transfer=self.kv_transfer_config, execution=self._execution(scheduler),
            speculative=self._speculative(model),
            tokenizer_dir=self._tokenizer_dir(),
            generation_config=self._generation_config(),
            max_logprobs=self._max_logprobs(),
        )

    def _tokenizer_dir(self) -> str:
        """The tokenizer's directory, absolute ("" when it is the model's)."""
        if self.tokenizer is None:
            return ""
        if not isinstance(self.tokenizer, str) or not os.path.isdir(self.tokenizer):
            raise ValueError(f"tokenizer must be a directory (with tokenizer.json), got "
                             f"{self.tokenizer!r}")
        if not os.path.isfile(os.path.join(self.tokenizer, "tokenizer.json")):
            raise ValueError(f"tokenizer {self.tokenizer!r} has no tokenizer.json; give the "
                             f"directory of a Hugging Face fast tokenizer")
        return os.path.abspath(self.tokenizer)

    def _generation_config(self) -> str:
        """The resolved source of default sampling parameters, its file read once here so
        that a bad one fails at startup."""
        source = resolve_generation_config(self.generation_config, self.model)
        read_generation_defaults(source)
        return source

    def _max_logprobs(self) -> int:
        value = self.max_logprobs
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT64_MAX:
            raise ValueError(f"max_logprobs must be an int >= 0, got {value!r}")
        return value

    def _speculative(self, model: ModelConfig) -> SpeculativeConfig | None:
        """The speculative config, its draft model checked against the target."""
        spec = self.speculative_config
        if spec is not None and spec.method == "draft_model":
            draft_model_config(spec, model)
        return spec

    def _execution(self, scheduler: SchedulerConfig) -> ExecutionConfig:
        """The attention backend and the CUDA graph sizes for this device."""
        backend = self.attention_backend
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, "
                             f"got {backend!r}")
        on_cuda = self.device.startswith("cuda")
        if backend == "auto":
            backend = "triton" if on_cuda else "torch"
        if backend == "triton":
            _check_triton(self.device)
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be a bool, got {self.enforce_eager!r}")
        sizes = self.cudagraph_capture_sizes
        if sizes is not None:
            sizes = _capture_sizes(sizes)
        if not on_cuda or backend != "triton" or self.enforce_eager:
            # graphs need CUDA, and a decode step whose shapes do not change with the context:
            # the Triton kernel reads the block table, the torch path gathers [B, L] contexts
            return ExecutionConfig(attention_backend=backend)
        if sizes is None:
            sizes = default_capture_sizes(scheduler.max_num_seqs)
        return ExecutionConfig(attention_backend=backend,
                               cudagraph_capture_sizes=tuple(s for s in sizes
                                                             if s <= scheduler.max_num_seqs))

    def _max_model_len(self, model: ModelConfig) -> int:
        limit = model.max_position_embeddings
        if model.sliding_window is not None:
            limit = min(limit, model.sliding_window)  # attention never needs the window then
        if self.max_model_len is None:
            return limit
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_model_len > limit:
            raise ValueError(
                f"max_model_len={self.max_model_len} exceeds the model's limit of {limit} "
                f"(max_position_embeddings or sliding_window); pass max_model_len <= {limit}")
        return self.max_model_len

    def _executor_backend(self) -> str:
        backend = self.distributed_executor_backend
        if backend is None:
            backend = "ray" if self.pipeline_parallel_size > 1 or self.ray_compiled_graph \
                else "inprocess"
        if backend not in ("ray", "inprocess"):
            raise ValueError(f"distributed_executor_backend must be 'ray' or 'inprocess', "
                             f"got {backend!r}")
        if self.ray_compiled_graph and backend != "ray":
            raise ValueError("ray_compiled_graph=True needs distributed_executor_backend='ray'")
        return backend

    def _layer_partition(self, model: ModelConfig) -> tuple[int, ...]:
        num_layers = model.num_layers
        n = self.pipeline_parallel_size
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"pipeline_parallel_size must be an int >= 1, got {n!r}")
        if n > num_layers:
            raise ValueError(f"pipeline_parallel_size={n} exceeds the model's {num_layers} "
                             f"layers; use at most {num_layers} stages")
        part = self.pp_layer_partition
        if part is None:
            return balanced_layer_partition(num_layers, n, lm_head_cost_in_layers(model))
        if isinstance(part, str):
            try:
                part = tuple(int(x) for x in part.split(","))
            except ValueError:
                raise ValueError(f"pp_layer_partition must be comma-separated ints such as "
                                 f"'3,2', got {self.pp_layer_partition!r}") from None
        part = tuple(part)
        if len(part) != n:
            raise ValueError(f"pp_layer_partition has {len(part)} entries but "
                             f"pipeline_parallel_size={n}; give one layer count per stage")
        if any(p < 1 for p in part):
            raise ValueError(f"pp_layer_partition entries must be >= 1, got {part}")
        if sum(part) != num_layers:
            raise ValueError(f"pp_layer_partition {part} sums to {sum(part)} but the model has "
                             f"{num_layers} layers")
        return part


def draft_model_config(spec: SpeculativeConfig, target: ModelConfig) -> ModelConfig:
    """The config of `spec`'s draft model; ValueError if it cannot be read or its vocabulary
    is not the target's."""
    if spec.model is None:
        raise ValueError("speculative_config: method 'draft_model' needs 'model'")
    try:
        draft = load_model_config(spec.model)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"speculative_config: model {spec.model!r} cannot be used as a "
                         f"draft model: {exc}") from None
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"speculative_config: the draft model {spec.model!r}'s vocabulary "
                         f"({draft.vocab_size} tokens) differs from the target's "
                         f"({target.vocab_size}); a draft model needs the same tokenizer")
    return draft


def _require_positive(obj: object, *fields: str) -> None:
    for name in fields:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if value > _INT64_MAX:  # the config crosses to engine processes as msgpack
            raise ValueError(f"{name} must be at most 2**63 - 1, got {value}")


def _check_device(device: object) -> None:
    """ValueError unless `device` names a torch device this host has."""
    import torch

    if not isinstance(device, str):
        raise ValueError(f"device must be a string such as 'cpu' or 'cuda:0', got {device!r}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', "
                         f"got {device!r}") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= count:
            raise ValueError(f"device {device!r}: this host has {count} CUDA device(s)")


def default_capture_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """vLLM's default decode batch sizes for CUDA graphs: 1, 2, 4, then every multiple of 8, up
    to max_num_seqs (at most MAX_CUDA_GRAPH_SIZE); the largest is max_num_seqs itself when it is
    below the cap and no multiple of 8, so every decode batch has a graph."""
    top = min(max_num_seqs, MAX_CUDA_GRAPH_SIZE)
    sizes = [s for s in (1, 2, 4) if s <= top] + list(range(8, top + 1, 8))
    if sizes[-1] != top:
        sizes.append(top)
    return tuple(sizes)


def _capture_sizes(sizes: object) -> tuple[int, ...]:
    """User-given capture sizes, deduplicated and sorted; ValueError naming the field."""
    if not isinstance(sizes, (list, tuple)):
        raise ValueError(f"cudagraph_capture_sizes must be a list of ints >= 1, got {sizes!r}")
    values = list(sizes)
    if not values or any(not isinstance(s, int) or isinstance(s, bool) or not 1 <= s <= _INT64_MAX
                         for s in values):
        raise ValueError(f"cudagraph_capture_sizes must be a non-empty list of ints >= 1, "
                         f"got {sizes!r}")
    return tuple(sorted(set(values)))


def _check_triton(device: str) -> None:
    """ValueError unless the Triton backend can run here: Triton installed, and on a CPU only
    under its interpreter (TRITON_INTERPRET=1: how the tests run the kernels without a GPU)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        raise ValueError("attention_backend='triton' needs the triton package (it comes with "
                         "CUDA builds of torch); use attention_backend='torch'")
    if not device.startswith("cuda") and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"attention_backend='triton' runs on CUDA; on device {device!r} only "
                         f"under the Triton interpreter (TRITON_INTERPRET=1, slow: for tests)")


def lm_head_cost_in_layers(model: ModelConfig) -> float:
    """The LM head's matmul work per token, in decoder layers: its weights over one layer's
    (attention projections plus the gated MLP). E.g. 2.0 for the benchmark model (vocab 32000,
    hidden 896), 4.3 for Llama-3.2-1B."""
    hidden, head_dim = model.hidden_size, model.head_dim
    attention = hidden * head_dim * (2 * model.num_heads + 2 * model.num_kv_heads)
    mlp = 3 * hidden * model.intermediate_size
    return model.vocab_size * hidden / (attention + mlp)


def balanced_layer_partition(num_layers: int, num_stages: int, last_stage_extra: float
                             ) -> tuple[int, ...]:
    """Layer counts per stage that minimise the busiest stage's cost, a layer costing 1 and the
    last stage `last_stage_extra` more (its LM head: a decode runs it for every token). In a
    pipeline the busiest stage sets the pace. Ties go to the split whose earlier stages hold
    more layers. Every stage gets at least one layer."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"cannot split {num_layers} layers over {num_stages} stages")

    @functools.cache
    def split(stages: int, layers: int) -> tuple[float, tuple[int, ...]]:
        """(busiest cost, counts) for the last `stages` stages holding `layers` layers."""
        if stages == 1:
            return layers + last_stage_extra, (layers,)
        best: tuple[float, tuple[int, ...]] | None = None
        for first in range(layers - stages + 1, 0, -1):  # more layers first: wins ties
            rest_cost, rest = split(stages - 1, layers - first)
            cost = max(first, rest_cost)
            if best is None or cost < best[0]:
                best = (cost, (first, *rest))
        assert best is not None
        return best

    return split(num_stages, num_layers)[1]

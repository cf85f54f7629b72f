"""One prepared check of pp-engine's CUDA path (issue 20), for whenever a GPU is at hand: greedy
parity on CUDA, the Triton paged-attention kernel against SDPA, CUDA graphs against eager, and
throughput against transformers `generate` measured in the same run. It finishes in under 5
minutes on one H100: every part has a time budget and what would run over is skipped with a note.

How to run it on the GPU machine (Python 3.12, torch 2.11 + CUDA 13, Triton 3.6.0, transformers
5.x, tokenizers, safetensors, jinja2, tqdm, uvloop; nothing can be fetched there):

  1. Here, once: `bash scripts/gpu_wheels.sh` downloads the py3.12 manylinux wheels of what the
     engine imports and the image lacks (msgspec, pyzmq; ~1 MiB) into `.gpu/whl/` (git-ignored).
  2. There, from the project root (the working tree travels as it is, ~14 MiB, plus that folder):
       PYTHONUNBUFFERED=1 timeout 330 python3 bench/gpu_check.py --wheels .gpu/whl OUTDIR
     With the session's `run` tool: that command with `$OUT` as OUTDIR, carry [".gpu/whl"],
     timeout_s 360.
  Nothing gets installed there: the wheels are unpacked into a temporary folder at the end of
  sys.path (so they only fill what the image lacks), and `engine_core` is laid out as it installs
  (`scripts/stage_package.py`) in another, first on sys.path.

Everything goes to OUTDIR: gpu.json (rewritten after every figure, so a run cut short keeps what
it measured; "notes" lists what was skipped, "errors" what failed) and gpu.log. In order of
importance (and of running):
  1. Greedy parity on CUDA in float32: a tiny random Llama (4 layers, GQA 8/2, head_dim 64),
     12 prompts of 5-300 tokens x 32 tokens against transformers `generate` (eager attention),
     one request at a time. Variants (`parity_<variant>_matched` / `_total`): pp1_triton_graphs,
     pp2_triton_graphs (in-process), pp1_triton_eager, pp1_triton_chunked (max_num_batched_tokens
     64), pp1_triton_prefix (shared prefixes, the second round served from the prefix cache),
     pp1_triton_preempt (40 KV blocks: requests preempted and recomputed), pp1_torch_eager (the
     torch backend on CUDA: a control that tells a kernel fault from the rest).
  2. The kernel against SDPA, 1.1B Llama heads (32 / 4 KV / head_dim 64), bf16, block size 16:
     decode at batch 1 / 64 / 256 over 256 tokens of context, and one 2048-token prefill.
     `kernel_<case>_<impl>_us` per call (CUDA events over a loop of calls, launches included) for
     impl triton (`triton_paged_attention`), torch (`paged_attention`: K/V store + gather + SDPA)
     and sdpa (plain SDPA over contiguous K/V: the lower bound); `_graph_us` the same calls
     replayed from a CUDA graph (GPU time alone); `_max_err` against sdpa;
     `kernel_<case>_torch_over_triton` (> 1: the kernel is faster than the torch path) and
     `kernel_<case>_triton_over_sdpa` (1.0: at the lower bound).
  3. CUDA graphs against eager: one request 128 -> 128 on the 1.1B model (bf16),
     `ours_pp1_eager_single_tok_s` vs `ours_pp1_single_tok_s` (graphs), and their ratio
     `graphs_vs_eager_single`; `_ttft_ms` (max_tokens=1) and `_decode_tok_s` (the rest).
  4. Throughput: 256 requests of 128 -> 128 tokens (greedy, ignore_eos) on a 1.1B Llama shape
     (hidden 2048, 22 layers, 32 heads, 4 KV heads, intermediate 5632, vocab 32000; random weights,
     bf16): `ours_pp1_tok_s` (auto backend, graphs), transformers `hf_bs256_tok_s` /
     `hf_bs64_tok_s` (static batches), `ours_pp1_vs_hf_best` (target >= 3), then if time allows
     `ours_pp2_tok_s` (in-process PP=2), `hf_bs1_tok_s` and `ours_pp1_eager_tok_s`.
     `ours_pp1_single_tok_s` (part 3) is the one-request figure (target >= 800).
The engine at PP=1 sizes its KV cache with gpu_memory_utilization=0.6 (transformers' model stays
on the GPU beside it); at PP=2 in one process, with num_kv_blocks (two stages on one GPU would
each claim the fraction).

`--smoke`: every part on CPU at tiny sizes, in well under a minute: the Triton kernel under its
interpreter (TRITON_INTERPRET=1, set before triton is imported), enforce_eager (graphs need CUDA),
float32 kernels (the interpreter's bf16 `tl.dot` is wrong), transformers as the parity oracle.
It writes the same keys (kernel and workload labels keep their GPU names; "shapes" and "workload"
say what ran). `tests/test_gpu_script.py` runs it.
"""

from __future__ import annotations

import argparse
import atexit
import faulthandler
import gc
import glob
import importlib.util
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_VS_HF = 3.0  # issue 20: 256 requests >= 3x transformers generate at its best batch
TARGET_SINGLE_TOK_S = 800.0  # issue 20: one request's output tokens/s
PARITY_VARIANTS = ("pp1_triton_graphs", "pp2_triton_graphs", "pp1_triton_eager",
                   "pp1_triton_chunked", "pp1_triton_prefix", "pp1_triton_preempt",
                   "pp1_torch_eager")


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU smoke run."""

    device: str
    budget_s: float  # the whole run, imports included
    part_caps_s: tuple[float, float, float]  # parity, kernel, graphs vs eager; throughput: the rest
    eager_only: bool  # no CUDA graphs anywhere (CPU)
    # max_num_batched_tokens of every engine but the chunked and preempt variants (None: the
    # engine's default; small on a CPU, where an engine warms its matmuls up to it at start)
    batched_tokens: int | None
    # 1. parity: a tiny random Llama in float32
    tiny: tuple[tuple[str, Any], ...]  # LlamaConfig fields
    parity_prompts: int
    parity_lengths: tuple[int, int]  # prompt lengths drawn in [lo, hi]
    parity_tokens: int
    parity_max_num_seqs: int
    parity_kv_blocks: int
    parity_max_model_len: int
    chunk_tokens: int  # max_num_batched_tokens of the chunked-prefill variant
    prefix_groups: int
    prefix_per_group: int
    prefix_len: int
    preempt_kv_blocks: int  # with the null block
    preempt_max_model_len: int
    preempt_batched_tokens: int
    # 2. kernel against SDPA
    heads: tuple[int, int, int]  # query heads, KV heads, head_dim
    kernel_dtype: str
    decode_batches: tuple[tuple[str, int], ...]  # (label, batch size)
    decode_context: int
    prefill: tuple[str, int]  # (label, tokens)
    kernel_warmup: int
    kernel_iters: int
    # 3-4. the 1.1B Llama shape
    big: tuple[tuple[str, Any], ...]  # LlamaConfig fields
    big_dtype: str
    num_requests: int
    prompt_len: int
    output_len: int
    hf_batches: tuple[tuple[str, int], ...]  # (label, static batch size)
    single_runs: int
    warm_requests: int
    warm_tokens: int
    pp2_kv_blocks: int
    cpu_kv_blocks: int  # num_kv_blocks where gpu_memory_utilization does not apply (CPU)
    hf_need_s: float  # time a transformers batch of all requests needs at most


GPU = Sizes(
    device="cuda", budget_s=270.0, part_caps_s=(80.0, 35.0, 70.0), eager_only=False,
    batched_tokens=None,
    tiny=(("hidden_size", 512), ("intermediate_size", 1024), ("num_hidden_layers", 4),
          ("num_attention_heads", 8), ("num_key_value_heads", 2), ("vocab_size", 32000),
          ("max_position_embeddings", 2048)),
    parity_prompts=12, parity_lengths=(5, 300), parity_tokens=32, parity_max_num_seqs=16,
    parity_kv_blocks=2048, parity_max_model_len=1024, chunk_tokens=64,
    prefix_groups=3, prefix_per_group=4, prefix_len=48,
    preempt_kv_blocks=41, preempt_max_model_len=512, preempt_batched_tokens=128,
    heads=(32, 4, 64), kernel_dtype="bfloat16",
    decode_batches=(("decode_b1", 1), ("decode_b64", 64), ("decode_b256", 256)),
    decode_context=256, prefill=("prefill_2048", 2048), kernel_warmup=5, kernel_iters=50,
    big=(("hidden_size", 2048), ("num_hidden_layers", 22), ("num_attention_heads", 32),
         ("num_key_value_heads", 4), ("intermediate_size", 5632), ("vocab_size", 32000),
         ("max_position_embeddings", 2048)),
    big_dtype="bfloat16", num_requests=256, prompt_len=128, output_len=128,
    hf_batches=(("bs256", 256), ("bs64", 64)), single_runs=3, warm_requests=64, warm_tokens=16,
    pp2_kv_blocks=8192, cpu_kv_blocks=8192, hf_need_s=20.0,
)

SMOKE = Sizes(
    device="cpu", budget_s=170.0, part_caps_s=(100.0, 40.0, 40.0), eager_only=True,
    batched_tokens=64,
    tiny=(("hidden_size", 64), ("intermediate_size", 128), ("num_hidden_layers", 2),
          ("num_attention_heads", 2), ("num_key_value_heads", 1), ("vocab_size", 512),
          ("max_position_embeddings", 256)),
    parity_prompts=5, parity_lengths=(8, 30), parity_tokens=8, parity_max_num_seqs=8,
    parity_kv_blocks=64, parity_max_model_len=64, chunk_tokens=8,
    prefix_groups=2, prefix_per_group=2, prefix_len=16,
    preempt_kv_blocks=5, preempt_max_model_len=48, preempt_batched_tokens=16,
    heads=(4, 2, 16), kernel_dtype="float32",
    decode_batches=(("decode_b1", 1), ("decode_b64", 2), ("decode_b256", 3)),
    decode_context=20, prefill=("prefill_2048", 24), kernel_warmup=1, kernel_iters=2,
    big=(("hidden_size", 64), ("num_hidden_layers", 2), ("num_attention_heads", 4),
         ("num_key_value_heads", 2), ("intermediate_size", 128), ("vocab_size", 512),
         ("max_position_embeddings", 256)),
    big_dtype="bfloat16", num_requests=8, prompt_len=16, output_len=8,
    hf_batches=(("bs256", 8), ("bs64", 2)), single_runs=2, warm_requests=4, warm_tokens=4,
    pp2_kv_blocks=64, cpu_kv_blocks=64, hf_need_s=1.0,
)


class Report:
    """The run's figures: OUTDIR/gpu.json, rewritten after every change, and the log
    OUTDIR/gpu.log (also printed)."""

    def __init__(self, outdir: str) -> None:
        self.started = time.perf_counter()
        self.path = os.path.join(outdir, "gpu.json")
        self.log_file = open(os.path.join(outdir, "gpu.log"), "a")  # noqa: SIM115 (the run's)
        self.data: dict[str, Any] = {"notes": []}

    def log(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.started:6.1f} s] {message}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.log(f"{key} = {value}")
        self._write()

    def note(self, message: str) -> None:
        self.data["notes"].append(message)
        self.log(f"NOTE {message}")
        self._write()

    def error(self, what: str, exc: BaseException) -> None:
        """Record that `what` failed with `exc` (its traceback goes to the log)."""
        self.data.setdefault("errors", {})[what] = f"{type(exc).__name__}: {exc}"[:600]
        self.log(f"ERROR in {what}:\n{traceback.format_exc()}")
        self._write()

    def _write(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


class Clock:
    """The run's time budget, and the current part's share of it."""

    def __init__(self, budget_s: float, report: Report) -> None:
        self.end = time.perf_counter() + budget_s
        self.part_end = self.end
        self.report = report

    def begin_part(self, cap_s: float | None) -> None:
        now = time.perf_counter()
        self.part_end = self.end if cap_s is None else min(self.end, now + cap_s)

    def left(self) -> float:
        return self.part_end - time.perf_counter()

    def allows(self, need_s: float, what: str) -> bool:
        """Whether `what` (~need_s seconds) fits what is left; a note when it does not."""
        if self.left() >= need_s:
            return True
        self.report.note(f"skipped {what}: needs ~{need_s:.0f} s, {max(self.left(), 0):.0f} s "
                         f"left of this part's budget")
        return False


def prepare_imports(wheels: str | None, report: Report) -> None:
    """Unpack `wheels`/*.whl (what the GPU image lacks) onto the end of sys.path, and put
    `engine_core`, laid out as it installs, first on it (the repository's `models/` and
    `executors/` folders are its subpackages: `scripts/stage_package.py`)."""
    if wheels is not None:
        files = sorted(glob.glob(os.path.join(wheels, "*.whl")))
        if not files:
            raise SystemExit(f"--wheels {wheels}: no .whl files there "
                             f"(bash scripts/gpu_wheels.sh downloads them)")
        site = tempfile.mkdtemp(prefix="gpu-check-site-")
        atexit.register(shutil.rmtree, site, ignore_errors=True)
        for path in files:
            with zipfile.ZipFile(path) as wheel:
                wheel.extractall(site)
        sys.path.append(site)  # after the installed packages: a wheel only fills a gap
        report.set("wheels_unpacked", len(files))
    spec = importlib.util.spec_from_file_location(
        "stage_package", os.path.join(ROOT, "scripts", "stage_package.py"))
    if spec is None or spec.loader is None:
        raise SystemExit("scripts/stage_package.py is missing")
    stager = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stager)
    staged = tempfile.mkdtemp(prefix="gpu-check-pkg-")
    atexit.register(shutil.rmtree, staged, ignore_errors=True)
    stager.stage(staged)
    sys.path.insert(0, staged)
    import engine_core

    report.log(f"engine_core from {engine_core.__file__}")


def sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free_memory(device: Any) -> None:
    """Drop what the last engine or model left (a later one measures the GPU's free memory)."""
    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def random_prompts(rng: random.Random, vocab: int, lengths: list[int]) -> list[list[int]]:
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


# ---------------------------------------------------------------- 1. greedy parity on the device


def build_tiny(path: str, sizes: Sizes) -> Any:
    """Save a tiny random float32 Llama (norm weights perturbed, so they are tested too) under
    `path`; return it as transformers' model with eager attention (the oracle)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**dict(sizes.tiny), rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                             dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.eval().save_pretrained(path)
    return model


def hf_greedy(model: Any, prompts: list[list[int]], max_tokens: int,
              device: str) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, one at a time (no padding); it stops at
    EOS as the engine does."""
    import torch

    results = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_tokens, pad_token_id=0)
            results.append(out[0, len(prompt):].tolist())
    return results


def engine_greedy(model_dir: str, rounds: list[list[list[int]]], max_tokens: int,
                  **kwargs: Any) -> tuple[list[list[int]], dict[str, int]]:
    """Greedy outputs of one LLM over `rounds` of prompts, one generate call each; returns the
    last round's token ids and what the engine did (cached prompt tokens in the last round,
    preemptions in all)."""
    from engine_core import LLM, SamplingParams

    llm = LLM(model_dir, **kwargs)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        for prompts in rounds:
            outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                   use_tqdm=False)
        scheduler = getattr(llm.engine, "scheduler", None)
        stats = {"cached_tokens": sum(o.num_cached_tokens for o in outputs),
                 "preemptions": int(getattr(scheduler, "num_preemptions", -1))}
        return [list(o.outputs[0].token_ids) for o in outputs], stats
    finally:
        llm.shutdown()


def prefix_prompts(sizes: Sizes, vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts in groups sharing a prefix (one of each group is the bare prefix, a whole number of
    blocks: a full hit up to its last token), and a first round of one prompt per group that
    fills the prefix cache."""
    rng = random.Random(2)
    prompts, warm = [], []
    for _ in range(sizes.prefix_groups):
        prefix = [rng.randrange(3, vocab) for _ in range(sizes.prefix_len)]
        group = [prefix] + [prefix + [rng.randrange(3, vocab)
                                      for _ in range(rng.randint(1, sizes.prefix_len))]
                            for _ in range(sizes.prefix_per_group - 1)]
        prompts.extend(group)
        warm.append(group[-1])
    return prompts, warm


def part_parity(sizes: Sizes, workdir: str, report: Report, clock: Clock) -> None:
    device = sizes.device
    vocab = dict(sizes.tiny)["vocab_size"]
    path = os.path.join(workdir, "tiny")
    model = build_tiny(path, sizes).to(device)
    rng = random.Random(0)
    lo, hi = sizes.parity_lengths
    prompts = random_prompts(rng, vocab, [rng.randint(lo, hi) for _ in range(sizes.parity_prompts)])
    shared, warm = prefix_prompts(sizes, vocab)
    expected = hf_greedy(model, prompts, sizes.parity_tokens, device)
    expected_shared = hf_greedy(model, shared, sizes.parity_tokens, device)
    del model
    free_memory(device)
    report.set("parity_shapes", {"model": dict(sizes.tiny), "max_tokens": sizes.parity_tokens,
                                 "prompt_lengths": [len(p) for p in prompts]})

    base = dict(dtype="float32", device=device, seed=0, distributed_executor_backend="inprocess",
                max_num_seqs=sizes.parity_max_num_seqs, num_kv_blocks=sizes.parity_kv_blocks,
                max_model_len=sizes.parity_max_model_len, attention_backend="triton",
                enforce_eager=sizes.eager_only, pipeline_parallel_size=1,
                max_num_batched_tokens=sizes.batched_tokens)
    variants: dict[str, dict[str, Any]] = {
        "pp1_triton_graphs": {},
        "pp2_triton_graphs": {"pipeline_parallel_size": 2},
        "pp1_triton_eager": {"enforce_eager": True},
        "pp1_triton_chunked": {"max_num_batched_tokens": sizes.chunk_tokens},
        "pp1_triton_prefix": {},
        "pp1_triton_preempt": {"num_kv_blocks": sizes.preempt_kv_blocks,
                               "max_model_len": sizes.preempt_max_model_len,
                               "max_num_batched_tokens": sizes.preempt_batched_tokens},
        "pp1_torch_eager": {"attention_backend": "torch", "enforce_eager": True},
    }
    assert tuple(variants) == PARITY_VARIANTS
    fully_matched = 0
    for name, overrides in variants.items():
        if not clock.allows(5.0, f"parity {name}"):
            continue
        rounds, want = ([warm, shared], expected_shared) if name.endswith("prefix") else (
            [prompts], expected)
        try:
            got, stats = engine_greedy(path, rounds, sizes.parity_tokens, **{**base, **overrides})
        except Exception as exc:
            report.error(f"parity_{name}", exc)
            continue
        finally:
            free_memory(device)
        matched = sum(g == w for g, w in zip(got, want))
        report.set(f"parity_{name}_matched", matched)
        report.set(f"parity_{name}_total", len(want))
        fully_matched += matched == len(want)
        if matched < len(want):  # where each diverging output first differs (a late near-tie?)
            report.set(f"parity_{name}_diverged_at", [
                next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w)))
                for g, w in zip(got, want) if g != w])
        if name.endswith("prefix"):
            report.set(f"parity_{name}_cached_tokens", stats["cached_tokens"])
        if name.endswith("preempt"):
            report.set(f"parity_{name}_preemptions", stats["preemptions"])
    report.set("parity_variants_matched", fully_matched)
    report.set("parity_variants_total", len(variants))


# ---------------------------------------------------------------- 2. the kernel against SDPA


def time_calls(fn: Callable[[], Any], device: str, warmup: int, iters: int) -> float:
    """Microseconds per call of `fn`, launches included: CUDA events around a loop on a GPU,
    the wall clock on a CPU."""
    import torch

    for _ in range(warmup):
        fn()
    sync(device)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / iters
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) * 1e6 / iters


def time_graph(fn: Callable[[], Any], iters: int, calls_per_graph: int = 10) -> float:
    """Microseconds per call of `fn` replayed from a CUDA graph of `calls_per_graph` calls: the
    GPU's time alone, as a captured decode step sees it."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    replays = max(1, iters // calls_per_graph)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * calls_per_graph)


def kernel_case(label: str, num_seqs: int, context: int, query_len: int, sizes: Sizes,
                report: Report) -> None:
    """Time one attention call three ways over the same paged cache: `num_seqs` sequences of
    `context` tokens, the last `query_len` of each new (decode: 1; prefill: the whole context of
    one sequence)."""
    import torch
    import torch.nn.functional as F
    from engine_core.models.attention import AttentionMetadata, paged_attention
    from engine_core.models.triton_attention import TritonAttentionMetadata
    from engine_core.models.triton_paged_attention import triton_paged_attention

    if not (query_len == 1 or (num_seqs == 1 and query_len == context)):
        raise ValueError(f"kernel case {label}: decode or a whole prefill, got {query_len} of "
                         f"{context} tokens in {num_seqs} sequences")
    device, dtype = sizes.device, getattr(torch, sizes.kernel_dtype)
    num_heads, num_kv_heads, head_dim = sizes.heads
    block_size, scale = 16, head_dim ** -0.5
    gen = torch.Generator().manual_seed(1)
    blocks_per_seq = math.ceil(context / block_size)
    num_blocks = 1 + num_seqs * blocks_per_seq  # block 0: the null block
    table = torch.randperm(num_blocks - 1, generator=gen).add_(1).view(num_seqs, blocks_per_seq)
    tables = table.tolist()  # scattered blocks, as a busy cache hands them out

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    k_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)  # [num_blocks, bs, Hkv, D]
    v_cache = randn(num_blocks, block_size, num_kv_heads, head_dim)
    num_tokens = num_seqs * query_len
    q = randn(num_tokens, num_heads, head_dim)  # [num_tokens, H, D]
    k_new = randn(num_tokens, num_kv_heads, head_dim)  # [num_tokens, Hkv, D]
    v_new = randn(num_tokens, num_kv_heads, head_dim)
    query_lens, computed = [query_len] * num_seqs, [context - query_len] * num_seqs
    triton_meta = TritonAttentionMetadata.build(query_lens, computed, tables, block_size, device)
    torch_meta = AttentionMetadata.build(query_lens, computed, tables, block_size, device)
    # the new tokens' K/V in the cache first: the kernel reads them there (the engine stores them
    # before the call; the torch path stores them itself, again, on each call)
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, triton_meta.slot_mapping, k_new)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, triton_meta.slot_mapping, v_new)
    positions = torch.arange(context)
    slots = (table[:, positions // block_size] * block_size + positions % block_size).to(device)
    # [num_seqs, Hkv, context, D]: each sequence's context, contiguous
    k_contiguous = k_cache.view(-1, num_kv_heads, head_dim)[slots].permute(0, 2, 1, 3).contiguous()
    v_contiguous = v_cache.view(-1, num_kv_heads, head_dim)[slots].permute(0, 2, 1, 3).contiguous()
    out = torch.empty_like(q)  # [num_tokens, H, D]

    def run_triton() -> torch.Tensor:
        triton_paged_attention(q, k_cache, v_cache, triton_meta.block_tables,
                               triton_meta.seq_lens, triton_meta.query_start_loc,
                               triton_meta.max_query_len, scale, out)
        return out

    def run_torch() -> torch.Tensor:
        return paged_attention(q, k_new, v_new, k_cache, v_cache, torch_meta, scale)

    if query_len == 1:  # the query heads sharing a KV head as its rows: [B, Hkv, G, D]
        q_sdpa = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)

        def run_sdpa() -> torch.Tensor:
            return F.scaled_dot_product_attention(q_sdpa, k_contiguous, v_contiguous,
                                                  scale=scale).view(num_tokens, num_heads,
                                                                    head_dim)
    else:
        q_sdpa = q.transpose(0, 1).unsqueeze(0).contiguous()  # [1, H, T, D]

        def run_sdpa() -> torch.Tensor:
            return F.scaled_dot_product_attention(q_sdpa, k_contiguous, v_contiguous,
                                                  is_causal=True, scale=scale,
                                                  enable_gqa=True)[0].transpose(0, 1)

    report.data.setdefault("shapes", {})[f"kernel_{label}"] = {
        "num_seqs": num_seqs, "context": context, "query_len": query_len, "heads": num_heads,
        "kv_heads": num_kv_heads, "head_dim": head_dim, "dtype": sizes.kernel_dtype,
        "block_size": block_size}
    runs = {"triton": run_triton, "torch": run_torch, "sdpa": run_sdpa}
    reference = run_sdpa().float()  # [num_tokens, H, D]
    us: dict[str, float] = {}
    for impl, fn in runs.items():
        try:
            if impl != "sdpa":
                result = fn().reshape(num_tokens, num_heads, head_dim).float()
                report.set(f"kernel_{label}_{impl}_max_err",
                           float((result - reference).abs().max()))
            us[impl] = time_calls(fn, device, sizes.kernel_warmup, sizes.kernel_iters)
            report.set(f"kernel_{label}_{impl}_us", round(us[impl], 2))
        except Exception as exc:
            report.error(f"kernel_{label}_{impl}", exc)
        if device == "cuda":
            try:
                report.set(f"kernel_{label}_{impl}_graph_us",
                           round(time_graph(fn, sizes.kernel_iters), 2))
            except Exception as exc:  # e.g. a host sync inside the call
                report.error(f"kernel_{label}_{impl}_graph", exc)
    if "triton" in us and "torch" in us:
        report.set(f"kernel_{label}_torch_over_triton", round(us["torch"] / us["triton"], 3))
    if "triton" in us and "sdpa" in us:
        report.set(f"kernel_{label}_triton_over_sdpa", round(us["triton"] / us["sdpa"], 3))


def part_kernel(sizes: Sizes, report: Report, clock: Clock) -> None:
    cases = [(label, batch, sizes.decode_context, 1) for label, batch in sizes.decode_batches]
    label, tokens = sizes.prefill
    cases.append((label, 1, tokens, tokens))
    for label, num_seqs, context, query_len in cases:
        if not clock.allows(3.0, f"kernel {label}"):
            continue
        try:
            kernel_case(label, num_seqs, context, query_len, sizes, report)
        except Exception as exc:
            report.error(f"kernel_{label}", exc)
        free_memory(sizes.device)


# ------------------------------------------------- 3-4. graphs vs eager, throughput (1.1B shape)


class PromptSource:
    """Fresh random prompts of the workload's length: no run hits another's prefix cache."""

    def __init__(self, sizes: Sizes, seed: int) -> None:
        self.rng = random.Random(seed)
        self.vocab = dict(sizes.big)["vocab_size"]
        self.length = sizes.prompt_len

    def take(self, n: int) -> list[list[int]]:
        return random_prompts(self.rng, self.vocab, [self.length] * n)


class BigModel:
    """The 1.1B Llama-shaped random checkpoint (built on first use), and transformers' model of it
    on the device (kept there for its baseline)."""

    def __init__(self, sizes: Sizes, workdir: str, report: Report) -> None:
        self.sizes, self.path, self.report = sizes, os.path.join(workdir, "big"), report
        self._model: Any = None

    def model(self) -> Any:
        if self._model is None:
            import torch
            from transformers import AutoModelForCausalLM, LlamaConfig

            sizes = self.sizes
            config = LlamaConfig(**dict(sizes.big), rms_norm_eps=1e-5, bos_token_id=1,
                                 eos_token_id=2, tie_word_embeddings=False)
            torch.manual_seed(0)
            t = time.perf_counter()
            with torch.device(sizes.device):  # random init on the GPU: seconds, not a minute
                model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch,
                                                                                sizes.big_dtype))
            model = model.to(sizes.device).eval()
            model.save_pretrained(self.path)
            self.report.set("big_params_M",
                            round(sum(p.numel() for p in model.parameters()) / 1e6, 1))
            self.report.set("big_build_s", round(time.perf_counter() - t, 1))
            self.report.set("hf_attn_implementation",
                            str(getattr(model.config, "_attn_implementation", None)))
            self._model = model
        return self._model

    def checkpoint(self) -> str:
        self.model()
        return self.path


def start_engine(big: BigModel, name: str, pp: int, eager: bool, report: Report) -> Any:
    """The engine on the big checkpoint; `<name>_start_s` (load, KV sizing, graph capture)."""
    from engine_core import LLM

    sizes = big.sizes
    kwargs: dict[str, Any] = dict(
        dtype=sizes.big_dtype, device=sizes.device, seed=0, pipeline_parallel_size=pp,
        distributed_executor_backend="inprocess", max_num_seqs=sizes.num_requests,
        attention_backend="auto", enforce_eager=eager or sizes.eager_only,
        max_num_batched_tokens=sizes.batched_tokens)
    if sizes.device == "cuda" and pp == 1:
        kwargs["gpu_memory_utilization"] = 0.6  # transformers' model stays beside it
    else:  # in-process stages on one GPU would each claim the fraction; CPU: not a GPU setting
        kwargs["num_kv_blocks"] = sizes.pp2_kv_blocks if pp > 1 else sizes.cpu_kv_blocks
    path = big.checkpoint()
    t = time.perf_counter()
    try:
        llm = LLM(path, **kwargs)
    except Exception as exc:
        if "gpu_memory_utilization" not in kwargs:
            raise
        report.error(f"{name}_gpu_memory_utilization", exc)
        report.note(f"{name}: KV sizing by gpu_memory_utilization failed; num_kv_blocks instead")
        del kwargs["gpu_memory_utilization"]
        free_memory(sizes.device)
        t = time.perf_counter()
        llm = LLM(path, **kwargs, num_kv_blocks=sizes.pp2_kv_blocks)
    report.set(f"{name}_start_s", round(time.perf_counter() - t, 2))
    block_manager = getattr(llm.engine, "block_manager", None)
    if block_manager is not None:
        report.set(f"{name}_kv_blocks", int(block_manager.num_blocks))
    return llm


def measure_single(llm: Any, name: str, sizes: Sizes, source: PromptSource,
                   report: Report) -> float:
    """One request of prompt_len -> output_len tokens at a time (fresh prompts, after a warm-up):
    `<name>_single_tok_s` (median of the runs, prefill included), `_ttft_ms` (max_tokens=1) and
    `_decode_tok_s` (the output tokens after the first, over the time after it)."""
    from engine_core import SamplingParams

    def run(max_tokens: int) -> tuple[int, float]:
        t = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": source.take(1)[0]}],
                           SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                          ignore_eos=True), use_tqdm=False)
        return len(out[0].outputs[0].token_ids), time.perf_counter() - t

    run(8)
    rates = []
    for _ in range(sizes.single_runs):
        n, wall = run(sizes.output_len)
        rates.append(n / wall)
    _, ttft = run(1)
    rate = statistics.median(rates)
    report.set(f"{name}_single_runs_tok_s", [round(r, 1) for r in rates])
    report.set(f"{name}_single_ttft_ms", round(ttft * 1e3, 2))
    decode_s = sizes.output_len / rate - ttft
    if decode_s > 0:
        report.set(f"{name}_single_decode_tok_s", round((sizes.output_len - 1) / decode_s, 1))
    else:
        report.note(f"{name}: the median one-request run took less than max_tokens=1 did")
    report.set(f"{name}_single_tok_s", round(rate, 1))
    return rate


def measure_throughput(llm: Any, name: str, sizes: Sizes, source: PromptSource,
                       workload: list[list[int]], report: Report, clock: Clock) -> float | None:
    """All requests in one generate call after a warm-up of warm_requests x warm_tokens (which
    also estimates whether the run fits the time left): `<name>_tok_s`."""
    from engine_core import SamplingParams

    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in source.take(sizes.warm_requests)],
                 SamplingParams(temperature=0.0, max_tokens=sizes.warm_tokens, ignore_eos=True),
                 use_tqdm=False)
    warm_s = time.perf_counter() - t
    # the full run has N/warm_requests times the prefill and output_len/warm_tokens times the
    # decode steps of the warm-up, each at a larger batch; half that product is a cautious bound
    scale = sizes.num_requests / sizes.warm_requests * sizes.output_len / sizes.warm_tokens
    if not clock.allows(warm_s * scale / 2 + 5, f"{name} throughput (warm-up took {warm_s:.1f} s)"):
        return None
    stats = getattr(llm.engine, "loop_stats", None)
    before = None if stats is None else (stats.num_steps, stats.schedule_s + stats.update_s)
    t = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in workload],
                           SamplingParams(temperature=0.0, max_tokens=sizes.output_len,
                                          ignore_eos=True), use_tqdm=False)
    wall = time.perf_counter() - t
    total = sum(len(o.outputs[0].token_ids) for o in outputs)
    if total != sizes.num_requests * sizes.output_len:
        report.note(f"{name}: {total} output tokens, not {sizes.num_requests * sizes.output_len}")
    if stats is not None and before is not None:
        steps = stats.num_steps - before[0]
        report.set(f"{name}_steps", steps)
        report.set(f"{name}_driver_ms_per_step",
                   round((stats.schedule_s + stats.update_s - before[1]) / max(steps, 1) * 1e3, 3))
    report.set(f"{name}_wall_s", round(wall, 2))
    report.set(f"{name}_tok_s", round(total / wall, 1))
    return total / wall


def hf_throughput(model: Any, workload: list[list[int]], batch: int, sizes: Sizes,
                  report: Report, clock: Clock, key: str) -> float:
    """transformers `generate` over the workload in static batches of `batch` (all prompts of one
    length: no padding), min_new_tokens = max_new_tokens: output tokens/s. Stops between batches
    when the part's time is out (noted, the rate over the batches done)."""
    import torch

    total, t = 0, time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(workload), batch):
            if i and clock.left() < 0:
                report.note(f"{key}: stopped after {i} of {len(workload)} requests (time)")
                break
            ids = torch.tensor(workload[i:i + batch], device=sizes.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=sizes.output_len,
                                 min_new_tokens=sizes.output_len, pad_token_id=0)
            total += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    sync(sizes.device)
    rate = total / (time.perf_counter() - t)
    report.set(key, round(rate, 1))
    return rate


def ratio(report: Report, key: str, ours: str, theirs: str) -> None:
    if isinstance(report.data.get(ours), (int, float)) and isinstance(
            report.data.get(theirs), (int, float)):
        report.set(key, round(report.data[ours] / report.data[theirs], 3))


def part_graphs(big: BigModel, sizes: Sizes, report: Report, clock: Clock) -> Any:
    """One request, eager then with CUDA graphs; returns the graph engine (for part 4)."""
    source = PromptSource(sizes, seed=11)
    big.checkpoint()
    llm = None
    if clock.allows(15.0, "eager one-request run"):
        try:
            llm = start_engine(big, "ours_pp1_eager", 1, True, report)
            measure_single(llm, "ours_pp1_eager", sizes, source, report)
        except Exception as exc:
            report.error("ours_pp1_eager_single", exc)
        finally:
            if llm is not None:
                llm.shutdown()
            llm = None
            free_memory(sizes.device)
    if not clock.allows(15.0, "graphs one-request run"):
        return None
    llm = start_engine(big, "ours_pp1", 1, False, report)
    try:
        measure_single(llm, "ours_pp1", sizes, source, report)
    except Exception as exc:
        report.error("ours_pp1_single", exc)
    ratio(report, "graphs_vs_eager_single", "ours_pp1_single_tok_s",
          "ours_pp1_eager_single_tok_s")
    return llm


def part_throughput(big: BigModel, llm: Any, sizes: Sizes, report: Report,
                    clock: Clock) -> None:
    source = PromptSource(sizes, seed=22)
    workload = PromptSource(sizes, seed=1234).take(sizes.num_requests)
    report.set("workload", {"num_requests": sizes.num_requests, "prompt_len": sizes.prompt_len,
                            "output_len": sizes.output_len, "model": dict(sizes.big),
                            "dtype": sizes.big_dtype})
    report.set("target_vs_hf_best", TARGET_VS_HF)
    report.set("target_single_tok_s", TARGET_SINGLE_TOK_S)
    # the engine at PP=1 with graphs (started by part 3, or here)
    try:
        if llm is None and clock.allows(20.0, "PP=1 engine start"):
            llm = start_engine(big, "ours_pp1", 1, False, report)
        if llm is not None:
            measure_throughput(llm, "ours_pp1", sizes, source, workload, report, clock)
    except Exception as exc:
        report.error("ours_pp1_throughput", exc)
    finally:
        if llm is not None:
            llm.shutdown()
        llm = None
        free_memory(sizes.device)
    # transformers at its static batches, same workload
    model = big.model()
    try:
        hf_throughput(model, source.take(8), 8, sizes, report, clock, "hf_warmup_tok_s")
        best = None
        for label, batch in sizes.hf_batches:
            if not clock.allows(sizes.hf_need_s, f"transformers {label}"):
                continue
            rate = hf_throughput(model, workload, batch, sizes, report, clock, f"hf_{label}_tok_s")
            if best is None or rate > best[0]:
                best = (rate, batch)
        if best is not None:
            report.set("hf_best_tok_s", round(best[0], 1))
            report.set("hf_best_batch", best[1])
    except Exception as exc:
        report.error("hf_throughput", exc)
    ratio(report, "ours_pp1_vs_hf_best", "ours_pp1_tok_s", "hf_best_tok_s")
    free_memory(sizes.device)
    # if time allows: PP=2 in one process, transformers at batch 1, the eager engine
    engine_need = 30.0 if sizes.device == "cuda" else 1.0
    if clock.allows(engine_need, "ours_pp2 (PP=2 in-process) throughput"):
        engine_throughput(big, "ours_pp2", 2, False, source, workload, report, clock)
    if clock.allows(sizes.hf_need_s / 2, "transformers batch 1"):
        try:
            hf_throughput(model, workload[:1], 1, sizes, report, clock, "hf_bs1_tok_s")
        except Exception as exc:
            report.error("hf_bs1", exc)
    if clock.allows(engine_need, "ours_pp1_eager throughput"):
        engine_throughput(big, "ours_pp1_eager", 1, True, source, workload, report, clock)
        ratio(report, "graphs_vs_eager_throughput", "ours_pp1_tok_s", "ours_pp1_eager_tok_s")
    single = report.data.get("ours_pp1_single_tok_s")
    if isinstance(single, (int, float)):
        report.set("meets_single_target", single >= TARGET_SINGLE_TOK_S)
    vs_hf = report.data.get("ours_pp1_vs_hf_best")
    if isinstance(vs_hf, (int, float)):
        report.set("meets_throughput_target", vs_hf >= TARGET_VS_HF)


def engine_throughput(big: BigModel, name: str, pp: int, eager: bool, source: PromptSource,
                      workload: list[list[int]], report: Report, clock: Clock) -> None:
    """Start an engine, measure the workload (and one request at PP > 1), shut it down;
    `<name>_vs_hf_best`."""
    llm = None
    try:
        llm = start_engine(big, name, pp, eager, report)
        measure_throughput(llm, name, big.sizes, source, workload, report, clock)
        if pp > 1:
            measure_single(llm, name, big.sizes, source, report)
    except Exception as exc:
        report.error(f"{name}_throughput", exc)
    finally:
        if llm is not None:
            llm.shutdown()
        llm = None
        free_memory(big.sizes.device)
    ratio(report, f"{name}_vs_hf_best", f"{name}_tok_s", "hf_best_tok_s")


# ---------------------------------------------------------------- the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", help="folder for gpu.json and gpu.log")
    parser.add_argument("--smoke", action="store_true",
                        help="every part on CPU at tiny sizes (the test of this script)")
    parser.add_argument("--wheels", default=None,
                        help="folder of wheels to unpack onto sys.path (scripts/gpu_wheels.sh)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (default: 270 on a GPU, 170 smoke)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:  # before anything imports triton: the kernels run under its interpreter
        os.environ["TRITON_INTERPRET"] = "1"
    sizes = SMOKE if args.smoke else GPU
    budget = args.budget if args.budget is not None else sizes.budget_s
    os.makedirs(args.outdir, exist_ok=True)
    report = Report(args.outdir)
    # a hung call (a deadlock, a kernel that never returns) still ends the run, with a traceback
    faulthandler.dump_traceback_later(budget + 30, exit=True, file=report.log_file)
    report.set("mode", "smoke" if args.smoke else "gpu")
    report.set("budget_s", budget)
    prepare_imports(args.wheels, report)
    import torch
    import transformers

    if args.smoke:
        torch.set_num_threads(1)  # a small shared CPU: threads would only contend
    if sizes.device == "cuda" and not torch.cuda.is_available():
        report.set("fatal", "no CUDA device (use --smoke on a CPU)")
        return 2
    report.set("versions", {"python": sys.version.split()[0], "torch": torch.__version__,
                            "cuda": torch.version.cuda, "transformers": transformers.__version__,
                            "triton": _version("triton")})
    if sizes.device == "cuda":
        report.set("device_name", torch.cuda.get_device_name())
    report.set("sizes", {k: v for k, v in asdict(sizes).items() if k not in ("tiny", "big")})
    clock = Clock(budget, report)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as workdir:
        big = BigModel(sizes, workdir, report)
        llm = None
        parts: list[tuple[str, float | None, Callable[[], Any]]] = [
            ("parity", sizes.part_caps_s[0], lambda: part_parity(sizes, workdir, report, clock)),
            ("kernel", sizes.part_caps_s[1], lambda: part_kernel(sizes, report, clock)),
            ("graphs", sizes.part_caps_s[2], lambda: part_graphs(big, sizes, report, clock)),
        ]
        for name, cap, run in parts:
            clock.begin_part(cap)
            report.log(f"--- part {name} ({clock.left():.0f} s)")
            try:
                result = run()
                if name == "graphs":
                    llm = result
            except Exception as exc:
                report.error(f"part_{name}", exc)
        clock.begin_part(None)
        report.log(f"--- part throughput ({clock.left():.0f} s)")
        try:
            part_throughput(big, llm, sizes, report, clock)
        except Exception as exc:
            report.error("part_throughput", exc)
        if sizes.device == "cuda":
            report.set("cuda_max_allocated_gib",
                       round(torch.cuda.max_memory_allocated() / 2**30, 2))
    faulthandler.cancel_dump_traceback_later()
    report.set("finished", True)
    return 0


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # absent, or broken on this host: a version is no reason to stop
        return None


if __name__ == "__main__":
    sys.exit(main())

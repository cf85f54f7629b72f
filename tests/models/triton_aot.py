"""Compile the paged-attention kernel ahead of time for GPU targets, with no GPU present.

Each launch is built by the launcher itself (`kernel_launch`) on tiny CPU tensors laid out as
the engine lays them out, and its arguments are specialised as Triton's JIT specialises them
(alignment and divisibility by 16, ints equal to 1), so what compiles here is what the engine
would compile. Runs as a module in a process without TRITON_INTERPRET (under the interpreter
Triton's own library functions are interpreted and cannot be compiled):

    python -m tests.models.triton_aot < request.json    # prints one JSON result per compile

request: {"shapes": [[num_heads, num_kv_heads, head_dim, block_size, dtype], ...],
"capabilities": [80, 90], "negative": true}. A result: shape, kind, capability, ok, error,
ptx_bytes, cubin_bytes, shared, registers, spill_bytes, uses (instruction families in the PTX).
Shapes list each of `kernel_configs`' kinds: decode, decode_split, combine, prefill.
"negative" adds one compile expected to fail: the decode launch with BLOCK_N = 8, a `tl.dot`
whose reduced dimension is below 16 (the interpreter runs it; a GPU cannot).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import time
from dataclasses import replace
from typing import Any

import torch
import triton
from engine_core.models import triton_paged_attention as tpa
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def representative_launch(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                          dtype: torch.dtype, kind: str) -> tpa.KernelLaunch:
    """The launcher's plan for a step of this model that launches `kind`: q a view of the
    fused q/k projection, the caches the two halves of one layer's KV tensor, index arrays
    views into one step buffer."""
    num_tokens = 3
    qk = torch.empty(num_tokens, num_heads + num_kv_heads, head_dim, dtype=dtype)
    q = qk[:, :num_heads]  # [num_tokens, H, D]
    kv = torch.empty(2, 4, block_size, num_kv_heads, head_dim, dtype=dtype)
    step = torch.zeros(64, dtype=torch.int64)
    seq_lens = step[1:3]
    query_start_loc = step[3:6]
    block_tables = step[6:16].view(2, 5)
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=dtype)
    max_query_len = 2 if kind == "prefill" else 1
    num_splits = 4 if kind in ("decode_split", "combine") else 1
    launches = tpa.kernel_launch(q, kv[0], kv[1], block_tables, seq_lens, query_start_loc,
                                 max_query_len, head_dim**-0.5, out, num_splits)
    (launch,) = [launch for launch in launches if launch.config.kind == kind]
    return launch


def compile_source(config: tpa.KernelConfig | tpa.CombineConfig,
                   args: tuple[Any, ...]) -> tuple[ASTSource, dict[str, int]]:
    """The kernel, its arguments specialised like the JIT's, as an ASTSource + options."""
    kernel = getattr(tpa, config.kernel)
    # Under the interpreter `triton.jit` returns an InterpretedFunction wrapping the function.
    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)
    constexprs: dict[str, Any] = dict(config.constexprs())
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    values = iter(args)
    for index, param in enumerate(fn.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            continue
        value = next(values)
        ty, key = native_specialize_impl(CUDABackend, value, False,
                                         not param.do_not_specialize,
                                         not param.do_not_specialize_on_alignment)
        if ty == "constexpr":  # an int equal to 1
            signature[param.name] = "constexpr"
            constexprs[param.name] = key
            continue
        signature[param.name] = ty
        if key:
            attrs[(index,)] = CUDABackend.parse_attr(key)
    if next(values, None) is not None:
        raise AssertionError("kernel_launch passes more arguments than the kernel takes")
    missing = set(config.constexprs()) - {p.name for p in fn.params if p.is_constexpr}
    if missing:
        raise AssertionError(f"constexprs the kernel does not take: {missing}")
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return ASTSource(fn, signature, constexprs, attrs), options


def compile_one(source: ASTSource, options: dict[str, int], capability: int) -> dict[str, Any]:
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints ptxas -v
            kernel = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                    options=options)
    except Exception as e:  # the result says what failed; the test decides
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
    ptx = kernel.asm["ptx"]
    registers = re.findall(r"Used (\d+) registers", log.getvalue())
    spills = re.findall(r"(\d+) bytes spill stores", log.getvalue())
    return {
        "ok": True,
        "seconds": round(time.perf_counter() - start, 2),
        "ptx_bytes": len(ptx),
        "cubin_bytes": len(kernel.asm["cubin"]),
        "entry": f".entry {kernel.name}" in ptx,
        "shared": kernel.metadata.shared,
        "registers": int(registers[-1]) if registers else None,
        "spill_bytes": int(spills[-1]) if spills else None,
        "uses": sorted(u for u in ("wgmma", "mma.sync", "cp.async", "tf32") if u in ptx),
    }


def main() -> None:
    request = json.load(sys.stdin)
    seen: dict[str, dict[str, Any]] = {}
    for shape in request["shapes"]:
        num_heads, num_kv_heads, head_dim, block_size, dtype_name = shape
        dtype = DTYPES[dtype_name]
        for config in tpa.kernel_configs(num_heads, num_kv_heads, head_dim, block_size, dtype):
            launch = representative_launch(num_heads, num_kv_heads, head_dim, block_size,
                                           dtype, config.kind)
            if launch.config != config:
                raise AssertionError(f"the launcher picked {launch.config}, listed {config}")
            source, options = compile_source(config, launch.args)
            for capability in request["capabilities"]:
                key = f"{source.hash()}-{options}-{capability}"  # identical compiles once
                if key not in seen:
                    seen[key] = compile_one(source, options, capability)
                print(json.dumps({"shape": shape, "kind": config.kind,
                                  "capability": capability, **seen[key]}), flush=True)
    if request.get("negative"):
        launch = representative_launch(32, 4, 64, 16, torch.float16, "decode")
        source, options = compile_source(replace(launch.config, block_n=8), launch.args)
        print(json.dumps({"shape": "negative: BLOCK_N=8", "kind": "decode",
                          "capability": 90, **compile_one(source, options, 90)}), flush=True)


if __name__ == "__main__":
    main()

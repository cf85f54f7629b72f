"""The KV cache's memory, reserved when the cache is allocated (issue 18).

A host that cannot hold the KV cache must fail at start with an error naming the setting, not
be OOM-killed later under load. So, before allocating, `check_fits` compares the cache's bytes
with what the device has free: on CUDA `torch.cuda.mem_get_info`; on the host the smaller of
`MemAvailable` (/proc/meminfo) and the headroom under every cgroup memory limit of this process
(v2 `memory.max`, v1 `memory.limit_in_bytes`), less a margin for activations, the rest of the
process and the OS. `allocate_resident` then allocates the tensors uninitialised and zeroes them
a slice at a time, so every page is resident before the first request (the kernel maps untouched
pages lazily), checking between slices that the host still has its margin free: memory taken
meanwhile by another process fails the start too, instead of OOM-killing it mid-touch.
"""

from __future__ import annotations

import logging
import os
import time

import torch

__all__ = ["KVMemoryError", "allocate_resident", "available_bytes", "check_fits"]

logger = logging.getLogger(__name__)

HOST_MARGIN_BYTES = 256 << 20  # kept free on the host at least...
HOST_MARGIN_FRACTION = 0.05  # ...or this share of what is available, if more
CUDA_MARGIN_FRACTION = 0.02
TOUCH_SLICE_BYTES = 256 << 20  # zeroed between two checks of the host's free memory
_UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a number near 2**63


class KVMemoryError(ValueError):
    """The KV cache does not fit in the memory the device has free."""


def available_bytes(device: torch.device) -> int | None:
    """Bytes this process can still allocate on `device`; None if unknown (not Linux, MPS)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    available = _meminfo_available()
    headroom = _cgroup_headroom()
    candidates = [b for b in (available, headroom) if b is not None]
    return min(candidates) if candidates else None


def margin_bytes(device: torch.device, available: int) -> int:
    """Bytes to leave free beyond the cache."""
    if device.type == "cuda":
        return int(available * CUDA_MARGIN_FRACTION)
    return max(HOST_MARGIN_BYTES, int(available * HOST_MARGIN_FRACTION))


def check_fits(nbytes: int, device: torch.device, setting: str) -> None:
    """KVMemoryError (a ValueError naming `setting`, the option that sized the cache) unless
    `nbytes` more fit on `device` with the margin left free."""
    available = available_bytes(device)
    if available is None:
        return
    margin = margin_bytes(device, available)
    if nbytes + margin > available:
        where = "GPU memory is free" if device.type == "cuda" else "host memory is available"
        raise KVMemoryError(
            f"the KV cache needs {_gib(nbytes)} ({setting}), but only {_gib(available)} of "
            f"{where} and {_gib(margin)} of it must stay free for the rest of the engine; "
            f"lower kv_cache_memory or num_kv_blocks (--kv-cache-memory / --num-kv-blocks), "
            f"or max_num_seqs / max_model_len, which cap it")


def allocate_resident(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device,
                      setting: str) -> list[torch.Tensor]:
    """Zero-filled tensors of `shapes`, every page resident on return. Checks the total first
    (`check_fits`); on the host, between slices of the zeroing, that the margin is still free
    (KVMemoryError otherwise, with everything allocated so far released)."""
    elem = torch.empty((), dtype=dtype).element_size()
    total = sum(_numel(shape) for shape in shapes) * elem
    check_fits(total, device, setting)
    start = time.perf_counter()
    if device.type != "cpu":  # device allocators commit memory at once
        tensors = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
    else:
        tensors = []
        slice_elems = max(1, TOUCH_SLICE_BYTES // elem)
        done = 0
        for shape in shapes:
            tensor = torch.empty(shape, dtype=dtype, device=device)
            flat = tensor.view(-1)  # [numel]
            for begin in range(0, flat.numel(), slice_elems):
                _check_margin(device, total - done, setting)
                chunk = flat[begin:begin + slice_elems]
                chunk.zero_()  # writes every page: resident from here on
                done += chunk.numel() * elem
            tensors.append(tensor)
    logger.info("KV cache: %s resident in %.2f s", _gib(total), time.perf_counter() - start)
    return tensors


def _check_margin(device: torch.device, remaining: int, setting: str) -> None:
    """The host must still have the not yet touched rest of the cache plus its margin free."""
    available = available_bytes(device)
    if available is None:
        return
    margin = margin_bytes(device, available)
    if remaining + margin > available:
        raise KVMemoryError(
            f"host memory ran short while the KV cache was being reserved ({setting}): "
            f"{_gib(remaining)} of it still to touch, {_gib(available)} available, "
            f"{_gib(margin)} must stay free (another process took memory meanwhile?); lower "
            f"kv_cache_memory or num_kv_blocks")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_headroom() -> int | None:
    """The least room left under any memory limit of this process's cgroups (v1 and v2, the
    cgroup and its ancestors); None if there is no limit."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    headroom = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            base, limit_name, usage_name = "/sys/fs/cgroup", "memory.max", "memory.current"
        elif "memory" in controllers.split(","):  # v1
            base = "/sys/fs/cgroup/memory"
            limit_name, usage_name = "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            directory = os.path.join(base, *parts[:depth])
            limit = _read_int(os.path.join(directory, limit_name))
            usage = _read_int(os.path.join(directory, usage_name))
            if limit is None or usage is None or limit >= _UNLIMITED:
                continue
            # page cache the kernel can drop counts as usage, but not against us
            usage -= _stat(os.path.join(directory, "memory.stat"),
                           "inactive_file" if controllers == "" else "total_inactive_file")
            room = max(0, limit - usage)
            headroom = room if headroom is None else min(headroom, room)
    return headroom


def _stat(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit

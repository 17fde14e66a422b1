"""The preallocated key/value cache of the text decoder: fixed shapes, set up by an explicit call.

k and v are each one tensor [layers, B, K, T, D], allocated by the model's `setup_caches` (K: the
layers' own kv heads, fewer per rank under tensor parallelism); the prompt fills slots 0..L-1 and
decode step s writes slot L+s in place (index_copy_ with a device-side index, so a captured CUDA
graph can replay it). Before allocating, `check_cache_fits` compares the bytes needed with the free memory of the
device and refuses with the numbers rather than failing inside the allocator.
"""

from __future__ import annotations

import os

import torch

GiB = 1024**3


def cache_bytes(config, batch: int, max_len: int, dtype: torch.dtype, *, kv_heads: int | None = None) -> int:
    """Bytes of k and v for `batch` rows of `max_len` tokens: 2 * layers * B * K * T * D * itemsize
    (K = kv_heads, default the config's)."""
    item = torch.empty((), dtype=dtype).element_size()
    K = config.num_key_value_heads if kv_heads is None else kv_heads
    return 2 * config.num_hidden_layers * batch * K * max_len * config.head_dim * item


def free_bytes(device: torch.device) -> int:
    """Free memory of the device: CUDA mem_get_info, or MemAvailable of /proc/meminfo on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_cache_fits(
    config,
    batch: int,
    max_len: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    extra_bytes: int = 0,
    headroom: float = 0.9,
    alloc_len: int | None = None,
    kv_heads: int | None = None,
) -> int:
    """Raise ValueError when the cache for `max_len` tokens (allocated as `alloc_len` >= max_len slots,
    plus `extra_bytes` of working memory) would not fit in `headroom` of the free memory, or when
    max_len exceeds the model's positions; else return the cache's bytes."""
    if max_len > config.max_position_embeddings:
        raise ValueError(
            f"prompt + max_new_tokens = {max_len} tokens exceeds max_position_embeddings "
            f"{config.max_position_embeddings}"
        )
    need = cache_bytes(config, batch, alloc_len or max_len, dtype, kv_heads=kv_heads)
    free = free_bytes(device)
    if need + extra_bytes > headroom * free:
        raise ValueError(
            f"KV cache for batch {batch} x {max_len} tokens needs {need / GiB:.2f} GiB "
            f"(+ {extra_bytes / GiB:.2f} GiB working memory) but {device.type} has {free / GiB:.2f} GiB free "
            f"(limit {headroom:.0%} of it); lower the batch size or max_new_tokens"
        )
    return need


class KVCache:
    """k, v [layers, B, K, T, D] in `dtype` on `device`, zero-filled."""

    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (layers, batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.batch, self.max_len = batch, max_len

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's (k, v), each a view [B, K, T, D]."""
        return self.k[i], self.v[i]

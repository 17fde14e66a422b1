"""Tensor parallelism for the text decoder, applied to a built impl.model.Qwen25VL from outside.

    apply_tp(model, group)   (torch.distributed initialised; every rank built the same model)
    from_pretrained_tp(folder, tp)   (under torchrun: each layer sharded as it is read)

Megatron's split, with explicit collectives (torch.distributed.all_reduce, NCCL on CUDA, gloo on
the CPU):
  attention  q|k|v rows sliced by head (column parallel): rank r keeps query heads
             [r*N/W, (r+1)*N/W) and the kv heads they read; o_proj columns sliced the same way
             (row parallel) and its output all-reduced (sum) before the residual add.
  MLP        gate and up rows sliced to I/W each (column parallel); down columns sliced (row
             parallel) and its output all-reduced.
  kv heads   K % W == 0: each rank keeps K/W kv heads. W % K == 0 (fewer kv heads than ranks, as
             the tiny test model's K = 1): each kv head is replicated on the W/K ranks whose query
             heads read it. Anything else is refused.
  replicated the vision tower (0.67B; its MLP width 3420 does not divide by 8), embeddings, final
             norm, lm_head (logits are whole on every rank, so every rank picks the same token).
Two all-reduces per layer; everything else is local. The layers' N and K become the local counts,
so setup_caches allocates the local kv heads only. The result equals TP=1 up to the summation
order of the reduced products (float32: ~1e-6 relative).

Sharding happens where the weights are: build the model on the CPU (or a device that holds the
whole model), apply_tp, then `model.to_device` onto the rank's GPU; apply int4 after that.
from_pretrained_tp does the same one layer at a time (shard_layer as Qwen25VL's layer_hook): the
checkpoint's tensors are memory-mapped (safetensors), so a rank's own memory holds the replicated
parts, its shards and at most one unsharded layer, never the whole decoder.

Shapes: N heads, K kv heads, D head dim, C hidden, I intermediate, W world size.
"""

from __future__ import annotations

import atexit
import os
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn

from .model import Qwen25VL, _linear, default_dtype
from .quant import apply_fp16_pack, apply_int4, fp16_pack_wanted


class RowParallel(nn.Module):
    """A linear layer whose input features are sharded: y = all_reduce_sum(x_local @ w_local^T)."""

    def __init__(self, linear: nn.Module, group):
        super().__init__()
        assert getattr(linear, "bias", None) is None, "a row-parallel layer adds its bias after the reduce"
        self.linear, self.group = linear, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=self.group)
        return y


def tp_heads(N: int, K: int, world: int, rank: int) -> tuple[range, range]:
    """The query heads and kv heads rank `rank` of `world` keeps (see the module doc's rule)."""
    if N % world:
        raise ValueError(f"tensor parallel size {world} must divide num_attention_heads {N}")
    if K % world == 0:
        kv = range(rank * K // world, (rank + 1) * K // world)
    elif world % K == 0:
        r = rank // (world // K)  # ranks r*(W/K) .. (r+1)*(W/K)-1 share kv head r
        kv = range(r, r + 1)
    else:
        raise ValueError(f"num_key_value_heads {K} and tensor parallel size {world}: one must divide the other")
    return range(rank * N // world, (rank + 1) * N // world), kv


def _rows(w: torch.Tensor, blocks: list[range], size: int) -> torch.Tensor:
    """Concatenate the row blocks [i*size, (i+1)*size) for i in each range of `blocks` (a fresh tensor)."""
    return torch.cat([w[r.start * size : r.stop * size] for r in blocks]).contiguous()


def apply_tp(model, group=None) -> None:
    """Shard model.text's layers over `group` (default: the world), in place (see module doc)."""
    for layer in model.text.layers:
        shard_layer(layer, group)


def shard_layer(layer, group=None) -> None:
    """Shard one built decoder layer over `group` in place: this rank keeps its heads' q|k|v rows and
    o_proj columns, and its slice of gate|up rows and down columns (see module doc)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    a, m = layer.attn, layer.mlp
    if not (type(a.qkv) is nn.Linear and type(m.gate_up) is nn.Linear):
        raise ValueError(
            f"apply_tp shards plain nn.Linear layers; layer {layer.i} holds {type(a.qkv).__name__}: "
            "shard before int4 and the other transforms, and build a bfloat16 CPU model with "
            "cpu_fp16_pack=False (impl.quant; from_pretrained_tp does)"
        )
    N, K, D, I = a.N, a.K, a.D, m.gate_up.weight.shape[0] // 2
    if I % world:
        raise ValueError(f"tensor parallel size {world} must divide intermediate_size {I}")
    q_heads, kv_heads = tp_heads(N, K, world, rank)
    local_i = range(rank * I // world, (rank + 1) * I // world)
    # q|k|v rows: q heads 0..N-1, then k heads at N.., v heads at N+K..
    blocks = [
        q_heads,
        range(N + kv_heads.start, N + kv_heads.stop),
        range(N + K + kv_heads.start, N + K + kv_heads.stop),
    ]
    a.qkv = _linear(_rows(a.qkv.weight, blocks, D), None if a.qkv.bias is None else _rows(a.qkv.bias, blocks, D))
    wo = a.o_proj.weight[:, q_heads.start * D : q_heads.stop * D].contiguous()
    a.o_proj = RowParallel(_linear(wo), group)
    a.N, a.K = len(q_heads), len(kv_heads)
    # gate|up rows: gate at 0..I-1, up at I..2I-1
    gu = [local_i, range(I + local_i.start, I + local_i.stop)]
    m.gate_up = _linear(_rows(m.gate_up.weight, gu, 1))
    m.down = RowParallel(_linear(m.down.weight[:, local_i.start : local_i.stop].contiguous()), group)


def init_tp(tp: int, device=None):
    """Join the process group torchrun made for `tp` ranks -> (group, rank, the rank's device): NCCL
    and cuda:LOCAL_RANK when the device is CUDA (default when available), else gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != tp:
        raise ValueError(f"--tp {tp} must run under `torchrun --nproc-per-node {tp}` (WORLD_SIZE is {world})")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    rank = dist.get_rank()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    return dist.group.WORLD, rank, device


def from_pretrained_tp(folder, tp: int, *, dtype=None, device=None, quantize=None, **kwargs) -> Qwen25VL:
    """This rank's shard of a checkpoint, under `torchrun --nproc-per-node tp` (init_tp, then
    load_shard). dtype default: bfloat16 on CUDA, float32 on the CPU."""
    group, _, device = init_tp(tp, device)
    return load_shard(folder, group, device, dtype=dtype, quantize=quantize, **kwargs)


def load_shard(folder, group, device, *, dtype=None, quantize=None, **kwargs) -> Qwen25VL:
    """This rank's shard over `group` (torch.distributed initialised): read on the CPU, each decoder
    layer sharded as soon as it is built (so the rank never holds more than one unsharded layer
    besides the replicated parts), moved to `device`, then int4 (quantize="int4"|"w4a8") if asked.
    kwargs: the other options of Qwen25VL.from_pretrained (attention, use_triton, progress)."""
    device = torch.device(device)
    model = Qwen25VL.from_pretrained(
        folder,
        dtype=dtype or default_dtype(device),
        device="cpu",
        cpu_fp16_pack=False,
        layer_hook=partial(shard_layer, group=group),
        **kwargs,
    )
    model.to_device(device)
    if quantize is not None:
        apply_int4(model, quantize)
    if fp16_pack_wanted(device, model.dtype_):  # after sharding: the shards get packed, as from_params would
        apply_fp16_pack(model)
    return model

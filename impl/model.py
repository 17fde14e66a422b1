"""The fast Qwen2.5-VL: nn.Modules holding fused weights, calling the kernels of impl.kernels.

What differs from spec (and why it is faster), stage by stage:
  vision   patch embed as one matmul; fused qkv (already fused in the checkpoint) and fused gate|up;
           q/k rotated in place in the qkv buffer by one kernel; every window of every image in
           ONE attention call (impl.attention.SegmentPlan; window order computed once per forward).
  text     q|k|v and gate|up concatenated at load (one matmul each); RMSNorm, rotary and SwiGLU as
           Triton kernels on CUDA; a preallocated KV cache; prefill computes logits for the last
           position only; decode attends over the fixed-size cache (see impl.generate).
What it takes from spec because it is identical by definition: config and checkpoint key table,
preprocessing and chat template, window partition and rotary positions, MRoPE position indices,
input checks and stage selection.

Shapes: B batch, L tokens, P patches, N heads, K kv heads, D head dim, C hidden, Cv vision hidden,
I intermediate, V vocab.
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..spec.checkpoint import check_params
from ..spec.forward import check_inputs, check_prefill_chunk, chunk_positions, chunk_spans, select_stages
from ..spec.mrope import mrope_cos_sin, rope_index
from ..spec.vision import VISION_ROPE_THETA
from ..spec.windows import vision_rotary_cos_sin, vision_rotary_positions, window_partition, window_row_order
from .attention import SegmentPlan, check_backend, decode_attention, prefill_attention, prefill_mask, segment_attention
from .cache import KVCache
from .generate import generate_tokens
from .kernels.rmsnorm import rms_norm
from .kernels.rotary import apply_rotary_
from .kernels.swiglu import swiglu

SUPPORTED_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.bfloat16, torch.float16, torch.float32)}


def default_dtype(device) -> torch.dtype:
    """The dtype a model gets when none is named: bfloat16 on CUDA, float32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def check_dtype_device(dtype, device) -> tuple[torch.dtype, torch.device]:
    """Normalize and validate (dtype, device); ValueError names the pair and what is supported."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype in ("float32", "bfloat16", "float16") else dtype
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device") from None
    if device.type not in SUPPORTED_DTYPES:
        raise ValueError(f"device {device.type!r} is not supported; use 'cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    if dtype not in SUPPORTED_DTYPES[device.type]:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES[device.type])
        raise ValueError(
            f"dtype {str(dtype).removeprefix('torch.')} is not supported on {device.type} (supported: {names})"
        )
    return dtype, device


def _linear(w: torch.Tensor, b: torch.Tensor | None = None) -> nn.Linear:
    """An nn.Linear that adopts w [out, in] (and b [out]) without allocating a second copy."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    lin.weight = nn.Parameter(w, requires_grad=False)
    if b is not None:
        lin.bias = nn.Parameter(b, requires_grad=False)
    return lin


def _norm(w: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(w, requires_grad=False)


class VisionBlock(nn.Module):
    def __init__(self, get, i: int, vcfg, use_triton: bool):
        super().__init__()
        p = f"visual.blocks.{i}."
        self.N, self.D, self.eps, self.use_triton = vcfg.num_heads, vcfg.head_dim, vcfg.rms_norm_eps, use_triton
        self.norm1, self.norm2 = _norm(get(p + "norm1.weight")), _norm(get(p + "norm2.weight"))
        self.qkv = _linear(get(p + "attn.qkv.weight"), get(p + "attn.qkv.bias"))
        self.proj = _linear(get(p + "attn.proj.weight"), get(p + "attn.proj.bias"))
        self.gate_up = _linear(
            get(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
            get(p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias"),
        )
        self.down = _linear(get(p + "mlp.down_proj.weight"), get(p + "mlp.down_proj.bias"))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, plan: SegmentPlan) -> torch.Tensor:
        """x [P, Cv] in window order; cos, sin float32 [P, D/2] -> [P, Cv]."""
        P, N, D, t = x.shape[0], self.N, self.D, self.use_triton
        qkv = self.qkv(rms_norm(x, self.norm1, self.eps, use_triton=t)).view(P, 3 * N, D)
        apply_rotary_(qkv, cos, sin, 2 * N, use_triton=t)  # q and k heads, in place
        q, k, v = qkv.split(N, dim=1)  # each [P, N, D]
        x = x + self.proj(segment_attention(q, k, v, plan).reshape(P, N * D))
        return x + self.down(swiglu(self.gate_up(rms_norm(x, self.norm2, self.eps, use_triton=t)), use_triton=t))


class VisionTower(nn.Module):
    def __init__(self, get, config, use_triton: bool):
        super().__init__()
        v = config.vision
        self.cfg, self.use_triton = v, use_triton
        # None: the grid geometry (window order, rotary tables, attention plans) is rebuilt per call;
        # a dict: it is kept per (grids, backend), for repeated image sizes (set `model.visual.geometry_cache = {}`)
        self.geometry_cache: dict | None = None
        w = get("visual.patch_embed.proj.weight")
        self.patch_embed = _linear(w.reshape(w.shape[0], -1))  # Conv3d with kernel = stride is a matmul
        self.blocks = nn.ModuleList(VisionBlock(get, i, v, use_triton) for i in range(v.depth))
        self.ln_q = _norm(get("visual.merger.ln_q.weight"))
        self.mlp0 = _linear(get("visual.merger.mlp.0.weight"), get("visual.merger.mlp.0.bias"))
        self.mlp2 = _linear(get("visual.merger.mlp.2.weight"), get("visual.merger.mlp.2.bias"))

    def forward(
        self,
        pixel_values: torch.Tensor,
        grid_thw: torch.Tensor,
        backend: str = "auto",
        captured: dict | None = None,
        wanted: set = frozenset(),
    ) -> tuple[torch.Tensor, dict]:
        """pixel_values [P, 1176], grid_thw [k, 3] -> (merged [P/4, C] in item order, {"window": label, "full": label})."""
        v = self.cfg
        dev, dt = self.ln_q.device, self.ln_q.dtype
        perm, inv_perm, cos, sin, plans, merge_index = self._geometry(grid_thw, pixel_values.shape[0], backend)

        x = self.patch_embed(pixel_values.to(device=dev, dtype=dt))  # [P, Cv]
        if "vision.patch_embed" in wanted:
            captured["vision.patch_embed"] = x
        x = x.index_select(0, perm)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, plans["full" if i in v.fullatt_block_indexes else "window"])
            if f"vision.block.{i}" in wanted:
                captured[f"vision.block.{i}"] = x.index_select(0, inv_perm)
        merged = self.merge(x).index_select(0, merge_index)  # item order
        return merged, {k: p.label for k, p in plans.items()}

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """The patch merger: x [P, Cv] (each run of m² rows one merge block) -> [P/m², C]."""
        x = rms_norm(x, self.ln_q, self.cfg.rms_norm_eps, use_triton=self.use_triton)
        x = x.view(x.shape[0] // self.cfg.spatial_merge_size**2, -1)  # [P/m², m²*Cv]
        return self.mlp2(F.gelu(self.mlp0(x)))

    def block(self, i: int, x: torch.Tensor, grid_thw: torch.Tensor, backend: str = "auto") -> torch.Tensor:
        """Block i alone (teacher forcing): x [P, Cv] in pixel_values row order -> [P, Cv] in that order."""
        perm, inv_perm, cos, sin, plans, _ = self._geometry(grid_thw, x.shape[0], backend)
        plan = plans["full" if i in self.cfg.fullatt_block_indexes else "window"]
        x = x.to(device=self.ln_q.device, dtype=self.ln_q.dtype).index_select(0, perm)
        return self.blocks[i](x, cos, sin, plan).index_select(0, inv_perm)

    def _geometry(self, grid_thw: torch.Tensor, P: int, backend: str):
        """`geometry`, through geometry_cache when it is a dict."""
        key = (tuple(map(tuple, grid_thw.tolist())), backend)
        geo = self.geometry_cache.get(key) if self.geometry_cache is not None else None
        if geo is None:
            geo = self.geometry(grid_thw, P, backend)
            if self.geometry_cache is not None:
                self.geometry_cache[key] = geo
        return geo

    def pad_mlp(self, multiple: int = 64) -> int:
        """Pad every block's MLP intermediate width (3420 in the released configs) with zeros up to a
        multiple of `multiple`, in place; returns the new width. Exact: the padded gate and up rows are
        zero, so silu(0) * 0 = 0 feeds zero columns of down. Why: a width of 3420 bf16 elements is not
        a multiple of 16 bytes, and cuBLAS runs slower kernels on such leading dimensions."""
        if not isinstance(multiple, int) or multiple < 1:
            raise ValueError(f"multiple must be a positive int, got {multiple!r}")
        width = self.blocks[0].down.weight.shape[1]
        new = -(-width // multiple) * multiple
        if new == width:
            return width
        for blk in self.blocks:
            I = blk.down.weight.shape[1]
            w, b = blk.gate_up.weight.data, blk.gate_up.bias
            pad = lambda t: F.pad(t, (0, 0) * (t.dim() - 1) + (0, new - I))  # noqa: E731 - zero rows at the end of dim 0
            gw = torch.cat([pad(w[:I]), pad(w[I:])])
            gb = None if b is None else torch.cat([pad(b.data[:I]), pad(b.data[I:])])
            blk.gate_up = _linear(gw, gb)
            blk.down = _linear(
                F.pad(blk.down.weight.data, (0, new - I)).contiguous(),
                None if blk.down.bias is None else blk.down.bias.data,
            )
        return new

    def geometry(self, grid_thw: torch.Tensor, P: int, backend: str):
        """What depends only on the grids: (perm [P], inv_perm [P], cos, sin float32 [P, D/2] in window
        order, {"window", "full"}: SegmentPlan, merge_index [P/4]), all on the tower's device."""
        v = self.cfg
        dev, dt = self.ln_q.device, self.ln_q.dtype
        window_index, cu_win, cu_full = window_partition(
            grid_thw, window_size=v.window_size, patch_size=v.patch_size, merge_size=v.spatial_merge_size
        )
        cos, sin = vision_rotary_cos_sin(
            vision_rotary_positions(grid_thw, v.spatial_merge_size), v.head_dim, VISION_ROPE_THETA, dtype=torch.float32
        )
        perm = window_row_order(window_index, v.spatial_merge_size).to(dev)  # patch rows in window order
        inv_perm = torch.argsort(perm)
        half = v.head_dim // 2
        cos, sin = (t[:, :half].to(dev).index_select(0, perm).contiguous() for t in (cos, sin))
        plans = {"window": SegmentPlan(cu_win, P, dev, dt, backend), "full": SegmentPlan(cu_full, P, dev, dt, backend)}
        return perm, inv_perm, cos, sin, plans, torch.argsort(window_index).to(dev)


class Attention(nn.Module):
    """The attention half of a decoder layer, residual included: x -> x + o_proj(attention(rotary(q|k|v(norm(x))))).

    The decode step is `decode` = `step_in`, attention over the cache, `step_out`; the variants of
    impl.variants replace step_in / step_out, and impl.tp shards qkv / o_proj and sets N, K."""

    variant = "eager"

    def __init__(self, norm, qkv: nn.Module, o_proj: nn.Module, N: int, K: int, D: int, eps: float, use_triton: bool):
        super().__init__()
        self.norm, self.qkv, self.o_proj = norm, qkv, o_proj
        self.N, self.K, self.D, self.eps, self.use_triton = N, K, D, eps, use_triton

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, C], cos, sin float32 [T, D/2] -> rotated q|k|v [T, N+2K, D]."""
        qkv = self.qkv(rms_norm(x, self.norm, self.eps, use_triton=self.use_triton)).view(x.shape[0], -1, self.D)
        return apply_rotary_(qkv, cos, sin, self.N + self.K, use_triton=self.use_triton)

    def prefill(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask, kv, start: int = 0) -> torch.Tensor:
        """x [B, L, C], the prompt tokens start..start+L-1; cos, sin [B*L, D/2]; mask from
        prefill_mask(attention_mask[:, :start + L], start); kv None or this layer's caches (k, v)
        [B, K, T, D], written at slots start..start+L-1; a chunk after the first (start > 0) attends to
        the cached keys 0..start+L-1 -> [B, L, C]."""
        B, L, C = x.shape
        N, K, D = self.N, self.K, self.D
        qkv = self.project(x.reshape(B * L, C), cos, sin).view(B, L, N + 2 * K, D)
        q = qkv[:, :, :N].transpose(1, 2)  # [B, N, L, D]
        k, v = qkv[:, :, N : N + K].transpose(1, 2), qkv[:, :, N + K :].transpose(1, 2)  # [B, K, L, D]
        if kv is not None:
            kv[0][:, :, start : start + L], kv[1][:, :, start : start + L] = k, v
            if start:
                k, v = kv[0][:, :, : start + L], kv[1][:, :, : start + L]
        return self.step_out(x, prefill_attention(q, k, v, mask).transpose(1, 2).reshape(B, L, N * D))

    def step_in(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv, slot: torch.Tensor) -> torch.Tensor:
        """Decode, before attention: x [B, C] -> q [B, N, D]; k and v written into kv at `slot` (int64 [1])."""
        N, K = self.N, self.K
        qkv = self.project(x, cos, sin)  # [B, N+2K, D]
        kv[0].index_copy_(2, slot, qkv[:, N : N + K, None])
        kv[1].index_copy_(2, slot, qkv[:, N + K :, None])
        return qkv[:, :N]

    def step_out(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """x [..., C] + o_proj(o [..., N*D])."""
        return x + self.o_proj(o)

    def decode(self, x, cos, sin, key_mask, kv, slot, attn: str = "sdpa", n_valid=None) -> torch.Tensor:
        """One token per row: x [B, C]; cos, sin [B, D/2]; key_mask [B, T] (see decode_attention);
        kv (k, v) [B, K, T, D]; slot int64 [1]; attn, n_valid: decode_attention's backend and filled
        length -> [B, C]."""
        q = self.step_in(x, cos, sin, kv, slot)
        o = decode_attention(q, kv[0], kv[1], key_mask, attn, n_valid, use_triton=self.use_triton)  # [B, N, D]
        return self.step_out(x, o.reshape(x.shape[0], -1))


class MLP(nn.Module):
    """The MLP half of a decoder layer, residual included: x -> x + down(swiglu(gate|up(norm(x))))."""

    variant = "eager"

    def __init__(self, norm, gate_up: nn.Module, down: nn.Module, eps: float, use_triton: bool):
        super().__init__()
        self.norm, self.gate_up, self.down, self.eps, self.use_triton = norm, gate_up, down, eps, use_triton

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.use_triton
        return x + self.down(swiglu(self.gate_up(rms_norm(x, self.norm, self.eps, use_triton=t)), use_triton=t))


class DecoderLayer(nn.Module):
    def __init__(self, get, i: int, config, use_triton: bool):
        super().__init__()
        p, a, eps = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", config.rms_norm_eps
        self.i = i
        self.attn = Attention(
            _norm(get(p + "input_layernorm.weight")),
            _linear(
                get(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
                get(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
            ),
            _linear(get(a + "o_proj.weight")),
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            eps,
            use_triton,
        )
        self.mlp = MLP(
            _norm(get(p + "post_attention_layernorm.weight")),
            _linear(get(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")),
            _linear(get(p + "mlp.down_proj.weight")),
            eps,
            use_triton,
        )

    def prefill(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask, kv=None, start: int = 0
    ) -> torch.Tensor:
        """x [B, L, C] -> [B, L, C]; see Attention.prefill."""
        return self.mlp(self.attn.prefill(x, cos, sin, mask, kv, start))

    def decode(self, x, cos, sin, key_mask, kv, slot, attn: str = "sdpa", n_valid=None) -> torch.Tensor:
        """x [B, C] -> [B, C]; see Attention.decode."""
        return self.mlp(self.attn.decode(x, cos, sin, key_mask, kv, slot, attn, n_valid))


class TextModel(nn.Module):
    def __init__(self, get, config, use_triton: bool, layer_hook=None):
        super().__init__()
        self.cfg, self.use_triton = config, use_triton
        self.embed = _norm(get("model.embed_tokens.weight"))
        self.layers = nn.ModuleList()
        for i in range(config.num_hidden_layers):
            layer = DecoderLayer(get, i, config, use_triton)
            if layer_hook is not None:  # before the next layer is read: impl.tp keeps one unsharded layer at a time
                layer_hook(layer)
            self.layers.append(layer)
        self.norm = _norm(get("model.norm.weight"))
        self.lm_head = _linear(get("lm_head.weight"))  # tied: get gives the embedding tensor itself, shared

    def final(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.norm, self.cfg.rms_norm_eps, use_triton=self.use_triton)


def mrope_half_tables(position_ids: torch.Tensor, config, device) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids int64 [3, B, L] -> (cos, sin) float32 [B*L, D/2] on device (angles in float64)."""
    cos, sin = mrope_cos_sin(
        position_ids,
        head_dim=config.head_dim,
        theta=config.rope_theta,
        mrope_section=config.mrope_section,
        dtype=torch.float64,
    )
    half = config.head_dim // 2
    return tuple(t[..., :half].reshape(-1, half).to(device=device, dtype=torch.float32) for t in (cos, sin))


class Qwen25VL(nn.Module):
    """The fast model. Build with `from_pretrained` (a checkpoint folder) or `from_params` (a hub-named dict)."""

    def __init__(
        self,
        config,
        params: dict,
        *,
        dtype,
        device,
        attention: str = "auto",
        use_triton: bool = True,
        progress: bool = False,
        tokenizer=None,
        layer_hook=None,
    ):
        super().__init__()
        dtype, device = check_dtype_device(dtype, device)
        check_backend(attention, device, dtype)
        check_params(params, config, source="params")
        self.config, self.dtype_, self.device_, self.attention = config, dtype, device, attention
        self.tokenizer, self.quant_report, self.last_stats, self.cache = tokenizer, None, {}, None
        done = [0]
        total = len(params)

        def get(*keys):
            """The tensor(s) named by keys, on device in dtype; several keys are concatenated along dim 0."""
            ts = []
            for k in keys:
                t = params[k]
                ts.append(t.to(device=device, dtype=dtype))
                done[0] += 1
                if progress and done[0] % 50 == 0:
                    print(f"\rloading weights {done[0]}/{total}", end="", file=sys.stderr, flush=True)
            return ts[0] if len(ts) == 1 else torch.cat(ts)

        cache_get = {}

        def get_once(*keys):  # a tensor fetched twice (tied lm_head) stays one tensor
            if len(keys) == 1 and keys[0] in ("model.embed_tokens.weight", "lm_head.weight"):
                src = (
                    "model.embed_tokens.weight"
                    if (keys[0] == "lm_head.weight" and config.tie_word_embeddings)
                    else keys[0]
                )
                if src not in cache_get:
                    cache_get[src] = get(src)
                return cache_get[src]
            return get(*keys)

        self.visual = VisionTower(get_once, config, use_triton)
        self.text = TextModel(get_once, config, use_triton, layer_hook)
        if progress:
            print(f"\rloading weights {total}/{total}", file=sys.stderr, flush=True)

    @classmethod
    def from_params(cls, config, params: dict, **kwargs) -> Qwen25VL:
        quantize = kwargs.pop("quantize", None)
        quantize_vision = kwargs.pop("quantize_vision", False)
        cpu_fp16_pack = kwargs.pop("cpu_fp16_pack", None)
        model = cls(config, params, **kwargs)
        from .quant import apply_fp16_pack, apply_int4, fp16_pack_wanted

        if quantize is not None:
            apply_int4(model, quantize, vision=quantize_vision)
        if cpu_fp16_pack is None:
            cpu_fp16_pack = fp16_pack_wanted(model.device_, model.dtype_)
        if cpu_fp16_pack:  # bfloat16 on an AVX2 CPU: fbgemm's float16 GEMM (impl.quant, "fp16 pack")
            apply_fp16_pack(model)
        return model

    @classmethod
    def from_pretrained(
        cls,
        folder,
        *,
        dtype=None,
        device=None,
        attention: str = "auto",
        quantize=None,
        quantize_vision: bool = False,
        use_triton: bool = True,
        progress: bool = False,
        cpu_fp16_pack: bool | None = None,
        layer_hook=None,
    ) -> Qwen25VL:
        """Load a safetensors checkpoint folder (spec.checkpoint.load_checkpoint).

        dtype: torch dtype or name (default bfloat16 on CUDA, float32 on CPU); device: default CUDA when
        available. attention: vision backend (impl.attention). quantize: None, "int4" (text decoder
        linears; quantize_vision=True also the vision tower) or "w4a8" (the same, int8 activations at
        decode; CPU). cpu_fp16_pack: hold the linears as fbgemm's
        packed float16 (impl.quant, "fp16 pack"); None: where it wins, bfloat16 on a CPU below AVX512.
        layer_hook: called on each text decoder layer as soon as it is built, before the next one is
        read (impl.tp.from_pretrained_tp shards there). The tokenizer is read from the folder when it
        holds one.
        """
        from ..spec.checkpoint import load_checkpoint
        from .quant import INT4_MODES

        device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = default_dtype(device)
        dtype, device = check_dtype_device(dtype, device)
        check_backend(attention, device, dtype)
        if quantize not in (None, *INT4_MODES):
            raise ValueError(f"quantize must be None or one of {INT4_MODES}, got {quantize!r}")
        if progress:
            print(f"reading {folder} ...", file=sys.stderr, flush=True)
        config, params = load_checkpoint(folder)
        tokenizer = None
        try:
            from ..spec.tokens import load_tokenizer

            tokenizer = load_tokenizer(str(folder))
        except Exception:  # a weights-only folder is fine for forward(); generate(messages) will say so
            tokenizer = None
        return cls.from_params(
            config,
            params,
            dtype=dtype,
            device=device,
            attention=attention,
            quantize=quantize,
            quantize_vision=quantize_vision,
            use_triton=use_triton,
            progress=progress,
            tokenizer=tokenizer,
            cpu_fp16_pack=cpu_fp16_pack,
            layer_hook=layer_hook,
        )

    def to_device(self, device) -> Qwen25VL:
        """Move every weight to `device` in place, keeping the dtype (e.g. onto a rank's GPU after
        impl.tp.apply_tp on the CPU). Before int4: its packed layouts are device specific."""
        if self.quant_report is not None:
            raise ValueError("to_device must come before int4 quantization (packed layouts are per device)")
        dtype, device = check_dtype_device(self.dtype_, device)
        check_backend(self.attention, device, dtype)
        if device.type != "cpu":
            from .quant import apply_fp16_pack

            apply_fp16_pack(self, on=False)  # fbgemm's layout is CPU-only; build with cpu_fp16_pack=False to skip it
        self.to(device)
        if self.config.tie_word_embeddings:  # .to() copies each Parameter on its own: share the table again
            self.text.lm_head.weight = self.text.embed
        self.device_, self.cache = device, None
        if self.visual.geometry_cache is not None:
            self.visual.geometry_cache = {}
        return self

    # ------------------------------------------------------------------------------------------
    # forward pieces

    def _vision_features(self, inputs: dict, captured: dict, wanted: set):
        """Images then videos in one tower call -> (image feats | None, video feats | None)."""
        pixels = [inputs[k] for k in ("pixel_values", "pixel_values_videos") if inputs.get(k) is not None]
        if not pixels:
            return None, None
        grids = torch.cat([inputs[k] for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None])
        merged, labels = self.visual(torch.cat(pixels), grids, self.attention, captured, wanted)
        self.last_stats["vision_attention"] = labels
        if "vision.merger" in wanted:
            captured["vision.merger"] = merged
        img = inputs.get("image_grid_thw")
        n_img = 0 if img is None else int(img.prod(-1).sum()) // self.config.vision.spatial_merge_size**2
        return (
            merged[:n_img] if img is not None else None,
            merged[n_img:] if inputs.get("video_grid_thw") is not None else None,
        )

    def _embed(self, inputs: dict, captured: dict, wanted: set) -> torch.Tensor:
        """input ids + vision features -> inputs_embeds [B, L, C] on device."""
        cfg = self.config
        ids = inputs["input_ids"]
        V = self.text.embed.shape[0]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
            raise ValueError(
                f"input_ids holds ids outside the vocabulary 0..{V - 1} (min {int(ids.min())}, max {int(ids.max())})"
            )
        ids_dev = ids.to(self.device_)
        x = F.embedding(ids_dev, self.text.embed)
        image_feats, video_feats = self._vision_features(inputs, captured, wanted)
        for kind, token_id, feats in (
            ("image", cfg.image_token_id, image_feats),
            ("video", cfg.video_token_id, video_feats),
        ):
            mask = ids_dev == token_id
            n_tok, n_feat = int(mask.sum()), 0 if feats is None else feats.shape[0]
            if n_tok != n_feat:
                raise ValueError(
                    f"input_ids holds {n_tok} {kind} pad tokens (id {token_id}) but the vision tower "
                    f"gave {n_feat} {kind} features: they must be equal"
                )
            if n_tok:
                x = x.masked_scatter(mask[..., None], feats.to(x.dtype))  # flattened (row, position) order
        return x

    def _run(self, inputs: dict, *, captured: dict, wanted: set, all_logits: bool, cache: KVCache | None, chunk=None):
        """Prompt -> (logits [B, L, V], or [B, V] for the last position, rope_deltas [B, 1]); keys and
        values written into `cache` when given. chunk: None, or the decoder run over the prompt that
        many tokens at a time, each chunk attending to the cache (spec.forward.decoder_stack_in_chunks)."""
        check_inputs(self.config, inputs)
        check_prefill_chunk(chunk)
        if chunk is not None and cache is None:
            raise ValueError("a prefill in chunks needs the KV cache: call setup_caches first")
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(torch.int64)
        x = self._embed(inputs, captured, wanted)
        position_ids, rope_deltas = rope_index(
            ids,
            inputs.get("image_grid_thw"),
            inputs.get("video_grid_thw"),
            inputs.get("second_per_grid_ts"),
            mask,
            config=self.config,
        )
        for name, val in (
            ("text.inputs_embeds", x),
            ("text.position_ids", position_ids),
            ("text.rope_deltas", rope_deltas),
        ):
            if name in wanted:
                captured[name] = val
        mask = mask.to(self.device_)
        every_position = all_logits or "text.norm" in wanted  # else the last chunk's output is all that is read
        outputs, layer_parts = [], {}
        for start, end in chunk_spans(ids.shape[1], chunk):  # one span unless prefilled in chunks
            h = x[:, start:end]
            cos, sin = self.rope_tables(chunk_positions(position_ids, start, end))
            amask = prefill_mask(mask[:, :end], start)
            for layer in self.text.layers:
                h = layer.prefill(h, cos, sin, amask, None if cache is None else cache.layer(layer.i), start)
                if f"text.layer.{layer.i}" in wanted:
                    layer_parts.setdefault(f"text.layer.{layer.i}", []).append(h)
            outputs = [*outputs, h] if every_position else [h]
        x = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
        captured.update({name: torch.cat(parts, dim=1) for name, parts in layer_parts.items()})
        if not all_logits and "text.norm" not in wanted:
            x = x[:, -1]  # generation needs only the last position (left padding: every row ends there)
        x = self.text.final(x)
        if "text.norm" in wanted:
            captured["text.norm"] = x
        logits = self.text.lm_head(x if all_logits or x.dim() == 2 else x[:, -1])
        if "logits" in wanted:
            captured["logits"] = logits
        return logits, rope_deltas

    @torch.inference_mode()
    def forward(self, inputs: dict, capture=()) -> tuple[torch.Tensor, dict]:
        """Model inputs (spec.tokens.build_inputs) -> (logits [B, L, V], captured {stage: tensor}).

        capture: (), "all", or stage names / prefixes (spec.forward.stage_names); vision stages in
        pixel_values row order, as spec gives them. Uses no cache.
        """
        wanted = select_stages(self.config, capture)
        captured: dict = {}
        logits, _ = self._run(inputs, captured=captured, wanted=wanted, all_logits=True, cache=None)
        return logits, captured

    # ------------------------------------------------------------------------------------------
    # generation: caches set up explicitly, then prefill once and decode one token per row at a time

    def setup_caches(self, batch: int, max_len: int) -> KVCache:
        """Allocate the KV cache for `batch` rows of `max_len` tokens (zero-filled, fixed shape), sized by
        the layers' own kv head count (local heads under tensor parallelism). prefill and decode use it."""
        a = self.text.layers[0].attn
        self.cache = KVCache(len(self.text.layers), batch, a.K, max_len, a.D, self.dtype_, self.device_)
        return self.cache

    def _check_cache(self, batch: int, length: int) -> None:
        assert self.cache is not None, "call setup_caches(batch, max_len) first"
        assert self.cache.batch == batch and length <= self.cache.max_len, (
            f"cache holds batch {self.cache.batch} x {self.cache.max_len} tokens; asked batch {batch} x {length}"
        )

    @torch.inference_mode()
    def prefill(self, inputs: dict, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt into the cache: model inputs -> (logits of the last position [B, V], rope_deltas [B, 1]).
        chunk: None (the prompt at once) or a token count: the decoder runs chunk by chunk, which bounds
        the activations by the chunk rather than the prompt (the vision tower still runs once)."""
        self._check_cache(*inputs["input_ids"].shape)
        return self._run(inputs, captured={}, wanted=set(), all_logits=False, cache=self.cache, chunk=chunk)

    def decode(
        self,
        tokens: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_mask: torch.Tensor,
        slot: torch.Tensor,
        attn: str = "sdpa",
        n_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """THE decode step: tokens int64 [B] at cache slot `slot` (int64 [1]); cos, sin [B, D/2]; key_mask
        [B, T]; attn, n_valid: see decode_attention -> logits [B, V]. Shapes never change (CUDA graphs)."""
        x = F.embedding(tokens, self.text.embed)  # [B, C]
        for layer in self.text.layers:
            x = layer.decode(x, cos, sin, key_mask, self.cache.layer(layer.i), slot, attn, n_valid)
        return self.text.lm_head(self.text.final(x))

    def rope_tables(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids int64 [3, B, L] -> the text rotary tables (cos, sin) float32 [B*L, D/2] on the device."""
        return mrope_half_tables(position_ids, self.config, self.device_)

    # ------------------------------------------------------------------------------------------
    # one stage alone, fed its golden input (the conformance harness's teacher forcing)

    @torch.inference_mode()
    def text_layer(self, i: int, x: torch.Tensor, position_ids: torch.Tensor, attention_mask) -> torch.Tensor:
        """Decoder layer i alone: x [B, L, C], position_ids [3, B, L], attention_mask [B, L] or None -> [B, L, C]."""
        x = x.to(device=self.device_, dtype=self.dtype_)
        mask = torch.ones(x.shape[:2], dtype=torch.int64) if attention_mask is None else attention_mask
        cos, sin = self.rope_tables(position_ids)
        return self.text.layers[i].prefill(x, cos, sin, prefill_mask(mask.to(self.device_)))

    def generate_from_inputs(self, inputs: dict, max_new_tokens: int, eos_token_id=None, **kwargs) -> torch.Tensor:
        """Greedy tokens int64 [B, n] (CPU), n <= max_new_tokens, pad after each row's eos (impl.generate)."""
        if eos_token_id is None:
            eos_token_id = self.config.eos_token_id
        return generate_tokens(self, inputs, max_new_tokens, eos_token_id, **kwargs)

    def generate(
        self,
        messages,
        images=None,
        videos=None,
        *,
        max_new_tokens: int = 128,
        eos_token_id=None,
        min_pixels=None,
        max_pixels=None,
        video_options=None,
        on_token=None,
        **input_options,
    ):
        """Chat messages (one conversation, or a list of them for a left-padded batch) -> decoded text
        (a str, or a list of str for a batch). images / videos: as spec.tokens.build_inputs takes them.
        on_token(list_of_B_ids): called after each generated step (streaming). input_options: passed on to
        build_inputs (add_vision_id, fps, nframes, max_decoded_pixels, fetch, media)."""
        from ..spec.tokens import build_inputs, decode

        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (the checkpoint folder holds none); use generate_from_inputs")
        single = bool(messages) and isinstance(messages[0], dict)
        inputs = build_inputs(
            messages,
            images,
            videos,
            self.tokenizer,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            video_options=video_options,
            **input_options,
        )
        eos = eos_token_id if eos_token_id is not None else [self.config.eos_token_id, self.config.pad_token_id]
        tokens = self.generate_from_inputs(inputs, max_new_tokens, eos, on_token=on_token)
        texts = [
            decode(
                self.tokenizer,
                [
                    t
                    for t in row.tolist()
                    if t not in (eos if isinstance(eos, list) else [eos]) and t != self.config.pad_token_id
                ],
                skip_special_tokens=True,
            )
            for row in tokens
        ]
        return texts[0] if single else texts

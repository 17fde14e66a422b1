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
from ..spec.forward import check_inputs, select_stages
from ..spec.mrope import mrope_cos_sin, rope_index
from ..spec.windows import vision_rotary_cos_sin, vision_rotary_positions, window_partition
from .attention import SegmentPlan, check_backend, decode_attention, prefill_attention, prefill_mask, segment_attention
from .kernels.rmsnorm import rms_norm
from .kernels.rotary import apply_rotary_
from .kernels.swiglu import swiglu

VISION_ROPE_THETA = 10000.0
SUPPORTED_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.bfloat16, torch.float16, torch.float32)}


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
        v, m2 = self.cfg, self.cfg.spatial_merge_size**2
        dev, dt = self.ln_q.device, self.ln_q.dtype
        P = pixel_values.shape[0]
        key = (tuple(map(tuple, grid_thw.tolist())), backend)
        geo = self.geometry_cache.get(key) if self.geometry_cache is not None else None
        if geo is None:
            geo = self.geometry(grid_thw, P, backend)
            if self.geometry_cache is not None:
                self.geometry_cache[key] = geo
        perm, inv_perm, cos, sin, plans, merge_index = geo

        x = self.patch_embed(pixel_values.to(device=dev, dtype=dt))  # [P, Cv]
        if "vision.patch_embed" in wanted:
            captured["vision.patch_embed"] = x
        x = x.index_select(0, perm)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, plans["full" if i in v.fullatt_block_indexes else "window"])
            if f"vision.block.{i}" in wanted:
                captured[f"vision.block.{i}"] = x.index_select(0, inv_perm)
        x = rms_norm(x, self.ln_q, v.rms_norm_eps, use_triton=self.use_triton).view(P // m2, -1)  # [P/4, 4*Cv]
        x = self.mlp2(F.gelu(self.mlp0(x)))  # [P/4, C]
        merged = x.index_select(0, merge_index)  # item order
        return merged, {k: p.label for k, p in plans.items()}

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
        v, m2 = self.cfg, self.cfg.spatial_merge_size**2
        dev, dt = self.ln_q.device, self.ln_q.dtype
        window_index, cu_win, cu_full = window_partition(
            grid_thw, window_size=v.window_size, patch_size=v.patch_size, merge_size=v.spatial_merge_size
        )
        cos, sin = vision_rotary_cos_sin(
            vision_rotary_positions(grid_thw, v.spatial_merge_size), v.head_dim, VISION_ROPE_THETA, dtype=torch.float32
        )
        perm = (window_index[:, None] * m2 + torch.arange(m2)).reshape(-1).to(dev)  # patch rows in window order
        inv_perm = torch.argsort(perm)
        half = v.head_dim // 2
        cos, sin = (t[:, :half].to(dev).index_select(0, perm).contiguous() for t in (cos, sin))
        plans = {"window": SegmentPlan(cu_win, P, dev, dt, backend), "full": SegmentPlan(cu_full, P, dev, dt, backend)}
        return perm, inv_perm, cos, sin, plans, torch.argsort(window_index).to(dev)


class DecoderLayer(nn.Module):
    def __init__(self, get, i: int, config, use_triton: bool):
        super().__init__()
        p = f"model.layers.{i}."
        self.i, self.use_triton, self.eps = i, use_triton, config.rms_norm_eps
        self.N, self.K, self.D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        a = p + "self_attn."
        self.norm1 = _norm(get(p + "input_layernorm.weight"))
        self.norm2 = _norm(get(p + "post_attention_layernorm.weight"))
        self.qkv = _linear(
            get(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
            get(a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
        )
        self.o_proj = _linear(get(a + "o_proj.weight"))
        self.gate_up = _linear(get(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"))
        self.down = _linear(get(p + "mlp.down_proj.weight"))

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, C], cos, sin float32 [T, D/2] -> rotated qkv [T, N+2K, D]."""
        qkv = self.qkv(rms_norm(x, self.norm1, self.eps, use_triton=self.use_triton)).view(x.shape[0], -1, self.D)
        return apply_rotary_(qkv, cos, sin, self.N + self.K, use_triton=self.use_triton)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        t = self.use_triton
        return x + self.down(swiglu(self.gate_up(rms_norm(x, self.norm2, self.eps, use_triton=t)), use_triton=t))

    def prefill(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask, cache) -> torch.Tensor:
        """x [B, L, C]; cos, sin [B*L, D/2]; mask from prefill_mask; cache KVCache or None -> [B, L, C]."""
        B, L, C = x.shape
        N, K, D = self.N, self.K, self.D
        qkv = self._qkv(x.reshape(B * L, C), cos, sin).view(B, L, N + 2 * K, D)
        q = qkv[:, :, :N].transpose(1, 2)  # [B, N, L, D]
        k, v = qkv[:, :, N : N + K].transpose(1, 2), qkv[:, :, N + K :].transpose(1, 2)  # [B, K, L, D]
        if cache is not None:
            cache.write_prompt(self.i, k, v)
        o = prefill_attention(q, k, v, mask).transpose(1, 2).reshape(B, L, N * D)
        return self._mlp(x + self.o_proj(o))

    def decode(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_mask: torch.Tensor,
        cache,
        slot: torch.Tensor,
        attn: str = "sdpa",
        n_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One token per row: x [B, C]; cos, sin [B, D/2]; key_mask [B, T] (see decode_attention);
        slot int64 [1]; attn, n_valid: decode_attention's backend and filled length -> [B, C]."""
        B = x.shape[0]
        N, K, D = self.N, self.K, self.D
        qkv = self._qkv(x, cos, sin)  # [B, N+2K, D]
        cache.write_step(self.i, qkv[:, N : N + K, None], qkv[:, N + K :, None], slot)
        o = decode_attention(
            qkv[:, :N], cache.k[self.i], cache.v[self.i], key_mask, attn, n_valid, use_triton=self.use_triton
        )  # [B, N, D]
        return self._mlp(x + self.o_proj(o.reshape(B, N * D)))


class TextModel(nn.Module):
    def __init__(self, get, config, use_triton: bool):
        super().__init__()
        self.cfg, self.use_triton = config, use_triton
        self.embed = _norm(get("model.embed_tokens.weight"))
        self.layers = nn.ModuleList(DecoderLayer(get, i, config, use_triton) for i in range(config.num_hidden_layers))
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
    ):
        super().__init__()
        dtype, device = check_dtype_device(dtype, device)
        check_backend(attention, device, dtype)
        check_params(params, config, source="params")
        self.config, self.dtype_, self.device_, self.attention = config, dtype, device, attention
        self.tokenizer, self.quant_report, self.last_stats = tokenizer, None, {}
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
        self.text = TextModel(get_once, config, use_triton)
        if progress:
            print(f"\rloading weights {total}/{total}", file=sys.stderr, flush=True)

    @classmethod
    def from_params(cls, config, params: dict, **kwargs) -> Qwen25VL:
        quantize = kwargs.pop("quantize", None)
        quantize_vision = kwargs.pop("quantize_vision", False)
        model = cls(config, params, **kwargs)
        if quantize is not None:
            from .quant import apply_int4

            apply_int4(model, quantize, vision=quantize_vision)
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
    ) -> Qwen25VL:
        """Load a safetensors checkpoint folder (spec.checkpoint.load_checkpoint).

        dtype: torch dtype or name (default bfloat16 on CUDA, float32 on CPU); device: default CUDA when
        available. attention: vision backend (impl.attention). quantize: None or "int4" (text decoder
        linears; quantize_vision=True also the vision tower). The tokenizer is read from the folder
        when it holds one.
        """
        from ..spec.checkpoint import load_checkpoint

        device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        dtype, device = check_dtype_device(dtype, device)
        check_backend(attention, device, dtype)
        if quantize not in (None, "int4"):
            raise ValueError(f"quantize must be None or 'int4', got {quantize!r}")
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
        )

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

    def _prefill(self, inputs: dict, cache, *, captured: dict, wanted: set, all_logits: bool):
        """-> (logits [B, L, V] or [B, V] (last position), rope_deltas [B, 1])."""
        check_inputs(self.config, inputs)
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
        cos, sin = mrope_half_tables(position_ids, self.config, self.device_)
        amask = prefill_mask(mask.to(self.device_))
        for layer in self.text.layers:
            x = layer.prefill(x, cos, sin, amask, cache)
            if f"text.layer.{layer.i}" in wanted:
                captured[f"text.layer.{layer.i}"] = x
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
        pixel_values row order, as spec gives them.
        """
        wanted = select_stages(self.config, capture)
        captured: dict = {}
        logits, _ = self._prefill(inputs, None, captured=captured, wanted=wanted, all_logits=True)
        return logits, captured

    def generate_from_inputs(self, inputs: dict, max_new_tokens: int, eos_token_id=None, **kwargs) -> torch.Tensor:
        """Greedy tokens int64 [B, n] (CPU), n <= max_new_tokens, pad after each row's eos (impl.generate)."""
        from .generate import generate_tokens

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

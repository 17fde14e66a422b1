"""A Qwen2.5-VL port in numpy, written from docs/exchange.md and the model's published description,
to prove the file exchange: it imports numpy and the vendored exchange helper, never torch or qwen25vl.

    python port.py IN OUT      runs every model case of IN/order.json (in that order, one process),
                               each batch row alone, and writes OUT/<case>/rows/<i>.safetensors,
                               generate.tokens.json and OUT/port.json

Shape legend: P patches, Cv vision width, N heads, K kv heads, D head dim, C text width, V vocab,
L tokens of one row, m merge size, (t, h, w) grid in patches. Everything runs in float64.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "conformance" / "port_kit"))
import qwen25vl_exchange as qx  # noqa: E402  (vendored: one file beside the port in a real one)

VISION_THETA = 10000.0  # the ViT's rotary base, fixed by the model (not in config.json)
VISION_EPS = 1e-6
erf = np.frompyfunc(math.erf, 1, 1)


def rms_norm(x, w, eps):
    return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))


def linear(x, w, b=None):
    return x @ w.T + (0 if b is None else b)


def silu(x):
    return x / (1 + np.exp(-x))


def softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], -1)


class Model:
    def __init__(self, folder: Path):
        cfg = json.loads((folder / "config.json").read_text())
        self.cfg, self.v = cfg, cfg["vision_config"]
        self.w = {k: a.astype(np.float64) for k, a in qx.load_safetensors(folder / "model.safetensors").items()}
        self.head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])  # [V, C]
        self.N, self.K = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.D = cfg.get("head_dim") or cfg["hidden_size"] // self.N
        self.m = self.v["spatial_merge_size"]

    # ---------------------------------------------------------------- vision tower

    def vision_layout(self, grids):
        """Per patch (row, col) in pixel order; the window order of the patches; window and frame segments."""
        m, ws = self.m, self.v["window_size"] // (self.v["patch_size"] * self.m)  # window side in units
        rowcol, order, windows, frames, offset = [], [], [], [], 0
        for t, h, w in grids:
            r = np.arange(h).reshape(h // m, 1, m, 1) + np.zeros((1, w // m, 1, m), int)
            c = np.arange(w).reshape(1, w // m, 1, m) + np.zeros((h // m, 1, m, 1), int)
            rowcol += [np.stack([r.ravel(), c.ravel()], -1)] * t
            lh, lw = h // m, w // m
            nh, nw = -(-lh // ws), -(-lw // ws)
            unit_window = (
                (np.arange(t)[:, None, None] * nh + (np.arange(lh) // ws)[None, :, None]) * nw
                + (np.arange(lw) // ws)[None, None, :]
            ).ravel()
            units = np.argsort(unit_window, kind="stable") + offset
            order.append((units[:, None] * m * m + np.arange(m * m)).ravel())
            windows += [n * m * m for n in np.bincount(unit_window) if n]
            frames += [h * w] * t
            offset += t * lh * lw
        return np.concatenate(rowcol), np.concatenate(order), np.cumsum([0] + windows), np.cumsum([0] + frames)

    def vision(self, pixels, grids, out):
        """pixels [P, 1176] of one row's items -> merged features [P/m², C]; stages into `out`
        (vision blocks in window order, as this port runs them: declared in port.json)."""
        v, w = self.v, self.w
        Nv = v["num_heads"]
        Dv = v["hidden_size"] // Nv
        pe = w["visual.patch_embed.proj.weight"]
        x = pixels @ pe.reshape(pe.shape[0], -1).T  # [P, Cv]
        out["vision.patch_embed"] = x
        rowcol, order, cu_win, cu_full = self.vision_layout(grids)
        inv = 1.0 / VISION_THETA ** (np.arange(0, Dv // 2, 2) / (Dv // 2))  # [D/4]
        ang = (rowcol[:, :, None] * inv).reshape(len(rowcol), -1)  # [P, D/2]: rows, then cols
        ang = np.concatenate([ang, ang], -1)[order]  # [P, D], window order
        cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
        x = x[order]
        for i in range(v["depth"]):
            b = f"visual.blocks.{i}."
            cu = cu_full if i in v["fullatt_block_indexes"] else cu_win
            h = rms_norm(x, w[b + "norm1.weight"], VISION_EPS)
            q, k, val = (
                linear(h, w[b + "attn.qkv.weight"], w[b + "attn.qkv.bias"])
                .reshape(len(x), 3, Nv, Dv)
                .transpose(1, 0, 2, 3)
            )
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            att = np.zeros_like(q)
            for s, e in zip(cu[:-1], cu[1:]):
                a = softmax(np.einsum("lnd,snd->nls", q[s:e], k[s:e]) / math.sqrt(Dv))
                att[s:e] = np.einsum("nls,snd->lnd", a, val[s:e])
            x = x + linear(att.reshape(len(x), -1), w[b + "attn.proj.weight"], w[b + "attn.proj.bias"])
            h = rms_norm(x, w[b + "norm2.weight"], VISION_EPS)
            gate = silu(linear(h, w[b + "mlp.gate_proj.weight"], w[b + "mlp.gate_proj.bias"]))
            up = linear(h, w[b + "mlp.up_proj.weight"], w[b + "mlp.up_proj.bias"])
            x = x + linear(gate * up, w[b + "mlp.down_proj.weight"], w[b + "mlp.down_proj.bias"])
            out[f"vision.block.{i}"] = x
        h = rms_norm(x, w["visual.merger.ln_q.weight"], VISION_EPS).reshape(-1, self.m**2 * v["hidden_size"])
        h = linear(h, w["visual.merger.mlp.0.weight"], w["visual.merger.mlp.0.bias"])
        h = h * 0.5 * (1 + erf(h / math.sqrt(2)).astype(np.float64))  # exact GELU
        merged = linear(h, w["visual.merger.mlp.2.weight"], w["visual.merger.mlp.2.bias"])
        units = order[:: self.m**2] // self.m**2  # the unit at each window place
        merged = merged[np.argsort(units)]  # back to item order
        out["vision.merger"] = merged
        return merged

    # ---------------------------------------------------------------- positions and text

    def positions(self, ids, items):
        """MRoPE positions of one row [3, L]: text counts up; a vision run takes (t, row, col) from its
        start, t in seconds for video; text after it starts at 1 + the largest so far. items: token id ->
        that kind's ((t, h, w), seconds) in prompt order (images and videos are counted apart)."""
        pos, cur, i, items = [], 0, 0, {kind: list(queue) for kind, queue in items.items()}
        while i < len(ids):
            if ids[i] not in items:
                pos.append([cur] * 3)
                cur, i = cur + 1, i + 1
                continue
            (t, h, w), seconds = items[ids[i]].pop(0)
            lh, lw = h // self.m, w // self.m
            tt = np.floor(
                np.arange(t, dtype=np.float32) * np.float32(seconds) * np.float32(self.v["tokens_per_second"])
            )
            tt = tt.astype(np.int64) if seconds is not None else np.zeros(t, int)
            for k in range(t):
                for r in range(lh):
                    for c in range(lw):
                        pos.append([cur + tt[k], cur + r, cur + c])
            i += t * lh * lw
            cur = max(max(p) for p in pos) + 1
        return np.array(pos, dtype=np.int64).T

    def rope(self, pos):
        """pos [3, L] -> cos, sin [L, D]: frequency slots split in sections (t, h, w)."""
        D = self.D
        inv = 1.0 / self.cfg["rope_theta"] ** (np.arange(0, D, 2) / D)
        ang = pos[:, :, None] * inv  # [3, L, D/2]
        s = np.cumsum([0] + list(self.cfg["rope_scaling"]["mrope_section"]))
        a = np.concatenate([ang[j, :, s[j] : s[j + 1]] for j in range(3)], -1)
        a = np.concatenate([a, a], -1)
        return np.cos(a)[:, None], np.sin(a)[:, None]  # [L, 1, D]

    def layer(self, i, x, cos, sin, cache):
        """Decoder layer i on new tokens x [L, C], cache (k, v) [S, K, D] of the tokens before."""
        w, p, eps = self.w, f"model.layers.{i}.", self.cfg["rms_norm_eps"]
        N, K, D, L = self.N, self.K, self.D, len(x)
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = linear(h, w[p + "self_attn.q_proj.weight"], w[p + "self_attn.q_proj.bias"]).reshape(L, N, D)
        k = linear(h, w[p + "self_attn.k_proj.weight"], w[p + "self_attn.k_proj.bias"]).reshape(L, K, D)
        v = linear(h, w[p + "self_attn.v_proj.weight"], w[p + "self_attn.v_proj.bias"]).reshape(L, K, D)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = np.concatenate([cache[0], k]), np.concatenate([cache[1], v])
        S = len(k)
        kr, vr = np.repeat(k, N // K, axis=1), np.repeat(v, N // K, axis=1)  # kv head g serves N/K query heads
        s = np.einsum("lnd,snd->nls", q, kr) / math.sqrt(D)
        s = np.where(np.arange(S)[None, None, :] <= (S - L + np.arange(L))[None, :, None], s, -np.inf)  # causal
        att = np.einsum("nls,snd->lnd", softmax(s), vr).reshape(L, N * D)
        x = x + linear(att, w[p + "self_attn.o_proj.weight"])
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = silu(linear(h, w[p + "mlp.gate_proj.weight"]))
        x = x + linear(gate * linear(h, w[p + "mlp.up_proj.weight"]), w[p + "mlp.down_proj.weight"])
        return x, (k, v)

    def decoder(self, x, pos, caches, out=None):
        cos, sin = self.rope(pos)
        new = []
        for i in range(self.cfg["num_hidden_layers"]):
            x, c = self.layer(i, x, cos, sin, caches[i])
            new.append(c)
            if out is not None:
                out[f"text.layer.{i}"] = x
        x = rms_norm(x, self.w["model.norm.weight"], self.cfg["rms_norm_eps"])
        if out is not None:
            out["text.norm"] = x
        return x, new

    def run_row(self, ids, pixels, grids, video_seconds, max_new, eos, chunk=None):
        """One prompt, alone: (its stages, generated ids, the top-5 ids per step). chunk: the prompt through
        the decoder that many tokens at a time (a <case>@chunked folder), each chunk taking the whole
        prompt's embeddings and positions at its own offset; its stages are then not written."""
        out, w = {}, self.w
        x = w["model.embed_tokens.weight"][ids]  # [L, C]
        image_id, video_id = self.cfg["image_token_id"], self.cfg["video_token_id"]
        items = {image_id: [], video_id: []}  # grids holds the row's images, then its videos
        for grid, seconds in zip(grids, video_seconds):
            items[image_id if seconds is None else video_id].append((grid, seconds))
        if len(grids):
            feats = self.vision(pixels, grids, out)
            n_image = sum(t * h * w for (t, h, w), _ in items[image_id]) // self.m**2
            x[ids == image_id] = feats[:n_image]  # each kind into its own pads, in order
            x[ids == video_id] = feats[n_image:]
        out["text.inputs_embeds"] = x
        pos = self.positions(ids, items)
        delta = int(pos.max()) + 1 - len(ids)  # against this row's own length ("unpadded")
        out["text.position_ids"] = np.concatenate([pos, np.zeros((1, len(ids)), np.int64)])  # llama.cpp: t, y, x, 0
        out["text.rope_deltas"] = np.array([delta], np.int64)
        empty = np.zeros((0, self.K, self.D))
        caches = [(empty, empty)] * self.cfg["num_hidden_layers"]
        step = chunk or len(ids)
        for start in range(0, len(ids), step):
            h, caches = self.decoder(x[start : start + step], pos[:, start : start + step], caches, out)
        logits = h[-1] @ self.head.T  # [V], the last prompt token only
        out["logits"] = logits
        tokens, topk = [], []
        for step in range(max_new):
            best = np.argsort(-logits, kind="stable")[:5]
            tokens.append(int(best[0]))
            topk.append(best.tolist())
            if tokens[-1] in eos or step == max_new - 1:
                break
            p = np.full((3, 1), len(ids) + step + delta)
            h, caches = self.decoder(w["model.embed_tokens.weight"][[tokens[-1]]], p, caches)
            logits = h[-1] @ self.head.T
        return out, tokens, topk


def runs(ids, token):
    """Number of maximal runs of `token` in ids (one run = one image or video)."""
    hit = ids == token
    return int((hit & ~np.concatenate([[False], hit[:-1]])).sum())


def run_case(model: Model, in_dir: Path, out_dir: Path, case: str) -> None:
    info, inputs = qx.read_case(in_dir, case), qx.read_inputs(in_dir, case)
    cfg = model.cfg
    mask, ids_all = inputs["attention_mask"], inputs["input_ids"]
    kinds = {
        "image": [inputs.get("image_grid_thw", np.zeros((0, 3), int)).tolist(), inputs.get("pixel_values"), 0, 0],
        "video": [
            inputs.get("video_grid_thw", np.zeros((0, 3), int)).tolist(),
            inputs.get("pixel_values_videos"),
            0,
            0,
        ],
    }
    seconds = inputs.get("second_per_grid_ts", np.ones(len(kinds["video"][0]))).tolist()
    tokens, topks = [], []
    for b in range(len(ids_all)):
        ids = ids_all[b][mask[b] == 1]
        grids, pix, secs = [], [], []
        # a row's images then its videos, as the harness's per-row layout wants them (docs/exchange.md)
        for kind, token in (("image", cfg["image_token_id"]), ("video", cfg["video_token_id"])):
            all_grids, pixels, item, row = kinds[kind]
            for _ in range(runs(ids, token)):
                t, h, w = all_grids[item]
                grids.append((t, h, w))
                pix.append(pixels[row : row + t * h * w])
                secs.append(seconds[item] if kind == "video" else None)
                item, row = item + 1, row + t * h * w
            kinds[kind][2:] = [item, row]
        pixels = np.concatenate(pix).astype(np.float64) if pix else None
        chunk = info.get("prefill_chunk")  # a <case>@chunked folder: generate.tokens only
        stages, toks, topk = model.run_row(
            ids, pixels, grids, secs, info["max_new_tokens"], info["eos_token_id"], chunk
        )
        if chunk is None:
            qx.write_row(out_dir, case, b, stages)
        tokens.append(toks)
        topks.append(topk)
    # top-k log-probs stay out: at a declared float64 the harness allows them no noise at all (see report)
    qx.write_tokens(out_dir, case, tokens, topk=topks)


def main(in_dir: str, out_dir: str) -> None:
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    models: dict[str, Model] = {}
    for case in qx.cases_in_order(in_dir):
        info = qx.read_case(in_dir, case)
        if info["kind"] != "model":
            continue  # exact stages are not this port's business: "not covered"
        if info["checkpoint"] not in models:
            models[info["checkpoint"]] = Model(Path(info["checkpoint"]))
        run_case(models[info["checkpoint"]], in_dir, out_dir, case)
    qx.write_port_json(
        out_dir,
        name="numpy-port",
        version="1",
        dtype="float64",
        outputs="rows",
        logits="last",
        vision_block_order="window",
        positions="sections4",
        rope_deltas="unpadded",
    )


if __name__ == "__main__":
    main(*sys.argv[1:])

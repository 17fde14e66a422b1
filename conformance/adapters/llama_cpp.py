"""llama.cpp as a target: its own converter, tokenizer, image preprocessing, vision encoder (clip) and
decoder, judged like any port (docs/ports.md, "llama.cpp").

llama.cpp is C++: this adapter drives the tap program shipped in conformance/llama_cpp_tap (built by
tools/build_llama_cpp.sh against the tree the user names), one process per request row. The checkpoint
is converted by llama.cpp's own convert_hf_to_gguf.py (text and --mmproj, float32, so that the verdict
measures llama.cpp's arithmetic and not a rounding of the weights). The tap writes what llama.cpp's eval
callbacks saw; this module maps those tensors onto the harness's stages with conversions.py:

  preprocess.input_ids      mtmd_tokenize's ids, the image pad id at the positions llama.cpp fills with
                            embeddings, left padded with 151643 as the reference pads
  preprocess.pixel_values   mtmd's preprocessor output (normalized [H, W, 3]), patchified by the spec
  vision.patch_embed        block 0's residual input, ffn_inp-0 - attn_out-0 (the conv output has no name
                            in clip's graph), in window order, un-permuted
  vision.block.i            layer_out-i, in window order, un-permuted
  vision.merger             the encoder output as mtmd hands it to the decoder
  text.inputs_embeds        token embeddings of text chunks (embd) and image embeddings, in chunk order
  text.position_ids         per-token (t, y, x) from mtmd_helper_image_get_decoder_pos
  text.layer.i              l_out-i
  text.norm, logits         result_norm and result_output. llama.cpp computes the last layer, the final norm
                            and the logits at the last prompt position only; the tap makes every prompt token
                            an output while it records, so all three hold every row. A tap run with
                            QWEN25VL_TAP_LAST_ONLY=1 (or an older tap) gives the last position: judged there
                            alone (conversions.GIVEN)
  generate.tokens           greedy (first maximal id), stopping on the eos list, with the top 5 per step

llama.cpp runs from the request (the rendered conversation and the image files), not from tensors: the
model stages of a case are taken from the case's own request, and other inputs are not covered.
Where llama.cpp lives: QWEN25VL_LLAMA_CPP_SRC (`qwen25vl conform --llama-cpp DIR` sets it), else the tree
that llama-cpp-python 0.3.36's sdist vendors (downloaded into .ci-cache); QWEN25VL_LLAMA_CPP_TAP names a
tap already built.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ...spec.chat import render_chat
from ...spec.patches import patchify
from ...spec.tokens import PAD_TOKEN_ID
from .. import conversions
from ..conversions import GIVEN
from .base import ChunkedGeneration, NotCovered

PACKAGE = Path(__file__).resolve().parents[2]  # the repository root (or the installed qwen25vl package)
BUILD_SCRIPT = PACKAGE / "tools" / "build_llama_cpp.sh"
MARKER = "<__media__>"  # mtmd's default media marker
VISION_SPAN = "<|vision_start|><|image_pad|><|vision_end|>"  # mtmd adds vision_start/end around each image
# llama.cpp's deliberate precision: ggml_conv_2d runs im2col in float16 for a float32 kernel
# (ggml/src/ggml.c, ggml_conv_2d: `a->type == GGML_TYPE_BF16 ? GGML_TYPE_F32 : GGML_TYPE_F16`), so the patch
# embedding sees float16-rounded pixels whatever the GGUF's type. Everything else is judged at float32; its
# float16 KV cache and attention are known divergences (expectations/llama.cpp.json), not a declared precision.
PROFILE = {"vision.patch_embed": "float16-inputs"}
TAP_TIMEOUT = 600.0
# converted checkpoints: $QWEN25VL_CACHE/llama-cpp-gguf (default ~/.cache/qwen25vl/llama-cpp-gguf), one folder per
# (tree, checkpoint folder, its files' sizes and times)
GGUF_CACHE = Path(os.environ.get("QWEN25VL_CACHE", Path.home() / ".cache" / "qwen25vl")) / "llama-cpp-gguf"
CONVERT_TIMEOUT = 900.0


class LlamaCppError(RuntimeError):
    """llama.cpp (its converter, build or tap) failed: the message carries the command and its output."""


def _tail(text: str, n: int = 1500) -> str:
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


def llama_cpp_source() -> Path | None:
    """The llama.cpp tree named by QWEN25VL_LLAMA_CPP_SRC, or None (the build script then downloads the
    sdist's tree)."""
    src = os.environ.get("QWEN25VL_LLAMA_CPP_SRC")
    if not src:
        return None
    p = Path(src).expanduser()
    if not (p / "convert_hf_to_gguf.py").is_file() or not (p / "tools" / "mtmd" / "mtmd.h").is_file():
        raise ValueError(
            f"target llama.cpp: {p} (--llama-cpp / QWEN25VL_LLAMA_CPP_SRC) is not a llama.cpp source tree "
            "(no convert_hf_to_gguf.py or tools/mtmd/mtmd.h)"
        )
    return p.resolve()


def ensure_tap(src: Path | None) -> Path:
    """The tap program: QWEN25VL_LLAMA_CPP_TAP when it names a file, else what tools/build_llama_cpp.sh
    prints (it builds libllama + libmtmd the first time, about 13 minutes on 2 cores; afterwards it only
    relinks the tap)."""
    given = os.environ.get("QWEN25VL_LLAMA_CPP_TAP")
    if given:
        if not Path(given).is_file():
            raise ValueError(f"target llama.cpp: QWEN25VL_LLAMA_CPP_TAP={given} is not a file")
        return Path(given)
    if shutil.which("cmake") is None or shutil.which(os.environ.get("CXX", "c++")) is None:
        raise ValueError("target llama.cpp: building the tap needs cmake and a C++ compiler (apt install cmake g++)")
    print(f"target llama.cpp: building the tap ({BUILD_SCRIPT}); the first build takes minutes", file=sys.stderr)
    cmd = ["bash", str(BUILD_SCRIPT)] + ([str(src)] if src else [])
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0 or not run.stdout.strip():
        raise ValueError(f"target llama.cpp: {' '.join(cmd)} failed ({run.returncode}): {_tail(run.stderr)}")
    return Path(run.stdout.strip().splitlines()[-1])


def _passes(tapped: dict, name: str) -> list[torch.Tensor]:
    """Every evaluation of a named tensor, in order: NAME, NAME#1, NAME#2, ... (one per prompt chunk or
    image)."""
    out, k = [], 0
    while True:
        key = name if k == 0 else f"{name}#{k}"
        if key not in tapped:
            return out
        out.append(tapped[key])
        k += 1


def _rows_of(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    """Passes of a [n, width] tensor (the tap drops leading sizes of 1) -> one [sum n, width]."""
    return torch.cat([p.reshape(-1, width) for p in parts]) if parts else torch.zeros(0, width)


class LlamaCppAdapter(ChunkedGeneration):
    name = "llama.cpp"

    def __init__(self, dtype: str = "float32", device: str = "cpu"):
        if str(dtype) != "float32" or device != "cpu":
            raise ValueError(
                f"target llama.cpp: judged with float32 GGUF files on the cpu here; got dtype {dtype!r}, "
                f"device {device!r}"
            )
        self.dtype, self.device = "float32", "cpu"
        self.src = llama_cpp_source()
        self.tap = ensure_tap(self.src)
        if self.src is None:  # the build script's default tree, next to the build it made
            self.src = self.tap.parents[2]
        self.case = None

    def describe(self) -> dict:
        return {
            "name": "llama.cpp",
            "version": self._version(),
            "dtype": self.dtype,
            "device": self.device,
            "profile": PROFILE,
        }

    def _version(self) -> str:
        """ggml's version and the tree, as this llama.cpp's CMakeLists gives them."""
        try:
            text = (self.src / "ggml" / "CMakeLists.txt").read_text()
            parts = [re.search(rf"GGML_VERSION_{k}\s+(\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
            ggml = ".".join(m.group(1) for m in parts) if all(parts) else "?"
        except OSError:
            ggml = "?"
        return f"ggml {ggml}, tree {self.src}"

    # ---- the checkpoint, converted by llama.cpp's own converter (kept in a cache: a worker process ends
    # without running finalizers, and the same checkpoint is converted once per tree)
    def _gguf(self, checkpoint: str) -> tuple[Path, Path]:
        files = sorted(p for p in Path(checkpoint).iterdir() if p.is_file())
        key = hashlib.sha256(
            json.dumps(
                [str(self.src), checkpoint] + [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
            ).encode()
        ).hexdigest()[:16]
        folder = GGUF_CACHE / key
        text, mmproj = folder / "text.gguf", folder / "mmproj.gguf"
        if text.is_file() and mmproj.is_file():
            return text, mmproj
        GGUF_CACHE.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=GGUF_CACHE, prefix=f"{key}.partial-"))
        env = {**os.environ, "PYTHONPATH": str(self.src / "gguf-py")}
        try:
            for name, extra in (("text.gguf", []), ("mmproj.gguf", ["--mmproj"])):
                cmd = [sys.executable, str(self.src / "convert_hf_to_gguf.py"), checkpoint, "--outtype", "f32"]
                cmd += ["--outfile", str(partial / name)] + extra
                try:
                    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=CONVERT_TIMEOUT)
                except subprocess.TimeoutExpired:
                    raise LlamaCppError(
                        f"llama.cpp's converter ran past {CONVERT_TIMEOUT:.0f} s on {checkpoint}"
                    ) from None
                if run.returncode != 0:
                    raise LlamaCppError(
                        f"llama.cpp's convert_hf_to_gguf.py {' '.join(extra)} refused {checkpoint} "
                        f"({run.returncode}): {_tail(run.stderr)}"
                    )
            try:
                partial.rename(folder)  # whole or not at all; another process may have won the race
            except OSError:
                pass
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return text, mmproj

    def prepare(self, checkpoint, *, dtype, device):
        self.checkpoint = str(Path(checkpoint).resolve())
        self.config = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
        self._gguf(self.checkpoint)

    def begin_case(self, case) -> None:
        self.case = case

    # ---- one request row through the tap
    def _tap(self, checkpoint: str, prompt: str, images: list[str], n_predict: int, eos=(151645,), batch=None) -> dict:
        """One tap run; batch: None (the prompt in one pass) or llama.cpp's n_batch = n_ubatch."""
        text, mmproj = self._gguf(checkpoint)
        out = Path(tempfile.mkdtemp(prefix="qwen25vl-llama-cpp-tap-"))
        (out / "prompt.txt").write_text(prompt, encoding="utf-8")
        cmd = [str(self.tap), str(text), str(mmproj), str(out / "prompt.txt"), str(out), str(n_predict)]
        cmd += [",".join(str(int(e)) for e in eos)] + list(images)
        env = None if batch is None else {**os.environ, "QWEN25VL_TAP_BATCH": str(int(batch))}
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=TAP_TIMEOUT, env=env)
        except subprocess.TimeoutExpired:
            shutil.rmtree(out, ignore_errors=True)
            raise LlamaCppError(f"the llama.cpp tap ran past {TAP_TIMEOUT:.0f} s") from None
        if run.returncode != 0:
            shutil.rmtree(out, ignore_errors=True)
            raise LlamaCppError(f"the llama.cpp tap failed ({run.returncode}): {_tail(run.stderr)}")
        from safetensors.torch import load_file

        try:
            return load_file(str(out / "tap.safetensors"))
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def _prompts(self, conversations, images, videos, options) -> list[tuple[str, list[str]]]:
        """Each conversation rendered by the reference's chat template (llama.cpp's jinja templating lives in
        its common library, outside libllama and libmtmd) with mtmd's marker for each image: (prompt, the
        row's image files)."""
        if videos:
            raise NotCovered("videos: mtmd takes still images here (its video helpers need ffmpeg)")
        if options.get("min_pixels") or options.get("max_pixels"):
            raise NotCovered("per-request pixel budgets: mtmd takes none")
        rows, k = [], 0
        for conv in conversations:
            text = render_chat(conv, add_generation_prompt=True)
            n = text.count(VISION_SPAN)
            rows.append((text.replace(VISION_SPAN, MARKER), [str(p) for p in images[k : k + n]]))
            k += n
        if k != len(images):
            raise ValueError(f"target llama.cpp: the conversations hold {k} images, the request gives {len(images)}")
        return rows

    def _case_rows(self, inputs: dict) -> list[tuple[str, list[str]]]:
        """The rows of the current case's request; llama.cpp cannot take other inputs."""
        if self.case is None:
            raise NotCovered("llama.cpp runs from a case's request (its conversation and image files)")
        own = self.case.tensors(self.case.manifest["inputs"])
        if not torch.equal(torch.as_tensor(inputs["input_ids"]), own["input_ids"]):
            raise NotCovered("llama.cpp runs from the request's text and images, not from other input tensors")
        request = self.case.json(self.case.manifest["request"])
        images, videos = self.case.media()
        return self._prompts(request["conversations"], images, videos, request.get("options", {}))

    # ---- preprocessing: mtmd's tokenizer and image preprocessor
    def _image_grids(self, ids: torch.Tensor, positions: torch.Tensor) -> list[list[int]]:
        """(t, h, w) patch grid of each image run (-1 ids) of one row, from its decoder positions."""
        m = self.config["vision_config"]["spatial_merge_size"]
        grids, start = [], None
        for i, x in enumerate(ids.tolist() + [0]):
            if x == -1 and start is None:
                start = i
            elif x != -1 and start is not None:
                p = positions[start:i]
                grids.append(
                    [1, int(p[:, 1].max() - p[:, 1].min() + 1) * m, int(p[:, 2].max() - p[:, 2].min() + 1) * m]
                )
                start = None
        return grids

    def build_inputs(self, conversations, images, videos, *, tokenizer_dir, options):
        self.config = json.loads((Path(tokenizer_dir) / "config.json").read_text(encoding="utf-8"))
        v = self.config["vision_config"]
        ids_rows, grids, pixels = [], [], []
        for prompt, files in self._prompts(conversations, images, videos, options):
            t = self._tap(str(Path(tokenizer_dir).resolve()), prompt, files, -1)
            ids = t["input_ids"].to(torch.int64)
            grids += self._image_grids(ids, t["positions_thw"].reshape(-1, 3))
            ids_rows.append(torch.where(ids == -1, self.config["image_token_id"], ids))
            for frame in _passes(t, "vision.pixels"):  # [H, W, 3] -> [1, 3, H, W]
                pv, _ = patchify(
                    frame.permute(2, 0, 1)[None],
                    patch_size=v["patch_size"],
                    temporal_patch_size=v.get("temporal_patch_size", 2),
                    merge_size=v["spatial_merge_size"],
                )
                pixels.append(pv)
        L = max(len(r) for r in ids_rows)
        input_ids = torch.full((len(ids_rows), L), PAD_TOKEN_ID, dtype=torch.int64)
        mask = torch.zeros_like(input_ids)
        for i, r in enumerate(ids_rows):
            input_ids[i, L - len(r) :], mask[i, L - len(r) :] = r, 1
        out = {"input_ids": input_ids, "attention_mask": mask}
        if grids:
            out["image_grid_thw"] = torch.tensor(grids, dtype=torch.int64)
        if pixels and len(pixels) == len(grids):
            out["pixel_values"] = torch.cat(pixels)
        return out

    # ---- the model
    def _row_stages(self, t: dict, capture) -> dict:
        """One row's tapped tensors -> per-row stage values (text [L_i, ...], vision per image)."""
        c, v = self.config, self.config["vision_config"]
        width, n_layers = c["hidden_size"], c["num_hidden_layers"]
        ids = t["input_ids"].to(torch.int64)
        n = len(ids)
        row: dict = {"positions": t["positions_thw"].reshape(n, 3).to(torch.int64)}
        # text.inputs_embeds: text chunks' token embeddings and images' encoder outputs, in chunk order
        text_parts, image_parts, parts = _passes(t, "text.embd"), _passes(t, "vision.mm_embd"), []
        is_image = (ids == -1).tolist()
        for j, flag in enumerate(is_image):
            if j == 0 or flag != is_image[j - 1]:  # a new chunk starts
                source = image_parts if flag else text_parts
                if not source:
                    raise LlamaCppError(
                        f"the tap wrote fewer {'image' if flag else 'text'} chunk embeddings than the ids hold"
                    )
                parts.append(source.pop(0))
        row["text.inputs_embeds"] = _rows_of(parts, width)
        for i in range(n_layers):
            row[f"text.layer.{i}"] = _rows_of(_passes(t, f"text.l_out-{i}"), width)
        # an embeddings context (the tap's prompt pass) renames the final norm's output as it hands it out
        norm = _passes(t, "text.result_norm") or _passes(t, "text.result_embd_pooled")
        row["text.norm"] = _rows_of(norm, width)
        row["logits"] = _rows_of(_passes(t, "text.result_output"), t["text.last_logits"].numel())
        # vision, per image: block outputs in window order; the merger output as the decoder receives it
        grids = self._image_grids(ids, row["positions"])
        win = {"window_size": v["window_size"], "patch_size": v["patch_size"], "merge_size": v["spatial_merge_size"]}

        def unpermute(parts, what):
            return [
                conversions.unpermute_windows(x.reshape(-1, v["hidden_size"]), torch.tensor([g]), **win, where=what)
                for x, g in zip(parts, grids)
            ]

        wanted = [s for s in capture if s.startswith("vision.block.")]
        for s in wanted:
            row[s] = unpermute(_passes(t, f"vision.layer_out-{s.rsplit('.', 1)[1]}"), f"llama.cpp {s}")
        if "vision.patch_embed" in capture:
            inp = [a - b for a, b in zip(_passes(t, "vision.ffn_inp-0"), _passes(t, "vision.attn_out-0"))]
            row["vision.patch_embed"] = unpermute(inp, "llama.cpp vision.patch_embed")
        row["vision.merger"] = [x.reshape(-1, c["hidden_size"]) for x in _passes(t, "vision.mm_embd")]
        return row

    def run(self, inputs, *, capture):
        rows = self._case_rows(inputs)
        mask = torch.as_tensor(inputs["attention_mask"])
        B, L = mask.shape
        per_row = [self._row_stages(self._tap(self.checkpoint, p, files, 1), capture) for p, files in rows]
        where = [f"llama.cpp row {i}" for i in range(B)]
        lengths = conversions.row_lengths(mask)
        for i, r in enumerate(per_row):
            if len(r["positions"]) != lengths[i]:
                raise ValueError(
                    f"llama.cpp tokenized row {i} into {len(r['positions'])} tokens, the reference into {lengths[i]} "
                    "(see preprocess.input_ids): its model stages cannot be laid over the reference's"
                )
        got: dict = {}
        got["text.position_ids"] = conversions.place_positions([r["positions"] for r in per_row], "tokens", mask, where)
        deltas = torch.tensor([int(r["positions"].max()) + 1 - len(r["positions"]) for r in per_row])
        got["text.rope_deltas"] = conversions.rope_deltas_padded(deltas, "unpadded", mask, "llama.cpp rope_deltas")
        last = torch.zeros(B, L, dtype=torch.bool)
        last[:, -1] = True
        for s in [s for s in per_row[0] if s.startswith("text.")] + ["logits"]:
            if all(len(r[s]) == len(r["positions"]) for r in per_row):
                got[s] = conversions.place_rows([r[s] for r in per_row], mask, where)
            elif all(len(r[s]) == 1 for r in per_row):  # computed at the last prompt position only
                got[s] = conversions.place_last_logits(torch.cat([r[s] for r in per_row]), mask, s)[0]
                got[s + GIVEN] = last
        grid = inputs.get("image_grid_thw")
        if grid is not None:
            m = self.config["vision_config"]["spatial_merge_size"]
            items = conversions.vision_row_items(inputs["input_ids"], grid, self.config["image_token_id"], m)
            none = [[] for _ in range(B)]
            for s in [s for s in per_row[0] if s.startswith("vision.")]:
                vals = [torch.cat(r[s]) if r[s] else None for r in per_row]
                per = m * m if s == "vision.merger" else 1
                got[s] = conversions.place_vision_rows(vals, items, none, grid, None, where, per=per)
        return {k: v for k, v in got.items() if k in capture or (k.endswith(GIVEN) and k[: -len(GIVEN)] in capture)}

    def generate_chunked(self, inputs, *, prefill_chunk, max_new_tokens, eos_token_id):
        """The tap's greedy loop, one row at a time; rows that stopped are padded with an eos id. With
        n_batch = n_ubatch = prefill_chunk (None: the prompt in one pass): llama.cpp decodes each text chunk and each
        image's embeddings that many tokens at a time (mtmd splits an image into several batches, the
        path of llama.cpp#16876). Its chunks follow mtmd's own text/image split, so the harness's
        boundary falls at the chunk size counted from each chunk's start, not the prompt's."""
        eos = sorted(set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]))
        tokens, topk = [], []
        for prompt, files in self._case_rows(inputs):
            t = self._tap(self.checkpoint, prompt, files, max_new_tokens, eos, batch=prefill_chunk)
            tokens.append(t["generated"].tolist())
            topk.append(t["generated_top5"].reshape(-1, 5).tolist())
        return {
            "tokens": conversions.pad_generated(tokens, eos, eos[0], "llama.cpp generate"),
            "topk": conversions.pad_generated(topk, eos, eos[0], "llama.cpp top-5", fill=eos[0]),
        }

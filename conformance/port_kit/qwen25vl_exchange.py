"""Read the harness's inputs and write a port's outputs: the file exchange of qwen25vl, numpy only.

Vendorable: copy this one file into a port (it imports numpy and the standard library, nothing of
qwen25vl). docs/exchange.md is the specification; this file follows it.

    import qwen25vl_exchange as qx
    for case in qx.cases_in_order("IN"):                 # IN/order.json: run them in ONE process
        info = qx.read_case("IN", case)                  # IN/<case>/case.json
        inputs = qx.read_inputs("IN", case)              # input_ids, attention_mask, pixel_values, ...
        ... run row i alone ...
        qx.write_row("OUT", case, i, {"vision.block.0": x, "text.norm": h, "logits": last})
        qx.write_tokens("OUT", case, [[ids of row 0], [ids of row 1]])
    qx.write_port_json("OUT", name="myport", version="0.1", dtype="float32", outputs="rows", logits="last")

safetensors, as read and written here: an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the raw
little-endian data, offsets counted from the end of the header. bfloat16 is the top half of a
float32: it is read as uint16 bits and widened to float32.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

# safetensors dtype names <-> numpy (little-endian); BF16 has no numpy type: uint16 bits
DTYPES = {
    "BOOL": np.dtype("bool"),
    "U8": np.dtype("<u1"),
    "I8": np.dtype("<i1"),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),
}
NAMES = {np.dtype(v).newbyteorder("<"): k for k, v in DTYPES.items() if k != "BF16"}
CONVENTIONS = {  # the declarations OUT/port.json accepts (docs/exchange.md, "port.json")
    "outputs": ("batch", "rows"),
    "logits": ("all", "last"),
    "vision_block_order": ("pixel_values", "window"),
    "positions": ("sections", "sections4", "tokens"),
    "rope_deltas": ("padded", "unpadded"),
}


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits -> float32 (exact: bfloat16 is float32's upper 16 bits)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bits, rounded to nearest even (NaN stays NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)


def load_safetensors(path, *, keep_bfloat16_bits: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as numpy; BF16 widened to float32 (or its uint16 bits)."""
    raw = Path(path).read_bytes()
    if len(raw) < 8:
        raise ValueError(f"{path}: too short for a safetensors file ({len(raw)} bytes)")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise ValueError(f"{path}: header length {n} runs past the end of the file ({len(raw)} bytes)")
    header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    data = memoryview(raw)[8 + n :]
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, not one of {sorted(DTYPES)}")
        begin, end = entry["data_offsets"]
        dtype = DTYPES[entry["dtype"]]
        count = int(np.prod(entry["shape"], dtype=np.int64))
        if end - begin != count * dtype.itemsize or end > len(data):
            raise ValueError(f"{path}: tensor {name!r} spans {end - begin} bytes, shape {entry['shape']} needs more")
        a = np.frombuffer(data[begin:end], dtype=dtype).reshape(entry["shape"]).copy()
        out[name] = bfloat16_to_float32(a) if entry["dtype"] == "BF16" and not keep_bfloat16_bits else a
    return out


def _atomic_write(path: Path, payload: bytes) -> None:
    """Write whole or not at all: a temporary file beside `path`, renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_safetensors(path, tensors: dict, *, bfloat16: tuple = ()) -> None:
    """Write numpy arrays as safetensors; the names in `bfloat16` are stored as BF16 (from float32)."""
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        a = np.asarray(tensors[name])
        if name in bfloat16:
            a, kind = float32_to_bfloat16(a.astype(np.float32)), "BF16"
        else:
            a = a.astype(a.dtype.newbyteorder("<"))
            if a.dtype not in NAMES:
                raise ValueError(f"{path}: tensor {name!r} has dtype {a.dtype}, not storable in safetensors")
            kind = NAMES[a.dtype]
        blob = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": kind, "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        chunks.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    _atomic_write(Path(path), struct.pack("<Q", len(text)) + text + b"".join(chunks))


def _write_json(path: Path, obj) -> None:
    _atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


# ---------------------------------------------------------------- the exchange's files


def cases_in_order(in_dir) -> list[str]:
    """IN/order.json: every case folder, in the order to run them, in one process."""
    return json.loads((Path(in_dir) / "order.json").read_text(encoding="utf-8"))["run_in_one_process_in_this_order"]


def read_case(in_dir, case: str) -> dict:
    """IN/<case>/case.json: kind, stages, checkpoint and its files, prompts, max_new_tokens, eos ids."""
    return json.loads((Path(in_dir) / case / "case.json").read_text(encoding="utf-8"))


def read_inputs(in_dir, case: str) -> dict[str, np.ndarray]:
    """IN/<case>/inputs.safetensors: the model inputs (model cases) or the item tensors (exact cases)."""
    path = Path(in_dir) / case / "inputs.safetensors"
    return load_safetensors(path) if path.is_file() else {}


def read_items(in_dir, case: str, stage: str) -> list[dict]:
    """IN/<case>/<stage>.inputs.json items; a {"$tensor": name} value is replaced by that tensor."""
    tensors = read_inputs(in_dir, case)

    def resolve(obj):
        if isinstance(obj, dict):
            if set(obj) == {"$tensor"}:
                return tensors[obj["$tensor"]]
            return {k: resolve(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [resolve(v) for v in obj]
        return obj

    path = Path(in_dir) / case / f"{stage}.inputs.json"
    return resolve(json.loads(path.read_text(encoding="utf-8"))["items"])


def write_items(out_dir, case: str, stage: str, results: list) -> None:
    """OUT/<case>/<stage>.json for an exact stage: one result per item, plain JSON (arrays as lists)."""

    def plain(obj):
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, (list, tuple)):
            return [plain(v) for v in obj]
        if isinstance(obj, dict):
            return {k: plain(v) for k, v in obj.items()}
        return obj

    _write_json(Path(out_dir) / case / f"{stage}.json", {"items": plain(results)})


def write_row(out_dir, case: str, row: int, stages: dict, *, bfloat16: tuple = ()) -> None:
    """OUT/<case>/rows/<row>.safetensors: row `row` run alone, every stage over its own real tokens
    (text stages [L_i, C], vision stages over its own images then videos, logits [V] or [L_i, V])."""
    save_safetensors(Path(out_dir) / case / "rows" / f"{row}.safetensors", stages, bfloat16=bfloat16)


def write_outputs(out_dir, case: str, stages: dict, *, bfloat16: tuple = ()) -> None:
    """OUT/<case>/outputs.safetensors: every stage in the batch layout (outputs "batch")."""
    save_safetensors(Path(out_dir) / case / "outputs.safetensors", stages, bfloat16=bfloat16)


def write_tokens(out_dir, case: str, tokens: list, *, topk: list | None = None, topk_logprobs: list | None = None):
    """OUT/<case>/generate.tokens.json: generated ids per row (a row that stopped at eos may be shorter),
    optionally the top-k ids and their log-probs at every step."""
    obj = {"tokens": [[int(t) for t in row] for row in tokens]}
    if topk is not None:
        obj["topk"] = [[[int(t) for t in step] for step in row] for row in topk]
    if topk_logprobs is not None:
        obj["topk_logprobs"] = [[[float(x) for x in step] for step in row] for row in topk_logprobs]
    _write_json(Path(out_dir) / case / "generate.tokens.json", obj)


def write_port_json(out_dir, *, name: str, version: str = "", dtype: str = "float32", **conventions) -> None:
    """OUT/port.json: who the port is and the conventions its files follow (CONVENTIONS)."""
    for key, value in conventions.items():
        if key not in CONVENTIONS:
            raise ValueError(f"port.json: unknown convention {key!r}; known: {sorted(CONVENTIONS)}")
        if value not in CONVENTIONS[key]:
            raise ValueError(f"port.json: {key} = {value!r}; expected one of {CONVENTIONS[key]}")
    _write_json(Path(out_dir) / "port.json", {"name": name, "version": version, "dtype": dtype, **conventions})

"""The file exchange: judge a port written in any language from the files it writes.

docs/exchange.md is the full specification, written for a port author who reads no Python; in short:

1. `qwen25vl conform --export-inputs IN` writes, for every case, what a port needs and nothing of the
   golden outputs: IN/<case>/case.json (what to compute and every file it needs: checkpoint,
   preprocessor config, tokenizer files, prompts, max_new_tokens, eos ids), the stage inputs of exact
   cases, and for model cases request.json, inputs.safetensors (the model inputs) and media/.
   IN/order.json lists the case folders, the model cases again as <case>@repeat (state.repeat), and
   the model cases with a generation as <case>@chunked, whose case.json adds prefill_chunk (state.chunked).
2. The port writes OUT/<case>/: <stage>.json for exact stages, model stage tensors in safetensors
   (outputs.safetensors in the batch layout, or rows/<i>.safetensors per row), generate.tokens.json,
   and OUT/port.json declaring its conventions (conversions.CONVENTIONS; defaults: the canonical ones).
3. `qwen25vl conform --target files:OUT` converts what the port declared (conformance/conversions.py)
   and compares. A file or key that is absent is "not covered".
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ...spec.chat import render_chat
from ...spec.config import Qwen25VLConfig
from .. import conversions, stages
from ..chunked import applies as chunked_applies
from ..chunked import chunk_for
from ..conversions import GIVEN
from ..repeat import REPEAT_SUFFIX
from .base import Adapter, NotCovered

CHUNKED_SUFFIX = "@chunked"  # the file exchange's folder for a case generated with its prompt prefilled in chunks
PORT_KEYS = ("name", "version", "dtype", "device", "profile", "exchange") + tuple(conversions.CONVENTIONS)
# a port that declares nothing is read in the canonical layout: each convention's first value
DEFAULTS = {key: values[0] for key, values in conversions.CONVENTIONS.items()}


def read_port_json(path: Path) -> dict:
    """OUT/port.json, checked: every key known, every convention one of conversions.CONVENTIONS."""
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: must hold a JSON object, got {type(meta).__name__}")
    unknown = sorted(set(meta) - set(PORT_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; known: {list(PORT_KEYS)}")
    for key in conversions.CONVENTIONS:
        if key in meta:
            conversions.check_convention(key, meta[key], f"{path} key {key!r}")
    return meta


class FilesAdapter(Adapter):
    name = "files"

    def __init__(self, folder: str, *, dtype: str | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"files target: {self.folder} is not a folder")
        self.meta = read_port_json(self.folder / "port.json")
        self.conventions = {k: self.meta.get(k, v) for k, v in DEFAULTS.items()}
        self.dtype = dtype or self.meta.get("dtype", "float32")
        self.case_dir: Path | None = None
        self.config = None
        self._outputs: dict | None = None

    def describe(self) -> dict:
        return {
            "name": self.meta.get("name", f"files:{self.folder}"),
            "version": self.meta.get("version", ""),
            "dtype": self.dtype,
            "device": self.meta.get("device", "n/a"),
            "profile": self.meta.get("profile"),  # precision per stage pattern (conformance/precision.py)
            "conventions": self.conventions,
        }

    def begin_case(self, case) -> None:
        self.case_dir = self.folder / case.name
        ck = case.checkpoint()
        self.config = Qwen25VLConfig.from_file(ck / "config.json") if ck and (ck / "config.json").is_file() else None
        self._outputs = None

    def prepare(self, checkpoint, *, dtype, device):
        pass

    def _json(self, name: str):
        p = self.case_dir / name
        if not p.is_file():
            raise NotCovered(f"no {p}")
        return json.loads(p.read_text(encoding="utf-8"))

    def _tensors(self, path: Path) -> dict:
        try:
            return load_file(str(path))
        except Exception as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None

    def outputs(self) -> dict:
        """outputs.safetensors (the batch layout), read once per case."""
        if self._outputs is None:
            p = self.case_dir / "outputs.safetensors"
            if not p.is_file():
                raise NotCovered(f"no {p}")
            self._outputs = self._tensors(p)
        return self._outputs

    def run_items(self, stage, items, *, tokenizer_dir=None):
        got = self._json(f"{stage}.json")
        if not isinstance(got, dict) or "items" not in got:
            raise ValueError(f'{self.case_dir / (stage + ".json")} must hold {{"items": [...]}}')
        return got["items"]

    def build_inputs(self, conversations, images, videos, *, tokenizer_dir, options):
        out = {k[len("preprocess.") :]: v for k, v in self.outputs().items() if k.startswith("preprocess.")}
        if not out:
            raise NotCovered("outputs.safetensors holds no preprocess.* keys")
        return out

    def run(self, inputs, *, capture):
        if self.conventions["outputs"] == "rows":
            return self._from_rows(inputs, capture)
        return self._from_batch(inputs, capture)

    def _from_batch(self, inputs, capture) -> dict:
        """outputs.safetensors: every stage already in the batch layout, up to the declared conventions."""
        got, c, mask = self.outputs(), self.conventions, inputs["attention_mask"]
        where = str(self.case_dir / "outputs.safetensors")
        out = {}
        for stage in capture:
            if stage not in got:
                continue
            at = f"{where} key {stage!r}"
            v = got[stage]
            if stage == "text.position_ids":
                if c["positions"] != "sections":
                    raise conversions.ConversionError(
                        f"{at}: positions {c['positions']!r} is a per-row layout; declare outputs 'rows' "
                        f"or write [3, B, L] sections"
                    )
                out[stage] = v
            elif stage == "text.rope_deltas":
                out[stage] = conversions.rope_deltas_padded(v, c["rope_deltas"], mask, at)
            elif stage == "logits" and c["logits"] == "last":
                out[stage], out[stage + GIVEN] = conversions.place_last_logits(conversions.to_float32(v, at), mask, at)
            elif stage.startswith("vision.block.") and c["vision_block_order"] == "window":
                out[stage] = self._unpermute(conversions.to_float32(v, at), _vision_grid(inputs), at)
            else:
                out[stage] = conversions.to_float32(v, at)
        return out

    def _from_rows(self, inputs, capture) -> dict:
        """rows/<i>.safetensors: row i alone, its real tokens only (docs/exchange.md, "outputs": "rows")."""
        mask, c = inputs["attention_mask"], self.conventions
        paths = [self.case_dir / "rows" / f"{i}.safetensors" for i in range(mask.shape[0])]
        missing = [str(p) for p in paths if not p.is_file()]
        if len(missing) == len(paths):
            raise NotCovered(f"no {paths[0].parent}/<row>.safetensors")
        if missing:
            raise ValueError(f"port.json declares outputs 'rows' but {missing} are missing")
        rows = [self._tensors(p) for p in paths]
        m = self.config.vision.spatial_merge_size
        ids = inputs["input_ids"]
        items = {
            kind: conversions.vision_row_items(ids, inputs.get(grid), token, m)
            for kind, grid, token in (
                ("image", "image_grid_thw", self.config.image_token_id),
                ("video", "video_grid_thw", self.config.video_token_id),
            )
        }
        out = {}
        for stage in capture:
            if not any(stage in r for r in rows):
                continue
            at = [f"{p} key {stage!r}" for p in paths]
            vals = [r.get(stage) for r in rows]
            if stage.startswith("vision."):
                vals = [None if v is None else conversions.to_float32(v, w) for v, w in zip(vals, at)]
                if stage.startswith("vision.block.") and c["vision_block_order"] == "window":
                    vals = [
                        None if v is None else self._unpermute(v, _row_grid(inputs, items, i), at[i])
                        for i, v in enumerate(vals)
                    ]
                per = m * m if stage == "vision.merger" else 1
                out[stage] = conversions.place_vision_rows(
                    vals,
                    items["image"],
                    items["video"],
                    inputs.get("image_grid_thw"),
                    inputs.get("video_grid_thw"),
                    at,
                    per=per,
                )
                continue
            absent = [w for v, w in zip(vals, at) if v is None]
            if absent:
                raise conversions.ConversionError(f"{absent[0]}: absent, while other rows give {stage}")
            if stage == "text.position_ids":
                out[stage] = conversions.place_positions(vals, c["positions"], mask, at)
            elif stage == "text.rope_deltas":
                for v, w in zip(vals, at):
                    if v.numel() != 1:
                        raise conversions.ConversionError(
                            f"{w}: expected shape [1] (the row's delta), got {list(v.shape)}"
                        )
                deltas = torch.stack([v.reshape(()) for v in vals])
                where = f"{self.case_dir / 'rows'}/*.safetensors key {stage!r}"
                out[stage] = conversions.rope_deltas_padded(deltas, c["rope_deltas"], mask, where)
            elif stage == "logits" and c["logits"] == "last":
                vals = [conversions.to_float32(v, w) for v, w in zip(vals, at)]
                for v, w in zip(vals, at):
                    if v.dim() != 1:
                        raise conversions.ConversionError(
                            f"{w}: expected shape [V] (logits 'last': the row's last prompt token), got {list(v.shape)}"
                        )
                out[stage], out[stage + GIVEN] = conversions.place_last_logits(torch.stack(vals), mask, at[0])
            else:
                out[stage] = conversions.place_rows([conversions.to_float32(v, w) for v, w in zip(vals, at)], mask, at)
        return out

    def _unpermute(self, x, grid, where):
        v = self.config.vision
        return conversions.unpermute_windows(
            x, grid, window_size=v.window_size, patch_size=v.patch_size, merge_size=v.spatial_merge_size, where=where
        )

    def generate_chunked(self, inputs, *, prefill_chunk, max_new_tokens, eos_token_id):
        """OUT/<case>@chunked/generate.tokens.json: the port's generation with the prompt prefilled in
        chunks of IN/<case>@chunked/case.json's prefill_chunk (the harness picks the same chunk)."""
        if prefill_chunk is None:
            return self.generate(inputs, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
        folder, self.case_dir = self.case_dir, self.case_dir.with_name(self.case_dir.name + CHUNKED_SUFFIX)
        try:
            return self.generate(inputs, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
        finally:
            self.case_dir = folder

    def generate(self, inputs, *, max_new_tokens, eos_token_id):
        got = self._json("generate.tokens.json")
        where = str(self.case_dir / "generate.tokens.json")
        if not isinstance(got, dict) or not isinstance(got.get("tokens"), list):
            raise ValueError(f'{where} must hold {{"tokens": [[ids] per row], ...}}')
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        pad = self.config.pad_token_id if self.config else eos[0]
        out = {"tokens": conversions.pad_generated(got["tokens"], eos, pad, f"{where} key 'tokens'")}
        for key, fill in (("topk", -1), ("topk_logprobs", 0.0)):  # steps after a row's eos are never judged
            if got.get(key) is not None:
                out[key] = conversions.pad_generated(got[key], eos, pad, f"{where} key {key!r}", fill=fill)
        return {"tokens": out["tokens"], "topk": out.get("topk"), "topk_logprobs": out.get("topk_logprobs")}


def _vision_grid(inputs) -> torch.Tensor:
    """The grids of every vision item in canonical order: images, then videos."""
    grids = [inputs[k] for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None]
    return torch.cat(grids) if grids else torch.zeros(0, 3, dtype=torch.int64)


def _row_grid(inputs, items, i) -> torch.Tensor:
    """Row i's own vision items (its images, then its videos)."""
    parts = [
        inputs[key][items[kind][i]]
        for kind, key in (("image", "image_grid_thw"), ("video", "video_grid_thw"))
        if items[kind][i]
    ]
    return torch.cat(parts) if parts else torch.zeros(0, 3, dtype=torch.int64)


def _inputs_only(obj, tensors: dict, used: dict):
    if isinstance(obj, dict):
        if set(obj) == {"$tensor"}:
            used[obj["$tensor"]] = tensors[obj["$tensor"]]
            return obj
        return {k: _inputs_only(v, tensors, used) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_inputs_only(v, tensors, used) for v in obj]
    return obj


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.json")
TOKENIZER_FILES += ("chat_template.jinja",)


def folder_files(folder: Path) -> dict:
    """What a port loads from a Hugging Face folder, as absolute paths (docs/exchange.md, case.json)."""
    found = {}
    if (folder / "config.json").is_file():
        found["config"] = str(folder / "config.json")
    weights = sorted(str(p) for p in folder.glob("*.safetensors"))
    if weights:
        found["weights"] = weights
    for key, name in (
        ("preprocessor_config", "preprocessor_config.json"),
        ("generation_config", "generation_config.json"),
    ):
        if (folder / name).is_file():
            found[key] = str(folder / name)
    tokenizer = {name: str(folder / name) for name in TOKENIZER_FILES if (folder / name).is_file()}
    if tokenizer:
        found["tokenizer_files"] = tokenizer
    return found


def stage_defaults(stage: str, items: list) -> dict:
    """The keyword arguments of an fn.* stage's function that its items leave to their defaults
    (preprocess_image's mean, std, patch and merge sizes, ...), so a port need not guess them."""
    if not stages.is_known(stage) or not stages.info(stage).direct:
        return {}
    given = {k for it in items for k in it["inputs"]}
    out = {}
    for p in inspect.signature(stages.info(stage).spec[0]).parameters.values():
        value = list(p.default) if isinstance(p.default, tuple) else p.default
        plain = value is None or isinstance(value, (bool, int, float, str, list))
        if p.default is not inspect.Parameter.empty and p.name not in given and plain:
            out[p.name] = value
    return out


def case_info(case) -> dict:
    """IN/<case>/case.json: what to compute and every file a port needs for it."""
    info = {
        "case": case.name,
        "kind": case.kind,
        "stages": list(case.stages),
        "description": case.manifest.get("description", ""),
    }
    if case.checkpoint():
        info |= {"checkpoint": str(case.checkpoint())} | folder_files(case.checkpoint())
    if case.manifest.get("tokenizer"):
        tok = (case.path / case.manifest["tokenizer"]).resolve()
        info |= {"tokenizer": str(tok), "tokenizer_files": folder_files(tok).get("tokenizer_files", {})}
    if case.kind == "exact":
        defaults = {stage: stage_defaults(stage, case.json(e["items"])["items"]) for stage, e in case.stages.items()}
        info["defaults"] = {stage: d for stage, d in defaults.items() if d}
    if case.kind == "model":
        request = case.json(case.manifest["request"])
        options = request.get("options", {})
        info["prompts"] = [
            render_chat(
                conv,
                add_generation_prompt=request.get("add_generation_prompt", True),
                add_vision_id=options.get("add_vision_id", False),
            )
            for conv in request["conversations"]
        ]
        mask = case.tensors(case.manifest["inputs"])["attention_mask"]
        info |= {"rows": int(mask.shape[0]), "row_lengths": [int(n) for n in mask.sum(-1)]}
        gen = case.json("generate.json") if "generate.json" in case.manifest["files"] else {}
        if gen:
            eos = gen["eos_token_id"]
            info |= {"max_new_tokens": gen["max_new_tokens"], "eos_token_id": [eos] if isinstance(eos, int) else eos}
    return info


def export_inputs(case_paths, out: str | Path) -> list[str]:
    """Write the inputs of every case under `out` (layout in the module docstring); returns the case names."""
    from ..fixtures import dump_json, load_case

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--export-inputs {out}: exists and is not a folder")
    cases = [load_case(path) for path in case_paths]  # every case checked before anything is written
    for case in cases:
        if case.bad_files:
            raise ValueError(f"case {case.name}: cannot export, bad files {case.bad_files}")
    infos = [case_info(case) for case in cases]  # prompts rendered, files found: before anything is written
    for case in cases:
        for suffix in (REPEAT_SUFFIX, CHUNKED_SUFFIX):
            again = out / (case.name + suffix)
            if case.kind == "model" and again.exists() and not again.is_dir():
                raise ValueError(f"--export-inputs: {again} exists and is not a folder")
    names = []
    for case, info in zip(cases, infos):
        # only the files named below are (over)written: a port's own files in the folder stay
        d = out / case.name
        d.mkdir(parents=True, exist_ok=True)
        if case.kind == "exact":
            used: dict = {}
            for stage, entry in case.stages.items():
                tensors = case.tensors(entry["tensors"]) if entry.get("tensors") else {}
                items = [
                    {"label": it.get("label", ""), "inputs": _inputs_only(it["inputs"], tensors, used)}
                    for it in case.json(entry["items"])["items"]
                ]
                (d / f"{stage}.inputs.json").write_bytes(dump_json({"items": items}))
            if used:
                save_file({k: v.contiguous() for k, v in used.items()}, str(d / "inputs.safetensors"))
        else:
            shutil.copy(case.file(case.manifest["request"]), d / "request.json")
            shutil.copy(case.file(case.manifest["inputs"]), d / "inputs.safetensors")
            for f in case.manifest["files"]:
                if f.startswith("media/"):
                    (d / f).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(case.file(f), d / f)
        (d / "case.json").write_bytes(dump_json(info))
        names.append(case.name)
    # state.repeat: the model cases once more, in reverse order, as cases of their own; a port runs
    # every folder of order.json in that order in ONE process, so what it keeps between requests shows
    model = [n for n, c in zip(names, cases) if c.kind == "model"]
    for name in reversed(model):
        again = out / (name + REPEAT_SUFFIX)
        shutil.copytree(out / name, again, dirs_exist_ok=True)
        info = json.loads((out / name / "case.json").read_text(encoding="utf-8"))
        (again / "case.json").write_bytes(dump_json({**info, "case": again.name, "repeat_of": name}))
    # state.chunked: each model case with a generation once more, to be generated with its prompt prefilled
    # prefill_chunk tokens at a time (the chunk the harness picks: a boundary inside the first vision span)
    chunked = []
    for name, case, info in zip(names, cases, infos):
        picked = _chunk_of(case) if chunked_applies(case) else None
        if picked is None:
            continue
        again = out / (name + CHUNKED_SUFFIX)
        shutil.copytree(out / name, again, dirs_exist_ok=True)
        extra = {"case": again.name, "chunked_of": name, "prefill_chunk": picked[0], "prefill_chunks": picked[1]}
        (again / "case.json").write_bytes(dump_json({**info, **extra, "stages": ["generate.tokens"]}))
        chunked.append(again.name)
    order = names + [n + REPEAT_SUFFIX for n in reversed(model)] + chunked
    (out / "order.json").write_bytes(dump_json({"run_in_one_process_in_this_order": order}))
    return names


def _chunk_of(case):
    """(prefill chunk, where its boundaries fall) for a model case, as the case runner picks it."""
    ck = case.checkpoint()
    if not ck or not (ck / "config.json").is_file():
        return None
    return chunk_for(case.tensors(case.manifest["inputs"])["input_ids"], Qwen25VLConfig.from_file(ck / "config.json"))

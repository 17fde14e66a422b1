"""The file exchange: judge a port written in any language from the files it writes.

1. `qwen25vl conform --export-inputs IN` writes, for every case, what a port needs and nothing of
   the golden outputs:
     IN/<case>/case.json          what to compute: kind, stages, the checkpoint folder (absolute path),
                                  and for model cases max_new_tokens / eos_token_id
     IN/<case>/<stage>.inputs.json   exact cases: {"items": [{"label", "inputs"}]}; a value
                                  {"$tensor": name} is tensor `name` of IN/<case>/inputs.safetensors
     IN/<case>/request.json, inputs.safetensors, media/   model cases: the conversation and media,
                                  and the model-inputs dict (docs/INTERFACES.md) to run the model on
2. The port writes OUT/<case>/:
     <stage>.json                 exact stages: {"items": [one output per item, in order]}, each in the
                                  layout of the stage's expected value (fixtures/FORMAT.md), tensors as
                                  nested lists; a refused item is {"error": "ValueError"}
     outputs.safetensors          model stages, keyed by stage name (vision.block.3, logits, ...) and
                                  preprocess.<key> for the inputs it built from request.json
     generate.tokens.json         {"tokens": [[...]], "topk": [[[5 ids] per step]] (optional),
                                  "topk_logprobs": [[[5 log-probs] per step]] (optional, judged)}
     and optionally OUT/port.json {"name": ..., "version": ..., "dtype": "bfloat16"}
3. `qwen25vl conform --target files:OUT` compares. A file or key that is absent is "not covered".
4. state.repeat: IN/order.json lists every case folder, the model cases a second time in reverse
   order as <case>@repeat (the same inputs). A port that runs them in that order in ONE process and
   writes OUT/<case>@repeat/ like any case is judged on whether its answers depend on what ran
   before; without those folders state.repeat is not covered.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..repeat import REPEAT_SUFFIX
from .base import Adapter, NotCovered


class FilesAdapter(Adapter):
    name = "files"

    def __init__(self, folder: str, *, dtype: str | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"files target: {self.folder} is not a folder")
        meta = {}
        if (self.folder / "port.json").is_file():
            meta = json.loads((self.folder / "port.json").read_text(encoding="utf-8"))
        self.meta = meta
        self.dtype = dtype or meta.get("dtype", "float32")
        self.case_dir: Path | None = None
        self._outputs: dict | None = None

    def describe(self) -> dict:
        return {
            "name": self.meta.get("name", f"files:{self.folder}"),
            "version": self.meta.get("version", ""),
            "dtype": self.dtype,
            "device": self.meta.get("device", "n/a"),
            "profile": self.meta.get("profile"),  # precision per stage pattern (conformance/precision.py)
        }

    def begin_case(self, case) -> None:
        self.case_dir = self.folder / case.name
        self._outputs = None

    def prepare(self, checkpoint, *, dtype, device):
        pass

    def _json(self, name: str):
        p = self.case_dir / name
        if not p.is_file():
            raise NotCovered(f"no {p}")
        return json.loads(p.read_text(encoding="utf-8"))

    def outputs(self) -> dict:
        if self._outputs is None:
            p = self.case_dir / "outputs.safetensors"
            if not p.is_file():
                raise NotCovered(f"no {p}")
            self._outputs = load_file(str(p))
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
        return {k: v for k, v in self.outputs().items() if k in capture}

    def generate(self, inputs, *, max_new_tokens, eos_token_id):
        got = self._json("generate.tokens.json")
        return {
            "tokens": torch.tensor(got["tokens"], dtype=torch.int64),
            "topk": None if got.get("topk") is None else torch.tensor(got["topk"]),
            "topk_logprobs": None if got.get("topk_logprobs") is None else torch.tensor(got["topk_logprobs"]),
        }


def _inputs_only(obj, tensors: dict, used: dict):
    if isinstance(obj, dict):
        if set(obj) == {"$tensor"}:
            used[obj["$tensor"]] = tensors[obj["$tensor"]]
            return obj
        return {k: _inputs_only(v, tensors, used) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_inputs_only(v, tensors, used) for v in obj]
    return obj


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
    names = []
    for case in cases:
        # only the files named below are (over)written: a port's own files in the folder stay
        d = out / case.name
        d.mkdir(parents=True, exist_ok=True)
        info = {
            "case": case.name,
            "kind": case.kind,
            "stages": list(case.stages),
            "description": case.manifest.get("description", ""),
        }
        if case.checkpoint():
            info["checkpoint"] = str(case.checkpoint())
        if case.manifest.get("tokenizer"):
            info["tokenizer"] = str((case.path / case.manifest["tokenizer"]).resolve())
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
            gen = case.json("generate.json") if "generate.json" in case.manifest["files"] else {}
            info |= {"max_new_tokens": gen.get("max_new_tokens"), "eos_token_id": gen.get("eos_token_id")}
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
        if again.exists() and not again.is_dir():
            raise ValueError(f"--export-inputs: {again} exists and is not a folder")
        shutil.copytree(out / name, again, dirs_exist_ok=True)
        info = json.loads((out / name / "case.json").read_text(encoding="utf-8"))
        (again / "case.json").write_bytes(dump_json({**info, "case": again.name, "repeat_of": name}))
    order = names + [n + REPEAT_SUFFIX for n in reversed(model)]
    (out / "order.json").write_bytes(dump_json({"run_in_one_process_in_this_order": order}))
    return names

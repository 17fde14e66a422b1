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

import difflib
import inspect
import json
import os
import shutil
import stat
import tempfile
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
EXCHANGE_VERSION = 2  # docs/exchange.md's version; port.json's "exchange", when given, must be it
DTYPES = ("float32", "bfloat16", "float16", "float64")  # port.json "dtype" (docs/exchange.md, section 4)
# a JSON file of the exchange is read whole: past this it is refused, not read (generate.tokens.json
# of a large batch is well under 1 MiB; exact results a few MiB)
MAX_JSON_BYTES = 256 * 2**20
Error = conversions.ConversionError


def _nearest(key: str, names) -> str:
    """' (did you mean X?)' for the name most like `key`, else ''."""
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def read_json(path: Path, name: str, *, limit: int | None = None):
    """The JSON value of one of a port's files. `name`: how the messages name it (its path under OUT).
    No file: NotCovered. Anything else that is not a readable JSON file of at most `limit` bytes
    (a folder, a FIFO or device, invalid UTF-8, a file cut short, nesting too deep): Error in words.
    limit: None for MAX_JSON_BYTES."""
    limit = MAX_JSON_BYTES if limit is None else limit
    try:
        st = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise Error(f"{name}: a link to {os.readlink(path)}, which does not exist") from None
        raise NotCovered(f"no {name}") from None
    except OSError as e:
        raise Error(f"{name}: cannot be read ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise Error(f"{name}: is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise Error(f"{name}: is not a regular file (a FIFO, device or socket); write a plain file")
    if st.st_size > limit:
        raise Error(f"{name}: {st.st_size} bytes, more than the {limit} a JSON file of the exchange may hold")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise Error(f"{name}: cannot be read ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Error(f"{name}: not UTF-8 text (byte {e.start} is {data[e.start : e.start + 1]!r})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        cut = " (the file ends there: cut short?)" if e.pos >= len(text.rstrip()) else ""
        raise Error(f"{name}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}{cut}") from None
    except RecursionError:
        raise Error(f"{name}: JSON nested too deep to read") from None
    except ValueError as e:  # e.g. an integer of more digits than Python reads
        raise Error(f"{name}: not valid JSON ({e})") from None


def read_port_json(path: Path) -> dict:
    """OUT/port.json, checked: every key known, every value one the table of docs/exchange.md lists."""
    if not path.exists() and not path.is_symlink():
        return {}
    try:
        meta = read_json(path, "port.json", limit=2**20)
    except NotCovered:
        return {}
    if not isinstance(meta, dict):
        raise Error(f"port.json: must hold a JSON object, got {type(meta).__name__}")
    for key in sorted(meta):
        if key not in PORT_KEYS:
            raise Error(f"port.json: unknown key {key!r}{_nearest(key, PORT_KEYS)}; known: {list(PORT_KEYS)}")
    for key in ("name", "version", "device"):
        if key in meta and not isinstance(meta[key], str):
            raise Error(f"port.json key {key!r}: expected a string, got {meta[key]!r}")
    if "dtype" in meta and meta["dtype"] not in DTYPES:
        raise Error(f"port.json key 'dtype': {meta['dtype']!r} is not a precision; expected one of {DTYPES}")
    if "profile" in meta and not isinstance(meta["profile"], dict):
        raise Error(
            f"port.json key 'profile': expected an object {{stage pattern: precision}}, got {meta['profile']!r}"
        )
    if "exchange" in meta and (type(meta["exchange"]) is not int or meta["exchange"] != EXCHANGE_VERSION):
        raise Error(f"port.json key 'exchange': {meta['exchange']!r} is not {EXCHANGE_VERSION} (the integer version)")
    for key in conversions.CONVENTIONS:
        if key in meta:
            conversions.check_convention(key, meta[key], f"port.json key {key!r}")
    return meta


class FilesAdapter(Adapter):
    name = "files"

    def __init__(self, folder: str, *, dtype: str | None = None):
        if not str(folder).strip():
            raise ValueError("files target: no folder given; write --target files:OUT")
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

    def _name(self, path: Path) -> str:
        """A port's file as the messages name it: its path under OUT."""
        try:
            return str(path.relative_to(self.folder))
        except ValueError:
            return str(path)

    def _json(self, name: str):
        p = self.case_dir / name
        return read_json(p, self._name(p))

    def _tensors(self, path: Path) -> dict:
        try:
            return load_file(str(path))
        except Exception as e:
            raise Error(f"{self._name(path)}: not a readable safetensors file ({e})") from None

    def outputs(self) -> dict:
        """outputs.safetensors (the batch layout), read once per case."""
        if self._outputs is None:
            p = self.case_dir / "outputs.safetensors"
            if not p.exists():
                raise NotCovered(f"no {self._name(p)}")
            self._outputs = self._tensors(p)
        return self._outputs

    def run_items(self, stage, items, *, tokenizer_dir=None):
        got = self._json(f"{stage}.json")
        if not isinstance(got, dict) or "items" not in got:
            raise Error(f'{self._name(self.case_dir / (stage + ".json"))} must hold {{"items": [...]}}')
        return got["items"]

    def build_inputs(self, conversations, images, videos, *, tokenizer_dir, options):
        out = {k[len("preprocess.") :]: v for k, v in self.outputs().items() if k.startswith("preprocess.")}
        if not out:
            raise NotCovered("outputs.safetensors holds no preprocess.* keys")
        return out

    def run(self, inputs, *, capture):
        """Every stage of `capture` the files give, each converted on its own: a value that does not fit
        is that stage's Error (a value, not raised), so the other stages are judged as usual. A key
        that is no stage of the case is the Error of the stage it most likely meant."""
        if self.conventions["outputs"] == "rows":
            return self._from_rows(inputs, capture)
        return self._from_batch(inputs, capture)

    def _widths(self) -> dict:
        """The trailing size of each model stage, from config.json: C, Cv, V (None where unknown)."""
        cfg = self.config
        if cfg is None:
            return {}
        last = "last" if self.conventions["logits"] == "last" else "all"
        return {
            "vision.patch_embed": (cfg.vision.hidden_size, "Cv, vision_config.hidden_size"),
            "vision.block": (cfg.vision.hidden_size, "Cv, vision_config.hidden_size"),
            "vision.merger": (cfg.hidden_size, "C, hidden_size"),
            "text": (cfg.hidden_size, "C, hidden_size"),
            "logits": (cfg.vocab_size, f"V, vocab_size; logits {last!r}"),
        }

    def _width(self, stage: str):
        w = self._widths()
        key = "vision.block" if stage.startswith("vision.block.") else "text" if stage.startswith("text.") else stage
        return w.get(key, (None, ""))

    def _unknown_keys(self, files: dict, capture, extra=()) -> dict:
        """{stage: Error} for each key of each file that is no stage of the case: on the absent stage the
        key most likely meant, else on the nearest stage name (a key the harness cannot place leaves
        the file's meaning in doubt). files: {file name: its tensors}; extra: keys allowed too."""
        errors: dict = {}
        for name, tensors in files.items():
            for key in sorted(tensors):
                if key in capture or key in extra or (stages.is_known(key) and tensors[key].numel() == 0):
                    continue  # e.g. vision keys with 0 rows in a text-only case (docs/exchange.md)
                absent = [s for s in capture if s not in tensors]
                close = difflib.get_close_matches(key, absent, n=1, cutoff=0.6)
                if close:
                    stage, why = close[0], f"did you mean {close[0]}?"
                else:
                    near = difflib.get_close_matches(key, list(capture), n=1, cutoff=0.0) or list(capture)[:1]
                    if not near:
                        continue
                    stage = near[0]
                    why = f"no stage of this case is named so; reported on the nearest, {stage}, which is not judged"
                errors.setdefault(stage, []).append(f"unknown stage key {key!r} in {name} ({why})")
        return {stage: Error("; ".join(said)) for stage, said in errors.items()}

    def _from_batch(self, inputs, capture) -> dict:
        """outputs.safetensors: every stage already in the batch layout, up to the declared conventions."""
        got, c, mask = self.outputs(), self.conventions, inputs["attention_mask"]
        where = self._name(self.case_dir / "outputs.safetensors")
        out = self._unknown_keys({where: got}, capture, extra={k for k in got if k.startswith("preprocess.")})
        for stage in capture:
            if stage not in got or stage in out:
                continue
            at = f"{where} key {stage!r}"
            v = got[stage]
            try:
                if stage == "text.position_ids":
                    if c["positions"] != "sections":
                        raise Error(
                            f"{at}: positions {c['positions']!r} is a per-row layout; declare outputs 'rows' "
                            f"or write [3, B, L] sections"
                        )
                    out[stage] = v
                elif stage == "text.rope_deltas":
                    out[stage] = conversions.rope_deltas_padded(v, c["rope_deltas"], mask, at)
                elif stage == "logits" and c["logits"] == "last":
                    out[stage], out[stage + GIVEN] = conversions.place_last_logits(
                        conversions.to_float32(v, at), mask, at
                    )
                elif stage.startswith("vision.block.") and c["vision_block_order"] == "window":
                    out[stage] = self._unpermute(conversions.to_float32(v, at), _vision_grid(inputs), at)
                else:
                    out[stage] = conversions.to_float32(v, at)
            except Error as e:
                out[stage] = e
        return out

    def _from_rows(self, inputs, capture) -> dict:
        """rows/<i>.safetensors: row i alone, its real tokens only (docs/exchange.md, "outputs": "rows")."""
        mask = inputs["attention_mask"]
        paths = [self.case_dir / "rows" / f"{i}.safetensors" for i in range(mask.shape[0])]
        names = [self._name(p) for p in paths]
        missing = [n for p, n in zip(paths, names) if not p.exists()]
        if len(missing) == len(paths):
            raise NotCovered(f"no {self._name(paths[0].parent)}/<row>.safetensors")
        if missing:
            raise Error(f"port.json declares outputs 'rows' but {missing} are missing (B = {len(paths)} rows)")
        rows = [self._tensors(p) for p in paths]  # an unreadable file: every stage it feeds is an error
        out = self._unknown_keys(dict(zip(names, rows)), capture)
        for stage in capture:
            if stage in out or not any(stage in r for r in rows):
                continue
            try:
                out |= self._row_stage(
                    stage, [r.get(stage) for r in rows], [f"{n} key {stage!r}" for n in names], inputs
                )
            except Error as e:
                out[stage] = e
        return out

    def _row_stage(self, stage, vals, at, inputs) -> dict:
        """One stage's per-row values (None where a row's file leaves it out) -> {stage: canonical value}."""
        mask, c = inputs["attention_mask"], self.conventions
        width, meaning = self._width(stage)
        said = f"; {meaning} {width}" if width is not None else ""
        if stage.startswith("vision."):
            m = self.config.vision.spatial_merge_size
            items = {
                kind: conversions.vision_row_items(inputs["input_ids"], inputs.get(grid), token, m)
                for kind, grid, token in (
                    ("image", "image_grid_thw", self.config.image_token_id),
                    ("video", "video_grid_thw", self.config.video_token_id),
                )
            }
            vals = [None if v is None else conversions.to_float32(v, w) for v, w in zip(vals, at)]
            if stage.startswith("vision.block.") and c["vision_block_order"] == "window":
                vals = [
                    None if v is None else self._unpermute(v, _row_grid(inputs, items, i), at[i])
                    for i, v in enumerate(vals)
                ]
            per = m * m if stage == "vision.merger" else 1
            value = conversions.place_vision_rows(
                vals,
                items["image"],
                items["video"],
                inputs.get("image_grid_thw"),
                inputs.get("video_grid_thw"),
                at,
                per=per,
                width=width,
                meaning=said,
            )
            return {stage: value}
        absent = [w for v, w in zip(vals, at) if v is None]
        if absent:
            raise Error(f"{absent[0]}: absent, while other rows give {stage}")
        if stage == "text.position_ids":
            return {stage: conversions.place_positions(vals, c["positions"], mask, at)}
        if stage == "text.rope_deltas":
            for v, w in zip(vals, at):
                if v.numel() != 1:
                    raise Error(f"{w}: expected shape [1] (the row's delta), got {list(v.shape)}")
            deltas = torch.stack([v.reshape(()) for v in vals])
            where = f"{self._name(self.case_dir / 'rows')}/*.safetensors key {stage!r}"
            return {stage: conversions.rope_deltas_padded(deltas, c["rope_deltas"], mask, where)}
        vals = [conversions.to_float32(v, w) for v, w in zip(vals, at)]
        if stage == "logits" and c["logits"] == "last":
            for v, w in zip(vals, at):
                if v.dim() != 1 or (width is not None and v.shape[0] != width):
                    want = f"[{width}]" if width is not None else "[V]"
                    raise Error(
                        f"{w}: expected shape {want} (logits 'last': the row's last prompt token{said}), "
                        f"got {list(v.shape)}"
                    )
            full, given = conversions.place_last_logits(torch.stack(vals), mask, at[0])
            return {stage: full, stage + GIVEN: given}
        return {stage: conversions.place_rows(vals, mask, at, width=width, meaning=said)}

    def _unpermute(self, x, grid, where):
        v = self.config.vision
        return conversions.unpermute_windows(
            x,
            grid,
            window_size=v.window_size,
            patch_size=v.patch_size,
            merge_size=v.spatial_merge_size,
            where=where,
            width=v.hidden_size,
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
        """generate.tokens.json -> tokens int64 [B, n], n the longest row, rows that stopped filled with
        the pad id after their eos (the golden's own layout); top-k tables the same with steps of pad ids / 0.0."""
        got = self._json("generate.tokens.json")
        where = self._name(self.case_dir / "generate.tokens.json")
        if not isinstance(got, dict) or not isinstance(got.get("tokens"), list):
            raise Error(f'{where} must hold {{"tokens": [[ids] per row], ...}}')
        unknown = sorted(set(got) - {"tokens", "topk", "topk_logprobs"})
        if unknown:
            raise Error(f"{where}: unknown key {unknown[0]!r}{_nearest(unknown[0], ('topk', 'topk_logprobs'))}")
        rows = inputs["attention_mask"].shape[0]
        if len(got["tokens"]) != rows:
            raise Error(f"{where} key 'tokens': {len(got['tokens'])} rows, the batch has {rows}")
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        pad = self.config.pad_token_id if self.config else eos[0]
        vocab = self.config.vocab_size if self.config else None
        out = {"tokens": conversions.pad_generated(got["tokens"], eos, pad, f"{where} key 'tokens'", vocab_size=vocab)}
        for key, fill in (("topk", pad), ("topk_logprobs", 0.0)):  # after a row's eos: its pick (pad), never judged
            if got.get(key) is not None:
                table = got[key]
                if not isinstance(table, list) or len(table) != rows:
                    raise Error(f"{where} key {key!r}: expected {rows} rows of per-step lists, got {_short(table)}")
                out[key] = conversions.pad_generated(
                    table, eos, pad, f"{where} key {key!r}", fill=fill, vocab_size=vocab
                )
        return {"tokens": out["tokens"], "topk": out.get("topk"), "topk_logprobs": out.get("topk_logprobs")}


def _short(x) -> str:
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


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


def _write_case(case, info: dict, d: Path) -> None:
    """The files of one case into folder d (layout in the module docstring)."""
    from ..fixtures import dump_json

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
    (d / "case.json").write_bytes(dump_json(info))  # last: a folder with case.json is complete


def _staged(out: Path, name: str) -> Path:
    """A fresh temporary folder beside out/<name>, holding what is there already (a port's own files
    stay: only the files the export names are overwritten)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=out))
    if (out / name).is_dir():
        shutil.copytree(out / name, tmp, symlinks=True, dirs_exist_ok=True)
    return tmp


def _swap_in(staged: dict, out: Path) -> None:
    """Each complete temporary folder renamed to its case's name (the old folder moved aside, then removed)."""
    for name, tmp in staged.items():
        old = out / name
        aside = None
        if old.is_dir():
            aside = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".old", dir=out))
            os.rename(old, aside / name)
        os.rename(tmp, old)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def export_inputs(case_paths, out: str | Path) -> list[str]:
    """Write the inputs of every case under `out` (layout in the module docstring); returns the case names.
    Everything is checked and every case written into a temporary folder beside its own before any is
    renamed into place, order.json last: a failure leaves `out` as it was (docs/exchange.md)."""
    from ..fixtures import dump_json, load_case

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--export-inputs {out}: exists and is not a folder")
    cases = [load_case(path) for path in case_paths]  # every case checked before anything is written
    for case in cases:
        if case.bad_files:
            raise ValueError(f"case {case.name}: cannot export, bad files {case.bad_files}")
    infos = [case_info(case) for case in cases]  # prompts rendered, files found: before anything is written
    names = [case.name for case in cases]
    # state.repeat: the model cases once more, in reverse order, as cases of their own; a port runs
    # every folder of order.json in that order in ONE process, so what it keeps between requests shows
    model = [n for n, c in zip(names, cases) if c.kind == "model"]
    # state.chunked: each model case with a generation once more, to be generated with its prompt prefilled
    # prefill_chunk tokens at a time (the chunk the harness picks: a boundary inside the first vision span)
    chunks = {name: _chunk_of(case) for name, case in zip(names, cases) if chunked_applies(case)}
    chunks = {name: picked for name, picked in chunks.items() if picked is not None}
    folders = names + [n + REPEAT_SUFFIX for n in reversed(model)] + [n + CHUNKED_SUFFIX for n in chunks]
    for name in folders + ["order.json"]:
        there = out / name
        if name != "order.json" and there.exists() and not there.is_dir():
            raise ValueError(f"--export-inputs: {there} exists and is not a folder")
        if name == "order.json" and there.is_dir():
            raise ValueError(f"--export-inputs: {there} is a folder")
    out.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}
    try:
        by_name = dict(zip(names, zip(cases, infos)))
        for name in folders:
            staged[name] = _staged(out, name)
            base = name.removesuffix(REPEAT_SUFFIX).removesuffix(CHUNKED_SUFFIX)
            case, info = by_name[base]
            if name.endswith(REPEAT_SUFFIX):
                info = {**info, "case": name, "repeat_of": base}
            elif name.endswith(CHUNKED_SUFFIX):
                chunk, where = chunks[base]
                info = {**info, "case": name, "chunked_of": base, "prefill_chunk": chunk, "prefill_chunks": where}
                info["stages"] = ["generate.tokens"]
            _write_case(case, info, staged[name])
        order = out / ".order.json.partial"
        order.write_bytes(dump_json({"run_in_one_process_in_this_order": folders}))
    except BaseException as e:
        for tmp in staged.values():
            shutil.rmtree(tmp, ignore_errors=True)
        (out / ".order.json.partial").unlink(missing_ok=True)
        if isinstance(e, OSError) and staged:
            name, tmp = list(staged.items())[-1]
            what = str(e.filename or "").replace(str(tmp), str(out / name))
            raise ValueError(
                f"--export-inputs: cannot write {what or out / name}: {e.strerror}; {out} is unchanged"
            ) from None
        raise
    _swap_in(staged, out)
    os.replace(order, out / "order.json")
    return names


def _chunk_of(case):
    """(prefill chunk, where its boundaries fall) for a model case, as the case runner picks it."""
    ck = case.checkpoint()
    if not ck or not (ck / "config.json").is_file():
        return None
    return chunk_for(case.tensors(case.manifest["inputs"])["input_ids"], Qwen25VLConfig.from_file(ck / "config.json"))

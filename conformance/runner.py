"""Run fixture cases against an adapter and judge every stage.

For each case: check the fixture files (sha256), then
  exact case   call each fn.* stage's function on its item table and compare item by item;
  model case   build the inputs from the request (preprocess.*), run the model end to end with
               every stage captured (vision.*, text.*, logits), generate greedily (generate.tokens),
               and run the first failing float stage again teacher-forced (fed the golden output of
               the stage before it) to tell "this stage is wrong" from "drift from upstream".
Every stage gets a status: pass, fail, error (the port raised, hung, returned NaN or a wrong shape or
dtype, or the fixture is bad), not_covered (the port does not expose it), and after the port's
expectations file: xfail (a known, explained divergence) or xpass. One stage's trouble never stops
the others.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..spec.checkpoint import checkpoint_files, to_hub_key
from ..spec.config import Qwen25VLConfig
from . import compare, stages
from .adapters.base import Adapter, NotCovered
from .fixtures import FixtureError, check_files, find_cases, load_case
from .supervisor import PortCrashed, PortFailed, SupervisedAdapter, default_memory_limit, describe_exception

BAD = ("fail", "error")


@dataclass
class StageResult:
    case: str
    stage: str
    status: str  # pass | fail | error | not_covered | xfail | xpass
    metric: str = ""
    tolerance: str = ""
    where: str = ""
    mode: str = ""  # items | e2e | teacher
    note: str = ""
    seconds: float = 0.0
    values: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class StageTimeout(BaseException):
    """A port call ran past the per-stage timeout (BaseException so a port's `except Exception` cannot eat it)."""


def call_with_timeout(fn, timeout: float | None):
    """fn() with a wall-clock limit. In the main thread SIGALRM interrupts Python code; elsewhere the
    call runs in a daemon thread that is abandoned when it overruns."""
    if not timeout or timeout <= 0:
        return fn()
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM"):

        def on_alarm(signum, frame):
            raise StageTimeout(f"timed out after {timeout:g} s")

        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed back to the caller below
            box["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        raise StageTimeout(f"timed out after {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _describe_exc(e: BaseException) -> str:
    if isinstance(e, (StageTimeout, PortCrashed, PortFailed)):
        return str(e)  # already says what happened, where
    return describe_exception(e)


# ------------------------------------------------------------------------- targets


def make_adapter(target: str, *, dtype: str | None = None, device: str | None = None) -> Adapter:
    """'impl' | 'spec' | 'transformers' | 'files:DIR' | 'package.module:Class'."""
    if target.startswith("files:"):
        from .adapters.files import FilesAdapter

        if device is not None:
            raise ValueError(f"target {target!r}: a files target reads a port's outputs; --device does not apply")
        return FilesAdapter(target[len("files:") :], dtype=dtype)
    builtin = {
        "impl": ("qwen25vl.conformance.adapters.impl", "ImplAdapter"),
        "spec": ("qwen25vl.conformance.adapters.spec", "SpecAdapter"),
        "transformers": ("qwen25vl.conformance.adapters.transformers", "TransformersAdapter"),
    }
    if target in builtin:
        mod, cls = builtin[target]
    elif ":" in target:
        mod, cls = target.split(":", 1)
    else:
        raise ValueError(f"target {target!r} is not one of impl, spec, transformers, files:DIR, module:Class")
    try:
        try:
            module = importlib.import_module(mod)
        except ImportError:
            import os
            import sys

            if os.getcwd() in sys.path:
                raise
            sys.path.insert(0, os.getcwd())  # a port's adapter module in the current folder, as `python -m` finds it
            module = importlib.import_module(mod)
        klass = getattr(module, cls)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"target {target!r}: cannot import {mod}.{cls}: {e}") from None
    if not isinstance(klass, type) or not issubclass(klass, Adapter):
        raise ValueError(
            f"target {target!r}: {mod}.{cls} is not a subclass of qwen25vl.conformance.adapters.base.Adapter"
        )
    kwargs = {k: v for k, v in (("dtype", dtype), ("device", device)) if v is not None}
    try:
        params = inspect.signature(klass).parameters
    except (TypeError, ValueError):  # a signature Python cannot read: let the call say
        params = None
    takes_any = params is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for k in kwargs:
        if not takes_any and k not in params:
            raise ValueError(
                f"target {target!r}: --{k} was given but {cls}() takes no {k!r} argument "
                f"(drop --{k}, or add a {k}= parameter to its constructor)"
            )
    try:
        return klass(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"target {target!r}: {cls}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: {e}"
        ) from None


# ------------------------------------------------------------------------- expectations


def load_expectations(path: str | Path | None) -> list[dict]:
    """An expectations file: {"port": ..., "expectations": [{"case": regex, "stage": regex,
    "status": "fail"|"error"|"not_covered", "reason": ...}]}; regexes match the whole name."""
    if not path:
        return []
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"expectations file {path}: {e}") from None
    out = data.get("expectations", []) if isinstance(data, dict) else None
    if not isinstance(out, list):
        raise ValueError(f'expectations file {path}: expected {{"expectations": [...]}}')
    for k, e in enumerate(out):
        for key in ("case", "stage", "reason"):
            if key not in e:
                raise ValueError(f"{path}: expectation {k} lacks {key!r}")
    return out


def apply_expectations(results: list[StageResult], expectations: list[dict]) -> None:
    """Known divergences become xfail (with their reason); an expected failure that passed is xpass."""
    for r in results:
        for e in expectations:
            if re.fullmatch(e["case"], r.case) and re.fullmatch(e["stage"], r.stage):
                want = e.get("status", "fail")
                want = [want] if isinstance(want, str) else want
                if r.status in BAD and r.status in want:
                    r.status, r.note = "xfail", f"expected: {e['reason']}"
                elif r.status == "not_covered" and "not_covered" in want:
                    r.note = f"known: {e['reason']}"
                elif r.status == "pass":
                    r.status, r.note = "xpass", f"expected to fail ({e['reason']}) but passed"
                break


# ------------------------------------------------------------------------- one case


def _resolve(obj, tensors):
    """{"$tensor": name} -> the tensor `name` of the case's tensors file, recursively."""
    if isinstance(obj, dict):
        if set(obj) == {"$tensor"}:
            return tensors[obj["$tensor"]]
        return {k: _resolve(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v, tensors) for v in obj]
    return obj


def _rope_padding_zeroed(inputs: dict, value):
    """Positions at left padding are never used (masked in attention); ports fill them with 0 or 1.
    Zero them on both sides before the exact comparison."""
    if not isinstance(value, dict) or "position_ids" not in value or inputs.get("attention_mask") is None:
        return value
    try:
        pos = torch.as_tensor(value["position_ids"]).clone()
        mask = torch.as_tensor(inputs["attention_mask"]).bool()
        pos[:, ~mask] = 0
    except (TypeError, ValueError, RuntimeError, IndexError):
        return value  # a malformed answer is judged as it is
    return {**value, "position_ids": pos}


NORMALIZE = {"fn.rope_index": _rope_padding_zeroed}

_CHECKPOINT_OK: dict[str, str | None] = {}


def checkpoint_problem(folder: Path) -> str | None:
    """The checkpoint folder's own manifest.json lists the sha256 of its files; None when they match."""
    key = str(folder)
    if key not in _CHECKPOINT_OK:
        problem = None
        try:
            with open(folder / "manifest.json", encoding="utf-8") as f:
                bad = check_files(folder, json.load(f)["files"])
        except (OSError, ValueError, KeyError) as e:
            problem = f"checkpoint {folder}: cannot read its manifest.json ({e})"
        else:
            name, why = next(iter(bad.items()), (None, None))
            if why == "missing":
                problem = f"checkpoint file {folder / name} is missing"
            elif why:
                problem = f"checkpoint file {folder / name}: sha256 mismatch (tampered or stale)"
        _CHECKPOINT_OK[key] = problem
    return _CHECKPOINT_OK[key]


class CaseRunner:
    def __init__(
        self, adapter: Adapter, *, timeout: float | None = 120.0, teacher: str = "first", only_stages: str | None = None
    ):
        self.adapter = adapter
        self.timeout = timeout
        self.teacher = teacher  # "first" (the first failing float stage), "all" or "none"
        self.only = re.compile(only_stages) if only_stages else None
        self._prepared: str | None = None

    @property
    def dtype(self) -> str:
        return str(self.adapter.describe().get("dtype", "float32")).replace("torch.", "")

    def run(self, path) -> list[StageResult]:
        try:
            case = load_case(path)
        except FixtureError as e:
            return [StageResult(Path(path).name, "manifest", "error", str(e))]
        try:
            self.adapter.begin_case(case)
        except Exception as e:
            return [StageResult(case.name, s, "error", _describe_exc(e)) for s in case.stages]
        results = self._exact(case) if case.kind == "exact" else self._model(case)
        return [r for r in results if self._wanted(r.stage)]

    def _wanted(self, stage: str) -> bool:
        return self.only is None or bool(self.only.search(stage))

    # exact cases
    def _exact(self, case) -> list[StageResult]:
        out = []
        tok = case.manifest.get("tokenizer")
        tokenizer_dir = str((case.path / tok).resolve()) if tok else None
        for stage in sorted(case.stages, key=stages.order_key):
            entry = case.stages[stage]
            if not self._wanted(stage):
                continue
            t0 = time.perf_counter()
            problem = case.stage_problem(stage)
            if problem:
                out.append(StageResult(case.name, stage, "error", problem, mode="items"))
                continue
            tensors = case.tensors(entry["tensors"]) if entry.get("tensors") else {}
            table = _resolve(case.json(entry["items"])["items"], tensors)
            inputs = [it["inputs"] for it in table]
            labels = [it.get("label", "") for it in table]
            expected = [it["expected"] for it in table]
            try:
                got = call_with_timeout(
                    lambda: self.adapter.run_items(stage, inputs, tokenizer_dir=tokenizer_dir), self.timeout
                )
            except NotCovered as e:
                out.append(StageResult(case.name, stage, "not_covered", str(e), mode="items"))
                continue
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt):
                    raise
                out.append(
                    StageResult(
                        case.name, stage, "error", _describe_exc(e), mode="items", seconds=time.perf_counter() - t0
                    )
                )
                continue
            if stage in NORMALIZE:
                expected = [NORMALIZE[stage](i, e) for i, e in zip(inputs, expected)]
                got = [NORMALIZE[stage](i, g) for i, g in zip(inputs, got)] if isinstance(got, list) else got
            tol = {"pixels": compare.PIXELS_MAX_ABS, "cos_sin": compare.COS_SIN_MAX_ABS}.get(entry["tolerance"], 0.0)
            v = compare.exact_items(expected, got, labels, tol=tol)
            out.append(
                StageResult(
                    case.name,
                    stage,
                    v.status,
                    v.metric,
                    v.tolerance,
                    v.where,
                    "items",
                    seconds=time.perf_counter() - t0,
                    values=v.values,
                )
            )
        return out

    # model cases
    def _model(self, case) -> list[StageResult]:
        out: list[StageResult] = []
        name = case.name
        ck = case.checkpoint()
        ck_problem = checkpoint_problem(ck) if ck else "the manifest names no checkpoint"
        req_problem = next(
            (
                f"fixture file {f}: {case.bad_files[f]}"
                for f in (case.manifest["request"], case.manifest["inputs"])
                if f in case.bad_files
            ),
            None,
        )
        if req_problem or ck_problem:
            return [StageResult(name, s, "error", req_problem or ck_problem) for s in case.stages if self._wanted(s)]
        request = case.json(case.manifest["request"])
        inputs = dict(case.tensors(case.manifest["inputs"]))
        golden = case.tensors("golden.safetensors") if "golden.safetensors" not in case.bad_files else {}
        mask = inputs["attention_mask"]
        names = [s for s in case.stages if self._wanted(s)]

        # preprocessing, from the request (conversation + media files)
        pre = [s for s in names if s.startswith("preprocess.")]
        if pre:
            out += self._preprocess(case, request, inputs, pre)

        # the model, end to end
        model_names = [s for s in names if not s.startswith("preprocess.") and s != "generate.tokens"]
        if model_names or "generate.tokens" in names:
            try:
                self._prepare(ck)
            except NotCovered as e:
                return out + [StageResult(name, s, "not_covered", f"prepare: {e}") for s in names if s not in pre]
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt):
                    raise
                return out + [
                    StageResult(name, s, "error", f"prepare: {_describe_exc(e)}") for s in names if s not in pre
                ]
        if model_names:
            capture = [s for s in case.stages if stages.is_known(s) and not s.startswith(("preprocess.", "generate."))]
            t0 = time.perf_counter()
            captured, failure = None, None
            try:
                captured = call_with_timeout(
                    lambda: self.adapter.run(dict(inputs), capture=list(capture)), self.timeout
                )
                if not isinstance(captured, dict):
                    failure = ("error", f"run returned {type(captured).__name__}, not a dict of stage tensors")
            except NotCovered as e:
                failure = ("not_covered", f"run: {e}")
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt):
                    raise
                failure = ("error", _describe_exc(e))
            secs = time.perf_counter() - t0
            for s in model_names:
                if failure:
                    out.append(StageResult(name, s, failure[0], failure[1], mode="e2e"))
                    continue
                problem = case.stage_problem(s)
                if problem:
                    out.append(StageResult(name, s, "error", problem, mode="e2e"))
                elif s not in captured or captured[s] is None:
                    out.append(StageResult(name, s, "not_covered", "the port does not capture this stage", mode="e2e"))
                else:
                    v = self._judge(case, s, golden, captured[s], mask, ck)
                    where = v.where
                    if v.status in BAD and v.values.get("worst") is not None:
                        where += locate(s, v.values["worst"], inputs)
                    out.append(
                        StageResult(
                            name, s, v.status, v.metric, v.tolerance, where, "e2e", seconds=secs, values=v.values
                        )
                    )
                    secs = 0.0
            self._teacher_forced(case, out, inputs, golden, mask, ck)

        if "generate.tokens" in names:
            out.append(self._generate(case, request, inputs))
        return sorted(out, key=lambda r: (stages.order_key(r.stage), r.mode == "teacher"))

    def _prepare(self, ck: Path) -> None:
        if self._prepared != str(ck):
            call_with_timeout(
                lambda: self.adapter.prepare(str(ck), dtype=self.dtype, device=self.adapter.device), self.timeout
            )
            self._prepared = str(ck)

    def _preprocess(self, case, request, inputs, names) -> list[StageResult]:
        media = case.path
        images = [str(media / p) for p in request.get("images", [])]
        videos = [{**v, "frames": [str(media / p) for p in v["frames"]]} for v in request.get("videos", [])]
        t0 = time.perf_counter()
        try:
            got = call_with_timeout(
                lambda: self.adapter.build_inputs(
                    request["conversations"],
                    images,
                    videos,
                    tokenizer_dir=str(case.checkpoint()),
                    options=request.get("options", {}),
                ),
                self.timeout,
            )
        except NotCovered as e:
            return [StageResult(case.name, s, "not_covered", f"build_inputs: {e}", mode="e2e") for s in names]
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            return [StageResult(case.name, s, "error", _describe_exc(e), mode="e2e") for s in names]
        secs = time.perf_counter() - t0
        out = []
        for s in names:
            key = s[len("preprocess.") :]
            problem = case.stage_problem(s)
            if problem:
                out.append(StageResult(case.name, s, "error", problem, mode="e2e"))
                continue
            g, x = inputs.get(key), got.get(key) if isinstance(got, dict) else None
            if g is None:
                v = (
                    compare.Verdict("pass", "absent on both sides", "absent")
                    if x is None
                    else compare.Verdict("fail", f"the port returned {key}, the spec has none", "absent")
                )
            elif x is None:
                v = compare.Verdict("fail", f"the port returned no {key}", "equal")
            elif key == "second_per_grid_ts":
                v = compare.max_abs(g, torch.as_tensor(x, dtype=torch.float64), limit=1e-9)
            elif stages.info(s).tolerance == "pixels":
                v = compare.max_abs(g, x, limit=compare.PIXELS_MAX_ABS)
            else:
                v = compare.exact_tensor(g, x)
            out.append(
                StageResult(
                    case.name, s, v.status, v.metric, v.tolerance, v.where, "e2e", seconds=secs, values=v.values
                )
            )
            secs = 0.0
        return out

    def _judge(self, case, stage, golden, got, mask, ck, *, control_key: str = "control") -> compare.Verdict:
        entry = case.stages[stage]
        tol = entry["tolerance"]
        if isinstance(got, torch.Tensor) and got.is_floating_point() and tol == "exact":
            return compare.Verdict("error", f"wrong dtype: {got.dtype} for an integer stage", "equal")
        try:  # logits are derived: stored as text.norm; logits = text.norm @ lm_head^T (FORMAT.md)
            g = golden_logits(golden["text.norm"], ck) if stage == "logits" else golden[stage]
        except Exception as e:
            return compare.Verdict("error", f"golden value unreadable: {e}")
        if tol == "exact":
            m = mask[None] if stage == "text.position_ids" else None
            return compare.exact_tensor(g, got, mask=m)
        if tol == "logits":
            return compare.logits(g, got, control=entry.get(control_key), dtype=self.dtype, mask=mask)
        m = mask if stage.startswith("text.") else None
        return compare.floats(g, got, control=entry.get(control_key), dtype=self.dtype, mask=m)

    def _teacher_forced(self, case, out, inputs, golden, mask, ck) -> None:
        if self.teacher == "none":
            return
        depth = int(case.manifest["depth"]["vision"])
        layers = int(case.manifest["depth"]["text"])
        float_bad = sorted(
            (
                r
                for r in out
                if r.mode == "e2e"
                and r.status in BAD
                and case.stages.get(r.stage, {}).get("tolerance") in ("float", "logits")
            ),
            key=lambda r: stages.order_key(r.stage),
        )
        todo = (
            [
                r
                for r in out
                if r.mode == "e2e"
                and r.stage in case.stages
                and case.stages[r.stage]["tolerance"] in ("float", "logits")
            ]
            if self.teacher == "all"
            else float_bad[:1]
        )
        for r in todo:
            prev = stages.previous(r.stage, depth, layers)
            feeds = dict(inputs)
            if prev is not None:
                feeds["hidden"] = golden[prev]
            feeds["position_ids"] = golden.get("text.position_ids")
            try:
                got = call_with_timeout(lambda: self.adapter.run_stage(r.stage, feeds), self.timeout)
            except NotCovered:
                if self.teacher == "all":
                    out.append(StageResult(case.name, r.stage, "not_covered", "run_stage", mode="teacher"))
                continue
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt):
                    raise
                v = compare.Verdict("error", _describe_exc(e))
            else:
                v = self._judge(case, r.stage, golden, got, mask, ck, control_key="control_teacher")
            if self.teacher == "all":
                out.append(
                    StageResult(
                        case.name, r.stage, v.status, v.metric, v.tolerance, v.where, "teacher", values=v.values
                    )
                )
            else:
                verdict = (
                    "the stage itself is wrong: it fails fed with the golden input too"
                    if v.status in BAD
                    else "drift from upstream: fed the golden input it passes"
                )
                r.note = f"teacher-forced: {v.status} ({v.metric}); {verdict}"

    def _generate(self, case, request, inputs) -> StageResult:
        s = "generate.tokens"
        problem = case.stage_problem(s)
        if problem:
            return StageResult(case.name, s, "error", problem, mode="e2e")
        gen = case.json("generate.json")
        g_tokens = torch.tensor(gen["tokens"], dtype=torch.int64)
        g_topk = torch.tensor(gen["topk"], dtype=torch.int64)
        t0 = time.perf_counter()
        try:
            got = call_with_timeout(
                lambda: self.adapter.generate(
                    dict(inputs), max_new_tokens=int(gen["max_new_tokens"]), eos_token_id=gen["eos_token_id"]
                ),
                self.timeout,
            )
        except NotCovered as e:
            return StageResult(case.name, s, "not_covered", f"generate: {e}", mode="e2e")
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            return StageResult(case.name, s, "error", _describe_exc(e), mode="e2e")
        topk = None
        if isinstance(got, tuple):
            got, topk = got
        v = compare.tokens(g_tokens, g_topk, got, topk)
        return StageResult(
            case.name,
            s,
            v.status,
            v.metric,
            v.tolerance,
            v.where,
            "e2e",
            seconds=time.perf_counter() - t0,
            values=v.values,
        )


def locate(stage: str, worst: list[int], inputs: dict) -> str:
    """Say what the worst coordinate is: for a vision stage the item, frame, patch (row, col) and
    whether it sits on a window edge; for a text stage the token and whether it is a vision pad."""
    try:
        if stage.startswith("vision.") and stage != "vision.merger":
            from ..spec.windows import vision_rotary_positions

            grids = [inputs[k] for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None]
            grid = torch.cat(grids)
            p = worst[0]
            sizes = (grid[:, 0] * grid[:, 1] * grid[:, 2]).tolist()
            item, start = 0, 0
            while p >= start + sizes[item]:
                start += sizes[item]
                item += 1
            t, h, w = grid[item].tolist()
            frame = (p - start) // (h * w)
            row, col = vision_rotary_positions(grid[item : item + 1])[p - start].tolist()
            edge = row % 8 in (0, 7) or col % 8 in (0, 7) or row == h - 1 or col == w - 1
            return f" = item {item} frame {frame} patch (row {row}, col {col}) of a {h}x{w} grid" + (
                ", on a window edge" if edge else ", inside a window"
            )
        if stage.startswith("text.") or stage == "logits":
            b, tok = worst[0], worst[1]
            tid = int(inputs["input_ids"][b, tok])
            kind = {151655: "an image pad", 151656: "a video pad"}.get(tid, "a text token")
            return f" = row {b} token {tok} (id {tid}, {kind})"
    except (IndexError, KeyError, ValueError, RuntimeError):
        pass
    return ""


_LM_HEAD: dict[str, torch.Tensor] = {}


def golden_logits(norm: torch.Tensor, checkpoint: Path) -> torch.Tensor:
    """Golden logits [B, L, V] in float64 from the stored golden text.norm and the checkpoint's LM head
    (lm_head.weight, or the embedding when tied). Stored logits would be L x 600 KB per case."""
    key = str(checkpoint)
    if key not in _LM_HEAD:
        # the spec's config and key layouts; only the one tensor is read, not the whole checkpoint
        tied = Qwen25VLConfig.from_file(checkpoint).tie_word_embeddings
        want = "model.embed_tokens.weight" if tied else "lm_head.weight"
        found = None
        for fp in checkpoint_files(checkpoint):
            with safe_open(str(fp), "pt") as f:
                k = next((k for k in f.keys() if to_hub_key(k) == want), None)
                if k is not None:
                    found = f.get_tensor(k).double()
                    break
        if found is None:
            raise FixtureError(f"no LM head in {checkpoint}")
        _LM_HEAD[key] = found
    return norm.double() @ _LM_HEAD[key].T


# ------------------------------------------------------------------------- the suite


@dataclass
class SuiteOptions:
    target: str = "impl"
    dtype: str | None = None
    device: str | None = None
    timeout: float | None = 120.0  # seconds per port call; None: no limit
    teacher: str = "first"
    only_stages: str | None = None
    in_process: bool = False  # call the port in this process (for a debugger); a crash ends the run
    memory_limit: int | None = field(default_factory=default_memory_limit)  # bytes resident, supervised only


def select_cases(fixtures: str | Path, only: str | None = None) -> list[Path]:
    paths = find_cases(fixtures)
    if only:
        rx = re.compile(only)
        paths = [p for p in paths if rx.search(p.name)]
    return paths


def _run_supervised(paths: list[Path], opts: SuiteOptions, jobs: int) -> tuple[dict, list[StageResult]]:
    """Each of `jobs` supervised workers takes the next case until none is left (a crash costs only
    the stage that was running: see supervisor.py). BadTarget (a ValueError) is raised before any case."""
    n = max(1, min(jobs, len(paths)))
    adapters = [
        SupervisedAdapter(
            opts.target,
            dtype=opts.dtype,
            device=opts.device,
            timeout=opts.timeout,
            memory_limit=opts.memory_limit,
            threads=1 if n > 1 else None,
        )
        for _ in range(n)
    ]
    try:
        try:
            desc = adapters[0].describe()
        except (PortCrashed, PortFailed) as e:  # the report is still written: every stage says why
            desc = {
                "name": opts.target,
                "dtype": opts.dtype or "float32",
                "device": opts.device or "cpu",
                "error": str(e),
            }
            for a in adapters:
                a._description = desc
        queue = list(enumerate(paths))
        lock = threading.Lock()
        rows: dict[int, list[StageResult]] = {}

        def work(adapter: SupervisedAdapter) -> None:
            runner = CaseRunner(adapter, timeout=None, teacher=opts.teacher, only_stages=opts.only_stages)
            while True:
                with lock:
                    if not queue:
                        return
                    k, path = queue.pop(0)
                rows[k] = runner.run(path)

        threads = [threading.Thread(target=work, args=(a,), daemon=True) for a in adapters]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        restarts = sum(a.restarts for a in adapters)
    finally:
        for a in adapters:
            a.close()
    desc = {**desc, "workers": n, "worker_restarts": restarts}
    return desc, [r for k in sorted(rows) for r in rows[k]]


def run_suite(
    paths: list[Path],
    opts: SuiteOptions,
    *,
    jobs: int = 1,
    expectations: list[dict] | None = None,
    adapter: Adapter | None = None,
) -> tuple[dict, list[StageResult]]:
    """Run every case; returns (the adapter's description, results in case then data-flow order).

    By default the target runs in supervised worker processes (`jobs` of them). With an adapter
    object, or opts.in_process, it is called in this process (timeouts by SIGALRM, no crash safety)."""
    if adapter is None and not opts.in_process:
        desc, results = _run_supervised(paths, opts, jobs)
    else:
        adapter = adapter or make_adapter(opts.target, dtype=opts.dtype, device=opts.device)
        runner = CaseRunner(adapter, timeout=opts.timeout, teacher=opts.teacher, only_stages=opts.only_stages)
        results = [r for p in paths for r in runner.run(p)]
        desc = adapter.describe()
    apply_expectations(results, expectations or [])
    return desc, results


def first_divergence(results: list[StageResult]) -> StageResult | None:
    """The earliest unexpected failure in data-flow order (exact function stages first, then the model)."""
    bad = [r for r in results if r.status in BAD]
    if not bad:
        return None

    def key(r):
        try:
            return stages.order_key(r.stage)
        except KeyError:
            return (-1, 0)

    return min(bad, key=key)

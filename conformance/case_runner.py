"""One fixture case against one adapter: every stage judged, one stage's trouble never stopping the others.

  exact case   call each fn.* stage's function on its item table and compare item by item;
  model case   build the inputs from the request (preprocess.*), run the model end to end with
               every stage captured (vision.*, text.*, logits), generate greedily (generate.tokens),
               and run the first failing float stage again teacher-forced (fed the golden output of
               the stage before it) to tell "this stage is wrong" from "drift from upstream".
Every stage gets a status: pass, fail, error (the port raised, crashed, hung, returned NaN or a
wrong shape or dtype, or the fixture is bad), not_covered (the port does not expose it); the
expectations file later turns known divergences into xfail / xpass (expectations.py).
"""

from __future__ import annotations

import difflib
import re
import time
from pathlib import Path

import torch

from . import compare, stages
from .adapters.base import Adapter, NotCovered
from .chunked import STAGE as STAGE_CHUNKED
from .chunked import applies as chunked_applies
from .chunked import chunked_result
from .conversions import GIVEN
from .diagnosis import Diagnosis, join_notes, name_mistakes
from .fixtures import FixtureError, load_case, request_media
from .golden import Checkpoint
from .locate import locate, locate_channels, locate_frames, locate_kinds, locate_worst
from .mistakes import LOCK as MISTAKES_LOCK
from .mistakes import for_stage
from .precision import Profile
from .reference import Reference
from .repeat import REPEAT_STAGE, ModelRun, answered_tokens, repeat_runs
from .results import BAD, StageResult
from .supervisor import StageTimeout, call_with_timeout, describe_failure  # noqa: F401  (StageTimeout: tests)
from .threads import warm_threads


def _resolve(obj, tensors):
    """{"$tensor": name} -> the tensor `name` of the case's tensors file, recursively."""
    if isinstance(obj, dict):
        if set(obj) == {"$tensor"}:
            return tensors[obj["$tensor"]]
        return {k: _resolve(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v, tensors) for v in obj]
    return obj


def _misspelt(stage: str, captured: dict) -> str | None:
    """The port's key that is `stage` misspelt ('vision.blocks.0' for vision.block.0), else None: a key that
    names no stage is otherwise ignored, and the stage it meant would read as merely not covered."""
    unknown = [k for k in captured if isinstance(k, str) and not stages.is_known(k) and not k.endswith(GIVEN)]
    close = difflib.get_close_matches(stage, unknown, n=1, cutoff=0.9)
    return close[0] if close else None


def _other_inputs(stage: str) -> str:
    """What a stage that is right alone but wrong in its full run most likely took there: inputs other than
    those it reported (its previous stage) and is given alone (positions, mask, grid)."""
    if stage.startswith("text."):
        return (
            "in its full run it took other inputs than it reported: its positions (text.position_ids), "
            "attention mask or rotary tables, or a hidden state other than the one it captured"
        )
    if stage == "vision.patch_embed":
        return "in its full run it took other pixels than the model inputs or its own build_inputs"
    return (
        "in its full run it took other inputs than it reported: its grid, window segments or rotary tables, "
        "or a hidden state other than the one it captured"
    )


# log-probs off by less than this many times the spec's noise, every stage passing: read as drift that adds up
DRIFT_OVER_NOISE = 2.0


def _tokens_context(before, values: dict) -> str:
    """Where wrong tokens come from, read off the stages judged before them (`before`, this case's results)
    and the tokens' verdict values (compare.tokens: first_step, logprobs_over_noise)."""
    step, over = values.get("first_step"), values.get("logprobs_over_noise")
    # the model stages: generate runs on the same model inputs (the fixture's), not on the port's preprocessing
    model = [
        r
        for r in before
        if r.mode == "e2e" and stages.is_known(r.stage) and not r.stage.startswith(("fn.", "preprocess.", "generate."))
    ]
    bad = [r.stage for r in model if r.status in BAD]
    if bad:
        return f"upstream, {bad[0]} fails: the tokens follow from it"
    judged = [r.stage for r in model if r.status == "pass"]
    if "logits" not in judged:
        return ""
    if step == 0:
        return (
            "every stage the run captured passes, the logits included, yet step 0 differs: generate does not pick "
            "the first token from those logits (another row or position, or a prefill unlike the run's)"
        )
    if over is not None and over < DRIFT_OVER_NOISE:
        return (
            f"every stage the run captured passes, and the log-probs are off by only {over:.1f}x the spec's own "
            f"noise at this precision: the drift each stage's budget allows, added up over the decode, more likely "
            f"than a decode bug (run it in float32: a bug stays, drift goes)"
        )
    return (
        f"every stage the run captured passes, the logits included: the prefill is right and the fault is in the "
        f"decode steps (from step {step}): the positions of the new tokens (rope_deltas), the KV cache, or the mask"
    )


class CaseRunner:
    """Runs cases against one adapter. Checkpoints are read once per runner (`checkpoint`), and the
    adapter is prepared once per checkpoint. timeout: per port call, enforced here by SIGALRM or a
    thread (in process); None when a supervisor enforces it (supervisor.py)."""

    def __init__(
        self,
        adapter: Adapter,
        *,
        timeout: float | None = 120.0,
        teacher: str = "first",
        only_stages: str | None = None,
        profile=None,
        diagnose: bool = True,
        mistakes_for=None,
    ):
        self.adapter = adapter
        self.timeout = timeout
        self.teacher = teacher  # "first" (the first failing float stage), "all" or "none"
        self.only = re.compile(only_stages) if only_stages else None
        self.diagnose = diagnose  # local errors, precision signatures, known mistakes (diagnosis.py)
        self.mistakes_for = mistakes_for or known_mistakes
        self._profile_arg = profile  # a profile given by the user overrides the port's own
        self._profile: Profile | None = None
        self._prepared: str | None = None
        self._checkpoints: dict[str, Checkpoint] = {}
        self._references: dict[str, Reference] = {}
        self._variants: dict[tuple, object] = {}  # (checkpoint, catalogue entry) -> its spec adapter
        self._runs: list[ModelRun] = []  # the model cases run so far, for repeat()
        self._port_ids: torch.Tensor | None = None  # the port's own prompt ids of the current case
        self._port_pixels: torch.Tensor | None = None  # the port's own pixel_values (build_inputs), when given
        self._golden_ids: torch.Tensor | None = None
        self._given: dict[str, torch.Tensor] = {}  # stage -> bool [B, L]: where a port gave it (conversions.GIVEN)
        self._last_model_case: str | None = None

    @property
    def profile(self) -> Profile:
        """The precision of each stage: the user's --profile, else the port's describe()["profile"]
        (port.json for files), else the port's dtype everywhere."""
        if self._profile is None:
            desc = self.adapter.describe()
            given, source = (
                (self._profile_arg, "--profile")
                if self._profile_arg is not None
                else (desc.get("profile"), f"the profile of target {desc.get('name', '?')}")
            )
            self._profile = Profile.parse(given, self.dtype, source=source)
        return self._profile

    def checkpoint(self, folder: Path) -> Checkpoint:
        """The Checkpoint value of a folder, made once per runner."""
        return self._checkpoints.setdefault(str(folder), Checkpoint(folder))

    @property
    def dtype(self) -> str:
        return str(self.adapter.describe().get("dtype", "float32")).replace("torch.", "")

    def run(self, path) -> list[StageResult]:
        warm_threads()  # before the spec computes anything in this thread (threads.py says why)
        try:
            case = load_case(path)
        except FixtureError as e:
            return [StageResult(Path(path).name, "manifest", "error", str(e))]
        try:
            _ = self.profile  # a port's malformed profile is an error of every stage
        except ValueError as e:
            return [StageResult(case.name, s, "error", str(e)) for s in case.stages if self._wanted(s)]
        try:
            self.adapter.begin_case(case)
        except Exception as e:
            return [StageResult(case.name, s, "error", describe_failure(e)) for s in case.stages]
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
                        case.name, stage, "error", describe_failure(e), mode="items", seconds=time.perf_counter() - t0
                    )
                )
                continue
            normalize = stages.info(stage).normalize
            if normalize is not None:
                expected = [normalize(i, e) for i, e in zip(inputs, expected)]
                got = [normalize(i, g) for i, g in zip(inputs, got)] if isinstance(got, list) else got
            v = stages.info(stage).tolerance.items(expected, got, labels)
            note = self._item_mistakes(stage, inputs, got, v, tokenizer_dir) if v.status == "fail" else ""
            out.append(
                StageResult(
                    case.name,
                    stage,
                    v.status,
                    v.metric,
                    v.tolerance,
                    v.where,
                    "items",
                    note=note,
                    seconds=time.perf_counter() - t0,
                    values=v.values,
                )
            )
        return out

    def _item_mistakes(self, stage, inputs, got, verdict, tokenizer_dir) -> str:
        """The catalogue's mistakes for a failing fn.* stage that give the port's answers on every item, those
        it got wrong and those it got right (a rule that agrees with the port only where it fails is not the
        port's): 'likely mistake: ...'."""
        bad = verdict.values.get("bad_items") or []
        if not bad or not isinstance(got, list):
            return ""
        limit = getattr(stages.info(stage).tolerance, "limit", 0.0)

        def answer(m):
            return m.adapter("float64").run_items(stage, inputs, tokenizer_dir=tokenizer_dir)

        def same(theirs):
            return len(theirs) == len(got) and all(
                compare.item_difference(t, g, limit) is None for t, g in zip(theirs, got)
            )

        return self._name_mistakes(stage, answer, same)

    # model cases
    def _model(self, case) -> list[StageResult]:
        out: list[StageResult] = []
        name = case.name
        ck = self.checkpoint(case.checkpoint()) if case.checkpoint() else None
        ck_problem = ck.problem if ck else "the manifest names no checkpoint"
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
        self._golden_ids, self._port_ids, self._port_pixels = inputs["input_ids"], None, None
        self._given = {}
        names = [s for s in case.stages if self._wanted(s)]
        if not names and self._wanted(REPEAT_STAGE):
            # state.repeat selected alone: the port answers the case once (rows not reported: run() keeps
            # the wanted ones) so that it can be asked again
            names = [s for s in case.stages if not s.startswith("preprocess.")]

        # preprocessing, from the request (conversation + media files)
        pre = [s for s in names if s.startswith("preprocess.")]
        if pre:
            out += self._preprocess(case, request, inputs, pre, ck.config)

        # the model, end to end
        model_names = [s for s in names if not s.startswith("preprocess.") and s != "generate.tokens"]
        chunked = chunked_applies(case) and self._wanted(STAGE_CHUNKED)  # a state.* check: not in the manifest
        if model_names or "generate.tokens" in names or chunked:
            try:
                self._prepare(ck)
            except NotCovered as e:
                return out + [StageResult(name, s, "not_covered", f"prepare: {e}") for s in names if s not in pre]
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt):
                    raise
                return out + [
                    StageResult(name, s, "error", f"prepare: {describe_failure(e)}") for s in names if s not in pre
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
                else:
                    self._given = {k[: -len(GIVEN)]: v for k, v in captured.items() if str(k).endswith(GIVEN)}
            except NotCovered as e:
                failure = ("not_covered", f"run: {e}")
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt):
                    raise
                failure = ("error", describe_failure(e))
            secs = time.perf_counter() - t0
            for s in model_names:
                if failure:
                    out.append(StageResult(name, s, failure[0], failure[1], mode="e2e"))
                    continue
                problem = case.stage_problem(s)
                if problem:
                    out.append(StageResult(name, s, "error", problem, mode="e2e"))
                elif s not in captured and (typo := _misspelt(s, captured)):
                    out.append(
                        StageResult(name, s, "error", f"not captured under its name, but as {typo!r}", mode="e2e")
                    )
                elif s not in captured or captured[s] is None:
                    out.append(StageResult(name, s, "not_covered", "the port does not capture this stage", mode="e2e"))
                else:
                    v = self._judge(case, s, golden, captured[s], mask, ck)
                    where = v.where
                    if v.status in BAD and v.values.get("worst") is not None:
                        where += locate(s, v.values, inputs, ck.config)
                        where += locate_kinds(s, golden.get(s), captured[s], mask, inputs, ck.config)
                        where += locate_frames(s, golden.get(s), captured[s], mask, inputs, ck.config)
                    out.append(
                        StageResult(
                            name, s, v.status, v.metric, v.tolerance, where, "e2e", seconds=secs, values=v.values
                        )
                    )
                    secs = 0.0
            if captured and not failure and self.diagnose:
                self._diagnose(case, out, captured, inputs, golden, mask, ck)
                self._name_position_mistakes(out, captured, inputs, mask, ck)
            self._teacher_forced(case, out, inputs, golden, mask, ck, crashed=bool(failure) and failure[0] == "error")

        result, tokens = None, None
        if "generate.tokens" in names:
            result, tokens = self._generate(case, request, inputs, ck, before=out)
            out.append(result)
        if chunked and not case.stage_problem("generate.tokens"):
            out.append(chunked_result(self, case, inputs, ck, result, tokens))
        # kept for the repeat check (state.repeat): the captured stages, or the tokens alone for a port
        # that only generates (a serving engine)
        ran = bool(model_names and captured and not failure)
        if ran or answered_tokens(tokens) is not None:
            keep = {k: v.detach().clone() for k, v in captured.items() if isinstance(v, torch.Tensor)} if ran else {}
            self._runs.append(ModelRun(case, inputs, capture if ran else [], keep, tokens, self._last_model_case))
        self._last_model_case = name
        return sorted(out, key=lambda r: (stages.order_key(r.stage), r.mode == "teacher"))

    def repeat(self) -> list[StageResult]:
        """state.repeat for every model case this runner ran (repeat.py)."""
        if not self._wanted(REPEAT_STAGE):
            return []
        return [r for r in repeat_runs(self) if self._wanted(r.stage)]

    def call(self, fn):
        """fn() under this runner's per-call timeout (None: a supervisor enforces it)."""
        return call_with_timeout(fn, self.timeout)

    def _prepare(self, ck: Checkpoint) -> None:
        if self._prepared != str(ck.folder):
            call_with_timeout(
                lambda: self.adapter.prepare(str(ck.folder), dtype=self.dtype, device=self.adapter.device), self.timeout
            )
            self._prepared = str(ck.folder)

    def _preprocess(self, case, request, inputs, names, config) -> list[StageResult]:
        built: dict = {}  # catalogue entry -> its build_inputs, made when a stage fails
        t0 = time.perf_counter()
        try:
            images, videos = request_media(case.path, request)  # a malformed request is an error here
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
            why = describe_failure(e)
            if any("file" in v for v in request.get("videos", []) if isinstance(v, dict)):
                # the protocol's newer video form: say so, for an adapter written for frame lists only
                why += "; this request's video is a file ({'file': path}): decode and sample it, or raise NotCovered"
            return [StageResult(case.name, s, "error", why, mode="e2e") for s in names]
        secs = time.perf_counter() - t0
        out = []
        for s in names:
            key = s[len("preprocess.") :]
            problem = case.stage_problem(s)
            if problem:
                out.append(StageResult(case.name, s, "error", problem, mode="e2e"))
                continue
            if not isinstance(got, dict):
                v = compare.Verdict("error", f"build_inputs returned {type(got).__name__}, not a dict of inputs")
                out.append(StageResult(case.name, s, v.status, v.metric, mode="e2e"))
                continue
            g, x = inputs.get(key), got.get(key)
            if g is None:
                v = (
                    compare.Verdict("pass", "absent on both sides", "absent")
                    if x is None
                    else compare.Verdict("fail", f"the port returned {key}, the spec has none", "absent")
                )
            elif x is None:  # a port that does not build this input is not judged on it
                out.append(StageResult(case.name, s, "not_covered", f"build_inputs returned no {key}", mode="e2e"))
                continue
            else:
                v = stages.info(s).tolerance.tensor(g, x, control=None, dtype=self.dtype)
                if v.status == "fail" and v.values.get("worst") is not None:  # the patch, channel and pixel
                    v.where += locate_worst(s, v.values["worst"], inputs, config) + locate_channels(s, g, x, config)
                if key == "pixel_values" and isinstance(x, torch.Tensor) and x.is_floating_point():
                    self._port_pixels = x
                if key == "input_ids":
                    self._port_ids = _as_ids(x)
                    if v.status != "pass" and self._port_ids is not None and self._port_ids.dim() == 2:
                        # another prompt is a disagreement, not a malformed answer
                        v.status, v.where = (
                            "fail",
                            f"the port's prompt differs: {compare.token_difference(g, self._port_ids)}",
                        )
                mask = _as_ids(x) if key == "attention_mask" and v.status == "error" else None
                ids = _as_ids(got.get("input_ids")) if mask is not None else None
                if ids is not None and mask.shape == ids.shape:
                    # the mask of the port's own prompt, another length than the golden one: the same disagreement
                    v.status, v.where = (
                        "fail",
                        "the mask of the port's own prompt, whose length differs (preprocess.input_ids)",
                    )
            note = ""
            if v.status == "fail":
                tol = stages.info(s).tolerance

                def answer(m, key=key):
                    if m.name not in built:  # one build_inputs per entry for all the failing keys
                        built[m.name] = m.adapter("float32").build_inputs(
                            request["conversations"],
                            images,
                            videos,
                            tokenizer_dir=str(case.checkpoint()),
                            options=request.get("options", {}),
                        )
                    return built[m.name].get(key)

                note = self._name_mistakes(
                    s,
                    answer,
                    lambda t, x=x, tol=tol: (
                        t is not None
                        and tol.tensor(torch.as_tensor(t), x, control=None, dtype=self.dtype).status == "pass"
                    ),
                )
            out.append(
                StageResult(
                    case.name,
                    s,
                    v.status,
                    v.metric,
                    v.tolerance,
                    v.where,
                    "e2e",
                    note=note,
                    seconds=secs,
                    values=v.values,
                )
            )
            secs = 0.0
        return out

    def _name_position_mistakes(self, out, captured, inputs, mask, ck) -> None:
        """The exact model stages (positions) that fail: the catalogue run on the same inputs."""
        for r in out:
            if r.mode != "e2e" or r.status != "fail" or r.stage not in ("text.position_ids", "text.rope_deltas"):
                continue
            tol, m3 = stages.info(r.stage).tolerance, (mask[None] if r.stage == "text.position_ids" else None)

            def answer(m, stage=r.stage):
                return self._variant(ck, m).run(dict(inputs), capture=[stage])[stage]

            def same(theirs, stage=r.stage, tol=tol, m3=m3):
                return tol.tensor(theirs, captured[stage], mask=m3).status == "pass"

            named = self._name_mistakes(r.stage, answer, same)
            r.note = join_notes(r.note, named)

    def _variant(self, ck: Checkpoint, m):
        """The catalogue entry `m` as one spec adapter per runner and checkpoint, kept across cases (a
        mistake that keeps state between requests shows only on the second), weights shared."""
        key = (str(ck.folder), m.name)
        if key not in self._variants:
            reference = self._references.setdefault(str(ck.folder), Reference(ck.folder))
            self._variants[key] = reference.variant(m.adapter).adapter("float32")
        return self._variants[key]

    def _name_mistakes(self, stage: str, answer_of, same) -> str:
        """The catalogue's entries of `stage` that reproduce the port (diagnosis.name_mistakes)."""
        return name_mistakes(self.mistakes_for(stage) if self.diagnose else [], answer_of, same)

    def _judge(self, case, stage, golden, got, mask, ck, *, control_key: str = "control") -> compare.Verdict:
        """The port's value of `stage` against the golden one, at the stage's precision."""
        try:  # logits are derived: stored as text.norm; logits = text.norm @ lm_head^T (FORMAT.md)
            g = ck.logits(golden["text.norm"]) if stage == "logits" else golden[stage]
        except Exception as e:
            return compare.Verdict("error", f"golden value unreadable: {e}")
        return self._judge_value(case, stage, g, got, mask, self.profile(stage), control_key)

    def _judge_value(self, case, stage, expected, got, mask, precision, control_key) -> compare.Verdict:
        """The stage's tolerance object judges; the registry row says which axes the mask covers. A text
        stage whose prompt is another length than the golden one is judged on the tokens both share."""
        row = stages.info(stage)
        control = case.stages[stage].get(control_key)
        given = self._given.get(stage)
        if given is not None and given.shape == mask.shape:  # e.g. logits at the last prompt token only
            mask = mask * given
        aligned = self._aligned(row, expected, got, mask)
        if aligned is not None:
            expected, got, mask, note = aligned
        m = {"BL": mask, "3BL": mask[None]}.get(row.masked)
        v = row.tolerance.tensor(expected, got, control=control, dtype=precision, mask=m)
        if aligned is not None:
            v.where = f"{note}; {v.where}" if v.where else note
            # the common tokens are laid out as one row: its indices are not the golden prompt's, so the
            # worst coordinate and the rows are not named by the golden's tokens (locate)
            v.values.pop("rows", None)
            v.values["worst"] = None
        if precision in case.stages[stage].get("not_held", ()):
            v.tolerance += f"; the spec's own {precision} run is not finite here (activations past its range)"
        return v

    def _aligned(self, row, expected, got, mask):
        """(golden, port, mask, note) on the common tokens when the port's prompt has another length
        (see preprocess.input_ids), else None."""
        axis = {"BL": 1, "3BL": 2}.get(row.masked)
        ids = self._port_ids
        if axis is None or ids is None or not isinstance(got, torch.Tensor) or got.dim() <= axis:
            return None
        if got.shape[axis] == expected.shape[axis] or got.shape[axis] != ids.shape[-1] or ids.shape[0] != mask.shape[0]:
            return None
        pairs = compare.common_positions(self._golden_ids, ids)
        g, x, m = compare.align(expected, got, pairs, axis, mask)
        n = sum(len(gi) for gi, _ in pairs)
        note = (
            f"judged on the {n} tokens the port's prompt ({ids.shape[-1]} long) shares with the golden one "
            f"({expected.shape[axis]} long); see preprocess.input_ids"
        )
        return g, x, m, note

    def _diagnose(self, case, out, captured, inputs, golden, mask, ck) -> None:
        def judge(stage, expected, got, precision, control_key):
            return self._judge_value(case, stage, expected, got, mask, precision, control_key)

        reference = self._references.setdefault(str(ck.folder), Reference(ck.folder))
        try:
            # the catalogue's variants swap spec functions while they run: one diagnosis at a time
            with MISTAKES_LOCK:
                own = {} if self._port_pixels is None else {"preprocess.pixel_values": self._port_pixels}
                Diagnosis(case, reference, self.profile, judge, self.mistakes_for).run(
                    out, {**captured, **own}, inputs, golden
                )
        except Exception as e:  # a fault of the harness's own diagnosis must not cost the port its report
            for r in out:
                if r.mode == "e2e" and stages.is_known(r.stage) and stages.info(r.stage).tolerance.scaled:
                    r.note = join_notes(r.note, f"diagnosis failed: {type(e).__name__}: {e}")

    def _teacher_forced(self, case, out, inputs, golden, mask, ck, *, crashed: bool = False) -> None:
        """Runs stages alone (run_stage) on the golden input of each: every stage (teacher "all"), or
        the first failing float stage ("first"), or, when the whole run raised (`crashed`), stage after
        stage until one fails alone, which is where the run's fault lies."""
        if self.teacher == "none":
            return
        model = sorted(
            (
                r
                for r in out
                if r.mode == "e2e"
                and r.stage in case.stages
                and stages.is_known(r.stage)
                and stages.info(r.stage).tolerance.scaled
            ),
            key=lambda r: stages.order_key(r.stage),
        )
        if self.teacher == "all":
            for r in model:
                v = self._forced(case, r.stage, inputs, golden, mask, ck)
                if v is None:
                    out.append(StageResult(case.name, r.stage, "not_covered", "run_stage", mode="teacher"))
                else:
                    out.append(
                        StageResult(
                            case.name, r.stage, v.status, v.metric, v.tolerance, v.where, "teacher", values=v.values
                        )
                    )
            return
        bad = [r for r in model if r.status in BAD]
        if crashed and bad:
            self._find_the_crash(case, bad, inputs, golden, mask, ck)
            return
        for r in bad[:1]:
            v = self._forced(case, r.stage, inputs, golden, mask, ck)
            if v is None:
                continue
            if v.status in BAD:
                verdict = "the stage itself is wrong: it fails fed with the golden input too"
            elif r.local.get("status") == "fail":  # right alone, wrong on what it reported it was fed
                verdict = (
                    f"fed the golden input it passes, yet the spec disagrees with it on {r.local['fed']}: "
                    f"{_other_inputs(r.stage)}"
                )
            elif r.status == "error":  # nothing to drift: what the full run handed back is the fault
                verdict = f"alone it is right, so what its full run handed back is what is wrong ({r.metric[:100]})"
            elif not self._has_upstream(case, r.stage):
                verdict = "alone on the model inputs it passes: in its full run it took other inputs than those"
            else:
                verdict = "drift from upstream: fed the golden input it passes"
            r.note = join_notes(r.note, f"teacher-forced: {v.status} ({v.metric}); {verdict}")

    @staticmethod
    def _has_upstream(case, stage: str) -> bool:
        depth = case.manifest["depth"]
        return stages.previous(stage, int(depth["vision"]), int(depth["text"]), vision=case.has_vision) is not None

    def _forced(self, case, stage, inputs, golden, mask, ck) -> compare.Verdict | None:
        """The port's run_stage on the golden input of `stage`, judged; None where it is not covered."""
        prev = stages.previous(
            stage, int(case.manifest["depth"]["vision"]), int(case.manifest["depth"]["text"]), vision=case.has_vision
        )
        feeds = dict(inputs)
        if prev is not None:
            feeds["hidden"] = golden[prev]
        feeds["position_ids"] = golden.get("text.position_ids")
        try:
            got = call_with_timeout(lambda: self.adapter.run_stage(stage, feeds), self.timeout)
        except NotCovered:
            return None
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            return compare.Verdict("error", describe_failure(e))
        return self._judge(case, stage, golden, got, mask, ck, control_key="control_teacher")

    def _find_the_crash(self, case, bad, inputs, golden, mask, ck) -> None:
        """The run raised, so no stage was captured: each stage alone, in data-flow order, until one fails."""
        first, passed = bad[0], []
        for r in bad:
            v = self._forced(case, r.stage, inputs, golden, mask, ck)
            if v is None:
                why = f"teacher-forced: {r.stage} is not covered by run_stage, so the stage that raised is not found"
                first.note = join_notes(first.note, why)
                return
            if v.status in BAD:
                r.note = join_notes(r.note, f"teacher-forced: {v.status} ({v.metric})")
                if r is not first:
                    alone = f"{', '.join(passed)} pass{'es' if len(passed) == 1 else ''}, and "
                    how = "raises" if v.status == "error" else "fails"
                    first.note = join_notes(
                        first.note,
                        f"the run raised before any stage was captured; run alone on the golden inputs, "
                        f"{alone}{r.stage} {how}: the fault lies in {r.stage}",
                    )
                return
            passed.append(r.stage)
        first.note = join_notes(
            first.note, "the run raised, yet every stage passes alone on the golden inputs: the fault lies between them"
        )

    def _generate(self, case, request, inputs, ck, *, before=()) -> tuple[StageResult, object]:
        s = "generate.tokens"
        problem = case.stage_problem(s)
        if problem:
            return StageResult(case.name, s, "error", problem, mode="e2e"), None
        gen = case.json("generate.json")
        t0 = time.perf_counter()
        try:
            got = call_with_timeout(
                lambda: self.adapter.generate(
                    dict(inputs), max_new_tokens=int(gen["max_new_tokens"]), eos_token_id=gen["eos_token_id"]
                ),
                self.timeout,
            )
        except NotCovered as e:
            return StageResult(case.name, s, "not_covered", f"generate: {e}", mode="e2e"), None
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            return StageResult(case.name, s, "error", describe_failure(e), mode="e2e"), None
        tol, noise, precision = stages.info(s).tolerance, case.stages[s].get("logit_noise"), self.profile.end_to_end(s)
        v = tol.judge_tokens(gen, got, precision=precision, logit_noise=noise)
        note = ""
        if v.status == "fail":

            def answer(m):
                variant = self._variant(ck, m)
                previous = self._runs[-1] if self._runs else None
                if previous is not None and previous.tokens is not None:  # the request the port saw before
                    g = previous.case.json("generate.json")
                    variant.generate(
                        dict(previous.inputs), max_new_tokens=int(g["max_new_tokens"]), eos_token_id=g["eos_token_id"]
                    )
                return variant.generate(
                    dict(inputs), max_new_tokens=int(gen["max_new_tokens"]), eos_token_id=gen["eos_token_id"]
                )

            def same(theirs):  # the variant runs in float32: its log-probs carry float32 noise on top
                return tol.same_answer(theirs, got, precision=precision, logit_noise=noise)

            note = self._name_mistakes(s, answer, same)
            if not note.startswith("likely mistake"):
                note = join_notes(note, _tokens_context(before, v.values))
        return StageResult(
            case.name,
            s,
            v.status,
            v.metric,
            v.tolerance,
            v.where,
            "e2e",
            note=note,
            seconds=time.perf_counter() - t0,
            values=v.values,
        ), got


def known_mistakes(stage: str) -> list:
    """The catalogue's entries for a stage (conformance/mistakes/)."""
    return for_stage(stage)


def _as_ids(x) -> torch.Tensor | None:
    """The port's prompt ids as an int tensor [B, L'], or None when they are not that."""
    try:
        ids = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        return None
    return ids if ids.dim() == 2 and not ids.is_floating_point() else None

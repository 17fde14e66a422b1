"""Golden fixture cases on disk: read a case folder, check every file's sha256, write one atomically.

A case is a folder holding manifest.json (format in fixtures/FORMAT.md) and the files it lists,
each with its sha256. Nothing is trusted before it is hashed: a file whose hash differs, or that is
missing, makes every stage that reads it an error (the other stages of the case still run).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..spec.video import read_video

FORMAT = "qwen25vl-fixture/1"
MANIFEST = "manifest.json"


class FixtureError(ValueError):
    """A fixture case cannot be read: no manifest, a bad manifest, a tampered or missing file."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_files(folder: Path, digests: dict[str, str]) -> dict[str, str]:
    """{file: why it cannot be used} for the files of `digests` (name -> sha256) under folder; each file hashed once."""
    bad = {}
    for name, digest in digests.items():
        fp = folder / name
        if not fp.is_file():
            bad[name] = "missing"
            continue
        actual = sha256_file(fp)
        if actual != digest:
            bad[name] = f"sha256 mismatch (manifest {digest[:12]}..., file {actual[:12]}...): tampered or stale"
    return bad


# How far a regenerated float may move from the committed one on another CPU. Vectorised cos/sin,
# exp and BLAS round differently per SIMD path (ATEN_CPU_CAPABILITY), so no float is compared by hash
# across machines: integers, strings and bytes stay exact, floats get a relative Frobenius budget.
# Goldens and exact-case tables are float64 computed: 1e-6 (far above a few ulps, far below any bug).
# A control_<dtype> file is the spec run in that dtype: two CPUs may round its accumulations
# differently, so it gets two unit roundoffs of its dtype, and, where the case's manifest measured the
# stage's control (that run's distance to the float64 golden), twice that: each CPU's run sits within its
# control of the golden, so two of them within the sum (a Xeon's bfloat16 path moved model_video_file's
# text.layer.1 by 8.6e-3, two roundoffs being 7.8e-3 and the control 1.0e-2). A tensor stored in a narrower type than
# it was computed in (a bfloat16 checkpoint drawn in float32) may flip one ulp of that type where the
# wider value moved by one ulp: it gets at least one unit roundoff of its storage type.
REGEN_RTOL = {"float64": 1e-6, "float32": 1e-6, "float16": 2 * 2.0**-11, "bfloat16": 2 * 2.0**-8}
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
JSON_FLOAT_RTOL = 1e-9


def _json_difference(a, b, path: str = "") -> str | None:
    if isinstance(a, float) and isinstance(b, float):  # an int never equals a float here: 3 vs 3.0 is a change
        close = a == b or abs(a - b) <= JSON_FLOAT_RTOL * max(abs(a), abs(b))
        return None if close else f"{path or 'value'}: {a!r} vs {b!r}"
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{path or 'value'}: keys {sorted(a.keys() ^ b.keys())} on one side only"
        return next((d for k in a if (d := _json_difference(a[k], b[k], f"{path}.{k}"))), None)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path or 'value'}: length {len(a)} vs {len(b)}"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _json_difference(x, y, f"{path}[{i}]"))), None)
    return None if a == b and type(a) is type(b) else f"{path or 'value'}: {a!r} vs {b!r}"


def content_difference(new: str | os.PathLike, old: str | os.PathLike) -> str | None:
    """None when a regenerated fixture file carries the committed file's content under the
    cross-machine rule (REGEN_RTOL); otherwise what differs. Bytes first: equal files are equal.
    .safetensors: same keys, dtypes and shapes; integer tensors equal; float tensors within the
    relative Frobenius budget of their precision (a control_<dtype> file: that dtype's; at least one
    unit roundoff of the type they are stored in).
    .json: equal, except floats within JSON_FLOAT_RTOL. Anything else: byte for byte."""
    new, old = Path(new), Path(old)
    if sha256_file(new) == sha256_file(old):
        return None
    if old.suffix == ".json":
        return _json_difference(json.loads(new.read_text("utf-8")), json.loads(old.read_text("utf-8")))
    if old.suffix in VIDEO_SUFFIXES:
        return _video_difference(new, old)
    if old.suffix != ".safetensors":
        return f"{old.name}: bytes differ"
    a, b = load_file(str(new)), load_file(str(old))
    if a.keys() != b.keys():
        return f"{old.name}: tensors {sorted(a.keys() ^ b.keys())} on one side only"
    dtype = old.stem.split("_", 1)[1] if old.stem.startswith("control_") else "float64"
    rtol = REGEN_RTOL.get(dtype, REGEN_RTOL["float64"])
    measured = _measured_controls(old.parent, dtype) if old.stem.startswith("control_") else {}
    for k in sorted(b):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"{old.name}:{k}: {x.dtype} {list(x.shape)} vs {y.dtype} {list(y.shape)}"
        if not y.is_floating_point():
            if not torch.equal(x, y):
                return f"{old.name}:{k}: integer values differ"
            continue
        budget = max(rtol, UNIT_ROUNDOFF.get(y.dtype, 0.0), 2 * measured.get(k, 0.0))
        x, y = x.double(), y.double()
        if not torch.equal(x.isnan(), y.isnan()):
            return f"{old.name}:{k}: NaN at different places"
        x, y = x.nan_to_num(0.0), y.nan_to_num(0.0)
        rel = ((x - y).norm() / y.norm().clamp_min(1e-300)).item()
        if rel > budget:
            return f"{old.name}:{k}: relative difference {rel:.2e} > {budget:.1e} ({dtype}, stored {y.dtype})"
    return None


def _measured_controls(folder: Path, dtype: str) -> dict[str, float]:
    """{stage: its end-to-end control at `dtype`} from the case manifest in `folder` ({} without one)."""
    try:
        stages = json.loads((folder / "manifest.json").read_text("utf-8"))["stages"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    out = {}
    for name, entry in stages.items():
        c = entry.get("control", {}).get(dtype) if isinstance(entry, dict) else None
        if isinstance(c, (int, float)):
            out[name] = float(c)
    return out


VIDEO_SUFFIXES = (".mov", ".mp4", ".mkv")


def _video_difference(new: Path, old: Path) -> str | None:
    """None when two video files decode to the same frames at the same rate (a lossless codec round trips)."""
    a, b = read_video(new, max_video_bytes=None), read_video(old, max_video_bytes=None)
    if a.frames.shape != b.frames.shape:
        return f"{old.name}: frames {list(a.frames.shape)} vs {list(b.frames.shape)}"
    if a.fps != b.fps:
        return f"{old.name}: {a.fps} vs {b.fps} frames per second"
    if not np.array_equal(a.frames, b.frames):
        first = int(np.flatnonzero((a.frames != b.frames).reshape(len(a.frames), -1).any(1))[0])
        return f"{old.name}: decoded frame {first} differs"
    return None


def dump_json(obj) -> bytes:
    """The one JSON encoding used in fixtures: sorted keys, one-space indent, UTF-8, trailing newline
    (so a regeneration is byte-identical)."""
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


@dataclass
class Case:
    """One fixture case folder, with its manifest and the result of checking its files."""

    path: Path
    manifest: dict
    bad_files: dict[str, str] = field(default_factory=dict)  # file -> why it cannot be used
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.manifest["case"]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def has_vision(self) -> bool:
        """Whether the case runs the vision tower (model_text runs none: its inputs_embeds are the ids')."""
        return "vision.merger" in self.stages

    @property
    def stages(self) -> dict[str, dict]:
        return self.manifest["stages"]

    def stage_problem(self, stage: str) -> str | None:
        """Why `stage` cannot be judged from this fixture (a bad file it reads), or None."""
        for f in self.stages[stage].get("files", []):
            if f in self.bad_files:
                return f"fixture file {f}: {self.bad_files[f]}"
        return None

    def file(self, name: str) -> Path:
        if name in self.bad_files:
            raise FixtureError(f"{self.path / name}: {self.bad_files[name]}")
        return self.path / name

    def json(self, name: str):
        if name not in self._cache:
            with open(self.file(name), encoding="utf-8") as f:
                self._cache[name] = json.load(f)
        return self._cache[name]

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self._cache:
            self._cache[name] = load_file(self.file(name))
        return self._cache[name]

    def media(self) -> tuple[list[str], list[dict]]:
        """request.json's images and videos, their files under this case's folder (request_media)."""
        return request_media(self.path, self.json(self.manifest["request"]))

    def checkpoint(self) -> Path | None:
        ck = self.manifest.get("checkpoint")
        return (self.path / ck).resolve() if ck else None


def request_media(folder: str | os.PathLike, request: dict) -> tuple[list[str], list[dict]]:
    """A model request's media with their paths made absolute under `folder`: (images [path], videos).

    A video is {"frames": [path], "fps": rate}, a list of frames used as given, or {"file": path}, a video
    file the port decodes and samples at the request's options.video_options.fps (default 2).
    """
    folder = Path(folder)
    videos = []
    for k, video in enumerate(request.get("videos", [])):
        if not isinstance(video, dict) or ("frames" in video) == ("file" in video):
            raise FixtureError(f"{folder / 'request.json'}: videos[{k}] must hold either 'frames' or 'file'")
        if "file" in video:
            videos.append({**video, "file": str(folder / video["file"])})
        else:
            videos.append({**video, "frames": [str(folder / p) for p in video["frames"]]})
    return [str(folder / p) for p in request.get("images", [])], videos


def load_case(path: str | os.PathLike, *, verify: bool = True) -> Case:
    """Read <path>/manifest.json and hash every file it lists (bad ones are recorded, not raised)."""
    path = Path(path)
    mpath = path / MANIFEST
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise FixtureError(f"{path} is not a fixture case: no {MANIFEST}") from None
    except json.JSONDecodeError as e:
        raise FixtureError(f"{mpath} is not valid JSON: {e}") from None
    for key in ("format", "case", "kind", "stages", "files"):
        if key not in manifest:
            raise FixtureError(f"{mpath} lacks the field {key!r}")
    if manifest["format"] != FORMAT:
        raise FixtureError(f"{mpath} has format {manifest['format']!r}; this harness reads {FORMAT!r}")
    return Case(path, manifest, check_files(path, manifest["files"]) if verify else {})


def find_cases(root: str | os.PathLike) -> list[Path]:
    """Every case folder under root (a folder with a manifest.json), sorted by name."""
    root = Path(root)
    if (root / MANIFEST).is_file():
        return [root]
    if not root.is_dir():
        raise FixtureError(f"fixture folder not found: {root}")
    return sorted(p.parent for p in root.glob(f"*/{MANIFEST}"))


def write_case(path: str | os.PathLike, manifest: dict, files: dict[str, object]) -> None:
    """Write a case folder: `files` maps a relative name to bytes, a dict of tensors (safetensors) or a
    JSON-able object (.json). The sha256 of each is added to the manifest, written last. The folder is
    built beside the target and renamed into place, so nothing is left half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        digests = {}
        for name, obj in sorted(files.items()):
            fp = tmp / name
            fp.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(obj, bytes):
                fp.write_bytes(obj)
            elif name.endswith(".safetensors"):
                save_file({k: v.contiguous() for k, v in obj.items()}, str(fp))
            elif name.endswith(".json"):
                fp.write_bytes(dump_json(obj))
            else:
                raise TypeError(f"cannot write fixture file {name!r} from {type(obj).__name__}")
            digests[name] = sha256_file(fp)
        manifest = {**manifest, "format": FORMAT, "files": digests}
        (tmp / MANIFEST).write_bytes(dump_json(manifest))
        tmp.chmod(0o755)  # mkdtemp makes it private; fixtures are meant to be shared
        for fp in tmp.rglob("*"):
            fp.chmod(0o755 if fp.is_dir() else 0o644)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

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

import torch
from safetensors.torch import load_file, save_file

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

    def checkpoint(self) -> Path | None:
        ck = self.manifest.get("checkpoint")
        return (self.path / ck).resolve() if ck else None


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

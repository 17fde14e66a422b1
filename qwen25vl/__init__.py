"""qwen25vl: reference (spec), fast path (impl) and conformance harness for Qwen2.5-VL.

The subpackages live in the repository's top-level folders (spec/, impl/, conformance/, tools/).
An install maps them here (pyproject.toml, package-dir); a plain checkout on PYTHONPATH finds them
through the folder above this one, so `PYTHONPATH=. python -m qwen25vl ...` works without installing.
"""

from pathlib import Path as _Path

_root = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).resolve().parent / "spec").exists() and (_root / "spec" / "__init__.py").is_file():
    __path__.append(str(_root))  # noqa: F821  (the package's own search path)

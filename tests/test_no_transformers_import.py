"""transformers is a cross-check only: spec/ and impl/ never import it (issue 2, "The package")."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def imported_modules(path):
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


@pytest.mark.parametrize("package", ["spec", "impl"])
def test_package_never_imports_transformers(package):
    files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ROOT, package)) for f in fs if f.endswith(".py")]
    assert files
    bad = [
        (os.path.relpath(p, ROOT), m)
        for p in files
        for m in imported_modules(p)
        if m == "transformers" or m.startswith("transformers.")
    ]
    assert not bad, f"transformers imported in {bad}"

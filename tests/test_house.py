"""The house rules of docs/DESIGN.md, enforced (issue 9).

1. Every own import is one a static resolver can follow by path: jedi, told nothing but the
   repository folder (no editable-install hook, no site-packages), finds the file of each.
2. Who may import whom is one table, HOUSE_RULES, checked on the syntax tree of every file.
3. ruff (lint + format) is clean on the code and the tests.

Each checker is a function of a root folder, so the tests below also run it on a small tree
planted in tmp_path and show that it reports the violation put there.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.simd_independent  # source text only: nothing is computed

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "qwen25vl"  # the name the repository folder has once installed (pyproject.toml, package-dir)
FOLDERS = ("spec", "impl", "conformance", "tools")  # mapped to qwen25vl.<folder>
CODE = (*FOLDERS, PACKAGE)  # PACKAGE/ is the root package itself (cli.py, __main__.py)

# importer (a folder; the longest matching one wins) -> (own folders it may import besides its own,
# third-party modules it must never import). The root package is named PACKAGE; nothing but `tools`
# itself imports `tools`, because no row lists it.
HOUSE_RULES = {
    "spec": ((), ("transformers",)),  # the oracle imports nothing else of the project
    "impl": (("spec",), ("transformers",)),  # identical-by-definition parts come from spec
    "conformance": (("spec",), ()),  # implementations only through the adapters ...
    "conformance/adapters": (("spec", "impl"), ()),  # ... which implement the adapter protocol
    "tools": (("spec", "impl", "conformance", PACKAGE), ()),
    PACKAGE: (("conformance", "impl"), ()),  # may dispatch to each package (today __main__ runs tools/cli.py by name)
}


def python_files(root: Path, folders=CODE) -> list[Path]:
    return sorted(p for folder in folders for p in (root / folder).rglob("*.py") if "__pycache__" not in p.parts)


def logical_package(root: Path, path: Path, package: str = PACKAGE) -> list[str]:
    """Dotted package of `path` once installed: spec/x.py -> [qwen25vl, spec]; qwen25vl/__main__.py -> [qwen25vl]."""
    parts = list(path.relative_to(root).parent.parts)
    return [package] + (parts[1:] if parts[0] == package else parts)


def own_imports(root: Path, path: Path, package: str = PACKAGE):
    """(line, absolute dotted name, is_relative) for every import of the project in `path`.

    Relative imports are made absolute from the file's package; `from .. import x` yields the
    package's member x. Absolute imports of PACKAGE or of a bare top-level folder count as own."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    own_tops = {package, *(p.name for p in root.iterdir() if (p / "__init__.py").is_file())}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = logical_package(root, path, package)
            if node.level > len(base):
                yield node.lineno, "." * node.level + (node.module or ""), True  # above the root
                continue
            base = base[: len(base) - node.level + 1]
            names = [node.module] if node.module else [a.name for a in node.names]
            for name in names:
                yield node.lineno, ".".join(base + [name]), True
        else:
            for name in imported_names(node):
                if name.split(".")[0] in own_tops:
                    yield node.lineno, name, False


def imported_names(node: ast.AST) -> list[str]:
    """Absolute module names a node imports: import statements and importlib.import_module("...")."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and not node.level and node.module:
        return [node.module]
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if func in ("import_module", "__import__") and isinstance(node.args[0].value, str):
            return [node.args[0].value]
    return []


# ---------------------------------------------------------------------------- import table


def target_folder(dotted: str, package: str = PACKAGE) -> str:
    """qwen25vl.spec.mrope -> spec; qwen25vl.cli -> qwen25vl; spec.mrope (absolute, bare) -> spec."""
    parts = dotted.split(".")
    if parts[0] == package:
        return parts[1] if len(parts) > 1 and parts[1] != package and parts[1] in FOLDERS else package
    return parts[0]


def house_violations(root: Path, rules=HOUSE_RULES, package: str = PACKAGE) -> list[str]:
    """Every import in the code folders of `root` that `rules` forbids, as 'file:line: why'."""
    bad = []
    for path in python_files(root, folders=sorted({f.split("/")[0] for f in rules})):
        rel = path.relative_to(root).as_posix()
        importer = max((f for f in rules if rel.startswith(f + "/")), key=len)
        allowed, banned = rules[importer]
        home = importer.split("/")[0]
        for line, dotted, relative in own_imports(root, path, package):
            if dotted.startswith("."):
                bad.append(f"{rel}:{line}: {dotted} climbs above the package root")
                continue
            target = target_folder(dotted, package)
            if not relative and dotted.split(".")[0] != package:
                bad.append(f"{rel}:{line}: absolute import of {dotted}; own imports are relative")
            if target != home and target not in allowed:
                bad.append(f"{rel}:{line}: {importer} imports {dotted} ({target}); it may import {sorted(allowed)}")
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            for name in imported_names(node):
                if name.split(".")[0] in banned:
                    bad.append(f"{rel}:{node.lineno}: {importer} never imports {name}")
    return bad


def test_house_rules_hold():
    bad = house_violations(ROOT)
    assert not bad, "house rules (docs/DESIGN.md) broken:\n" + "\n".join(bad)


def test_every_code_folder_has_a_rule():
    assert sorted(f.split("/")[0] for f in HOUSE_RULES if "/" not in f) == sorted(CODE)
    assert all((ROOT / f).is_dir() for f in HOUSE_RULES), "a rule names a folder that no longer exists"


def plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


# a tree that keeps the rules: every folder is a package, each module imports what it may
CLEAN = {
    **{f"{folder}/__init__.py": "" for folder in (*FOLDERS, "conformance/adapters", PACKAGE)},
    "spec/mrope.py": "import torch\n\ndef rope_index():\n    return 0\n",
    "impl/model.py": "from ..spec.mrope import rope_index\n",
    "conformance/runner.py": "from ..spec import mrope\nfrom .adapters import base\n",
    "conformance/adapters/base.py": "from ...impl import model\nfrom ...spec.mrope import rope_index\n",
    "tools/bench.py": "from ..impl.model import rope_index\nfrom ..conformance import runner\n",
    f"{PACKAGE}/cli.py": "def main():\n    from .conformance.runner import mrope\n    from .impl import model\n",
}


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("spec/x.py", "from ..impl import model\n", "spec imports qwen25vl.impl (impl)"),
        ("spec/x.py", "def f():\n    from .. import tools\n", "spec imports qwen25vl.tools (tools)"),
        ("spec/x.py", "import transformers\n", "spec never imports transformers"),
        (
            "impl/x.py",
            "import importlib\nimportlib.import_module('transformers.models')\n",
            "never imports transformers",
        ),
        ("impl/kernels/x.py", "from ...conformance import stages\n", "impl imports qwen25vl.conformance"),
        ("conformance/runner2.py", "from ..impl.model import rope_index\n", "conformance imports qwen25vl.impl"),
        ("conformance/x.py", "from qwen25vl.tools import bench\n", "conformance imports qwen25vl.tools"),
        (f"{PACKAGE}/x.py", "from .tools import bench\n", "qwen25vl imports qwen25vl.tools"),
        ("impl/x.py", "from spec.mrope import rope_index\n", "absolute import of spec.mrope"),
        ("spec/x.py", "from .... import y\n", "climbs above the package root"),
    ],
)
def test_house_rules_report_a_planted_import(tmp_path, name, text, expected):
    root = plant(tmp_path, CLEAN)
    assert house_violations(root) == []
    plant(root, {name: text})
    bad = house_violations(root)
    assert len(bad) == 1 and expected in bad[0] and bad[0].startswith(name), bad


# ---------------------------------------------------------------------------- static resolution


def jedi_positions(path: Path, source: str, package: str = PACKAGE):
    """(line, column, what) of every own imported name or module in `path`, where jedi should jump.

    For `from <mod> import a, b` it is the last part of <mod> (a module) and each of a, b; for
    `import p.q` the last part, q."""
    lines = source.splitlines()
    own = (package, *FOLDERS)
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in own):
            what = "." * node.level + (node.module or "")
            if node.module:
                m = re.compile(r"from\s+[.\s]*" + re.escape(node.module)).match(lines[node.lineno - 1], node.col_offset)
                if m:  # the module's last part (a continuation line would leave only the names to check)
                    yield node.lineno, m.end() - len(node.module.split(".")[-1]), what, True
            for a in node.names:
                if a.name != "*":
                    yield a.lineno, a.col_offset, f"{what} import {a.name}", not node.module
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in own:
                    yield a.lineno, a.col_offset + len(a.name) - len(a.name.split(".")[-1]), a.name, True


def unresolved_imports(root: Path, folders=CODE, package: str = PACKAGE) -> list[str]:
    """Own imports in `folders` of `root` that jedi cannot follow to a file inside `root`.

    jedi sees only `root` on its path (no site-packages, so no editable-install hook, no .pth): a
    module resolves only if its file is where the import says. A module part must land in `root`;
    an imported name must land somewhere (re-exports may end outside, in torch)."""
    import jedi

    project = jedi.Project(root, sys_path=[str(root)], smart_sys_path=False)
    environment = jedi.InterpreterEnvironment()
    bad = []
    for path in python_files(root, folders):
        source = path.read_text(encoding="utf-8")
        script = None  # one Script per file: its inference state caches what it has followed
        for line, column, what, must_be_inside in jedi_positions(path, source, package):
            if script is None:
                script = jedi.Script(source, path=path, project=project, environment=environment)
            found = [n.module_path for n in script.goto(line, column, follow_imports=True)]
            inside = [p for p in found if p is not None and Path(p).resolve().is_relative_to(root.resolve())]
            if not found or (must_be_inside and not inside):
                where = f" (found {[str(p) for p in found]})" if found else ""
                bad.append(f"{path.relative_to(root)}:{line}: {what}{where}")
    return bad


def test_every_own_import_resolves_statically():
    pytest.importorskip("jedi", reason="jedi is in the test extra (pyproject.toml)")
    start = time.perf_counter()
    bad = unresolved_imports(ROOT)
    print(f"jedi resolved the own imports of {len(python_files(ROOT))} files in {time.perf_counter() - start:.1f} s")
    assert not bad, "imports a static resolver cannot follow by path:\n" + "\n".join(bad)


def test_static_resolution_reports_a_planted_import(tmp_path):
    pytest.importorskip("jedi", reason="jedi is in the test extra (pyproject.toml)")
    # pkg/ is installed as qwen25vl_fake (package-dir): Python finds qwen25vl_fake.b, no path does
    root = plant(
        tmp_path,
        {
            "pyproject.toml": '[tool.setuptools]\npackage-dir = {"qwen25vl_fake" = "pkg"}\n',
            "pkg/__init__.py": "",
            "pkg/b.py": "x = 1\n",
            "pkg/a.py": "from .b import x\nfrom . import b\nimport qwen25vl_fake.b\nfrom qwen25vl_fake.b import x as y\n",
            "pkg/c.py": "from .a import missing\n",
        },
    )
    bad = unresolved_imports(root, folders=["pkg"], package="qwen25vl_fake")
    assert sorted(bad) == [
        "pkg/a.py:3: qwen25vl_fake.b",
        "pkg/a.py:4: qwen25vl_fake.b",
        "pkg/a.py:4: qwen25vl_fake.b import x",
        "pkg/c.py:1: .a import missing",
    ], bad


# ---------------------------------------------------------------------------- ruff


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["check", "format"])
def test_ruff_is_clean(command):
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (it is in the test extra: pip install -e '.[test]')")
    targets = [*CODE, "tests"]
    run = subprocess.run([sys.executable, "-m", "ruff", *command, *targets], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, f"ruff {' '.join(command)}:\n{run.stdout}{run.stderr}"

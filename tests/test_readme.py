"""The documentation runs: README.md and every docs/*.md, from the repository root.

Convention (also in docs/testing.md):
- every ```python block runs as written (`python -c BLOCK`) and must exit 0;
- a ```bash block runs only when its fence says ```bash run (`bash -euo pipefail -c BLOCK`, with this
  Python's bin folder first on PATH, so `qwen25vl` is the checkout's command); plain ```bash blocks
  (installing, a GPU, a long job), ```text, ```py (needs a real checkpoint) and bare ``` blocks are
  shown, not run;
- the README's adapter example (the ```python block whose first line is `# my_port_adapter.py`) also
  runs through the harness's command line: written to a temporary folder and judged by
  `qwen25vl conform --target my_port_adapter:MyPort` in a supervised worker; its stages must pass.
Test ids are `<file>:<kind><index>`, the index counting the runnable blocks of that kind in that file.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
ADAPTER_HEAD = "# my_port_adapter.py"


def blocks(path: Path) -> list[tuple[str, str]]:
    """(kind, code) of every runnable block of one file, in order: kind 'python' or 'bash'."""
    out = []
    for info, code in FENCE.findall(path.read_text(encoding="utf-8")):
        words = info.split()
        if words == ["python"]:
            out.append(("python", code))
        elif words == ["bash", "run"]:
            out.append(("bash", code))
    return out


def all_blocks() -> list[tuple[str, str, str]]:
    """(id, kind, code) over README.md and docs/*.md."""
    out = []
    for path in DOCS:
        count: dict[str, int] = {}
        for kind, code in blocks(path):
            k = count[kind] = count.get(kind, -1) + 1
            out.append((f"{path.relative_to(ROOT)}:{kind}{k}", kind, code))
    return out


BLOCKS = all_blocks()


def _env() -> dict:
    bindir = os.path.dirname(sys.executable)
    return dict(os.environ, PYTHONHASHSEED="0", PATH=bindir + os.pathsep + os.environ.get("PATH", ""))


@pytest.mark.parametrize(("kind", "code"), [(k, c) for _, k, c in BLOCKS], ids=[i for i, _, _ in BLOCKS])
def test_doc_block(kind, code):
    cmd = [sys.executable, "-c", code] if kind == "python" else ["bash", "-euo", "pipefail", "-c", code]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, (
        f"{kind} block failed (exit {done.returncode}):\n{code}\n--- stdout ---\n{done.stdout[-2000:]}"
        f"\n--- stderr ---\n{done.stderr[-3000:]}"
    )


def test_readme_opens_with_the_two_commands_that_ci_runs():
    head = README.read_text(encoding="utf-8")[:1500]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = re.findall(r"```bash\n(.*?)\n```", head, re.S)
    assert len(commands) >= 2, "README must open with two bash commands: set up + main job, then the tests"
    assert "qwen25vl conform" in commands[0]
    assert commands[1].strip() in ci, "the README's test command must be the exact command .ci/run calls"


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move detail into docs/"


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file (lower case, punctuation dropped, spaces to '-')."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    heads = re.findall(r"^#+ (.*)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_links_stay_inside_the_repository():
    """Every relative Markdown link of README.md and docs/*.md names a file of this repository, and
    a #fragment names a heading of that file."""
    bad = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: outside links are fine
                continue
            name, _, anchor = target.partition("#")
            file = (path.parent / name).resolve() if name else path
            if not file.is_relative_to(ROOT) or not file.exists():
                bad.append(f"{path.relative_to(ROOT)}: {target} (no such file in the repository)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                bad.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_readme_adapter_passes_through_the_command_line(tmp_path):
    """The README's adapter, saved as the README says, judged by `qwen25vl conform --target module:Class`."""
    adapters = [c for _, k, c in BLOCKS if k == "python" and c.startswith(ADAPTER_HEAD)]
    assert len(adapters) == 1, f"README.md must hold one ```python block starting with {ADAPTER_HEAD!r}"
    (tmp_path / "my_port_adapter.py").write_text(adapters[0], encoding="utf-8")
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "qwen25vl", "conform", "--target", "my_port_adapter:MyPort", "--json", str(report)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    data = json.loads(report.read_text(encoding="utf-8"))
    judged = {(r["case"], r["stage"]): r["status"] for r in data["results"] if r["status"] != "not_covered"}
    assert judged == {("exact_resize", "fn.smart_resize"): "pass", ("exact_positions", "fn.decode_positions"): "pass"}
    assert data["coverage"]["covered"] == 2 and data["coverage"]["total"] == len(data["results"])
    assert "RESULT: PASS (2 of" in done.stdout


# The public spec functions the work orders name: each one appears as a call in a runnable example.
DOCUMENTED = [
    "smart_resize",
    "smart_resize_qwen_vl_utils",
    "preprocess_image",
    "resize_bicubic",
    "load_image",
    "patchify",
    "unpatchify",
    "read_video",
    "sample_frame_indices",
    "sample_video",
    "video_frame_size",
    "preprocess_video",
    "render_chat",
    "load_tokenizer",
    "expand_vision_tokens",
    "build_inputs",
    "vision_rotary_positions",
    "window_partition",
    "rope_index",
    "rope_index_transformers_v53",
    "decode_positions",
    "mrope_cos_sin",
    "apply_mrope",
    "load_checkpoint",
    "vision_encoder",
    "forward",
    "generate_greedy",
    "precision_profile",
    "make_tiny_checkpoint",
]


@pytest.mark.parametrize("name", DOCUMENTED)
def test_public_function_has_a_runnable_example(name):
    assert any(re.search(rf"(?<![\w.]){name}\(", code) for _, kind, code in BLOCKS if kind == "python"), (
        f"no ```python block of README.md or docs/*.md calls {name}(...)"
    )

"""tools/bench's optional llama.cpp column, through a stand-in build folder (scripts with the real tools'
arguments and output format): found or "not installed", the files converted and quantized once, the
llama-bench JSON lines read, a failing tool named; and the side-by-side table."""

import json
import stat
import sys

import pytest
from qwen25vl.tools.bench import LLAMA_CPP_ENV, LlamaCpp, table

BENCH = """#!{python}
import json, sys
a = sys.argv
n = int(a[a.index("-n") + 1]); p = int(a[a.index("-p") + 1])
open({log!r}, "a").write(" ".join(a[1:]) + "\\n")
print(json.dumps({{"n_prompt": p, "n_gen": n, "avg_ts": 100.0 if n else 1000.0, "model_size": 12345}}))
"""
CONVERT = """import sys
a = sys.argv
open(a[a.index("--outfile") + 1], "w").write("gguf " + a[a.index("--outtype") + 1])
"""
QUANTIZE = """#!{python}
import shutil, sys
if "--fail" in open(sys.argv[-3]).read():
    sys.exit("llama_model_quantize: failed")
shutil.copyfile(sys.argv[-3], sys.argv[-2])
"""


def _exe(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def standin(tmp_path):
    build, src = tmp_path / "build", tmp_path / "src"
    (build / "bin").mkdir(parents=True)
    (src / "gguf-py").mkdir(parents=True)
    log = tmp_path / "bench.log"
    _exe(build / "bin" / "llama-bench", BENCH.format(python=sys.executable, log=str(log)))
    _exe(build / "bin" / "llama-quantize", QUANTIZE.format(python=sys.executable))
    (src / "convert_hf_to_gguf.py").write_text(CONVERT)
    (build / "CMakeCache.txt").write_text(f"FOO:BOOL=ON\nCMAKE_HOME_DIRECTORY:INTERNAL={src}\n")
    return build, log


def test_not_installed_is_a_status_not_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv(LLAMA_CPP_ENV, raising=False)
    lc, why = LlamaCpp.find(None)
    assert lc is None and why.startswith("not installed") and LLAMA_CPP_ENV in why
    lc, why = LlamaCpp.find(str(tmp_path))
    assert lc is None and "llama-bench is missing" in why
    (tmp_path / "bin").mkdir()
    _exe(tmp_path / "bin" / "llama-bench", "#!/bin/sh\n")
    lc, why = LlamaCpp.find(str(tmp_path))
    assert lc is None and "convert_hf_to_gguf.py" in why


def test_standin_convert_quantize_and_bench(standin, tmp_path, monkeypatch):
    from qwen25vl.tools.make_tiny_checkpoint import tiny_config

    build, log = standin
    monkeypatch.setenv(LLAMA_CPP_ENV, str(build))
    lc, why = LlamaCpp.find(None)
    assert lc is not None, why
    files = lc.ggufs("tiny", tiny_config(tied=True), tmp_path / "work")
    assert sorted(files) == ["bf16", "q4_0", "q4_0_bf16emb"]
    assert all(f.read_text() == "gguf bf16" for f in files.values())
    assert not list((tmp_path / "work").rglob("checkpoint"))  # the checkpoint is removed after converting
    mtime = files["bf16"].stat().st_mtime_ns
    assert lc.ggufs("tiny", tiny_config(tied=True), tmp_path / "work")["bf16"].stat().st_mtime_ns == mtime  # cached
    assert lc.bench(files["bf16"], prompt=306, gen=0, threads=2) == {"prompt_tok_s": 1000.0, "model_size": 12345}
    assert lc.bench(files["bf16"], prompt=306, gen=64, threads=2) == {"decode_tok_s": 100.0, "model_size": 12345}
    calls = log.read_text().splitlines()
    assert "-p 306 -n 0" in calls[0] and "-t 2" in calls[0]
    assert "-p 0 -n 64 -d 306" in calls[1]  # decode after a prompt of the same length


def test_failing_tool_is_named(standin, tmp_path):
    from qwen25vl.tools.make_tiny_checkpoint import tiny_config

    build, _ = standin
    (build.parent / "src" / "convert_hf_to_gguf.py").write_text(CONVERT.replace('"gguf "', '"--fail "'))
    lc, _ = LlamaCpp.find(str(build))
    with pytest.raises(RuntimeError, match=r"llama-quantize q4_0_bf16emb failed \(exit 1\).*failed"):
        lc.ggufs("tiny", tiny_config(tied=True), tmp_path / "work")
    assert not list((tmp_path / "work").rglob("q4_0*.gguf"))  # nothing half-written under the final name


def test_side_by_side_table():
    recs = [
        {"size": "cpu", "what": "llama_cpp", "status": "not installed (give --llama-cpp DIR)"},
        {
            "size": "cpu",
            "what": "decode.side_by_side",
            "system": "impl int4, lm_head int8",
            "tok_s": 90.0,
            "bytes_per_token": 90e6,
            "vs_impl_model_dtype": 1.5,
            "copy_gb_s": 24.0,
            "share_of_limit": 0.3375,
        },
    ]
    out = table(recs)
    assert "| cpu | llama.cpp | not installed (give --llama-cpp DIR) | - | - |" in out
    assert "| cpu | impl int4, lm_head int8 | 90 MB | 90.0 | 1.50x | 0.34 (copy 24.0 GB/s) |" in out
    json.dumps(recs)  # records stay JSON lines

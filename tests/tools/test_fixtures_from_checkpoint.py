"""tools/fixtures_from_checkpoint.py (`qwen25vl fixtures`): streamed goldens from the user's checkpoint.

Streaming changes no number (the cases equal the bundled generator's on the same checkpoint, under the
regeneration rule), the harness accepts the folder as is, memory stays below whole-model loading, and
bad inputs are refused with a clear message and nothing written.
"""

import json
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from qwen25vl.conformance.cli import conform
from qwen25vl.conformance.fixtures import content_difference
from qwen25vl.spec.checkpoint import load_checkpoint
from qwen25vl.tools import fixtures_from_checkpoint as ffc
from qwen25vl.tools.generate_fixtures import CHECKPOINT, generate
from qwen25vl.tools.make_tiny_checkpoint import make_tiny_checkpoint

CASE = "model_batch"  # two rows, left padding, a row stopping at eos: the most the streaming path must carry


def _sharded_copy(src: Path, dst: Path, shards: int = 2) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("manifest.json"))
    ffc.shard_checkpoint(dst, shards)
    return dst


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """(bundled generator's folder, streamed folder) for CASE on the same tiny checkpoint."""
    root = tmp_path_factory.mktemp("own")
    generate(root / "bundled", only=CASE)
    ck = _sharded_copy(root / "bundled" / CHECKPOINT, root / "sharded")
    assert ffc.main(["--checkpoint", str(ck), "--out", str(root / "streamed"), "--cases", CASE]) == 0
    return root / "bundled", root / "streamed", ck


MEASURED = ("control", "control_teacher", "logit_noise")  # the spec's own low-precision noise, per stage


def _split_manifest(manifest: Path, out: Path) -> tuple[Path, list[float]]:
    """(the manifest without the checkpoint it names, the producer and the measured controls, those controls
    as one flat list of floats)."""
    raw = json.loads(manifest.read_text("utf-8"))
    raw.pop("checkpoint"), raw.pop("producer")
    measured = [raw["stages"][s].pop(k) for s in sorted(raw["stages"]) for k in MEASURED if k in raw["stages"][s]]
    out.write_text(json.dumps(raw), encoding="utf-8")
    flat = []

    def walk(v):
        if isinstance(v, dict):
            [walk(v[k]) for k in sorted(v)]
        elif isinstance(v, list):
            [walk(x) for x in v]
        else:
            flat.append(float(v))

    walk(measured)
    return out, flat


def test_streamed_case_equals_bundled_generator(both, tmp_path):
    bundled, streamed, _ = both
    old, new = bundled / CASE, streamed / CASE
    files = sorted(p.relative_to(old) for p in old.rglob("*") if p.is_file())
    assert sorted(p.relative_to(new) for p in new.rglob("*") if p.is_file()) == files
    for f in files:
        if f.name == "manifest.json":  # the checkpoint it names (and the producer's versions) differ by design
            a, a_measured = _split_manifest(new / f, tmp_path / "new.json")
            b, b_measured = _split_manifest(old / f, tmp_path / "old.json")
            assert content_difference(a, b) is None
            # The controls are statistics of noise: the float64 logits of a chunked LM head differ from one
            # whole matmul in the last bit (BLAS picks its kernel by shape), and a KL of 1e-13 between two
            # nearly equal distributions carries that at 1e-8 relative, above the JSON rule's 1e-9.
            assert a_measured == pytest.approx(b_measured, rel=1e-6, abs=1e-12)
        else:
            assert content_difference(new / f, old / f) is None, f


def test_output_is_a_fixtures_folder_the_harness_accepts(both, capsys):
    _, streamed, ck = both
    manifest = json.loads((streamed / CASE / "manifest.json").read_text("utf-8"))
    assert manifest["checkpoint"] == "../checkpoints/own"
    links = streamed / "checkpoints" / "own"
    assert (links / "model-00001-of-00002.safetensors").resolve() == (ck / "model-00001-of-00002.safetensors")
    assert not (ck / "manifest.json").exists()  # the user's folder is not written to
    assert conform(["--target", "spec", "--dtype", "float32", "--fixtures", str(streamed), "--in-process"]) == 0
    assert "RESULT: PASS" in capsys.readouterr().out


def test_streamed_params_read_the_same_tensors(tiny_checkpoint, tmp_path):
    ck = _sharded_copy(tiny_checkpoint, tmp_path / "ck", shards=3)
    config, whole = load_checkpoint(ck, dtype=torch.float64)
    streamed = ffc.StreamedParams(ck, config, torch.float64)
    assert set(streamed) == set(whole)
    for key in whole:
        if key in (ffc.EMBED, ffc.HEAD):
            continue
        assert torch.equal(streamed[key], whole[key]), key
    ids = torch.tensor([[5, 151655, 5], [0, 151643, 7]])
    assert torch.equal(streamed[ffc.EMBED][ids], whole[ffc.EMBED][ids])
    x = torch.randn(2, 3, config.hidden_size, dtype=torch.float64)
    torch.testing.assert_close(x @ streamed[ffc.HEAD].T, x @ whole[ffc.HEAD].T, rtol=1e-12, atol=1e-12)


MEASURE = textwrap.dedent(
    r"""
    import re, sys, torch
    from qwen25vl.spec.checkpoint import load_checkpoint
    from qwen25vl.spec.config import Qwen25VLConfig
    from qwen25vl.spec.forward import forward
    from qwen25vl.tools.fixtures_from_checkpoint import StreamedParams
    folder, how = sys.argv[1], sys.argv[2]
    if how == "whole":
        config, params = load_checkpoint(folder, dtype=torch.float64)
    else:
        config = Qwen25VLConfig.from_file(folder)
        params = StreamedParams(folder, config, torch.float64)
    ids = torch.arange(1000, 1016).view(1, 16)
    with torch.no_grad():
        logits, _ = forward(params, config, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    # VmHWM is this address space's own high-water mark. ru_maxrss is not: Linux carries the forking
    # parent's RSS into it across exec, so under a pytest worker of 3.9 GB both runs read 3.9 GB.
    hwm_kib = int(re.search(r"^VmHWM:\s+(\d+) kB", open("/proc/self/status").read(), re.M).group(1))
    print(hwm_kib * 1024, float(logits.double().abs().sum()))
    """
)


def test_streaming_peak_memory_below_whole_model(tmp_path):
    """A mid-size checkpoint (untied vocabulary tables at width 256: 622 MB in float64): the same
    forward, whole-model float64 loading vs streaming, each in its own process."""
    from qwen25vl.tools.make_tiny_checkpoint import tiny_config

    tiny = tiny_config()
    config = replace(
        tiny, hidden_size=256, intermediate_size=512, num_attention_heads=8, mrope_section=(4, 6, 6),
        vision=replace(tiny.vision, out_hidden_size=256),
    )  # fmt: skip
    ck = make_tiny_checkpoint(tmp_path / "mid", config=config)
    ffc.shard_checkpoint(ck, 2)
    whole_f64 = sum(t.numel() for t in load_checkpoint(ck)[1].values()) * 8
    runs = {}
    for how in ("whole", "streamed"):
        out = subprocess.run([sys.executable, "-c", MEASURE, str(ck), how], capture_output=True, text=True, check=True)
        rss, checksum = out.stdout.split()
        runs[how] = (int(rss), float(checksum))
    assert runs["whole"][1] == pytest.approx(runs["streamed"][1], rel=1e-12)  # the same forward
    saved = runs["whole"][0] - runs["streamed"][0]
    # streaming keeps neither vocabulary table nor the layers: it saves a large part of the float64
    # model (measured 0.49x of it beside another pytest worker, more alone; the allocator's reuse varies)
    assert saved > 0.3 * whole_f64, (
        f"whole {runs['whole'][0] / 1e6:.0f} MB, streamed {runs['streamed'][0] / 1e6:.0f} MB"
    )


def _refused(capsys, parent: Path, *args) -> str:
    before = set(parent.iterdir())
    assert ffc.main([*args]) == 2
    assert set(parent.iterdir()) == before  # nothing written, no partial folder left
    return capsys.readouterr().err


def test_bad_inputs_are_refused_and_write_nothing(tiny_checkpoint, tmp_path, capsys):
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    out = str(out_parent / "new")
    err = _refused(capsys, out_parent, "--checkpoint", str(tmp_path / "absent"), "--out", out)
    assert "absent" in err and "does not exist" in err

    no_config = tmp_path / "no_config"
    shutil.copytree(tiny_checkpoint, no_config, ignore=shutil.ignore_patterns("config.json"))
    err = _refused(capsys, out_parent, "--checkpoint", str(no_config), "--out", out)
    assert "no config.json" in err

    shard_gone = _sharded_copy(tiny_checkpoint, tmp_path / "shard_gone")
    (shard_gone / "model-00002-of-00002.safetensors").unlink()
    err = _refused(capsys, out_parent, "--checkpoint", str(shard_gone), "--out", out)
    assert "model-00002-of-00002.safetensors" in err

    llama = tmp_path / "llama"
    shutil.copytree(tiny_checkpoint, llama)
    raw = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(
        json.dumps({**raw, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    err = _refused(capsys, out_parent, "--checkpoint", str(llama), "--out", out)
    assert "llama" in err.lower()

    err = _refused(capsys, out_parent, "--checkpoint", str(tiny_checkpoint), "--out", out, "--cases", "model_nope")
    assert "model_nope" in err

    (out_parent / "taken").mkdir()
    err = _refused(capsys, out_parent, "--checkpoint", str(tiny_checkpoint), "--out", str(out_parent / "taken"))
    assert "exists" in err


def test_failure_midway_leaves_no_output(tiny_checkpoint, tmp_path, monkeypatch):
    def fail(name, out, *args, **kwargs):
        (out / name).mkdir()
        (out / name / "golden.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(ffc, "write_model", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        ffc.fixtures_from_checkpoint(tiny_checkpoint, tmp_path / "out", ["model_image"])
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_past_float16s_range_gets_no_float16_control(tmp_path, capsys):
    """A residual channel past 65504 makes the spec's own float16 run inf: that control is left out (a stand-in
    judges float16, said so), never written as Infinity or NaN, which would budget anything or nothing."""
    from safetensors.torch import load_file, save_file

    ck = make_tiny_checkpoint(tmp_path / "ck", tied=True)
    weights = load_file(str(ck / "model.safetensors"))
    weights["visual.blocks.1.mlp.down_proj.bias"][5] = 61440.0  # + block 0's 20480: 81920 in channel 5
    save_file(weights, str(ck / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "own"
    assert ffc.main(["--checkpoint", str(ck), "--out", str(out), "--cases", "model_outliers"]) == 0
    text = (out / "model_outliers" / "manifest.json").read_text("utf-8")
    assert "Infinity" not in text and "NaN" not in text
    stages = json.loads(text)["stages"]
    assert "float16" not in stages["vision.block.1"]["control"] and stages["vision.block.1"]["not_held"] == ["float16"]
    assert "float16" in stages["vision.block.0"]["control"] and "not_held" not in stages["vision.block.0"]
    assert {"bfloat16", "float32"} <= set(stages["vision.block.1"]["control"])

    assert conform(["--target", "spec", "--dtype", "float32", "--fixtures", str(out), "--in-process"]) == 0
    capsys.readouterr()
    report = tmp_path / "r.json"
    args = ["--target", "spec", "--dtype", "float16", "--fixtures", str(out), "--in-process", "--json", str(report)]
    assert conform(args) == 1
    rows = {r["stage"]: r for r in json.loads(report.read_text())["results"] if r.get("mode", "e2e") == "e2e"}
    block = rows["vision.block.1"]
    assert block["status"] == "error" and "non-finite" in block["metric"], block
    assert "the spec's own float16 run is not finite here" in block["tolerance"], block

"""File exchange v2 (docs/exchange.md): the conversions a port declares, the numpy-only port kit, and a
port written from the document alone (numpy_port/port.py) judged through the files it writes."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from qwen25vl.conformance import conversions
from qwen25vl.conformance.adapters.files import FilesAdapter, read_port_json
from qwen25vl.conformance.conversions import ConversionError
from qwen25vl.conformance.fixtures import load_case
from qwen25vl.tools import cli
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
PORT = Path(__file__).resolve().parent / "numpy_port" / "port.py"
KIT_PATH = ROOT / "conformance" / "port_kit" / "qwen25vl_exchange.py"

# runs a script with `import torch` / `import qwen25vl` (and safetensors, transformers) made to fail
NO_TORCH = """
import runpy, sys
BLOCKED = ("torch", "qwen25vl", "safetensors", "transformers")
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"the numpy port may not import {name}")
sys.meta_path.insert(0, Blocker())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def kit():
    spec = importlib.util.spec_from_file_location("qwen25vl_exchange", KIT_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("in")
    assert cli.main(["conform", "--cases", "model_", "--export-inputs", str(folder)]) == 0
    return folder


# ---------------------------------------------------------------- the proof: a port from the document alone


@pytest.fixture(scope="module")
def ported(exported, tmp_path_factory):
    """OUT of the numpy port, run with torch and qwen25vl unimportable."""
    out = tmp_path_factory.mktemp("out")
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(PORT), str(exported), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_numpy_port_passes_every_model_case_through_the_conversions(ported, tmp_path):
    out = ported
    # it could only have been judged through the conversions: rows, last logits, its own layouts
    declared = json.loads((out / "port.json").read_text())
    assert {k: declared[k] for k in conversions.CONVENTIONS} == {
        "outputs": "rows",
        "logits": "last",
        "vision_block_order": "window",
        "positions": "sections4",
        "rope_deltas": "unpadded",
    }
    assert not list(out.glob("*/outputs.safetensors"))
    row = load_file(str(out / "model_batch" / "rows" / "1.safetensors"))
    assert row["logits"].shape == (152064,) and row["text.position_ids"].shape[0] == 4
    lengths = load_case(FIXTURES / "model_batch").tensors("inputs.safetensors")["attention_mask"].sum(-1)
    assert row["text.norm"].shape[0] == int(lengths[1]) < int(lengths.max())  # no padding in a row

    code = cli.main(["conform", "--target", f"files:{out}", "--cases", "model_", "--json", str(tmp_path / "r.json")])
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert code == 0
    model = [r for r in results if not r["stage"].startswith("preprocess.")]
    assert {r["case"] for r in model} == {
        "model_image",
        "model_batch",
        "model_video",
        "model_image_swap",
        "model_text",
        "model_resize_tie",
        "model_thin",
        "model_video_fps",
        "model_video_sparse",
        "model_video_file",
        "model_video_budget",
        "model_outliers",
        "model_video_image",
        "model_media_forms",
    }
    assert all(r["status"] == "pass" for r in model), [(r["case"], r["stage"], r["metric"]) for r in model]
    stages = {r["stage"] for r in model}
    assert {
        "logits",
        "text.position_ids",
        "text.rope_deltas",
        "vision.block.0",
        "generate.tokens",
        "state.repeat",
        "state.chunked",  # the port prefilled each <case>@chunked prompt in chunks of prefill_chunk tokens
    } <= stages
    # preprocessing is not this port's business: not covered, never a failure
    assert {r["status"] for r in results if r["stage"].startswith("preprocess.")} == {"not_covered"}


def test_a_chunked_generation_is_read_from_its_own_folder(ported, exported, tmp_path):
    """IN/<case>@chunked/case.json holds the chunk the case runner picks; OUT/<case>@chunked/ is judged as
    state.chunked: a changed token there fails it (and nothing else), a missing folder is not covered."""
    info = json.loads((exported / "model_image@chunked" / "case.json").read_text())
    assert (info["chunked_of"], info["prefill_chunk"], info["stages"]) == ("model_image", 45, ["generate.tokens"])
    assert "inside the image span 18..71" in info["prefill_chunks"]
    order = json.loads((exported / "order.json").read_text())["run_in_one_process_in_this_order"]
    assert order[-1].endswith("@chunked") and "model_batch@chunked" in order
    out = tmp_path / "out"
    shutil.copytree(ported, out)
    tokens = out / "model_image@chunked" / "generate.tokens.json"
    answer = json.loads(tokens.read_text())
    answer["tokens"][0][1] = 17
    answer.pop("topk", None)  # a top-k without the port's own pick is an error, not a divergence
    answer.pop("topk_logprobs", None)
    tokens.write_text(json.dumps(answer))
    shutil.rmtree(out / "model_thin@chunked")
    code = cli.main(
        ["conform", "--target", f"files:{out}", "--cases", "model_(image|thin)$", "--json", str(tmp_path / "r.json")]
    )
    results = {(r["case"], r["stage"]): r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert code == 1
    assert results[("model_image", "state.chunked")]["status"] == "fail"
    assert "chunks of 45 tokens" in results[("model_image", "state.chunked")]["where"]
    assert results[("model_image", "generate.tokens")]["status"] == "pass"
    assert results[("model_thin", "state.chunked")]["status"] == "not_covered"
    assert results[("model_thin", "generate.tokens")]["status"] == "pass"


def test_a_key_the_port_leaves_out_stays_not_covered(ported, tmp_path):
    qx = kit()
    out = tmp_path / "out"
    shutil.copytree(ported, out)
    row = out / "model_image" / "rows" / "0.safetensors"
    stages = qx.load_safetensors(row)
    del stages["text.layer.1"]
    qx.save_safetensors(row, stages)
    argv = ["conform", "--target", f"files:{out}", "--cases", "model_image$", "--stages", "text.layer"]
    assert cli.main(argv + ["--no-diagnosis", "--json", str(tmp_path / "r.json")]) == 0
    status = {r["stage"]: r["status"] for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert status == {"text.layer.0": "pass", "text.layer.1": "not_covered"}


def test_the_batch_layout_with_last_logits_window_order_and_unpadded_deltas(ported, tmp_path):
    """The same answers written as one batch (laid out here by hand from the rows): the batch branch."""
    qx = kit()
    mask = load_case(FIXTURES / "model_batch").tensors("inputs.safetensors")["attention_mask"].numpy()
    B, L = mask.shape
    rows = [qx.load_safetensors(ported / "model_batch" / "rows" / f"{i}.safetensors") for i in range(B)]
    batch = {}
    for key in rows[0]:
        if key.startswith("vision."):  # images of row 0, then of row 1
            batch[key] = np.concatenate([r[key] for r in rows])
        elif key.startswith("text.") and key not in ("text.position_ids", "text.rope_deltas"):
            batch[key] = np.zeros((B, L, rows[0][key].shape[-1]))
            for i, r in enumerate(rows):
                batch[key][i, L - len(r[key]) :] = r[key]
    batch["text.position_ids"] = np.ones((3, B, L), np.int64)
    for i, r in enumerate(rows):
        batch["text.position_ids"][:, i, L - r["text.position_ids"].shape[1] :] = r["text.position_ids"][:3]
    batch["text.rope_deltas"] = np.array([int(r["text.rope_deltas"][0]) for r in rows])  # [B], unpadded
    batch["logits"] = np.stack([r["logits"] for r in rows])  # [B, V]
    out = tmp_path / "out"
    qx.write_outputs(out, "model_batch", batch, bfloat16=())
    shutil.copy(ported / "model_batch" / "generate.tokens.json", out / "model_batch")
    qx.write_port_json(
        out, name="batch", dtype="float64", logits="last", vision_block_order="window", rope_deltas="unpadded"
    )
    argv = ["conform", "--target", f"files:{out}", "--cases", "model_batch$", "--no-diagnosis"]
    assert cli.main(argv + ["--json", str(tmp_path / "r.json")]) == 0
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    model = {r["stage"]: r["status"] for r in results if not r["stage"].startswith(("preprocess.", "state."))}
    assert set(model.values()) == {"pass"}, model
    assert {"logits", "text.position_ids", "text.rope_deltas", "vision.block.3", "text.norm", "generate.tokens"} <= set(
        model
    )


# ---------------------------------------------------------------- each conversion, by hand


def test_rows_are_placed_at_the_real_tokens_of_a_left_padded_batch():
    mask = torch.tensor([[0, 0, 1], [1, 1, 1]])
    rows = [torch.tensor([[7.0]]), torch.tensor([[1.0], [2.0], [3.0]])]
    got = conversions.place_rows(rows, mask, ["r0", "r1"])
    assert got.tolist() == [[[0.0], [0.0], [7.0]], [[1.0], [2.0], [3.0]]]
    # the expected shape claims only what is known: the row's tokens, and the width when it is given
    with pytest.raises(ConversionError, match=r"^r0: expected shape \[1, \*\] \(row 0's 1 real tokens, no padding\)"):
        conversions.place_rows([torch.ones(3, 1), rows[1]], mask, ["r0", "r1"])
    with pytest.raises(
        ConversionError, match=r"^r0: expected shape \[1, 1\] \(row 0's 1 real tokens, no padding\), got \[1, 3\]"
    ):
        conversions.place_rows([torch.ones(1, 3), rows[1]], mask, ["r0", "r1"], width=1)
    with pytest.raises(
        ConversionError, match=r"^r1: expected shape \[3, 1\] \(the trailing axes of row 0, \[1\]\), got \[3, 2\]"
    ):
        conversions.place_rows([rows[0], torch.ones(3, 2)], mask, ["r0", "r1"])


def test_window_order_is_undone_exactly():
    # grid (1, 8, 12): units 4x6, windows of 4x4 units; the window order, written out by hand
    index = [0, 1, 2, 3, 6, 7, 8, 9, 12, 13, 14, 15, 18, 19, 20, 21, 4, 5, 10, 11, 16, 17, 22, 23]
    pixel_order = torch.arange(96.0)[:, None].repeat(1, 2)  # [P, 2]: row p holds p
    window_order = torch.cat([pixel_order[4 * u : 4 * u + 4] for u in index])
    got = conversions.unpermute_windows(
        window_order, [[1, 8, 12]], window_size=112, patch_size=14, merge_size=2, where="f key 'vision.block.0'"
    )
    assert torch.equal(got, pixel_order)
    with pytest.raises(ConversionError, match=r"f key 'vision.block.0': expected shape \[96, \*\]"):
        conversions.unpermute_windows(
            window_order[:-4],
            [[1, 8, 12]],
            window_size=112,
            patch_size=14,
            merge_size=2,
            where="f key 'vision.block.0'",
        )


def test_positions_layouts_agree_after_conversion():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    t, h, w = [0, 1, 1], [0, 1, 2], [0, 2, 1]
    row1 = [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]]
    canonical = torch.tensor([[[1] + t, row1[0]], [[1] + h, row1[1]], [[1] + w, row1[2]]])  # [3, B, L]
    forms = {
        "sections": [torch.tensor([t, h, w]), torch.tensor(row1)],
        "sections4": [torch.tensor(t + h + w + [0, 0, 0]), torch.tensor(row1 + [[0] * 4])],  # flat and [4, L]
        "tokens": [torch.tensor([t, h, w]).T, torch.tensor(row1).T],
    }
    for layout, rows in forms.items():
        assert torch.equal(conversions.place_positions(rows, layout, mask, ["a", "b"]), canonical), layout
    with pytest.raises(ConversionError, match="a: the fourth section .* must be 0"):
        conversions.place_positions(
            [torch.tensor([t, h, w, [0, 0, 5]]), forms["sections4"][1]], "sections4", mask, ["a", "b"]
        )
    with pytest.raises(ConversionError, match=r"b: expected shape \[4, 4\] \(4 sections"):
        conversions.place_positions([forms["sections4"][0], torch.tensor(row1)], "sections4", mask, ["a", "b"])


def test_rope_deltas_in_either_convention():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    # row 0 alone: 3 tokens, largest position 0 -> delta 0 + 1 - 3 = -2; in the padded batch 0 + 1 - 5 = -4
    got = conversions.rope_deltas_padded(torch.tensor([-2, 7]), "unpadded", mask, "w")
    assert got.tolist() == [[-4], [7]]
    assert conversions.rope_deltas_padded(torch.tensor([[-4], [7]]), "padded", mask, "w").tolist() == [[-4], [7]]
    with pytest.raises(ConversionError, match=r"w: expected 2 rope_deltas \(one per row\)"):
        conversions.rope_deltas_padded(torch.tensor([1, 2, 3]), "padded", mask, "w")


def test_last_position_logits_are_judged_where_given():
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    full, given = conversions.place_last_logits(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), mask, "w")
    assert full[:, -1].tolist() == [[1.0, 2.0], [3.0, 4.0]] and full[:, :-1].abs().sum() == 0
    assert given.tolist() == [[False, False, True], [False, False, True]]
    with pytest.raises(ConversionError, match="w: the batch is not left padded"):
        conversions.place_last_logits(torch.ones(2, 2), torch.tensor([[1, 1, 0], [1, 1, 1]]), "w")


def test_generated_rows_of_different_lengths():
    got = conversions.pad_generated([[5, 9], [4, 2, 8, 1]], [9, 3], 0, "w")
    assert got.tolist() == [[5, 9, 0, 0], [4, 2, 8, 1]]
    with pytest.raises(ConversionError, match=r"w: row 0 has 2 tokens and does not end in an eos id \[9, 3\]"):
        conversions.pad_generated([[5, 6], [4, 2, 8, 1]], [9, 3], 0, "w")
    topk = conversions.pad_generated([[[1, 2]], [[3, 4], [5, 6]]], [9], 0, "w", fill=-1)
    assert topk.tolist() == [[[1, 2], [-1, -1]], [[3, 4], [5, 6]]]


def test_any_float_dtype_is_widened_and_integers_refused():
    x = torch.tensor([1.5, -2.25])
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert conversions.to_float32(x.to(dtype), "w").dtype == torch.float32
    with pytest.raises(ConversionError, match="w: expected a floating-point tensor, got torch.int64"):
        conversions.to_float32(torch.tensor([1, 2]), "w")


def test_port_json_declarations_are_checked(tmp_path):
    (tmp_path / "port.json").write_text(json.dumps({"name": "p", "positions": "yxt"}))
    with pytest.raises(ValueError, match=r"port.json key 'positions': positions = 'yxt' is not a known convention"):
        FilesAdapter(str(tmp_path))
    (tmp_path / "port.json").write_text(json.dumps({"name": "p", "logit": "last"}))
    with pytest.raises(ValueError, match=r"port.json: unknown key 'logit' \(did you mean logits\?\)"):
        read_port_json(tmp_path / "port.json")
    assert kit().CONVENTIONS == conversions.CONVENTIONS  # the vendored kit declares what the harness accepts


def test_a_row_that_does_not_fit_names_its_file_and_key(exported, tmp_path):
    qx = kit()
    qx.write_port_json(tmp_path, name="p", outputs="rows")
    case = load_case(FIXTURES / "model_batch")
    inputs = case.tensors("inputs.safetensors")
    lengths = [int(n) for n in inputs["attention_mask"].sum(-1)]
    for i, n in enumerate(lengths):
        qx.write_row(
            tmp_path, "model_batch", i, {"text.norm": np.zeros((n + i, 32), np.float32)}
        )  # row 1: one too many
    adapter = FilesAdapter(str(tmp_path))
    adapter.begin_case(case)
    got = adapter.run(dict(inputs), capture=["text.norm"])["text.norm"]
    assert isinstance(got, ConversionError)  # a value: the error of this stage alone
    assert re.fullmatch(
        rf"model_batch/rows/1\.safetensors key 'text\.norm': expected shape \[{lengths[1]}, 32\] "
        rf"\(row 1's {lengths[1]} real tokens, no padding; C, hidden_size 32\), got \[{lengths[1] + 1}, 32\]",
        str(got),
    )


# ---------------------------------------------------------------- the export and the numpy-only kit


def test_case_json_names_everything_a_port_needs(exported):
    info = json.loads((exported / "model_batch" / "case.json").read_text())
    ck = Path(info["checkpoint"])
    assert Path(info["preprocessor_config"]) == ck / "preprocessor_config.json"
    assert Path(info["config"]).is_file() and all(Path(p).is_file() for p in info["weights"])
    assert {"tokenizer_config.json"} <= set(info["tokenizer_files"]) and all(
        Path(p).is_file() for p in info["tokenizer_files"].values()
    )
    generate = load_case(FIXTURES / "model_batch").json("generate.json")
    assert info["max_new_tokens"] == generate["max_new_tokens"] and isinstance(info["eos_token_id"], list)
    assert info["rows"] == 2 and len(info["prompts"]) == 2 and len(info["row_lengths"]) == 2
    request = json.loads((exported / "model_batch" / "request.json").read_text())
    for conversation, prompt in zip(request["conversations"], info["prompts"]):
        parts = [p for m in conversation for p in (m["content"] if isinstance(m["content"], list) else [])]
        images = sum(p["type"] == "image" for p in parts)
        assert prompt.count("<|vision_start|><|image_pad|><|vision_end|>") == images
        assert all(p["text"] in prompt for p in parts if p["type"] == "text")
        assert prompt.endswith("<|im_start|>assistant\n")  # the generation prompt
    assert (exported / "order.json").is_file() and (exported / "model_batch@repeat" / "case.json").is_file()


def test_exact_cases_name_the_defaults_their_items_rely_on(tmp_path):
    assert cli.main(["conform", "--cases", "exact_(patches|prompt)", "--export-inputs", str(tmp_path)]) == 0
    pre = json.loads((tmp_path / "exact_patches" / "case.json").read_text())["defaults"]["fn.preprocess_image"]
    processor = json.loads((FIXTURES / "checkpoints" / "tiny" / "preprocessor_config.json").read_text())
    for key in ("image_mean", "image_std", "patch_size", "temporal_patch_size", "merge_size"):
        assert pre[key] == processor[key], key
    prompt = json.loads((tmp_path / "exact_prompt" / "case.json").read_text())
    assert all(Path(p).is_file() for p in prompt["tokenizer_files"].values()) and prompt["tokenizer_files"]


def test_port_kit_round_trips_against_the_safetensors_package(tmp_path):
    qx = kit()
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f64": rng.standard_normal(5),
        "f16": rng.standard_normal((2, 2)).astype(np.float16),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "b": np.array([True, False]),
        "scalar": np.array(7, dtype=np.int64),
    }
    arrays["bf16"] = rng.standard_normal((2, 3)).astype(np.float32)
    qx.save_safetensors(tmp_path / "kit.safetensors", arrays, bfloat16=("bf16",))
    theirs = load_file(str(tmp_path / "kit.safetensors"))
    for name, a in arrays.items():
        if name == "bf16":
            assert theirs[name].dtype == torch.bfloat16
            assert torch.equal(theirs[name].float(), torch.from_numpy(a).to(torch.bfloat16).float())  # torch rounds too
        else:
            assert np.array_equal(theirs[name].numpy(), a) and theirs[name].numpy().dtype == a.dtype, name
    torch_side = {
        "bf16": torch.randn(4, 5).to(torch.bfloat16),
        "f32": torch.randn(3),
        "i32": torch.arange(4, dtype=torch.int32),
    }
    save_file(torch_side, str(tmp_path / "torch.safetensors"), metadata={"format": "pt"})
    back = qx.load_safetensors(tmp_path / "torch.safetensors")
    assert back["bf16"].dtype == np.float32 and np.array_equal(back["bf16"], torch_side["bf16"].float().numpy())
    assert np.array_equal(back["f32"], torch_side["f32"].numpy()) and back["i32"].dtype == np.int32
    bits = qx.load_safetensors(tmp_path / "torch.safetensors", keep_bfloat16_bits=True)["bf16"]
    assert bits.dtype == np.uint16 and np.array_equal(
        bits, torch_side["bf16"].view(torch.int16).numpy().view(np.uint16)
    )
    (tmp_path / "short.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ValueError, match="short.safetensors: too short"):
        qx.load_safetensors(tmp_path / "short.safetensors")


# ---------------------------------------------------------------- a port's files that do not fit


def _conform(out: Path, cases: str, report: Path, *extra) -> tuple[int, dict]:
    argv = ["conform", "--target", f"files:{out}", "--cases", cases, "--no-diagnosis", "--json", str(report), *extra]
    code = cli.main(argv)
    return code, {(r["case"], r["stage"]): r for r in json.loads(report.read_text())["results"]}


def test_each_key_of_a_row_file_is_judged_on_its_own(ported, tmp_path):
    """Three bad keys in rows/0: each is the error of its own stage, named with the file, the key and the
    shape the case asks for (L_i and C from case.json / config.json); every other stage passes."""
    qx = kit()
    out = tmp_path / "out"
    shutil.copytree(ported, out)
    row = out / "model_image" / "rows" / "0.safetensors"
    d = qx.load_safetensors(row)
    n, c = d["text.norm"].shape
    p, cv = d["vision.block.2"].shape
    d["text.norm"] = d["text.norm"].T.copy()  # [C, L_i]
    d["vision.block.2"] = d["vision.block.2"][:-4].copy()
    d["text.layer.1"] = d["text.layer.1"][None].copy()
    d["vision.merger"] = np.round(d["vision.merger"]).astype(np.int64)
    qx.save_safetensors(row, d)

    case = load_case(FIXTURES / "model_image")
    adapter = FilesAdapter(str(out))
    adapter.begin_case(case)
    capture = [s for s in case.stages if not s.startswith(("preprocess.", "generate."))]
    got = adapter.run(dict(case.tensors("inputs.safetensors")), capture=capture)
    at = "model_image/rows/0.safetensors key"
    assert str(got["text.norm"]) == (
        f"{at} 'text.norm': expected shape [{n}, {c}] (row 0's {n} real tokens, no padding; C, hidden_size {c}), "
        f"got [{c}, {n}]"
    )
    assert str(got["text.layer.1"]).endswith(f"expected shape [{n}, {c}] (row 0's {n} real tokens, no padding; "
                                              f"C, hidden_size {c}), got [1, {n}, {c}]")  # fmt: skip
    assert str(got["vision.block.2"]).startswith(f"{at} 'vision.block.2': expected shape [{p}, {cv}]")
    assert str(got["vision.merger"]) == f"{at} 'vision.merger': expected a floating-point tensor, got torch.int64"
    bad = {"text.norm", "text.layer.1", "vision.block.2", "vision.merger"}
    assert all(isinstance(v, torch.Tensor) for k, v in got.items() if k.split("@")[0] not in bad)

    code, results = _conform(out, "model_image$", tmp_path / "r.json")
    status = {s: r["status"] for (case_name, s), r in results.items() if case_name == "model_image"}
    assert code == 1
    assert {s for s, v in status.items() if v == "error"} == bad
    assert results[("model_image", "text.norm")]["metric"].startswith(f"{at} 'text.norm': expected shape")  # as said
    assert {s for s, v in status.items() if v == "pass"} >= {"vision.block.0", "vision.block.3", "text.layer.0",
                                                              "logits", "text.position_ids", "generate.tokens"}  # fmt: skip


def test_a_misnamed_key_is_the_error_of_the_stage_it_meant(ported, tmp_path):
    qx = kit()
    out = tmp_path / "out"
    shutil.copytree(ported, out)
    row = out / "model_image" / "rows" / "0.safetensors"
    d = qx.load_safetensors(row)
    d["vision.blocks.0"] = d.pop("vision.block.0")
    d["not.a.stage"] = np.zeros(3, np.float32)
    qx.save_safetensors(row, d)
    case = load_case(FIXTURES / "model_image")
    adapter = FilesAdapter(str(out))
    adapter.begin_case(case)
    capture = [s for s in case.stages if not s.startswith(("preprocess.", "generate."))]
    got = adapter.run(dict(case.tensors("inputs.safetensors")), capture=capture)
    assert str(got["vision.block.0"]) == (
        "unknown stage key 'vision.blocks.0' in model_image/rows/0.safetensors (did you mean vision.block.0?)"
    )
    said = [str(v) for v in got.values() if isinstance(v, ConversionError) and "'not.a.stage'" in str(v)]
    assert len(said) == 1 and "no stage of this case is named so" in said[0]
    code, results = _conform(out, "model_image$", tmp_path / "r.json", "--stages", "vision")
    assert code == 1 and results[("model_image", "vision.block.0")]["status"] == "error"


@pytest.mark.parametrize(
    "content, said",
    [
        (b'{"tokens": [[32810, 39784,', r"not valid JSON: Expecting value at line 1 column 27 \(the file ends there"),
        (b'{"tokens": [[1, 2]], "\xff\xfe": 1}', r"not UTF-8 text \(byte 22 is b'\\xff'\)"),
        (b'{"tokens": ' + b"[" * 100000 + b"]" * 100000 + b"}", "JSON nested too deep to read"),
        (b'{"tokens": [["a", null]]}', r"key 'tokens': row 0 step 0: 'a' is not an integer token id"),
        (b'{"tokens": [[32810, null]]}', r"key 'tokens': row 0 step 1: None is not an integer token id"),
        (b'{"tokens": [[1e999999, 32810]]}', r"key 'tokens': row 0 step 0: inf is not an integer token id"),
        (b'{"tokens": [[32810, 39784.5]]}', r"key 'tokens': row 0 step 1: 39784.5 is not an integer token id"),
        (b'{"tokens": [[32810, 39784.0]]}', r"key 'tokens': row 0 step 1: 39784.0 is not an integer token id"),
        (b'{"tokens": [[32810, 39784, -5]]}', r"row 0 step 2: id -5 is not a token id \(0 <= id < vocab_size 152064\)"),
        (b'{"tokens": [[152064]]}', r"row 0 step 0: id 152064 is not a token id \(0 <= id < vocab_size 152064\)"),
        (b'{"tokens": [[1, 2]], "topk": [[[1, 2], [3, 4.5]]]}', r"key 'topk': row 0 step 1: 4.5 is not an integer"),
        (b'{"tokens": [[1, 2]], "topk_logprobs": [[["x"], [0.0]]]}', r"key 'topk_logprobs': row 0 step 0: 'x' is not"),
        (b'{"tokens": [[1, 2]], "topk_ids": []}', r"unknown key 'topk_ids' \(did you mean topk\?\)"),
        (b'{"tokens": [[1, 2], [3]]}', r"key 'tokens': 2 rows, the batch has 1"),
    ],
)
def test_a_malformed_tokens_file_is_named_with_what_is_wrong(tmp_path, content, said):
    case = load_case(FIXTURES / "model_image")
    (tmp_path / "model_image").mkdir()
    (tmp_path / "model_image" / "generate.tokens.json").write_bytes(content)
    adapter = FilesAdapter(str(tmp_path))
    adapter.begin_case(case)
    with pytest.raises(ConversionError, match=r"^model_image/generate\.tokens\.json:? .*" + said):
        adapter.generate(dict(case.tensors("inputs.safetensors")), max_new_tokens=6, eos_token_id=[151645, 151643])


def test_a_tokens_file_that_is_no_plain_file_or_too_large_is_refused(tmp_path, monkeypatch):
    from qwen25vl.conformance.adapters import files

    case = load_case(FIXTURES / "model_image")
    inputs = dict(case.tensors("inputs.safetensors"))
    folder = tmp_path / "model_image"
    folder.mkdir()
    adapter = FilesAdapter(str(tmp_path))
    adapter.begin_case(case)
    tokens = folder / "generate.tokens.json"

    def refused(match):
        with pytest.raises(ConversionError, match=match):
            adapter.generate(inputs, max_new_tokens=6, eos_token_id=[151645])

    tokens.mkdir()
    refused(r"^model_image/generate\.tokens\.json: is a folder, not a file$")
    tokens.rmdir()
    os.mkfifo(tokens)  # opened, it would wait for a writer forever
    refused(r"^model_image/generate\.tokens\.json: is not a regular file")
    tokens.unlink()
    tokens.write_text('{"tokens": [[1, 2, 3]]}')
    monkeypatch.setattr(files, "MAX_JSON_BYTES", 10)
    adapter = FilesAdapter(str(tmp_path))
    adapter.begin_case(case)
    refused(r"^model_image/generate\.tokens\.json: 23 bytes, more than the 10 a JSON file of the exchange may hold")


def test_rows_that_stopped_at_an_eos_are_padded_as_the_golden_is(tmp_path):
    """model_batch's golden row 1 stopped at 151643 (an eos) at step 4 and is padded with the pad id
    151643: a port that writes the row up to its eos gives exactly the golden [2, 6]."""
    case = load_case(FIXTURES / "model_batch")
    golden = case.json("generate.json")["tokens"]
    assert golden[1][4:] == [151643, 151643]
    (tmp_path / "model_batch").mkdir()
    written = {"tokens": [golden[0], golden[1][:5]]}
    (tmp_path / "model_batch" / "generate.tokens.json").write_text(json.dumps(written))
    adapter = FilesAdapter(str(tmp_path))
    adapter.begin_case(case)
    got = adapter.generate(dict(case.tensors("inputs.safetensors")), max_new_tokens=6, eos_token_id=[151645, 151643])
    assert got["tokens"].tolist() == golden and got["tokens"].dtype == torch.int64


def test_a_port_that_stops_too_early_diverges_where_it_stopped(ported, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(ported, out)
    tokens = out / "model_image" / "generate.tokens.json"
    written = json.loads(tokens.read_text())["tokens"][0]
    tokens.write_text(json.dumps({"tokens": [written[:2] + [151645]]}))  # an eos at step 2; the golden goes on
    code, results = _conform(out, "model_image$", tmp_path / "r.json", "--stages", "generate")
    r = results[("model_image", "generate.tokens")]
    assert code == 1 and r["status"] == "fail", r
    assert r["metric"].startswith(
        f"row 0 diverges at step 2: golden {load_case(FIXTURES / 'model_image').json('generate.json')['tokens'][0][2]}, got 151645"
    )


def test_port_json_that_cannot_be_read_or_holds_a_bad_value_is_refused(tmp_path):
    pj = tmp_path / "port.json"
    pj.mkdir()
    with pytest.raises(ValueError, match=r"^port.json: is a folder, not a file$"):
        FilesAdapter(str(tmp_path))
    pj.rmdir()
    for meta, said in (
        ({"exchange": "two"}, r"port.json key 'exchange': 'two' is not 2 \(the integer version\)"),
        ({"exchange": 2.0}, r"port.json key 'exchange': 2.0 is not 2"),
        ({"name": ["x"]}, r"port.json key 'name': expected a string, got \['x'\]"),
        ({"dtype": "float128"}, r"port.json key 'dtype': 'float128' is not a precision"),
        ({"outputs": "columns"}, r"port.json key 'outputs': outputs = 'columns' is not a known convention"),
    ):
        pj.write_text(json.dumps(meta))
        with pytest.raises(ValueError, match=said):
            FilesAdapter(str(tmp_path))
    pj.write_bytes(b'{"name": "x", "dtype": ')
    with pytest.raises(ValueError, match=r"^port.json: not valid JSON: .*cut short"):
        FilesAdapter(str(tmp_path))
    pj.write_text(json.dumps({"name": "x", "exchange": 2, "dtype": "bfloat16"}))
    assert FilesAdapter(str(tmp_path)).dtype == "bfloat16"
    with pytest.raises(ValueError, match="files target: no folder given"):
        FilesAdapter("")


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_a_failed_export_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    from qwen25vl.conformance.adapters import files

    conflict = tmp_path / "conflict"
    (conflict / "model_image").mkdir(parents=True)
    (conflict / "model_image" / "media").write_text("x")  # a file where the export needs a folder
    before = _tree(conflict)
    assert cli.main(["conform", "--export-inputs", str(conflict), "--cases", "exact_windows$|model_image$"]) == 2
    assert _tree(conflict) == before  # no exact_windows, no case folder without case.json, no order.json

    good = tmp_path / "good"
    assert cli.main(["conform", "--export-inputs", str(good), "--cases", "exact_windows$|model_image$"]) == 0
    (good / "model_image" / "port_notes.txt").write_text("the port's own")
    before = _tree(good)
    real, calls = files._write_case, []

    def fails_on_the_third(case, info, d):
        calls.append(d)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", str(d / "inputs.safetensors"))
        real(case, info, d)

    monkeypatch.setattr(files, "_write_case", fails_on_the_third)
    assert cli.main(["conform", "--export-inputs", str(good), "--cases", "exact_windows$|model_image$"]) == 2
    assert _tree(good) == before  # the two cases already staged were not renamed in either
    monkeypatch.setattr(files, "_write_case", real)
    assert cli.main(["conform", "--export-inputs", str(good), "--cases", "exact_windows$|model_image$"]) == 0
    assert _tree(good) == before

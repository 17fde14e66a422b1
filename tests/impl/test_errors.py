"""Bad input to impl: clear ValueErrors that name the input, the value and the limit."""

import pytest
import torch
from qwen25vl.impl.cache import cache_bytes, check_cache_fits
from qwen25vl.impl.model import Qwen25VL, check_dtype_device

from .helpers import vision_inputs


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return Qwen25VL.from_pretrained(tiny_checkpoint, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize(
    "dtype,device,match",
    [
        (torch.float16, "cpu", "dtype float16 is not supported on cpu"),
        (torch.float64, "cpu", "dtype float64 is not supported on cpu"),
        ("int8", "cpu", "dtype must be"),
        (torch.float32, "tpu", "not a torch device|not supported"),
    ],
)
def test_dtype_device_refused(dtype, device, match):
    with pytest.raises(ValueError, match=match):
        check_dtype_device(dtype, device)


def test_cuda_refused_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # only reachable in tools/gpu_check.sh, never in CI
    with pytest.raises(ValueError, match="cuda"):
        check_dtype_device(torch.bfloat16, "cuda")


def test_from_pretrained_refuses_before_loading(tmp_path):
    """Bad options fail fast, before the (missing) folder is read."""
    with pytest.raises(ValueError, match=r"quantize must be None or one of \('int4', 'w4a8'\), got 'int8'"):
        Qwen25VL.from_pretrained(tmp_path, dtype=torch.float32, device="cpu", quantize="int8")
    with pytest.raises(ValueError, match="attention='varlen' needs"):
        Qwen25VL.from_pretrained(tmp_path, dtype=torch.float32, device="cpu", attention="varlen")
    with pytest.raises(ValueError, match="float16 is not supported on cpu"):
        Qwen25VL.from_pretrained(tmp_path, dtype="float16", device="cpu")


def test_cache_too_large_is_refused_with_numbers(model):
    """batch x max_len beyond the free memory: ValueError with GiB numbers, nothing allocated."""
    cfg = model.config
    inputs = vision_inputs(cfg, [[1, 2, 3]] * 4096, [], [], seed=0)
    need = cache_bytes(cfg, 4096, 3 + 100_000, torch.float32)
    assert need > 64 * 1024**3  # far beyond this machine (and the GPU machine's host)
    with pytest.raises(ValueError, match=r"KV cache for batch 4096 x 100003 tokens needs [0-9.]+ GiB .* GiB free"):
        model.generate_from_inputs(inputs, 100_000, [151645])


def test_cache_beyond_max_positions(model):
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 128000"):
        check_cache_fits(model.config, 1, 128_001, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer, got 0"),
        ({"eos_token_id": [10**7]}, "eos_token_id must be one id or a list of ids in 0..152063"),
        ({"eos_token_id": []}, "eos_token_id"),
    ],
)
def test_generate_arguments(model, kwargs, match):
    inputs = vision_inputs(model.config, [[1, 2, 3]], [], [], seed=0)
    args = {"max_new_tokens": 4, "eos_token_id": [151645]} | kwargs
    with pytest.raises(ValueError, match=match):
        model.generate_from_inputs(inputs, args["max_new_tokens"], args["eos_token_id"])


def test_right_padding_refused(model):
    inputs = vision_inputs(model.config, [[1, 2, 3], [4]], [], [], seed=0)
    inputs["attention_mask"] = inputs["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="left padding"):
        model.generate_from_inputs(inputs, 4, [151645])


def test_bad_inputs(model):
    cfg = model.config
    inputs = vision_inputs(cfg, [[1, 2, 3]], [(0, (1, 4, 4))], [], seed=0)
    bad = dict(inputs, pixel_values=inputs["pixel_values"][:-1])
    with pytest.raises(ValueError, match="pixel_values"):
        model.forward(bad)
    bad = dict(inputs, input_ids=inputs["input_ids"].clone())
    bad["input_ids"][0, 0] = 10**6
    with pytest.raises(ValueError, match="outside the vocabulary 0..152063"):
        model.forward(bad)
    bad = dict(inputs, image_grid_thw=torch.tensor([[1, 4, 8]]), pixel_values=torch.zeros(32, 1176))
    with pytest.raises(ValueError, match="image"):  # 8 image tokens needed, the prompt has 4
        model.forward(bad)


def test_generate_needs_tokenizer(tiny_checkpoint):
    from qwen25vl.spec.checkpoint import load_checkpoint

    config, params = load_checkpoint(tiny_checkpoint)
    m = Qwen25VL.from_params(config, params, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="no tokenizer"):
        m.generate([{"role": "user", "content": "hi"}])

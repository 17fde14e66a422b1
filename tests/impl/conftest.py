"""Fixtures of the impl tests that need no files (so tools/gpu_check.sh can run them on a machine
without the shared tokenizer folder): the tiny config's params, the very values the tiny
checkpoint stores (make_random_params, seed 0, bfloat16, with its planted stop)."""

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_params():
    from qwen25vl.tools.make_tiny_checkpoint import make_random_params, plant_stop, tiny_config

    config = tiny_config()
    return config, plant_stop(make_random_params(config, 0, torch.bfloat16))

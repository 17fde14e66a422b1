"""Shared test settings: hypothesis profiles sized for CI (2 cores, several workers)."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from qwen25vl.conformance.threads import warm_threads

# Under pytest-xdist every worker is its own process; torch's default of one thread per core would
# oversubscribe the 2-core CI machine several times over.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
# A new intra-op thread's first work can come out wrong on some CPUs (conformance/threads.py): start them
# before any test computes.
warm_threads()

settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
TOKENIZER_DIR = os.path.join(SHARED, "qwen2_tokenizer")
MODEL_CONFIG_DIR = os.path.join(TOKENIZER_DIR, "model_config")


# --- tiny random checkpoints (tools/make_tiny_checkpoint.py), built once per test session ---


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Folder of the tiny untied checkpoint, hub key layout, bfloat16, seed 0."""
    from qwen25vl.tools.make_tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint_tied(tmp_path_factory):
    """Folder of the tiny checkpoint with tie_word_embeddings (no lm_head.weight stored)."""
    from qwen25vl.tools.make_tiny_checkpoint import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_tied", tied=True)

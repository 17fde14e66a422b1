"""Shared test settings: hypothesis profiles sized for CI (2 cores, several workers)."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
TOKENIZER_DIR = os.path.join(SHARED, "qwen2_tokenizer")
MODEL_CONFIG_DIR = os.path.join(TOKENIZER_DIR, "model_config")

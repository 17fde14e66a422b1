"""Tensor parallelism (impl.tp) on the CPU: 2 gloo processes against TP=1, and the harness under TP.

Each check spawns 2 ranks (torch.multiprocessing, gloo, a free local port, a timeout) running
tests/impl/tp_worker.py; rank 0 writes what it measured and this process judges it.
"""

import json
import socket
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from qwen25vl.impl.tp import tp_heads

from . import tp_worker

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(tmp_path, checkpoint, harness: bool, timeout: float = 120) -> dict:
    ctx = mp.start_processes(
        tp_worker.main,
        args=(2, _free_port(), str(tmp_path), harness, str(FIXTURES), str(checkpoint)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    try:
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the 2 tensor-parallel ranks did not finish in {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return json.loads((tmp_path / "result.json").read_text())


@pytest.mark.parametrize(
    "N,K,W,rank,q,kv",
    [
        (2, 1, 2, 1, [1], [0]),  # the tiny model: one kv head, replicated
        (4, 2, 2, 1, [2, 3], [1]),
        (28, 4, 4, 2, [14, 15, 16, 17, 18, 19, 20], [2]),  # 7B at TP=4
        (64, 8, 8, 7, [56, 57, 58, 59, 60, 61, 62, 63], [7]),  # 72B at TP=8
        (8, 2, 4, 3, [6, 7], [1]),  # ranks 2, 3 share kv head 1
    ],
)
def test_head_assignment(N, K, W, rank, q, kv):
    got_q, got_kv = tp_heads(N, K, W, rank)
    assert list(got_q) == q and list(got_kv) == kv


def test_head_counts_refused():
    with pytest.raises(ValueError, match="must divide num_attention_heads 28"):
        tp_heads(28, 4, 8, 0)
    with pytest.raises(ValueError, match="num_key_value_heads 3 and tensor parallel size 2"):
        tp_heads(6, 3, 2, 0)


def test_tp2_equals_tp1_and_harness_passes(tmp_path, tiny_checkpoint):
    """TP=2 logits and every decoder layer within float32 summation-order noise of TP=1, greedy
    tokens equal; the checkpoint loader that shards layer by layer gives the same shards as sharding
    the whole model; then the conformance harness (fixture model_batch, impl expectations) under TP=2."""
    out = _spawn(tmp_path, tiny_checkpoint, harness=True)
    loaders = out["loaders"]
    assert loaders["same_keys"] and not loaders["unequal"], loaders
    assert loaders["local_heads"] == [2, 1] and loaders["gate_up_rows"] == 2 * 64 // 2, loaders
    for name, heads in (("kv_replicated", [1, 1]), ("kv_sharded", [2, 1])):
        r = out[name]
        assert r["local_heads"] == heads and r["cache_kv_heads"] == heads[1], (name, r)
        assert r["tokens_equal"], (name, r)
        assert r["logits_max_abs"] <= 1e-5 * r["logits_scale"] and r["layer_max_abs"] <= 1e-5, (name, r)
    h = out["harness"]
    assert h["describe"]["tp"] == 2
    statuses = {(case, stage): status for case, stage, status, _ in h["results"]}
    bad = [(k, s, note) for (*k, s, note) in h["results"] if s in ("fail", "error")]
    assert not bad, bad
    assert any(s == "pass" and st.startswith("text.layer.") for (_, st), s in statuses.items())
    assert any(s == "pass" and st == "generate.tokens" for (_, st), s in statuses.items())
    print(json.dumps({k: {m: v for m, v in out[k].items() if m != "tokens"} for k in ("kv_replicated", "kv_sharded")}))


def test_layer_hook_sees_each_layer_before_the_next_is_read():
    """from_pretrained_tp shards in Qwen25VL's layer_hook: a rank holds at most one unsharded layer only
    if the hook runs on layer i before any tensor of layer i+1 is read."""
    import torch
    from qwen25vl.impl.model import Qwen25VL
    from qwen25vl.tools.make_tiny_checkpoint import make_random_params, tiny_config

    config = tiny_config()
    read: list[str] = []

    class Logged:
        """A stored tensor that logs when its values are taken (check_params reads only the shape)."""

        def __init__(self, key, t):
            self.key, self.t, self.shape, self.dtype = key, t, t.shape, t.dtype

        def is_floating_point(self):
            return self.t.is_floating_point()

        def to(self, *args, **kwargs):
            read.append(self.key)
            return self.t.to(*args, **kwargs)

    def layer_of(key):
        return int(key.split(".")[2]) if key.startswith("model.layers.") else None

    seen = []

    def hook(layer):
        later = [k for k in read if (layer_of(k) or -1) > layer.i]
        seen.append((layer.i, max(layer_of(k) for k in read if layer_of(k) is not None), later))

    params = {k: Logged(k, t) for k, t in make_random_params(config, 0, torch.float32).items()}
    Qwen25VL(config, params, dtype=torch.float32, device="cpu", layer_hook=hook)
    assert [i for i, _, _ in seen] == list(range(config.num_hidden_layers))
    assert all(newest == i and not later for i, newest, later in seen), seen

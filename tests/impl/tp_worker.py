"""One rank of tests/impl/test_tp.py (imported by torch.multiprocessing's spawn, so no pytest here).

Each rank builds the TP=1 model and the TP=W model from the same random params, runs both on the
same inputs, and (rank 0) writes the differences to OUT/result.json. It also loads a checkpoint
folder both ways (from_pretrained_tp, which shards each layer as it is read, and from_pretrained +
apply_tp) and compares the shards. With harness=True every rank
also runs the conformance harness on the impl target sharded over the group (in process: every rank
makes the same calls in the same order), and rank 0 writes each stage's status.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist


def _configs():
    from qwen25vl.tools.make_tiny_checkpoint import tiny_config

    c = tiny_config()
    # the tiny model: N = 4, K = 2 (kv heads sharded at TP 2); and N = 2, K = 1 (the one kv head replicated)
    replicated = dataclasses.replace(
        c, num_attention_heads=2, num_key_value_heads=1, mrope_section=(2, 3, 3), intermediate_size=96
    )
    return {"kv_sharded": c, "kv_replicated": replicated}


def _inputs(config):
    from .helpers import vision_inputs

    return vision_inputs(
        config, [[100, 101, 102, 103], [7], [9, 10]], [(0, (1, 6, 10))], [(1, (2, 4, 8))], seed=11, spgt=[0.5]
    )


def compare_models(out: dict) -> None:
    from qwen25vl.impl.model import Qwen25VL
    from qwen25vl.impl.tp import apply_tp
    from qwen25vl.tools.make_tiny_checkpoint import make_random_params

    for name, config in _configs().items():
        params = make_random_params(config, 0, torch.bfloat16)
        inputs = _inputs(config)
        one = Qwen25VL.from_params(config, params, dtype=torch.float32, device="cpu")
        tp = Qwen25VL.from_params(config, params, dtype=torch.float32, device="cpu")
        apply_tp(tp, dist.group.WORLD)
        want_logits, want = one.forward(inputs, capture="text")
        got_logits, got = tp.forward(inputs, capture="text")
        real = inputs["attention_mask"].bool()
        diffs = {k: (got[k][real] - want[k][real]).abs().max().item() for k in want if k.startswith("text.layer")}
        want_tokens = one.generate_from_inputs(inputs, 12, [151645])
        got_tokens = tp.generate_from_inputs(inputs, 12, [151645])
        out[name] = {
            "local_heads": [tp.text.layers[0].attn.N, tp.text.layers[0].attn.K],
            "cache_kv_heads": tp.cache.k.shape[2],
            "logits_max_abs": (got_logits[real] - want_logits[real]).abs().max().item(),
            "logits_scale": want_logits[real].abs().max().item(),
            "layer_max_abs": max(diffs.values()),
            "tokens_equal": bool(torch.equal(got_tokens, want_tokens)),
            "tokens": got_tokens.tolist(),
        }


def compare_loaders(out: dict, checkpoint: str) -> None:
    """from_pretrained_tp (each layer sharded as it is read) against from_pretrained + apply_tp."""
    from qwen25vl.impl.model import Qwen25VL
    from qwen25vl.impl.tp import apply_tp, from_pretrained_tp

    sharded_on_load = from_pretrained_tp(checkpoint, dist.get_world_size(), dtype=torch.float32, device="cpu")
    sharded_after = Qwen25VL.from_pretrained(checkpoint, dtype=torch.float32, device="cpu")
    apply_tp(sharded_after, dist.group.WORLD)
    got, want = sharded_on_load.state_dict(), sharded_after.state_dict()
    out["loaders"] = {
        "same_keys": list(got) == list(want),
        "unequal": [k for k in want if k in got and not torch.equal(got[k], want[k])],
        "local_heads": [sharded_on_load.text.layers[0].attn.N, sharded_on_load.text.layers[0].attn.K],
        "gate_up_rows": sharded_on_load.text.layers[0].mlp.gate_up.weight.shape[0],
    }


def run_harness(out: dict, fixtures: str) -> None:
    from qwen25vl.conformance import runner
    from qwen25vl.conformance.adapters.impl import ImplAdapter
    from qwen25vl.conformance.cli import default_expectations

    paths = runner.select_cases(fixtures, "^model_batch$")  # left padding, 2 images, decode: one case keeps it short
    adapter = ImplAdapter(dtype="float32", device="cpu", tp_group=dist.group.WORLD)
    opts = runner.SuiteOptions(target="impl", in_process=True, timeout=120)
    expectations = runner.load_expectations(default_expectations("impl"))
    desc, results = runner.run_suite(paths, opts, adapter=adapter, expectations=expectations)
    out["harness"] = {"describe": desc, "results": [[r.case, r.stage, r.status, r.note] for r in results]}


def main(rank: int, world: int, port: int, out_dir: str, harness: bool, fixtures: str, checkpoint: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out: dict = {}
        compare_models(out)
        compare_loaders(out, checkpoint)
        if harness:
            run_harness(out, fixtures)
        if rank == 0:
            (Path(out_dir) / "result.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()
